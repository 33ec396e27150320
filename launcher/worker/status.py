"""How a run ends, as the user sees it: status.json (written atomically by rank 0) and StopRun, an expected stop
with a message, an exit code and a status state. Shared by the training loop and the end-of-run export."""

from __future__ import annotations

import json
import os
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_LOSS_SCALE_COLLAPSE = 3


class StopRun(Exception):
    """A clear, expected stop: message for the user, exit code, status state."""

    def __init__(self, message: str, code: int, state: str = "failed") -> None:
        super().__init__(message)
        self.code = code
        self.state = state


class Progress:
    """The last step this rank completed (-1: none yet), for the status of a run that fails."""

    step = -1


progress = Progress()


def write_status(run_dir: Path, state: str, step: int, message: str = "", rank: int = 0) -> None:
    """Atomic (temp file + rename); each rank uses its own temp file, so failing ranks never tear it."""
    tmp = run_dir / f".status.json.{rank}.tmp"
    tmp.write_text(json.dumps({"state": state, "step": step, "message": message}) + "\n")
    os.replace(tmp, run_dir / "status.json")
