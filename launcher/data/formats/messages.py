"""data.format=messages (OpenAI style): {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

from launcher.data.formats.common import check_turns
from launcher.data.records import RecordError

FIELDS = {"messages": "messages", "role": "role", "content": "content", "system": "system"}


def convert(record: Mapping[str, Any], fields: Mapping[str, str]) -> List[Dict[str, str]]:
    msgs = record.get(fields["messages"])
    if not isinstance(msgs, list):
        raise RecordError(f"missing list field '{fields['messages']}'")
    turns = []
    for i, item in enumerate(msgs):
        if not isinstance(item, Mapping) or fields["role"] not in item or fields["content"] not in item:
            raise RecordError(f"turn {i}: needs '{fields['role']}' and '{fields['content']}'")
        turns.append({"role": str(item[fields["role"]]), "content": item[fields["content"]]})
    system = record.get(fields["system"])
    if isinstance(system, str) and system.strip() and not (turns and turns[0]["role"] == "system"):
        turns.insert(0, {"role": "system", "content": system})
    return check_turns(turns)
