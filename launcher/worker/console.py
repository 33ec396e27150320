"""What a rank shows on the terminal, and where everything else goes.

Every rank's stdout/stderr (DeepSpeed's INFO lines, torch FutureWarnings, tracebacks) is redirected at the
file-descriptor level to <run_dir>/logs/rank<N>.log before torch or deepspeed is imported; the launcher's
own lines (rank 0's summary, one line per log step, progress, errors) go to the terminal the rank was
started on. verbose=true leaves both streams on the terminal, as plain DeepSpeed would.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import IO, Optional

from launcher.worker.streams import SurvivingStream

# Without a terminal (a SLURM log, a pipe): one plain progress line at most every this many seconds.
PROGRESS_SECONDS = float(os.environ.get("LAUNCHER_PROGRESS_SECONDS", "30"))

_stream: IO[str] = sys.stdout
_errors: IO[str] = sys.stderr
_log_path: Optional[Path] = None


def setup(run_dir: Path, rank: int, verbose: bool) -> None:
    """Point fds 1 and 2 at logs/rank<rank>.log (unless verbose); keep the terminal for say()."""
    global _stream, _errors, _log_path
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    _log_path = logs / f"rank{rank}.log"
    if verbose:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    terminal, terminal_err = os.dup(1), os.dup(2)
    log_fd = os.open(_log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    # The terminal may close under a running job (SIGHUP): writes then fail with EIO and are dropped.
    _stream = SurvivingStream(os.fdopen(terminal, "w", buffering=1))
    _errors = SurvivingStream(os.fdopen(terminal_err, "w", buffering=1))


def log_path() -> Optional[Path]:
    return _log_path


def stream() -> IO[str]:
    return _stream


def is_tty() -> bool:
    return _stream.isatty()


def say(line: str) -> None:
    """A line for the terminal (also kept in this rank's log)."""
    _stream.write(line + "\n")
    _stream.flush()
    if _stream is not sys.stdout:
        print(line, flush=True)


def error(line: str) -> None:
    """An error line for the terminal's stderr (also kept in this rank's log)."""
    _errors.write(line + "\n")
    _errors.flush()
    if _errors is not sys.stderr:
        print(line, file=sys.stderr, flush=True)


class Progress:
    """A single updating bar on a terminal (tqdm); elsewhere a plain line every PROGRESS_SECONDS."""

    def __init__(self, start: int, total: int) -> None:
        self.step, self.total = start, total
        self.t0, self.start, self.last = time.time(), start, time.time()
        self.bar = None
        if is_tty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0,
                            file=_stream)

    def update(self, n: int = 1) -> None:
        self.step += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.time()
        if now - self.last >= PROGRESS_SECONDS and self.step < self.total:
            self.last = now
            rate = (now - self.t0) / max(1, self.step - self.start)
            eta = int(rate * (self.total - self.step))
            say(f"progress: step {self.step}/{self.total} ({self.step / self.total:.0%}), {rate:.2f} s/step, "
                f"eta {eta // 60}m{eta % 60:02d}s")

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=_stream)
            print(line, flush=True)
        else:
            say(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
