"""Helpers the benchmark drivers share: ports, the launch environment, DeepSpeed's op cache and leaked shm."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def remove_shm_buffers(port: int) -> None:
    """DeepSpeed's CPU shm all-reduce leaves /dev/shm/deepspeed_allreduce_buffer_*_<port>_<rank> (66 MB per rank)
    behind when ranks exit outside the launcher (Trainer, the bare script). Remove this (finished) launch's."""
    from launcher.launch.shm import remove_shm_files

    remove_shm_files(port)


def launch_port(run_dir: Path) -> int:
    """The master port the launcher chose for this run (in its launch.sh)."""
    words = (run_dir / "launch.sh").read_text().split()
    return int(words[words.index("--master_port") + 1])


def private_extensions_dir() -> Path:
    """build/bench_torch_extensions, seeded from the user's extension dir and (re)built once, untimed."""
    ext = REPO / "build" / "bench_torch_extensions"
    py = f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
    default = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser(f"~/.cache/torch_extensions/{py}"))
    if not ext.is_dir() and default.is_dir() and default.resolve() != ext.resolve():
        shutil.copytree(default, ext, ignore=shutil.ignore_patterns("lock"))
    ext.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext), DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    # Only the op these runs load (no offload: no cpu_adam). Up to date: ~1 s; rebuilt: 30-80 s, once.
    warm = "from deepspeed.accelerator import get_accelerator as g; g().create_op_builder('ShareMemCommBuilder').load()"
    subprocess.run([PY, "-c", warm], cwd=REPO, env=env, check=True, capture_output=True)
    return ext


def launch_env(run_dir: Path, base: dict) -> dict:
    """base plus the variables launch.sh exports to the ranks (DS_ACCELERATOR, OMP_NUM_THREADS)."""
    env = dict(base)
    for line in (run_dir / "launch.sh").read_text().splitlines():
        if line.startswith("export ") and not line.startswith("export PYTHONPATH="):
            key, _, value = line[len("export "):].partition("=")
            env[key] = value.strip("'\"")
    return env


def render_run(overrides: list, render: Path, env: dict) -> None:
    """Render a run dir with the launcher itself (dry run: nothing started); exit with its message on error."""
    shutil.rmtree(render, ignore_errors=True)
    res = subprocess.run([PY, "-m", "launcher", *overrides, f"hydra.run.dir={render}", "dry_run=true"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(res.stdout + res.stderr)
