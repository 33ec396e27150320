"""DeepSpeed's CPU shared-memory allreduce (deepspeed_shm_comm, 0.19) creates one 66 MiB file per rank in
/dev/shm, `deepspeed_allreduce_buffer_<uid>_<master addr>_<master port>_<rank>`, and never unlinks it: every
CPU launch leaks 132 MiB of RAM per 2 ranks until reboot (seen here: 15 GB after a day of tests, then the
OOM killer). Ranks remove their own file at exit; the launcher sweeps the launch's files after it ends
(covers ranks that were killed). No torch import."""

from __future__ import annotations

import glob
import os
from typing import List, Optional

SHM_DIR = "/dev/shm"
PREFIX = "deepspeed_allreduce_buffer"


def shm_files(master_port: int, master_addr: Optional[str] = None, rank: Optional[int] = None) -> List[str]:
    addr = "*" if master_addr is None else glob.escape(master_addr)
    which = "*" if rank is None else str(rank)
    return glob.glob(os.path.join(SHM_DIR, f"{PREFIX}_{os.getuid()}_{addr}_{int(master_port)}_{which}"))


def remove_shm_files(master_port: int, master_addr: Optional[str] = None, rank: Optional[int] = None) -> int:
    removed = 0
    for path in shm_files(master_port, master_addr, rank):
        try:
            os.unlink(path)
            removed += 1
        except OSError:
            pass
    return removed
