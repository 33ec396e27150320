"""A packed row as text, record by record, with every span marked trained or masked (the debug command)."""

from __future__ import annotations

from typing import Any, List

import numpy as np

from launcher.data.store import Rows


def _escape(text: str) -> str:
    return text.replace("\n", "\\n")


def describe_row(rows: Rows, i: int, tokenizer: Any) -> str:
    ids, labels, pos = rows.row(i)
    trained = labels != -100
    starts = [t for t in range(len(ids)) if pos[t] == 0] + [len(ids)]
    stats = rows.meta.get("stats", {})
    lines: List[str] = [
        f"row {i} of {len(rows)} ({rows.seq_len} tokens, {len(starts) - 1} segments, "
        f"{rows.targets(i)} target tokens; the first token is never one) from {rows.path}",
        f"data: {', '.join(f'{k} {v}' for k, v in sorted(stats.items()))}",
        "legend: 'train |' spans are targets (labels = input_ids); '    - |' spans are masked (labels = -100); "
        "position_ids restart at 0 for every segment",
    ]
    for k, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        padding = not trained[a:b].any() and np.all(ids[a:b] == ids[a])
        lines.append(f"segment {k + 1}: tokens {a}-{b - 1}" + (" (padding)" if padding else ""))
        t = a
        while t < b:
            u = t
            while u < b and trained[u] == trained[t]:
                u += 1
            mark = "train" if trained[t] else "    -"
            lines.append(f"  {mark} | {_escape(tokenizer.decode(ids[t:u].tolist()))}")
            t = u
    return "\n".join(lines)
