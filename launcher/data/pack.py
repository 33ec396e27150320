"""Packing tokenized records into fixed-length rows that keep records apart.

A packed row is three arrays of seq_len each:
  input_ids     token ids
  loss_mask     1 where the token is a target (labels = input_ids there, -100 elsewhere)
  position_ids  0, 1, 2, ... restarting at every record (and for the padding at a row's end)
Restarting position_ids, with no attention_mask and the KV cache off, is what makes transformers' sdpa/eager/
flex attention build a block-diagonal causal mask (and flash attention take the varlen path), so attention
never crosses records. HF shifts labels inside the model (logits[t] predicts labels[t+1]), so the first
token of every record is never a target: the previous record's last token does not learn to predict it.

Two layouts:
- wrap (data.format=text): documents `bos ids eos` concatenated and cut every seq_len tokens (a long
  document continues in the next row, at position 0); no padding; the tail is dropped.
- fit (chat formats): each record (at most seq_len tokens, see data.overlong) goes whole into the first of
  the recently opened rows with room (first fit over the last OPEN_ROWS rows), and rows are padded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

OPEN_ROWS = 64
Encoded = Tuple[Sequence[int], Optional[Sequence[int]]]  # (ids, mask); mask None: every token a target


@dataclass
class Packed:
    input_ids: np.ndarray  # [rows, seq_len] int64
    loss_mask: np.ndarray  # [rows, seq_len] uint8
    position_ids: np.ndarray  # [rows, seq_len] int64

    def __len__(self) -> int:
        return len(self.input_ids)


def labels_of(input_ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    return np.where(loss_mask.astype(bool), input_ids.astype(np.int64), -100)


def pack_wrap(records: Sequence[Encoded], seq_len: int) -> Packed:
    lengths = np.fromiter((len(ids) for ids, _ in records), dtype=np.int64, count=len(records))
    stream = np.concatenate([np.asarray(ids, dtype=np.int64) for ids, _ in records]) if records else np.zeros(0)
    mask = np.concatenate([np.ones(n, dtype=np.uint8) if m is None else np.asarray(m, dtype=np.uint8)
                           for (_, m), n in zip(records, lengths)]) if records else np.zeros(0, np.uint8)
    starts = np.zeros(len(stream), dtype=bool)
    starts[np.cumsum(lengths)[:-1]] = True
    if len(stream):
        starts[0] = True
    mask[starts] = 0  # a record's first token is never a target
    rows = len(stream) // seq_len
    n = rows * seq_len
    stream, mask, starts = stream[:n], mask[:n], starts[:n]
    idx = np.arange(n)
    starts |= idx % seq_len == 0
    positions = idx - np.maximum.accumulate(np.where(starts, idx, 0))
    shape = (rows, seq_len)
    return Packed(stream.reshape(shape), mask.reshape(shape), positions.reshape(shape))


def pack_fit(records: Sequence[Encoded], seq_len: int, pad_id: int) -> Packed:
    rows: List[List[Encoded]] = []
    room: List[int] = []
    first_open = 0
    for rec in records:
        n = len(rec[0])
        if n > seq_len:
            raise ValueError(f"record of {n} tokens > seq_len {seq_len}; truncate or drop it first")
        for r in range(first_open, len(rows)):
            if room[r] >= n:
                rows[r].append(rec)
                room[r] -= n
                break
        else:
            rows.append([rec])
            room.append(seq_len - n)
            first_open = max(first_open, len(rows) - OPEN_ROWS)
    ids = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), seq_len), dtype=np.uint8)
    pos = np.zeros((len(rows), seq_len), dtype=np.int64)
    for r, members in enumerate(rows):
        at = 0
        for rec_ids, rec_mask in members:
            n = len(rec_ids)
            ids[r, at:at + n] = rec_ids
            mask[r, at:at + n] = 1 if rec_mask is None else np.asarray(rec_mask, dtype=np.uint8)
            mask[r, at] = 0
            pos[r, at:at + n] = np.arange(n)
            at += n
        pos[r, at:] = np.arange(seq_len - at)  # padding: its own segment, never a target
    return Packed(ids, mask, pos)
