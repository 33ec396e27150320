"""data.format=text: {"text": "..."}; every token is trained (pretraining-style)."""

from __future__ import annotations

from typing import Any, Mapping

from launcher.data.records import RecordError

FIELDS = {"text": "text"}


def convert(record: Mapping[str, Any], fields: Mapping[str, str]) -> str:
    value = record.get(fields["text"])
    if not isinstance(value, str):
        raise RecordError(f"missing text field '{fields['text']}'")
    if not value.strip():
        raise RecordError(f"empty text field '{fields['text']}'")
    return value
