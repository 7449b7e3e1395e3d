#!/usr/bin/env bash
# Builds everything scripts/gpu-check.sh runs, on a machine with cargo (no GPU needed), into one
# directory that a GPU machine without a Rust toolchain runs as it is:
#
#   scripts/gpu-bundle.sh [DIR]        # default DIR: target/gpu-bundle
#   (copy DIR to the GPU machine)  DIR/gpu-check.sh
#
# DIR holds bin/train, the CUDA test binaries (tests/), the kernel benches (benches/), the
# corpus and tokenizers the training runs prepare their data from (data/), gpu-check.sh, and
# MANIFEST (commit, archs, nvcc). Binaries are stripped of debug info to stay small.
#
# Environment: LMTRAIN_CUDA_ARCHS (default 80,90: A100, H100/H200; PTX for the newest too),
# NVCC (default: the pinned wheels of scripts/cuda-toolchain.sh, installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/gpu-bundle}"

export NVCC="${NVCC:-$(scripts/cuda-toolchain.sh)}"
export LMTRAIN_CUDA_ARCHS="${LMTRAIN_CUDA_ARCHS:-80,90}"
export LMTRAIN_REQUIRE_CUDA=1

# Every executable cargo builds for the tests and the benches, as JSON messages; kept are the
# CUDA tests that run on a device (not the emulator's self-test or the ptxas report check, which
# are about this build) and tests/train_cuda.rs.
list="$(mktemp)"
trap 'rm -f "$list"' EXIT
cargo build --release --bin train >&2
cargo test --release --workspace --no-run --message-format=json >"$list"
cargo bench --workspace --no-run --message-format=json --bench cuda_kernels --bench cuda_fused >>"$list"

rm -rf "$out"
mkdir -p "$out/bin" "$out/tests" "$out/benches" "$out/data/corpus" "$out/data/tokenizers"
cp target/release/train "$out/bin/train"
# "name executable" for each test or bench target of interest
python3 - "$list" "$out" <<'EOF'
import json, shutil, sys
listing, out = sys.argv[1], sys.argv[2]
want_tests = {"cuda_backend", "cuda_device", "cuda_fused", "cuda_kernels", "train_cuda"}
want_benches = {"cuda_kernels", "cuda_fused"}
seen = set()
for line in open(listing):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    kind, name = m["target"]["kind"][0], m["target"]["name"]
    if kind == "test" and name in want_tests and m["profile"]["test"]:
        dest = f"{out}/tests/{name}"
    elif kind == "bench" and name in want_benches:
        dest = f"{out}/benches/{name}"
    else:
        continue
    shutil.copy(m["executable"], dest)
    seen.add(dest)
missing = [n for n in sorted(want_tests) if f"{out}/tests/{n}" not in seen] + [n for n in sorted(want_benches) if f"{out}/benches/{n}" not in seen]
if missing:
    sys.exit(f"gpu-bundle: cargo built no executable for {missing}")
EOF
for f in "$out"/bin/* "$out"/tests/* "$out"/benches/*; do
    strip --strip-debug "$f" 2>/dev/null || true
done
cp data/corpus/kjv.txt.gz "$out/data/corpus/"
cp data/tokenizers/gpt2.tokenizer.json data/tokenizers/bert-base-uncased.tokenizer.json "$out/data/tokenizers/"
cp scripts/gpu-check.sh "$out/gpu-check.sh"
{
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "archs $LMTRAIN_CUDA_ARCHS"
    echo "nvcc $("$NVCC" --version | tail -n 2 | head -n 1)"
    echo "built $(date -u +%Y-%m-%dT%H:%MZ)"
} >"$out/MANIFEST"
echo "gpu-bundle: $out ($(du -sh "$out" | cut -f1)); on the GPU machine run $out/gpu-check.sh" >&2
