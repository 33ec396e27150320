"""Shared test helpers: run the real CLI in a subprocess, prepare configs in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import pytest

REPO = Path(__file__).resolve().parent.parent

# Hermetic on any host: no test sees this machine's GPUs, so `hardware=local` means CPU ranks everywhere and
# the CPU-rank tests launch CPU ranks on a GPU host too. Tests about GPUs inject a GPU count or set
# CUDA_VISIBLE_DEVICES themselves (monkeypatch); scripts/gpu_check.sh is what runs on real GPUs.
os.environ["CUDA_VISIBLE_DEVICES"] = ""


def run_cli(args: List[str], cwd: Optional[Path] = None, env: Optional[dict] = None, module: str = "launcher",
            timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONPATH", str(REPO))
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture(autouse=True, scope="session")
def sweep_leaked_shm():
    """Probe scripts that start ranks without the launcher (ac_probe, bench) leave DeepSpeed's /dev/shm
    allreduce files behind (see launcher/launch/shm.py); remove the ones this session created."""
    import glob
    import time

    start = time.time()
    yield
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"):
        try:
            if os.path.getmtime(path) >= start:
                os.unlink(path)
        except OSError:
            pass
