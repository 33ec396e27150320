"""data.format=sharegpt: {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}], "system"?}."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

from launcher.data.formats.common import check_turns
from launcher.data.records import RecordError

FIELDS = {"conversations": "conversations", "role": "from", "content": "value", "system": "system"}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bing": "assistant", "bard": "assistant", "system": "system"}


def convert(record: Mapping[str, Any], fields: Mapping[str, str]) -> List[Dict[str, str]]:
    conv = record.get(fields["conversations"])
    if not isinstance(conv, list):
        raise RecordError(f"missing list field '{fields['conversations']}'")
    turns = []
    for i, item in enumerate(conv):
        if not isinstance(item, Mapping) or fields["role"] not in item or fields["content"] not in item:
            raise RecordError(f"turn {i}: needs '{fields['role']}' and '{fields['content']}'")
        role = ROLES.get(str(item[fields["role"]]).lower())
        if role is None:
            raise RecordError(f"turn {i}: unknown {fields['role']} {item[fields['role']]!r}")
        turns.append({"role": role, "content": item[fields["content"]]})
    system = record.get(fields["system"])
    if isinstance(system, str) and system.strip() and not (turns and turns[0]["role"] == "system"):
        turns.insert(0, {"role": "system", "content": system})
    return check_turns(turns)
