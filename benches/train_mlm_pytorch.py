#!/usr/bin/env python3
"""PyTorch side of the masked-LM training benchmarks: Hugging Face BertForMaskedLM (--family bert)
or DebertaV2ForMaskedLM (--family deberta, DeBERTa-v3's attention settings) + torch.optim.AdamW, eager float32 on the CPU, the same step as lmtrain's trainer (forward with
labels, backward, clip_grad_norm_(1.0), AdamW with weight-decay groups). 15% of the tokens carry a
label (80% of them [MASK], 10% random, 10% kept), as DataCollatorForLanguageModeling makes them;
the model computes its MLM head on every position, as transformers does.

Default config = the issues' benchmarks: 4 layers, hidden 256, 4 heads, intermediate 1024, batch
8, block 128, HF default dropout 0.1, 2 threads; vocabulary 30522 (BERT) or 128100 (DeBERTa-v3:
relative attention, c2p|p2c, 256 position buckets, shared keys, LayerNorm on the relative
embeddings). Prints a human line on stderr and one JSON object on stdout.

    python3 benches/train_mlm_pytorch.py [--family bert|deberta] [--threads 2] [--steps 20] [--compile]
"""
import argparse

from torch_step import time_training


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="bert", choices=["bert", "deberta"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=None, help="30522 (bert) or 128100 (deberta)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--mlm-probability", type=float, default=0.15)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="stop timing after this long")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                    help="HF attention implementation (sdpa is transformers' default)")
    args = ap.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                 intermediate_size=args.intermediate)
    if args.family == "bert":
        args.vocab = args.vocab or 30522
        cfg = transformers.BertConfig(vocab_size=args.vocab, max_position_embeddings=args.block, **sizes)
        cls = transformers.BertForMaskedLM
    else:
        args.vocab = args.vocab or 128100
        # deberta-v3-base's attention settings
        cfg = transformers.DebertaV2Config(
            vocab_size=args.vocab, max_position_embeddings=512, relative_attention=True, position_buckets=256,
            norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False,
            max_relative_positions=-1, type_vocab_size=0, layer_norm_eps=1e-7, **sizes)
        cls = transformers.DebertaV2ForMaskedLM
    if args.family == "bert":
        cfg._attn_implementation = args.attn
    model = cls(cfg).float()
    gen = torch.Generator().manual_seed(1)
    original = torch.randint(1000, args.vocab, (args.batch, args.block), generator=gen)
    chosen = torch.rand(original.shape, generator=gen) < args.mlm_probability
    labels = torch.where(chosen, original, torch.full_like(original, -100))
    ids = original.clone()
    split = torch.rand(original.shape, generator=gen)
    ids[chosen & (split < 0.8)] = 103
    rand = chosen & (split >= 0.8) & (split < 0.9)
    ids[rand] = torch.randint(1000, args.vocab, (int(rand.sum()),), generator=gen)
    no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n  # noqa: E731
    time_training(args, model, no_decay, dict(input_ids=ids, labels=labels), family=args.family,
                  labels=int(chosen.sum()))


if __name__ == "__main__":
    main()
