"""The error types users see, printed as one line with no traceback.

ConfigError: a bad key and how to fix it (the launcher, the planner, the SLURM job entry; exit code 2).
ExportError: a problem with a run dir, a checkpoint or export options (`python -m launcher.export`; exit code 2).
"""

from __future__ import annotations


class ConfigError(Exception):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class ExportError(Exception):
    """A user-facing export problem: printed as one `error: ...` line, exit code 2."""
