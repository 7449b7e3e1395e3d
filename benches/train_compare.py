#!/usr/bin/env python3
"""Runs a training benchmark side by side: lmtrain's CPU backend (`cargo bench --bench train_MODEL`)
and PyTorch eager float32 (benches/train_gpt2_pytorch.py or train_mlm_pytorch.py, Hugging Face + torch.optim.AdamW), same
config, same thread count; prints a Markdown table and the ratio.

  --model gpt2: GPT2LMHeadModel, n_layer 4, n_head 4, n_embd 256, vocab 50257, batch 8 x 128
  --model bert: BertForMaskedLM, 4 layers, hidden 256, 4 heads, intermediate 1024, vocab 30522,
                batch 8 x 128, 15% masking (lmtrain also reports its MLM head on every position)
  --model deberta: DebertaV2ForMaskedLM with DeBERTa-v3's attention, the same sizes, vocab 128100

    python3 benches/train_compare.py [--model gpt2|bert|deberta] [--threads 2] [--steps 10] [--compile] [--repeat N]

Run it on a quiet machine: both sides are timed by their median step.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def last_json(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit("no JSON result in the output:\n" + text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2", choices=["gpt2", "bert", "deberta"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument("--repeat", type=int, default=1,
                    help="alternate the two sides this many times and report every pair and the median ratio "
                         "(the machine's speed drifts by several percent between runs)")
    args = ap.parse_args()

    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    bench, bench_args = ("train_gpt2", []) if args.model == "gpt2" else ("train_mlm", ["--family", args.model])
    script, script_args = ("train_gpt2_pytorch.py", []) if args.model == "gpt2" else ("train_mlm_pytorch.py", ["--family", args.model])

    def ours():
        print(f"== lmtrain (cargo bench --bench {bench}, RAYON_NUM_THREADS={args.threads})", file=sys.stderr)
        out = subprocess.run(
            ["cargo", "bench", "-q", "--bench", bench, "--", *bench_args, "--json", "--steps", str(args.steps)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, check=True,
        )
        return last_json(out.stdout)

    def theirs(extra):
        print(f"== PyTorch {' '.join(extra) or 'eager'}", file=sys.stderr)
        try:
            out = subprocess.run(
                [sys.executable, str(ROOT / "benches" / script), *script_args, "--threads", str(args.threads),
                 "--steps", str(max(args.steps, 5))] + extra,
                cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True,
            )
            return last_json(out.stdout)
        except (subprocess.CalledProcessError, FileNotFoundError) as e:
            print(f"PyTorch side failed ({e}); is torch + transformers installed?", file=sys.stderr)
            return None

    pairs = []
    for _ in range(args.repeat):
        pairs.append((ours(), theirs([])))
    rows = [pairs[-1][0]] + ([pairs[-1][1]] if pairs[-1][1] else [])
    if args.compile:
        compiled = theirs(["--compile"])
        if compiled:
            rows.append(compiled)
    eager = next((r for r in rows if r["impl"] == "pytorch-eager"), None)
    print()
    if args.model == "gpt2":
        print(f"GPT-2 training step, n_layer 4, n_head 4, n_embd 256, vocab 50257, batch 8 x 128, {args.threads} threads")
    else:
        vocab = 30522 if args.model == "bert" else 128100
        print(f"{args.model} masked-LM training step, 4 layers x 256, intermediate 1024, vocab {vocab}, batch 8 x 128, "
              f"15% masked, {args.threads} threads")
    print()
    print("| implementation | tokens/s (median step) | step ms | vs PyTorch eager |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        ratio = f"{r['tokens_per_s'] / eager['tokens_per_s']:.2f}x" if eager else "n/a"
        print(f"| {r['impl']} | {r['tokens_per_s']:.0f} | {r['step_ms_median']:.1f} | {ratio} |")
        if "all_rows_tokens_per_s" in r:
            ratio = f"{r['all_rows_tokens_per_s'] / eager['tokens_per_s']:.2f}x" if eager else "n/a"
            print(f"| {r['impl']}, MLM head on every position | {r['all_rows_tokens_per_s']:.0f} | "
                  f"{r['all_rows_step_ms_median']:.1f} | {ratio} |")
    if args.repeat > 1 and all(t for _, t in pairs):
        ratios = sorted(o["tokens_per_s"] / t["tokens_per_s"] for o, t in pairs)
        print()
        print(f"{args.repeat} alternating runs (lmtrain, then PyTorch eager):")
        print()
        print("| run | lmtrain tokens/s | PyTorch eager tokens/s | ratio |")
        print("| ---: | ---: | ---: | ---: |")
        for i, (o, t) in enumerate(pairs, 1):
            print(f"| {i} | {o['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | {o['tokens_per_s'] / t['tokens_per_s']:.2f}x |")
        if all("all_rows_tokens_per_s" in o for o, _ in pairs):
            all_rows = sorted(o["all_rows_tokens_per_s"] / t["tokens_per_s"] for o, t in pairs)
            print()
            print(f"lmtrain with the MLM head on every position: median ratio {all_rows[len(all_rows) // 2]:.2f}x")
        print()
        print(f"median ratio {ratios[len(ratios) // 2]:.2f}x (range {ratios[0]:.2f}x - {ratios[-1]:.2f}x)")
    if "ops" in rows[0]:
        print()
        print("lmtrain per-op time per step (timed backend):")
        print()
        print("| op | ms/step |")
        print("| --- | ---: |")
        for op in rows[0]["ops"]:
            print(f"| {op['op']} | {op['ms_per_step']:.2f} |")


if __name__ == "__main__":
    main()
