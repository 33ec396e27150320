"""What each rank reads: packed rows (prepared by launcher.data before the ranks start, memory-mapped shards), in
a deterministic global order.

Sample k of the run (k = step x global_batch + offset) is packed row perm_e[k mod N] with e = k div N and
perm_e a seeded permutation: the same global batch for any world size or micro batch, and the position to
resume from is just the step. Rows are numbered across shards (store.Rows), so sharding changes nothing here.
"""

from __future__ import annotations

from typing import Dict, Iterator

import numpy as np

from launcher.data.build import build_packed, cache_path
from launcher.data.cache import is_complete
from launcher.data.records import DataError
from launcher.data.store import Rows

# build_packed is here for tests and references that build rows in-process; the ranks only read (is_complete).
__all__ = ["DataError", "Rows", "SampleOrder", "build_packed", "cache_path", "global_targets", "is_complete",
           "micro_batches"]


class SampleOrder:
    """Global sample position -> packed row, epoch by epoch, from a seed only."""

    def __init__(self, num_rows: int, seed: int) -> None:
        self.num_rows = num_rows
        self.seed = seed
        self._epoch = -1
        self._perm = np.arange(0)

    def row(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_rows)
        if epoch != self._epoch:
            self._perm = np.random.default_rng(self.seed + epoch).permutation(self.num_rows)
            self._epoch = epoch
        return int(self._perm[offset])


def micro_batches(
    rows: Rows, order: SampleOrder, step: int, global_batch: int, micro: int, accum: int, rank: int, world: int
) -> Iterator[Dict[str, np.ndarray]]:
    """The `accum` micro batches this rank trains on at `step` (0-based): input_ids, labels, position_ids,
    each [micro, seq_len] int64."""
    base = step * global_batch
    for m in range(accum):
        start = base + (m * world + rank) * micro
        parts = [rows.row(order.row(start + i)) for i in range(micro)]
        yield {key: np.stack([p[j] for p in parts]) for j, key in enumerate(("input_ids", "labels", "position_ids"))}


def global_targets(rows: Rows, order: SampleOrder, step: int, global_batch: int) -> int:
    """Target tokens in the whole global batch of `step` (every rank, every micro batch): the loss divisor.
    Every rank computes it from the sample order alone, without a collective."""
    base = step * global_batch
    return sum(rows.targets(order.row(base + i)) for i in range(global_batch))
