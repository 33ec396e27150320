"""Reading records from local files, with where each came from, and the one bad-record policy.

Files: .jsonl (one JSON object per line), .json (a JSON array of objects, or JSON lines), .txt (format=text:
one document per non-empty line), .parquet (one record per row). A folder is read file by file, sorted.
A bad record (invalid JSON, missing or empty fields) is counted with its file and line; `check_bad` refuses
the data when more than data.max_bad_fraction of the records are bad (default 0: any bad record refuses it).
"""

from __future__ import annotations

import hashlib
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


SMALL_FILE = 1 << 20  # files under 1 MiB are keyed by content (a same-second edit still changes the key)


def fingerprint(path: str) -> List[Tuple[str, int, str]]:
    """What identifies the source in a cache key: each file's path, size, and mtime (or content hash if small)."""
    out = []
    for f in data_files(path):
        size = os.path.getsize(f)
        if size < SMALL_FILE:
            with open(f, "rb") as fh:
                stamp = "sha256:" + hashlib.sha256(fh.read()).hexdigest()[:16]
        else:
            stamp = f"mtime:{os.path.getmtime(f)!r}"
        out.append((f, size, stamp))
    return out


def iter_raw(path: str) -> Iterator[Tuple[str, Any]]:
    """(where, raw) for every record, streamed: raw is an unparsed JSON line (str), an already parsed record,
    or a RecordError. JSON lines and .txt are read line by line (bounded memory); a .json array and parquet
    row groups are parsed whole (use .jsonl for large data)."""
    for f in data_files(path):
        name = os.path.basename(f)
        if f.endswith(".parquet"):
            yield from _parquet(f, name)
            continue
        if f.endswith(".json") and _starts_with_bracket(f):
            with open(f, "rb") as fh:
                try:
                    items = json.loads(fh.read().decode("utf-8"))
                except UnicodeDecodeError as exc:
                    yield name, RecordError(f"not UTF-8 ({exc.reason} at byte {exc.start})")
                    continue
                except ValueError as exc:
                    yield name, RecordError(f"invalid JSON ({exc})")
                    continue
            for i, item in enumerate(items, 1):
                yield f"{name}[{i}]", item
            continue
        text = f.endswith(".txt")
        with open(f, "rb") as fh:
            for i, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield f"{name}:{i}", RecordError(f"not UTF-8 ({exc.reason} at byte {exc.start})")
                    continue
                if not line.strip():
                    continue
                yield f"{name}:{i}", ({"text": line.rstrip("\r\n")} if text else line)


def parse(raw: Any) -> Any:
    """A record from iter_raw's raw form; raises RecordError."""
    if isinstance(raw, RecordError):
        raise raw
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise RecordError(f"invalid JSON ({exc.msg})") from None
    return raw


def iter_records(path: str) -> Iterator[Tuple[str, Any]]:
    """(where, record) for every record; record is a RecordError when it cannot be parsed."""
    for where, raw in iter_raw(path):
        try:
            yield where, parse(raw)
        except RecordError as exc:
            yield where, exc


def _starts_with_bracket(f: str) -> bool:
    with open(f, "rb") as fh:
        head = fh.read(4096).lstrip()
    return head.startswith(b"[")


def _parquet(f: str, name: str) -> Iterator[Tuple[str, Any]]:
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(f).iter_batches():
        for row in batch.to_pylist():
            i += 1
            yield f"{name}[{i}]", row
