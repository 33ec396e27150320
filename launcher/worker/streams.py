"""stdout/stderr that survive a closed terminal. Ranks inherit the launcher's terminal; once it is closed
(SIGHUP, ssh dropped) every write fails with EIO, and a failing print in the middle of a stop checkpoint
would turn a clean stop into a crash. After the first failure the stream drops output silently."""

from __future__ import annotations

import os
import sys
from typing import Any


class SurvivingStream:
    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._dead = False

    def write(self, text: str) -> int:
        if not self._dead:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):
                self._dead = True
                self._stream = open(os.devnull, "w")
        return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            self._dead = True
            self._stream = open(os.devnull, "w")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def install() -> None:
    sys.stdout = SurvivingStream(sys.stdout)
    sys.stderr = SurvivingStream(sys.stderr)
