"""Packed rows on disk: a directory per cache key, written whole into a temporary sibling and renamed into
place (a half-written cache is never read), read back memory-mapped.

    packed-<key>/meta.json                 {"version", "seq_len", "rows", "dtype", "shards": [{"name", "rows"}],
                                            "stats": {...}, "source": {...}}
    packed-<key>/shard-00000/input_ids.npy      [rows, seq_len] uint16 when the vocabulary fits, else uint32
    packed-<key>/shard-00000/loss_mask.npy      [rows, seq_len] uint8 (1 = target)
    packed-<key>/shard-00000/position_ids.npy   [rows, seq_len] uint16/uint32 (restart per record)
Rows are numbered across shards in shard order; ShardWriter appends a shard each SHARD_TOKENS tokens.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from launcher.data.pack import Packed, labels_of

VERSION = 2
ARRAYS = ("input_ids", "loss_mask", "position_ids")


def id_dtype(limit: int) -> str:
    return "uint16" if limit <= np.iinfo(np.uint16).max + 1 else "uint32"


SHARD_TOKENS = 1 << 22  # tokens per shard: 4M x (2-4 + 1 + 2-4) bytes = 20-36 MB held while a shard fills


class ShardWriter:
    """Rows in, shard files out as each shard fills: memory holds at most one shard.

    Writes into `tmp` (a directory of its own); finish() writes meta.json last, so a directory with meta.json
    is complete. Publishing (renaming tmp into place) is the caller's (launcher.data.cache)."""

    def __init__(self, tmp: str, seq_len: int, vocab_limit: int, shard_tokens: Optional[int] = None) -> None:
        self.tmp = tmp
        self.seq_len = seq_len
        self.vocab_limit = vocab_limit
        self.ids_dtype, self.pos_dtype = id_dtype(vocab_limit), id_dtype(seq_len)
        self.shard_rows = max(1, (shard_tokens or SHARD_TOKENS) // seq_len)
        self.entries: List[Dict[str, Any]] = []
        self.rows = 0
        self.targets = 0
        self.max_id = -1
        self._fill = 0
        self._new_buffers()

    def _new_buffers(self) -> None:
        shape = (self.shard_rows, self.seq_len)
        self._buf = {"input_ids": np.empty(shape, self.ids_dtype), "loss_mask": np.empty(shape, np.uint8),
                     "position_ids": np.empty(shape, self.pos_dtype)}

    def add(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> None:
        """A block of [rows, seq_len] rows (any integer dtypes)."""
        if len(ids):
            top = int(ids.max())
            if top >= self.vocab_limit:
                raise ValueError(f"token id {top} >= vocab_size={self.vocab_limit}")
            self.max_id = max(self.max_id, top)
            self.targets += int(mask[:, 1:].sum())
        at = 0
        while at < len(ids):
            take = min(len(ids) - at, self.shard_rows - self._fill)
            sl = slice(self._fill, self._fill + take)
            self._buf["input_ids"][sl] = ids[at:at + take]
            self._buf["loss_mask"][sl] = mask[at:at + take]
            self._buf["position_ids"][sl] = pos[at:at + take]
            self._fill += take
            at += take
            if self._fill == self.shard_rows:
                self._flush()

    @property
    def total_rows(self) -> int:
        """Rows written plus rows waiting in the current shard."""
        return self.rows + self._fill

    def _flush(self) -> None:
        if self._fill == 0:
            return
        name = f"shard-{len(self.entries):05d}"
        os.makedirs(os.path.join(self.tmp, name))
        for key, array in self._buf.items():
            np.save(os.path.join(self.tmp, name, f"{key}.npy"), array[: self._fill])
        self.entries.append({"name": name, "rows": self._fill})
        self.rows += self._fill
        self._fill = 0

    def close_shards(self) -> None:
        """Write the last, partial shard; `rows`, `entries` are final after this."""
        self._flush()

    def finish(self, meta: Dict[str, Any]) -> None:
        self._flush()
        self._buf = {}
        full = {"version": VERSION, "seq_len": self.seq_len, "rows": self.rows, "dtype": self.ids_dtype,
                "shards": self.entries, **meta}
        path = os.path.join(self.tmp, "meta.json")
        with open(path + ".part", "w") as f:
            json.dump(full, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".part", path)


def write(out: str, shards: List[Packed], vocab_limit: int, meta: Dict[str, Any]) -> str:
    """Write in-memory packed rows to `out` atomically (tests and small data); a complete `out` is kept."""
    if os.path.isfile(os.path.join(out, "meta.json")):
        return out
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    writer = ShardWriter(tmp, int(shards[0].input_ids.shape[1]), vocab_limit)
    for shard in shards:
        writer.add(shard.input_ids, shard.loss_mask, shard.position_ids)
    writer.finish(meta)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished the same cache first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class Rows:
    """Read-only, memory-mapped packed rows: row(i) -> (input_ids, labels, position_ids) as int64 arrays."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.meta = json.loads((Path(path) / "meta.json").read_text())
        self.seq_len = int(self.meta["seq_len"])
        self._shards: List[Dict[str, np.ndarray]] = []
        self._starts: List[int] = []
        start = 0
        for entry in self.meta["shards"]:
            arrays = {a: np.load(os.path.join(path, entry["name"], f"{a}.npy"), mmap_mode="r") for a in ARRAYS}
            self._shards.append(arrays)
            self._starts.append(start)
            start += int(entry["rows"])
        self._len = start

    def __len__(self) -> int:
        return self._len

    def _locate(self, i: int) -> Tuple[Dict[str, np.ndarray], int]:
        if not 0 <= i < self._len:
            raise IndexError(i)
        k = bisect.bisect_right(self._starts, i) - 1
        return self._shards[k], i - self._starts[k]

    def row(self, i: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        arrays, j = self._locate(i)
        ids = arrays["input_ids"][j].astype(np.int64)
        return ids, labels_of(ids, arrays["loss_mask"][j]), arrays["position_ids"][j].astype(np.int64)

    def mask(self, i: int) -> np.ndarray:
        arrays, j = self._locate(i)
        return np.asarray(arrays["loss_mask"][j])

    def targets(self, i: int) -> int:
        """Tokens of row i the loss counts: HF shifts labels, so position 0 is never one."""
        return int(self.mask(i)[1:].sum())
