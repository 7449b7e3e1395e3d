#!/usr/bin/env python3
"""PyTorch side of the BERT masked-LM training benchmark: Hugging Face BertForMaskedLM +
torch.optim.AdamW, eager float32 on the CPU, the same step as lmtrain's trainer (forward with
labels, backward, clip_grad_norm_(1.0), AdamW with weight-decay groups). 15% of the tokens carry a
label (80% of them [MASK], 10% random, 10% kept), as DataCollatorForLanguageModeling makes them;
the model computes its MLM head on every position, as transformers does.

Default config = the issue's benchmark: 4 layers, hidden 256, 4 heads, intermediate 1024, vocab
30522, batch 8, block 128, HF default dropout 0.1, 2 threads. Prints a human line on stderr and
one JSON object on stdout.

    python3 benches/train_bert_pytorch.py [--threads 2] [--steps 20] [--compile]
"""
import argparse
import json
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=30522)
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
    from transformers import BertConfig, BertForMaskedLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=args.intermediate,
        max_position_embeddings=args.block,
    )
    cfg._attn_implementation = args.attn
    model = BertForMaskedLM(cfg).float()
    model.train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=5e-5, betas=(0.9, 0.999), eps=1e-8, foreach=True,
    )
    step_model = torch.compile(model) if args.compile else model
    gen = torch.Generator().manual_seed(1)
    original = torch.randint(1000, args.vocab, (args.batch, args.block), generator=gen)
    chosen = torch.rand(original.shape, generator=gen) < args.mlm_probability
    labels = torch.where(chosen, original, torch.full_like(original, -100))
    ids = original.clone()
    split = torch.rand(original.shape, generator=gen)
    ids[chosen & (split < 0.8)] = 103
    rand = chosen & (split >= 0.8) & (split < 0.9)
    ids[rand] = torch.randint(1000, args.vocab, (int(rand.sum()),), generator=gen)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = step_model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    times = []
    t_start = time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > args.max_seconds:
            break
    times.sort()
    median = times[len(times) // 2]
    tokens = args.batch * args.block
    result = {
        "impl": "pytorch" + ("-compile" if args.compile else "-eager"),
        "torch": torch.__version__,
        "threads": args.threads,
        "attn": model.config._attn_implementation,
        "labels": int(chosen.sum()),
        "steps": len(times),
        "step_ms_median": median * 1e3,
        "tokens_per_s": tokens / median,
        "tokens_per_s_mean": tokens * len(times) / sum(times),
        "params": sum(p.numel() for p in model.parameters()),
    }
    print(f"{result['impl']}: {result['tokens_per_s']:.0f} tokens/s (median step {median*1e3:.1f} ms over "
          f"{len(times)} steps, {args.threads} threads)", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
