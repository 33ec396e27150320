"""Packed rows on disk: a directory per cache key, written whole into a temporary sibling and renamed into
place (a half-written cache is never read), read back memory-mapped.

    packed-<key>/meta.json                 {"version", "seq_len", "rows", "dtype", "shards": [{"name", "rows"}],
                                            "stats": {...}, "source": {...}}
    packed-<key>/shard-00000/input_ids.npy      [rows, seq_len] uint16 when the vocabulary fits, else uint32
    packed-<key>/shard-00000/loss_mask.npy      [rows, seq_len] uint8 (1 = target)
    packed-<key>/shard-00000/position_ids.npy   [rows, seq_len] uint16/uint32 (restart per record)
Rows are numbered across shards in shard order; a streaming writer appends shards.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from launcher.data.pack import Packed, labels_of

VERSION = 1
ARRAYS = ("input_ids", "loss_mask", "position_ids")


def id_dtype(limit: int) -> str:
    return "uint16" if limit <= np.iinfo(np.uint16).max + 1 else "uint32"


def write(out: str, shards: List[Packed], vocab_limit: int, meta: Dict[str, Any]) -> str:
    """Write shards and meta.json into `out` atomically; an existing complete `out` is kept as is."""
    if os.path.isfile(os.path.join(out, "meta.json")):
        return out
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    seq_len = int(shards[0].input_ids.shape[1])
    ids_dtype, pos_dtype = id_dtype(vocab_limit), id_dtype(seq_len)
    entries = []
    for k, shard in enumerate(shards):
        name = f"shard-{k:05d}"
        os.makedirs(os.path.join(tmp, name))
        for key, array, dtype in (("input_ids", shard.input_ids, ids_dtype), ("loss_mask", shard.loss_mask, "uint8"),
                                  ("position_ids", shard.position_ids, pos_dtype)):
            np.save(os.path.join(tmp, name, f"{key}.npy"), array.astype(dtype))
        entries.append({"name": name, "rows": len(shard)})
    full = {"version": VERSION, "seq_len": seq_len, "rows": sum(e["rows"] for e in entries), "dtype": ids_dtype,
            "shards": entries, **meta}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(full, f, indent=1, sort_keys=True)
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
        self._shards: List[Tuple[int, Dict[str, np.ndarray]]] = []
        start = 0
        for entry in self.meta["shards"]:
            arrays = {a: np.load(os.path.join(path, entry["name"], f"{a}.npy"), mmap_mode="r") for a in ARRAYS}
            self._shards.append((start, arrays))
            start += int(entry["rows"])
        self._len = start

    def __len__(self) -> int:
        return self._len

    def _locate(self, i: int) -> Tuple[Dict[str, np.ndarray], int]:
        for start, arrays in reversed(self._shards):
            if i >= start:
                return arrays, i - start
        raise IndexError(i)

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
