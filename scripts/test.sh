#!/usr/bin/env bash
# The test command: sets up (scripts/setup.sh) and runs the whole suite, SLURM tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# --durations: the slowest tests in every CI log, so the suite can be kept under its 30-minute budget.
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 "$@"
