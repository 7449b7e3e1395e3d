#!/usr/bin/env bash
# Prepare throughput, lmtrain vs the Hugging Face `datasets` tutorial pipeline, side by side.
#
#   benches/prepare_vs_datasets.sh [SIZE_MB]      (default 100; run from the repository root)
#
# Builds a corpus of at least SIZE_MB by repeating the embedded King James Bible (one
# verse per line) into target/bench-data/ (never committed), then times on it:
#   lmtrain:  train prepare CORPUS --tokenizer data/tokenizers/gpt2.tokenizer.json
#             (block size 128, all cores, EOS after every document)
#   datasets: load_dataset("text") -> map(tokenize, batched, num_proc=NPROC) -> map(group_texts)
#             (benches/prepare_datasets.py; skipped when `datasets` is not importable)
# Both sides use the same GPT-2 tokenizer.json and block size. The ratio compares wall
# time for the whole job (process start to store written), which is what a user waits for.
set -euo pipefail
cd "$(dirname "$0")/.."

size_mb=${1:-100}
nproc=$(nproc)
tokenizer=data/tokenizers/gpt2.tokenizer.json
work=target/bench-data
mkdir -p "$work"
corpus=$work/kjv-${size_mb}mb.txt
if [[ ! -s $corpus ]]; then
    gunzip -c data/corpus/kjv.txt.gz > "$work/kjv.txt"
    : > "$corpus"
    while (( $(stat -c %s "$corpus") < size_mb * 1000 * 1000 )); do
        cat "$work/kjv.txt" >> "$corpus"
    done
fi
echo "corpus: $corpus ($(( $(stat -c %s "$corpus") / 1000000 )) MB, $(wc -l < "$corpus") lines), $nproc cores"

cargo build --release --quiet --bin train
now() { date +%s.%N; }

rm -rf "$work/lmtrain-out"
t0=$(now)
./target/release/train prepare "$corpus" --tokenizer "$tokenizer" --block-size 128 \
    --output-dir "$work/lmtrain-out" --quiet | tee "$work/lmtrain.log"
t1=$(now)
rust_s=$(echo "$t1 - $t0" | bc -l)
rust_tokens=$(awk '$1 == "train" { print $4 }' "$work/lmtrain.log")
printf 'lmtrain:  %s tokens in %.2f s wall = %.0f tokens/s\n' "$rust_tokens" "$rust_s" "$(echo "$rust_tokens / $rust_s" | bc -l)"

if ! python3 -c "import datasets, transformers" 2>/dev/null; then
    echo "datasets: not installed (pip install datasets transformers); skipped"
    exit 0
fi
t0=$(now)
py_json=$(python3 benches/prepare_datasets.py "$corpus" --tokenizer "$tokenizer" --block-size 128 --num-proc "$nproc")
t1=$(now)
py_s=$(echo "$t1 - $t0" | bc -l)
echo "$py_json"
py_tokens=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['tokens'])" "$py_json")
printf 'datasets: %s tokens in %.2f s wall = %.0f tokens/s\n' "$py_tokens" "$py_s" "$(echo "$py_tokens / $py_s" | bc -l)"
printf 'speed-up (datasets wall / lmtrain wall): %.2fx\n' "$(echo "$py_s / $rust_s" | bc -l)"
