#!/usr/bin/env python3
"""PyTorch side of the training benchmark: Hugging Face GPT2LMHeadModel + torch.optim.AdamW,
eager float32 on the CPU, the same step as lmtrain's trainer (forward with labels, backward,
clip_grad_norm_(1.0), AdamW with weight-decay groups).

Default config = the issue's benchmark: n_layer 4, n_head 4, n_embd 256, vocab 50257,
batch 8, block 128, 2 threads. Prints a human line on stderr and one JSON object on stdout.

    python3 benches/train_gpt2_pytorch.py [--threads 2] [--steps 20] [--compile]
"""
import argparse

from torch_step import time_training


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--dropout", type=float, default=0.1, help="embd/attn/resid dropout (HF default 0.1)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="stop timing after this long")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                    help="HF attention implementation (sdpa is transformers' default)")
    args = ap.parse_args()

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=args.vocab, n_positions=args.block, n_embd=args.n_embd, n_layer=args.n_layer,
        n_head=args.n_head, embd_pdrop=args.dropout, attn_pdrop=args.dropout, resid_pdrop=args.dropout,
    )
    cfg._attn_implementation = args.attn
    model = GPT2LMHeadModel(cfg).float()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.block), generator=gen)
    no_decay = lambda n: n.endswith("bias") or ".ln_" in n or n.startswith("transformer.ln_f")  # noqa: E731
    time_training(args, model, no_decay, dict(input_ids=ids, labels=ids))


if __name__ == "__main__":
    main()
