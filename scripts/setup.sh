#!/usr/bin/env bash
# Idempotent setup for this checkout: .venv with the CPU torch wheel, DeepSpeed, the project, and
# DeepSpeed's JIT ops built once (cached in ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR).
# GPU machines: install torch for your CUDA first, then `pip install -e .`; this script is for CPU boxes/CI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
if ! "$VENV/bin/python" -c "import torch, deepspeed, launcher, xdist, peft" 2>/dev/null; then
  pip install --upgrade pip wheel setuptools
  # The CPU wheel (a bare `torch` requirement would pull a multi-GB CUDA build).
  pip install torch==2.13.0
  # DeepSpeed's setup.py imports torch: build it against the torch above, not an isolated one.
  pip install --no-build-isolation deepspeed==0.19.8
  pip install -e ".[test]"
fi
"$VENV/bin/python" -c "import torch, deepspeed, launcher" || { echo "setup failed: see pip output above" >&2; exit 1; }
# Build DeepSpeed's CPU ops now (shm comm ~30 s, cpu_adam ~60 s cold) rather than inside a timed run.
"$VENV/bin/python" -m launcher.worker.ops
