#!/usr/bin/env bash
# Installs NVIDIA's CUDA 13.0 compiler wheels (pinned; NVIDIA's licence, never committed) into
# .toolchain/cuda, unless that exact set is already there, and prints nvcc's canonical path.
# Used by .ci/run and scripts/gpu-check.sh. 13.0 on purpose: PTX from a newer nvcc would be
# refused by the CUDA 13.0 drivers of our GPU machines. Messages go to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.toolchain/cuda
pins="nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85"
nvcc="$dir/nvidia/cu13/bin/nvcc"
stamp="$dir/.lmtrain-pins"
if [ -x "$nvcc" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$pins" ]; then
    echo "cuda-toolchain: $dir already holds the pinned wheels" >&2
else
    echo "cuda-toolchain: installing $pins into $dir" >&2
    rm -rf "$dir"
    # shellcheck disable=SC2086 # the pins are separate arguments
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore --target "$dir" $pins >&2
    echo "$pins" >"$stamp"
fi
# nvcc finds its headers relative to the path it is invoked by: hand out the real one.
readlink -f "$nvcc"
