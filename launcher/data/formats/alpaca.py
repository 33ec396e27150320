"""data.format=alpaca: {"instruction", "input" (optional), "output", "system" (optional)} -> one exchange.

The user turn is the instruction, then a blank line and the input when there is one (Stanford Alpaca's
layout); the assistant turn is the output.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

from launcher.data.formats.common import check_turns
from launcher.data.records import RecordError

FIELDS = {"instruction": "instruction", "input": "input", "output": "output", "system": "system"}


def convert(record: Mapping[str, Any], fields: Mapping[str, str]) -> List[Dict[str, str]]:
    instruction, output = record.get(fields["instruction"]), record.get(fields["output"])
    for key, value in (("instruction", instruction), ("output", output)):
        if not isinstance(value, str):
            raise RecordError(f"missing {key} field '{fields[key]}'")
    extra = record.get(fields["input"])
    if extra is not None and not isinstance(extra, str):
        raise RecordError(f"input field '{fields['input']}' is not a string")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    system = record.get(fields["system"])
    if isinstance(system, str) and system.strip():
        turns.insert(0, {"role": "system", "content": system})
    return check_turns(turns)
