"""Rules every chat format shares."""

from __future__ import annotations

from typing import Dict, List

from launcher.data.records import RecordError


def check_turns(turns: List[Dict[str, str]]) -> List[Dict[str, str]]:
    """Shared chat rules: roles known, contents non-empty strings, at least one assistant turn."""
    if not turns:
        raise RecordError("no turns")
    for i, turn in enumerate(turns):
        if turn["role"] not in ("system", "user", "assistant"):
            raise RecordError(f"turn {i}: unknown role {turn['role']!r}")
        if not isinstance(turn["content"], str) or not turn["content"].strip():
            raise RecordError(f"turn {i} ({turn['role']}): empty content")
    if not any(t["role"] == "assistant" for t in turns):
        raise RecordError("no assistant turn (nothing to train on)")
    return turns
