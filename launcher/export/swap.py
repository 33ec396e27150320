"""Put a finished export directory in place atomically: a crash leaves the old export or the new, never half.

Linux's renameat2(RENAME_EXCHANGE) swaps two paths in one step (then the old tree is deleted); where it is
missing (old kernels, some filesystems) two renames leave a short window with no directory at all, never a
mixed one. Files and directories are fsynced first, so the new export is on disk before its name is."""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

RENAME_EXCHANGE = 2
AT_FDCWD = -100


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (also used for checkpoints: launcher.worker.ckpt)."""
    for dirpath, _, names in os.walk(root):
        for name in names:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def fsync_path(path: "str | Path") -> None:
    """fsync a file or a directory (a directory's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap a and b atomically; False when the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished tmp into out; an earlier out is swapped out, then deleted."""
    fsync_tree(tmp)
    if not out.exists():
        os.rename(tmp, out)
    elif _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old export
    else:
        old = out.parent / f".{out.name}.export-old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(out.parent)
