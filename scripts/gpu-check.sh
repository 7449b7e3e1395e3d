#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: compile the kernels for it, run every CUDA test against the
# real driver (LMTRAIN_CUDA_REAL=1: in-process, no emulator), run the kernel benchmarks, and
# print a short summary. Exit status 1 if anything failed.
#
#   scripts/gpu-check.sh
#
# Environment: NVCC (default: $CUDA_HOME, /usr/local/cuda or PATH, else the pinned wheels of
# scripts/cuda-toolchain.sh),
# LMTRAIN_CUDA_ARCHS (default: 80,90 plus the GPU's own compute capability),
# GPU_CHECK_BENCH_ITERS (default 20). Logs are kept in a printed temporary directory.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu-check: no NVIDIA GPU/driver found (nvidia-smi); nothing to check" >&2
    exit 1
fi
gpu="$(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader -i 0)"
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader -i 0 | tr -d ' .')" # "9.0" -> 90

# nvcc: $NVCC, else the machine's own toolkit (it matches its driver), else the pinned wheels.
if [ -z "${NVCC:-}" ]; then
    for cand in "${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda/bin/nvcc "$(command -v nvcc || true)"; do
        if [ -n "$cand" ] && [ -x "$cand" ]; then NVCC="$(readlink -f "$cand")"; break; fi
    done
fi
if [ -z "${NVCC:-}" ]; then
    NVCC="$(scripts/cuda-toolchain.sh)" || { echo "gpu-check: no nvcc and cannot install one" >&2; exit 1; }
fi
export NVCC
export LMTRAIN_CUDA_ARCHS="${LMTRAIN_CUDA_ARCHS:-80,90,$cap}"
export LMTRAIN_REQUIRE_CUDA=1 LMTRAIN_CUDA_REAL=1
unset LMTRAIN_CUEMU LMTRAIN_CUDA_CHILD CUEMU_SCHED

logs="$(mktemp -d -t lmtrain-gpu-check.XXXXXX)"
status=0
echo "gpu-check: $gpu; archs $LMTRAIN_CUDA_ARCHS; logs in $logs" >&2

# Every CUDA test of lmtrain-cuda, one at a time (they share the GPU).
if ! cargo test --release -p lmtrain-cuda --no-fail-fast -- --test-threads=1 --nocapture >"$logs/tests.log" 2>&1; then
    status=1
fi
if ! cargo bench -p lmtrain-cuda --bench cuda_kernels -- --iters "${GPU_CHECK_BENCH_ITERS:-20}" >"$logs/bench.log" 2>&1; then
    status=1
fi
# The fused kernels (attention, classifier, LayerNorm, embeddings, AdamW, ...) at GPT-2 124M and
# BERT-base shapes: criterion, CUDA-event timed, throughput in bytes or FLOPs per second.
if ! cargo bench -p lmtrain-cuda --bench cuda_fused >"$logs/bench-fused.log" 2>&1; then
    status=1
fi

echo
echo "## lmtrain GPU check"
echo
echo "GPU: $gpu"
echo "nvcc: $("$NVCC" --version | tail -n 2 | head -n 1)"
echo
echo "| tests | passed | failed | skipped |"
echo "|---|---|---|---|"
# "Running tests/cuda_kernels.rs (...)" is followed by that binary's "test result:" line.
awk '
    /^ *Running / { name = $2 }
    /^ *Doc-tests / { name = "doc-tests" }
    /^test result:/ {
        passed = $4; failed = $6; sub(";", "", passed); sub(";", "", failed)
        printf "| %s | %s | %s | %d |\n", name, passed, failed, skips[name]
    }
    /^SKIP / { skips[name]++ }
' "$logs/tests.log"
if grep -q "FAILED\|panicked\|^error" "$logs/tests.log"; then
    echo
    echo "Failures:"
    grep -E "^test .* FAILED$|panicked at|^error" "$logs/tests.log" | head -n 40
fi
echo
echo "Kernel benchmark (CUDA events, mean per call):"
echo
grep -E "^(\||device:|SKIP|error)" "$logs/bench.log" || { echo "(no bench output; see $logs/bench.log)"; status=1; }
echo
echo "Fused kernels (criterion; thrpt in B/s for memory-bound kernels, elem/s = FLOP/s for attention):"
echo
grep -E "^(gpt2|bert)|thrpt:|^SKIP|^error" "$logs/bench-fused.log" | sed 's/^ *//' | paste - - 2>/dev/null | awk '{$1=$1};1' \
    || { echo "(no fused-bench output; see $logs/bench-fused.log)"; status=1; }
echo
[ "$status" = 0 ] && echo "gpu-check: OK" || echo "gpu-check: FAILED (logs: $logs)"
exit "$status"
