"""The code stays lint-clean (ruff, rules in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is part of the test extra: pip install -e .[test]"
    res = subprocess.run([ruff, "check", "launcher", "tests", "bench"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:]
