"""DeepSpeed JIT-builds ops (shm comm, cpu_adam) into torch's extension dir under a `lock` file. A build
killed midway leaves the lock behind and every later run waits on it forever. Detect that before launch.
No torch import: this runs on the launcher side.

A lock is removed only when its build cannot still be running: it is older than STALE_AFTER_S (a build on
another host sharing the directory, or one between taking the lock and starting ninja) and no process on
this host works in that build directory (ninja and the compilers run with it as their cwd).
torch's lock file is empty, so there is no holder pid to check."""

from __future__ import annotations

import glob
import os
import time
from typing import List

# A cold build takes 30-80 s here; a lock this old belongs to a build that died.
STALE_AFTER_S = 600


def extension_dirs() -> List[str]:
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return [explicit]
    return glob.glob(os.path.expanduser("~/.cache/torch_extensions/py*"))


def build_running(build_dir: str) -> bool:
    """A process on this host has its cwd or an open file in build_dir (ninja, c++, the Python that waits)."""
    import psutil

    build_dir = os.path.realpath(build_dir)
    for proc in psutil.process_iter():
        try:
            paths = [proc.cwd()] + [f.path for f in proc.open_files()]
        except (psutil.Error, OSError):
            continue
        if any(p == build_dir or p.startswith(build_dir + os.sep) for p in paths):
            return True
    return False


def check_jit_locks(remove_stale: bool = True) -> List[str]:
    """Remove stale op build locks; return one note per lock found."""
    notes = []
    now = time.time()
    for base in extension_dirs():
        for lock in glob.glob(os.path.join(base, "*", "lock")):
            age = now - os.path.getmtime(lock)
            if age > STALE_AFTER_S and remove_stale and not build_running(os.path.dirname(lock)):
                os.remove(lock)
                notes.append(f"note: removed stale DeepSpeed JIT build lock {lock} ({age / 60:.0f} min old)")
            else:
                notes.append(
                    f"note: DeepSpeed JIT build lock {lock} exists ({age:.0f} s old): another build is running, or "
                    f"one was killed; if ranks wait on it, `rm {lock}`"
                )
    return notes
