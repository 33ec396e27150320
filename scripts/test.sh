#!/usr/bin/env bash
# The test command: sets up (scripts/setup.sh) and runs the whole suite, SLURM tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
