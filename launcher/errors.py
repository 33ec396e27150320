"""The one error type users see: a bad key and how to fix it, printed as one line, no traceback."""

from __future__ import annotations


class ConfigError(Exception):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message
