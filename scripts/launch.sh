#!/usr/bin/env bash
# Set up (first time only) and run the launcher: `bash scripts/launch.sh [overrides]`.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bash "$here/scripts/setup.sh" >&2
exec "$here/.venv/bin/python" -m launcher "$@"
