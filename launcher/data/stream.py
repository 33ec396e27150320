"""Streaming versions of pack.py's two layouts: records go in chunk by chunk, finished rows come out, and only
a bounded window is held (wrap: less than one row; fit: the last OPEN_ROWS open rows).

Both produce exactly the rows pack_wrap / pack_fit produce for the same records in the same order (tested),
as (input_ids, loss_mask, position_ids) blocks of [rows, seq_len] arrays handed to `sink`.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import numpy as np

from launcher.data.pack import OPEN_ROWS

Block = Tuple[np.ndarray, np.ndarray, np.ndarray]  # input_ids, loss_mask, position_ids: [rows, seq_len] each
Sink = Callable[[np.ndarray, np.ndarray, np.ndarray], None]


class WrapPacker:
    """data.format=text: records concatenated and cut every seq_len tokens; a record's first token is never a
    target; positions restart at each record and each row; the last partial row is dropped."""

    def __init__(self, seq_len: int, sink: Sink) -> None:
        self.seq_len = seq_len
        self.sink = sink
        self._ids = np.zeros(0, np.int64)
        self._mask = np.zeros(0, np.uint8)
        self._starts = np.zeros(0, bool)
        self.tokens = 0

    def add(self, ids: np.ndarray, lengths: np.ndarray, mask: Optional[np.ndarray] = None) -> None:
        """ids: the records' tokens concatenated; lengths: tokens per record; mask: 1 = target (None: all)."""
        if len(ids) == 0:
            return
        self.tokens += len(ids)
        starts = np.zeros(len(ids), bool)
        starts[np.cumsum(lengths)[:-1]] = True
        starts[0] = True
        mask = np.ones(len(ids), np.uint8) if mask is None else mask.astype(np.uint8, copy=True)
        mask[starts] = 0
        self._ids = np.concatenate([self._ids, ids.astype(np.int64)])
        self._mask = np.concatenate([self._mask, mask])
        self._starts = np.concatenate([self._starts, starts])
        rows = len(self._ids) // self.seq_len
        if rows:
            n = rows * self.seq_len
            idx = np.arange(n)
            starts = self._starts[:n] | (idx % self.seq_len == 0)
            pos = idx - np.maximum.accumulate(np.where(starts, idx, 0))
            shape = (rows, self.seq_len)
            self.sink(self._ids[:n].reshape(shape), self._mask[:n].reshape(shape), pos.reshape(shape))
            self._ids, self._mask, self._starts = self._ids[n:], self._mask[n:], self._starts[n:]

    def finish(self) -> None:
        """The tail shorter than a row is dropped (as in pack_wrap)."""


class FitPacker:
    """Chat formats: each record whole into the first of the last OPEN_ROWS rows with room, else a new row;
    a row leaving the window is final and emitted; rows are padded with pad_id, padding its own segment."""

    def __init__(self, seq_len: int, pad_id: int, sink: Sink) -> None:
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.sink = sink
        self._rows: List[List[Tuple[np.ndarray, np.ndarray]]] = []
        self._room: List[int] = []
        self.record_tokens = 0

    def add_one(self, ids: np.ndarray, mask: np.ndarray) -> None:
        n = len(ids)
        if n > self.seq_len:
            raise ValueError(f"record of {n} tokens > seq_len {self.seq_len}; truncate or drop it first")
        self.record_tokens += n
        for r, room in enumerate(self._room):
            if room >= n:
                self._rows[r].append((ids, mask))
                self._room[r] -= n
                return
        self._rows.append([(ids, mask)])
        self._room.append(self.seq_len - n)
        if len(self._rows) > OPEN_ROWS:
            self._emit(len(self._rows) - OPEN_ROWS)

    def add(self, ids: np.ndarray, lengths: np.ndarray, mask: np.ndarray) -> None:
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        for a, b in zip(bounds[:-1], bounds[1:]):
            self.add_one(ids[a:b], mask[a:b])

    def finish(self) -> None:
        self._emit(len(self._rows))

    def _emit(self, count: int) -> None:
        if count <= 0:
            return
        ids = np.full((count, self.seq_len), self.pad_id, dtype=np.int64)
        mask = np.zeros((count, self.seq_len), dtype=np.uint8)
        pos = np.zeros((count, self.seq_len), dtype=np.int64)
        for r, members in enumerate(self._rows[:count]):
            at = 0
            for rec_ids, rec_mask in members:
                n = len(rec_ids)
                ids[r, at:at + n] = rec_ids
                mask[r, at:at + n] = rec_mask
                mask[r, at] = 0  # a record's first token is never a target
                pos[r, at:at + n] = np.arange(n)
                at += n
            pos[r, at:] = np.arange(self.seq_len - at)
        del self._rows[:count], self._room[:count]
        self.sink(ids, mask, pos)
