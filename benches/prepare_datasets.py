"""The Hugging Face `datasets` side of the prepare benchmark (see prepare_vs_datasets.sh).

Runs the language-modeling tutorial's pipeline on a text file:
load_dataset("text") -> map(tokenize, batched=True, num_proc=N) -> map(group_texts,
batched=True, num_proc=N), block size 128, with the GPT-2 tokenizer from a local
tokenizer.json, in a fresh cache directory (nothing reused between runs), and prints the
token count, the seconds and tokens/s as one JSON line.
"""

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--num-proc", type=int, default=2)
    args = ap.parse_args()

    datasets.disable_progress_bars()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=args.tokenizer)
    block_size = args.block_size

    def tokenize_function(examples):
        return tokenizer(examples["text"])

    def group_texts(examples):
        # The tutorial's group_texts, as written there.
        concatenated = {k: sum(examples[k], []) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
            for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        raw = datasets.load_dataset("text", data_files={"train": args.corpus}, cache_dir=cache)
        tokenized = raw.map(
            tokenize_function, batched=True, num_proc=args.num_proc, remove_columns=["text"]
        )
        tokenize_done = time.perf_counter()
        lm = tokenized.map(group_texts, batched=True, num_proc=args.num_proc)
        end = time.perf_counter()
        tokens = sum(len(ids) for ids in tokenized["train"]["input_ids"])
        blocks = lm["train"].num_rows
    seconds = end - start
    print(
        json.dumps(
            {
                "side": "datasets",
                "tokens": tokens,
                "blocks": blocks,
                "seconds": round(seconds, 2),
                "tokenize_seconds": round(tokenize_done - start, 2),
                "tokens_per_s": round(tokens / seconds),
            }
        )
    )


if __name__ == "__main__":
    main()
