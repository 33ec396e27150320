"""DeepSpeed JIT-builds ops (shm comm, cpu_adam) into torch's extension dir under a `lock` file. A build
killed midway leaves the lock behind and every later run waits on it forever. Detect that before launch.
No torch import: this runs on the launcher side."""

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


def check_jit_locks(remove_stale: bool = True) -> List[str]:
    """Remove stale op build locks; return one note per lock found."""
    notes = []
    now = time.time()
    for base in extension_dirs():
        for lock in glob.glob(os.path.join(base, "*", "lock")):
            age = now - os.path.getmtime(lock)
            if age > STALE_AFTER_S and remove_stale:
                os.remove(lock)
                notes.append(f"note: removed stale DeepSpeed JIT build lock {lock} ({age / 60:.0f} min old)")
            else:
                notes.append(
                    f"note: DeepSpeed JIT build lock {lock} exists ({age:.0f} s old): another build is running, or "
                    f"one was killed; if ranks wait on it, `rm {lock}`"
                )
    return notes
