#!/usr/bin/env bash
# Wheels for scripts/gpu_check.sh, built where there is internet, for a GPU machine that has CUDA torch and
# transformers preinstalled but maybe not the rest (Python 3.12 expected). Output: gpu_wheels/ (git-ignored).
#   scripts/gpu_wheels.sh            (PYTHON=... must be a Python with torch, for DeepSpeed's setup.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p gpu_wheels
# Pure-Python packages: any interpreter builds them.
"$PY" -m pip wheel -q --no-deps -w gpu_wheels hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 \
  hjson py-cpuinfo einops tqdm
# DeepSpeed without prebuilt ops (they are JIT-built on the GPU machine on first use).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w gpu_wheels deepspeed==0.19.8
# Binary wheels for the GPU machine's Python and platform.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  -d gpu_wheels msgpack ninja psutil safetensors pydantic pydantic-core annotated-types typing-inspection
ls -1 gpu_wheels
