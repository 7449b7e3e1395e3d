#!/usr/bin/env python3
"""Check that Hugging Face transformers loads a GPT-2 saved by lmtrain-hf and computes the same loss.

For each fixture: the `resave` example loads it, moves the weights by one gradient step, saves
them with lmtrain_hf::save_gpt2 and prints lmtrain's loss on the fixture batch; this script then
loads that directory with GPT2LMHeadModel.from_pretrained and compares the losses.

usage (repository root, needs torch + transformers):
    HF_HUB_OFFLINE=1 python3 scripts/golden/check_hf_load.py
"""
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402

FIXTURES = "crates/model/tests/fixtures"


def main():
    worst = 0.0
    for name in sorted(n for n in os.listdir(FIXTURES) if n.startswith("gpt2_")):  # the MLM fixtures have their own check_mlm_load.py
        src = os.path.join(FIXTURES, name)
        with tempfile.TemporaryDirectory() as out:
            res = subprocess.run(
                ["cargo", "run", "--quiet", "--release", "-p", "lmtrain-hf", "--example", "resave", "--", src, out],
                check=True, capture_output=True, text=True)
            ours = json.loads(res.stdout.strip().splitlines()[-1])
            model = GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager").eval()
            g = load_file(os.path.join(src, "golden.safetensors"))
            with torch.no_grad():
                loss = model(input_ids=g["input_ids"], labels=g["labels"]).loss.item()
            rel = abs(loss - ours["loss"]) / abs(loss)
            worst = max(worst, rel)
            print(f"{name}: lmtrain loss {ours['loss']:.7f} (before the step {ours['loss_before']:.7f}), "
                  f"transformers on lmtrain's files {loss:.7f}, relative difference {rel:.2e}")
    ok = worst <= 1e-5
    print("OK" if ok else "MISMATCH", f"worst relative difference {worst:.2e}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
