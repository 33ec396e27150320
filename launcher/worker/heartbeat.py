"""Rank 0 touches the run dir's lock while the training lives, so a launch from another host (which cannot
check a pid here) can tell a live run from a dead one (launcher.launch.lock)."""

from __future__ import annotations

import threading
from pathlib import Path

from launcher.launch.lock import HEARTBEAT_S, heartbeat


def start_heartbeat(run_dir: Path) -> threading.Thread:
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            heartbeat(run_dir)

    thread = threading.Thread(target=beat, name="launcher-heartbeat", daemon=True)
    thread.start()
    return thread
