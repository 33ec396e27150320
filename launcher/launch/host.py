"""Facts about the host that prepares a run: the `deepspeed` runner to use, a free port, CPU features."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path


def deepspeed_executable() -> str:
    """The runner beside this Python (its venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "deepspeed"
    if beside.is_file():
        return str(beside)
    return shutil.which("deepspeed") or "deepspeed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def usable_cpus() -> int:
    """Cores this process may run on (its CPU affinity: taskset, cgroups, a SLURM step), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
