"""One module per data.format. Each turns one JSON record into text (format=text) or chat turns
([{"role": "system"|"user"|"assistant", "content": str}, ...]), raising RecordError for a bad record.

Field names come from data.fields (a key -> the record's field name); the defaults are in DEFAULT_FIELDS.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Union

from launcher.data.formats import alpaca, messages, sharegpt, text
from launcher.data.records import RecordError

Turns = List[Dict[str, str]]
Converter = Callable[[Mapping[str, Any], Mapping[str, str]], Union[str, Turns]]

CONVERTERS: Dict[str, Converter] = {
    "text": text.convert,
    "alpaca": alpaca.convert,
    "sharegpt": sharegpt.convert,
    "messages": messages.convert,
}
DEFAULT_FIELDS: Dict[str, Dict[str, str]] = {
    "text": text.FIELDS,
    "alpaca": alpaca.FIELDS,
    "sharegpt": sharegpt.FIELDS,
    "messages": messages.FIELDS,
}
FORMATS = tuple(CONVERTERS)


def fields_for(fmt: str, overrides: Mapping[str, str]) -> Dict[str, str]:
    """The format's default field names with the user's data.fields applied (unknown keys are refused)."""
    fields = dict(DEFAULT_FIELDS[fmt])
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise KeyError(f"data.fields.{unknown[0]} is not a field of data.format={fmt} "
                       f"(its fields: {', '.join(sorted(fields))})")
    fields.update({k: str(v) for k, v in overrides.items()})
    return fields


def convert(fmt: str, record: Any, fields: Mapping[str, str]) -> Union[str, Turns]:
    if not isinstance(record, Mapping):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}")
    return CONVERTERS[fmt](record, fields)
