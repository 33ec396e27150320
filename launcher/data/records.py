"""Reading records from local files, with where each came from, and the one bad-record policy.

Files: .jsonl (one JSON object per line), .json (a JSON array of objects, or JSON lines), .txt (format=text:
one document per non-empty line), .parquet (one record per row). A folder is read file by file, sorted.
A bad record (invalid JSON, missing or empty fields) is counted with its file and line; `check_bad` refuses
the data when more than data.max_bad_fraction of the records are bad (default 0: any bad record refuses it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Tuple

SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
SHOWN_BAD = 5


class DataError(Exception):
    """A data problem found before training; the message names the data.* key and the fix."""


class RecordError(Exception):
    """One record is unusable (the reason); counted by BadRecords."""


@dataclass
class BadRecords:
    total: int = 0
    bad: int = 0
    examples: List[str] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.bad += 1
        if len(self.examples) < SHOWN_BAD:
            self.examples.append(f"{where}: {reason}")


def check_bad(counts: BadRecords, max_bad_fraction: float, path: str) -> None:
    if counts.total == 0:
        raise DataError(f"data.path: {path} holds no records")
    if counts.bad == 0 or counts.bad <= max_bad_fraction * counts.total:
        return
    shown = "; ".join(counts.examples) + (" ..." if counts.bad > len(counts.examples) else "")
    raise DataError(
        f"data.path: {counts.bad} of {counts.total} records are bad ({shown}); fix them, or set "
        f"data.max_bad_fraction={counts.bad / counts.total:.3g} to skip them"
    )


def data_files(path: str) -> List[str]:
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES)
    if not files:
        raise DataError(f"data.path: {path} has no {'/'.join(SUFFIXES)} files")
    bad = [f for f in files if f.suffix not in SUFFIXES]
    if bad:
        raise DataError(f"data.path: {bad[0]} is not {'/'.join(SUFFIXES)}")
    kinds = {"text" if f.suffix == ".txt" else "records" for f in files}
    if len(kinds) > 1:
        raise DataError(f"data.path: {path} mixes .txt with record files; keep one kind per folder")
    empty = next((f for f in files if f.stat().st_size == 0), None)
    if empty is not None:
        raise DataError(f"data.path: {empty} is empty")
    return [str(f) for f in files]


def fingerprint(path: str) -> List[Tuple[str, int, float]]:
    """What identifies the source in a cache key: each file's path, size and mtime."""
    return [(f, os.path.getsize(f), os.path.getmtime(f)) for f in data_files(path)]


def iter_records(path: str) -> Iterator[Tuple[str, Any]]:
    """(where, record) for every record; record is a RecordError when it cannot be parsed."""
    for f in data_files(path):
        name = os.path.basename(f)
        if f.endswith(".parquet"):
            yield from _parquet(f, name)
            continue
        with open(f, encoding="utf-8", errors="strict") as fh:
            try:
                text = fh.read()
            except UnicodeDecodeError as exc:
                yield f"{name}", RecordError(f"not UTF-8 ({exc.reason} at byte {exc.start})")
                continue
        if f.endswith(".txt"):
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    yield f"{name}:{i}", {"text": line}
        elif f.endswith(".json") and text.lstrip().startswith("["):
            try:
                items = json.loads(text)
            except ValueError as exc:
                yield f"{name}", RecordError(f"invalid JSON ({exc})")
                continue
            for i, item in enumerate(items, 1):
                yield f"{name}[{i}]", item
        else:
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    yield f"{name}:{i}", json.loads(line)
                except ValueError as exc:
                    yield f"{name}:{i}", RecordError(f"invalid JSON ({exc.msg})")


def _parquet(f: str, name: str) -> Iterator[Tuple[str, Any]]:
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(f).iter_batches():
        for row in batch.to_pylist():
            i += 1
            yield f"{name}[{i}]", row
