#!/usr/bin/env bash
# The test command: sets up (scripts/setup.sh) and runs the whole suite, SLURM tests included.
# Two passes: the tests that start no rank run 2 at a time (pytest-xdist; each is one short Python process,
# so the machine's cores are otherwise idle), then the rank and SLURM tests one at a time (each launch
# already uses 2 cores: running two would only slow both and make their timeouts flaky).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
PYTEST=(.venv/bin/python -m pytest -q -p no:cacheprovider)
# --durations: the slowest tests in every CI log, so the suite can be kept under its 30-minute budget.
"${PYTEST[@]}" -m "not ranks and not slurm" -n 2 --durations=10 "$@"
light=$?
"${PYTEST[@]}" -m "ranks or slurm" --durations=25 "$@"
heavy=$?
# 5: no test selected in that pass (e.g. a single file given as an argument): not a failure.
for rc in $light $heavy; do
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then exit "$rc"; fi
done
[ "$light" -eq 5 ] && [ "$heavy" -eq 5 ] && exit 5
exit 0
