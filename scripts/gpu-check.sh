#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and its driver (no Rust toolchain needed): run a bundle made
# by scripts/gpu-bundle.sh — every CUDA test on the real driver, the kernel benchmarks, and two
# short bf16 training runs (GPT-2 124M at T=1024, BERT-base MLM at T=128) that report tokens/s
# and MFU — then print a one-screen summary. Exit status 1 if anything failed.
#
#   scripts/gpu-bundle.sh            # where cargo is: builds target/gpu-bundle
#   target/gpu-bundle/gpu-check.sh   # on the GPU machine (copy the directory there)
#
# Environment: GPU_CHECK_STEPS (training steps per run, default 40), GPU_CHECK_BENCH_ITERS
# (default 20), GPU_PEAK_TFLOPS (dense bf16 peak for MFU; default from the GPU's name: H100 /
# H200 989, A100 312), GPU_CHECK_EMULATOR=DIR (run against lmtrain's CPU emulator in DIR
# instead of a GPU, with tiny training runs: checks this script, measures nothing).
# The whole check is sized to finish inside 10 minutes on an H100. Logs stay in a printed
# temporary directory.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ -x "$here/bin/train" ]; then
    bundle="$here"
elif [ -x "$here/../target/gpu-bundle/bin/train" ]; then
    bundle="$(cd "$here/../target/gpu-bundle" && pwd)"
else
    echo "gpu-check: no bundle next to this script or in target/gpu-bundle; build one with scripts/gpu-bundle.sh" >&2
    exit 1
fi
train="$bundle/bin/train"
steps="${GPU_CHECK_STEPS:-40}"
logs="$(mktemp -d -t lmtrain-gpu-check.XXXXXX)"
status=0

if [ -n "${GPU_CHECK_EMULATOR:-}" ]; then
    export LD_LIBRARY_PATH="$GPU_CHECK_EMULATOR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" LMTRAIN_CUEMU=1 LMTRAIN_CUDA_CHILD=1
    gpu="lmtrain CPU emulator ($GPU_CHECK_EMULATOR)"
    peak="${GPU_PEAK_TFLOPS:-0}"
    tiny=1
    # LMTRAIN_CUEMU=1 is set for the whole run here, so the test of its refusal cannot pass
    skip=(--skip emulator_refused_outside_tests)
else
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu-check: no NVIDIA GPU/driver found (nvidia-smi); nothing to check" >&2
        exit 1
    fi
    gpu="$(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader -i 0)"
    case "$gpu" in
        *H100* | *H200* | *GH200*) peak_default=989 ;;
        *A100*) peak_default=312 ;;
        *) peak_default=0 ;;
    esac
    peak="${GPU_PEAK_TFLOPS:-$peak_default}"
    export LMTRAIN_CUDA_REAL=1
    unset LMTRAIN_CUEMU LMTRAIN_CUDA_CHILD CUEMU_SCHED
    tiny=0
    skip=()
fi
export LMTRAIN_TRAIN_BIN="$train" LMTRAIN_DATA_DIR="$bundle/data"
echo "gpu-check: $gpu; bundle $bundle ($(head -n 1 "$bundle/MANIFEST" 2>/dev/null)); logs in $logs" >&2

# 1. Every CUDA test, one at a time (they share the GPU).
: >"$logs/tests.log"
for t in "$bundle"/tests/*; do
    echo "     Running tests/$(basename "$t")" >>"$logs/tests.log"
    if ! timeout 300 "$t" --test-threads=1 "${skip[@]}" >>"$logs/tests.log" 2>&1; then
        status=1
    fi
done

# 2. Kernel benchmarks: the simple CUDA-event table, and the fused kernels under criterion at
#    GPT-2 124M and BERT-base shapes (throughput in bytes or FLOPs per second).
small=()
[ "$tiny" = 1 ] && small=(--small)
if ! timeout 180 "$bundle/benches/cuda_kernels" --iters "${GPU_CHECK_BENCH_ITERS:-20}" "${small[@]}" >"$logs/bench.log" 2>&1; then
    status=1
fi
if [ "$tiny" = 0 ]; then
    if ! timeout 240 "$bundle/benches/cuda_fused" --bench --warm-up-time 1 --measurement-time 2 >"$logs/bench-fused.log" 2>&1; then
        status=1
    fi
fi

# 3. Training runs, bf16 on the GPU: the data prepared from the bundle's corpus, a fresh model
#    of the real size (tiny under the emulator), median tokens/s of the logged windows after the
#    first, and MFU = tokens/s x model FLOPs per token (llm.c's count: 6 N + 6 L C T, N the
#    parameters) / the dense bf16 peak.
train_run() { # name model-type tokenizer block layers width heads batch
    local name=$1 mt=$2 tok=$3 block=$4 layers=$5 width=$6 heads=$7 batch=$8 kind=causal
    [ "$mt" = bert ] && kind=masked
    local dir="$logs/$name"
    if ! "$train" prepare "$bundle/data/corpus/kjv.txt.gz" --tokenizer "$bundle/data/tokenizers/$tok" --model-type "$kind" \
        --block-size "$block" -o "$dir/data" >"$dir.prepare.log" 2>&1; then
        echo "| $name | prepare failed (see $dir.prepare.log) | | | |"
        status=1
        return
    fi
    if ! timeout 300 "$train" --data "$dir/data" --model-type "$mt" --n-layer "$layers" --n-embd "$width" --n-head "$heads" \
        --n-positions "$block" --device cuda --dtype bf16 --per-device-train-batch-size "$batch" --max-steps "$steps" \
        --learning-rate 3e-4 --warmup-steps 5 --logging-steps 5 --save-strategy no --no-progress --output-dir "$dir/out" \
        >"$dir.log" 2>&1; then
        echo "| $name | failed: $(grep -m1 '^error' "$dir.log") | | | |"
        status=1
        return
    fi
    local params med loss
    params="$(sed -n 's/.*(\([0-9.]*\)M parameters).*/\1/p' "$dir.log" | head -n 1)"
    # the first logged window holds the warm-up
    med="$(grep -o '"tokens_per_s":[0-9.e+-]*' "$dir/out/metrics.jsonl" | cut -d: -f2 | tail -n +2 | sort -g |
        awk '{ v[NR] = $1 } END { if (NR) print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')"
    loss="$(grep -o '"loss":[0-9.e+-]*' "$dir/out/metrics.jsonl" | tail -n 1 | cut -d: -f2)"
    if [ -z "$med" ] || [ -z "$params" ]; then
        echo "| $name | no throughput logged (see $dir.log) | | | |"
        status=1
        return
    fi
    awk -v name="$name" -v params="$params" -v l="$layers" -v c="$width" -v t="$block" -v peak="$peak" \
        -v bt="$((batch * block))" -v med="$med" -v loss="$loss" 'BEGIN {
            flops = 6 * params * 1e6 + 6 * l * c * t
            mfu = peak > 0 ? sprintf("%.1f%%", 100 * med * flops / (peak * 1e12)) : "n/a"
            printf "| %s | %.2fM params, %d tokens/step | %.0f | %s | %.3f |\n", name, params, bt, med, mfu, loss
        }'
}
if [ "$tiny" = 1 ]; then
    runs=("gpt2-tiny gpt2 gpt2.tokenizer.json 32 2 64 2 2" "bert-tiny bert bert-base-uncased.tokenizer.json 32 2 64 2 2")
else
    runs=("gpt2-124M gpt2 gpt2.tokenizer.json 1024 12 768 12 8" "bert-base bert bert-base-uncased.tokenizer.json 128 12 768 12 64")
fi
: >"$logs/train.md"
for r in "${runs[@]}"; do
    # shellcheck disable=SC2086
    train_run $r >>"$logs/train.md"
done

echo
echo "## lmtrain GPU check"
echo
echo "GPU: $gpu"
echo "bundle: $(tr '\n' ';' <"$bundle/MANIFEST" 2>/dev/null)"
echo
echo "| tests | passed | failed | skipped |"
echo "|---|---|---|---|"
awk '
    /^ *Running / { name = $2 }
    /^test result:/ {
        passed = $4; failed = $6; sub(";", "", passed); sub(";", "", failed)
        printf "| %s | %s | %s | %d |\n", name, passed, failed, skips[name]
    }
    /^SKIP / { skips[name]++ }
' "$logs/tests.log"
if grep -q "FAILED\|panicked\|^error" "$logs/tests.log"; then
    echo
    echo "Failures:"
    grep -E "^test .* FAILED$|panicked at|^error" "$logs/tests.log" | head -n 20
fi
echo
echo "Kernel benchmark (CUDA events, mean per call):"
echo
grep -E "^(\||device:|SKIP|error)" "$logs/bench.log" || { echo "(no bench output; see $logs/bench.log)"; status=1; }
if [ "$tiny" = 0 ]; then
    echo
    echo "Fused kernels (criterion; thrpt in B/s for memory-bound kernels, elem/s = FLOP/s for attention):"
    echo
    grep -E "^(gpt2|bert)|thrpt:|^SKIP|^error" "$logs/bench-fused.log" | sed 's/^ *//' | paste - - 2>/dev/null | awk '{$1=$1};1' \
        || { echo "(no fused-bench output; see $logs/bench-fused.log)"; status=1; }
fi
echo
echo "Training, bf16, $steps steps (tokens/s: median of the logged windows after the first; MFU against $peak TFLOP/s):"
echo
echo "| run | size | tokens/s | MFU | last loss |"
echo "|---|---|---|---|---|"
cat "$logs/train.md"
echo
[ "$status" = 0 ] && echo "gpu-check: OK" || echo "gpu-check: FAILED (logs: $logs)"
exit "$status"
