#!/usr/bin/env python3
"""Check that Hugging Face transformers loads a masked-LM directory lmtrain saved and computes the
same loss on the same masked batches (issue 10 item 6, issue 12 item 4).

MODEL_DIR holds config.json + model.safetensors (BERT, DistilBERT, RoBERTa or DeBERTa-v2). Each
BATCH file is a safetensors file with int64 `input_ids`, `labels` (-100 = ignored) and optionally
`attention_mask`, `token_type_ids` (all [B, T]) and `loss` (float32 [1]: lmtrain's loss on that
batch, compared when present) -- the fixtures' golden.safetensors files have this layout, so
`check_mlm_load.py crates/model/tests/fixtures/bert_odd crates/model/tests/fixtures/bert_odd/golden.safetensors`
is a self-test. The model is loaded with AutoModelForMaskedLM (eager attention, float32, eval
mode); loading fails the check when transformers reports missing or unexpected tensors
(lmtrain's files must load cleanly; tied tensors are not reported as missing).

Prints one line per batch and a JSON summary as the last line:
  {"class": ..., "batches": N, "mean_batch_loss": ..., "token_loss": ..., "perplexity": ...,
   "worst_rel_diff": ... or null}
where token_loss = sum of cross-entropy over all labelled tokens / their count and
perplexity = exp(token_loss) (HF's "perplexity = exp(eval_loss)" on equal-sized batches).
Exit status 1 when a batch's loss differs from its stored `loss` by more than --rtol, or from
--expect-loss (compared with token_loss).

usage: HF_HUB_OFFLINE=1 python3 scripts/golden/check_mlm_load.py MODEL_DIR BATCH [BATCH ...]
           [--expect-loss X] [--rtol 1e-5]
"""
import argparse
import inspect
import json
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForMaskedLM  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("batches", nargs="+")
    ap.add_argument("--expect-loss", type=float, default=None)
    ap.add_argument("--rtol", type=float, default=1e-5)
    a = ap.parse_args()

    model, info = AutoModelForMaskedLM.from_pretrained(a.model_dir, attn_implementation="eager",
                                                       dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        print(f"{a.model_dir}: transformers did not load the files cleanly: {bad}")
        sys.exit(1)
    model.eval()
    cls = type(model).__name__
    accepts_types = "token_type_ids" in inspect.signature(model.forward).parameters

    ok = True
    worst = None
    total_ce, total_n, batch_losses = 0.0, 0, []
    for path in a.batches:
        g = load_file(path)
        kw = dict(input_ids=g["input_ids"], labels=g["labels"])
        if "attention_mask" in g:
            kw["attention_mask"] = g["attention_mask"]
        if "token_type_ids" in g and accepts_types:
            kw["token_type_ids"] = g["token_type_ids"]
        with torch.no_grad():
            out = model(**kw)
        loss = out.loss.item()
        n = int((g["labels"] != -100).sum())
        ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).double(),
                                               g["labels"].reshape(-1), ignore_index=-100, reduction="sum").item()
        total_ce += ce
        total_n += n
        batch_losses.append(loss)
        line = f"{path}: transformers {cls} loss {loss:.7f} over {n} labelled tokens"
        if "loss" in g:
            ours = g["loss"].reshape(-1)[0].item()
            rel = abs(loss - ours) / max(abs(loss), 1e-30)
            worst = rel if worst is None else max(worst, rel)
            line += f", lmtrain {ours:.7f}, relative difference {rel:.2e}"
            if rel > a.rtol:
                ok = False
                line += " MISMATCH"
        print(line)
    token_loss = total_ce / max(total_n, 1)
    if a.expect_loss is not None:
        rel = abs(token_loss - a.expect_loss) / max(abs(token_loss), 1e-30)
        worst = rel if worst is None else max(worst, rel)
        print(f"token loss {token_loss:.7f} vs expected {a.expect_loss:.7f}: relative difference {rel:.2e}")
        ok = ok and rel <= a.rtol
    print(json.dumps(dict(cls=cls, batches=len(batch_losses), mean_batch_loss=sum(batch_losses) / len(batch_losses),
                          token_loss=token_loss, perplexity=math.exp(token_loss), worst_rel_diff=worst,
                          ok=ok)))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
