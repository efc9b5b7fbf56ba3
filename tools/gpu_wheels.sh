#!/usr/bin/env bash
# Download, where PyPI is reachable, the cp312 manylinux wheels that the GPU machine's image lacks, into
# .whl/ (git-ignored; carried to the GPU machine with `carry: [".whl"]`, see docs/gpu.md):
#
#   tools/gpu_wheels.sh            # then: make gpu-check OUT=... there
#
# The image (Python 3.12, torch 2.11+cu130, triton 3.6, transformers, accelerate, peft, safetensors,
# einops, psutil, pyyaml, numpy 2, huggingface_hub 1.x, pytest) lacks megatron-core and diffusers; every
# other Requires-Dist of these two wheels is in the image (diffusers' importlib_metadata is only used
# before Python 3.8), so each is fetched with --no-deps and listed here, one version each. Transformer
# Engine (276 MB) and DALI (199 MB) cannot travel (64 MiB per call): the check says so and skips them.
# Pins: megatron-core as the GPU lane (constraints/mcore-latest.txt), diffusers as constraints/cpu.txt.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.whl}"
PYTHON="${PYTHON:-python3}"
LIMIT_MIB=60
WHEELS=(
  "megatron-core==0.19.2"
  "diffusers==0.42.1"
)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl   # one version of each: two would stop the install there
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${WHEELS[@]}"

total=0
for f in "$DEST"/*.whl; do
  size=$(stat -c %s "$f")
  total=$((total + size))
  awk -v s="$size" -v n="$(basename "$f")" 'BEGIN { printf "%8.2f MiB  %s\n", s / 1048576, n }'
done
awk -v s="$total" 'BEGIN { printf "%8.2f MiB  total\n", s / 1048576 }'
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "error: the wheels take more than $LIMIT_MIB MiB; the working tree that travels is limited to 64 MiB" >&2
  exit 1
fi
