"""SIGTERM / SIGUSR1 / SIGINT -> a flag; the loop checkpoints at the next step boundary and exits cleanly.

The flag is agreed across ranks (all-reduce MAX) each step, because a signal may reach only some ranks
(the deepspeed launcher forwards SIGTERM to one rank at a time, SLURM may signal only the batch step).
"""

from __future__ import annotations

import signal
from typing import Optional

_received: Optional[str] = None


def _handler(signum: int, frame: object) -> None:
    global _received
    _received = signal.Signals(signum).name


def install() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, _handler)


def received() -> Optional[str]:
    return _received
