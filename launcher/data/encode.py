"""One chunk of raw records -> tokens, in a worker process (or in-process for num_proc=1).

A chunk is a list of (where, raw) from records.iter_raw. Each record is parsed, converted for data.format,
tokenized (format=text: `bos ids eos`; chat formats: chat.encode_chat, truncated or dropped at seq_len), and
the chunk's records come back concatenated as numpy arrays (cheap to send between processes):
    ids      uint32 [tokens]    every kept record's tokens, in record order
    lengths  int64  [records]   tokens per kept record
    mask     uint8  [tokens]    1 = target (chat formats); None for text (every token)
with the counts of bad / truncated / dropped records and up to SHOWN_BAD bad examples with their file:line.
The worker state (tokenizer, format, fields, seq_len, ...) is set once per process by `init`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from launcher.data import chat, formats
from launcher.data.records import SHOWN_BAD, RecordError, parse
from launcher.data.text import encode as encode_texts

Chunk = List[Tuple[str, Any]]


@dataclass
class WorkerState:
    tokenizer: Any
    format: str
    fields: Dict[str, str]
    seq_len: int
    overlong: str = "truncate"
    template: Optional[str] = None
    bos: Optional[int] = None
    eos: Optional[int] = None
    byte_identity: bool = False


@dataclass
class Encoded:
    ids: np.ndarray
    lengths: np.ndarray
    mask: Optional[np.ndarray]
    records: int = 0
    bad: int = 0
    truncated: int = 0
    dropped: int = 0
    raw_chars: int = 0
    bad_examples: List[str] = field(default_factory=list)


_STATE: Optional[WorkerState] = None


def init(state: WorkerState) -> None:
    """Set this process's state; pool workers get it by fork and call this as their initializer."""
    global _STATE
    _STATE = state
    # One tokenizer thread per worker process: the processes are the parallelism (num_proc).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def encode_chunk(chunk: Chunk) -> Encoded:
    st = _STATE
    assert st is not None, "encode.init() first"
    bad: List[str] = []
    kept = []
    chars = 0
    for where, raw in chunk:
        chars += len(raw) if isinstance(raw, str) else 0
        try:
            kept.append((where, formats.convert(st.format, parse(raw), st.fields)))
        except RecordError as exc:
            bad.append(f"{where}: {exc}")
    if st.format == "text":
        out = _encode_text(st, [x for _, x in kept])
    else:
        out = _encode_chat(st, kept, bad)
    out.records, out.raw_chars = len(chunk), chars
    out.bad, out.bad_examples = len(bad), bad[:SHOWN_BAD]
    return out


def _encode_text(st: WorkerState, texts: List[str]) -> Encoded:
    lists = encode_texts(st.tokenizer, texts, byte_identity=st.byte_identity)
    body = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    head, tail = int(st.bos is not None), int(st.eos is not None)
    lengths = body + head + tail
    flat = np.fromiter(chain.from_iterable(lists), dtype=np.uint32, count=int(body.sum()))
    if not head and not tail:
        return Encoded(flat, lengths, None)
    ids = np.empty(int(lengths.sum()), dtype=np.uint32)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    is_body = np.ones(len(ids), dtype=bool)
    if head:
        ids[starts] = st.bos
        is_body[starts] = False
    if tail:
        ids[ends - 1] = st.eos
        is_body[ends - 1] = False
    ids[is_body] = flat
    return Encoded(ids, lengths, None)


def _encode_chat(st: WorkerState, kept: List[Tuple[str, Any]], bad: List[str]) -> Encoded:
    ids_parts, mask_parts, lengths = [], [], []
    truncated = dropped = 0
    for where, turns in kept:
        try:
            ids, mask = chat.encode_chat(st.tokenizer, turns, st.template)
        except RecordError as exc:
            bad.append(f"{where}: {exc}")
            continue
        if len(ids) > st.seq_len:
            if st.overlong == "drop":
                dropped += 1
                continue
            ids, mask = ids[: st.seq_len], mask[: st.seq_len]
            truncated += 1
        if sum(mask[1:]) == 0:  # truncation cut every reply: nothing left to learn
            dropped += 1
            continue
        ids_parts.append(np.asarray(ids, dtype=np.uint32))
        mask_parts.append(np.asarray(mask, dtype=np.uint8))
        lengths.append(len(ids))
    return Encoded(_cat(ids_parts, np.uint32), np.asarray(lengths, dtype=np.int64), _cat(mask_parts, np.uint8),
                   truncated=truncated, dropped=dropped)


def _cat(parts: List[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype)
