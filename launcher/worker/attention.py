"""Attention over packed rows on CPU ranks: scaled-dot-product attention record by record.

A packed row holds several records with position_ids restarting at 0 for each and no attention_mask.
transformers' `sdpa` then builds a block-diagonal causal mask over the whole row and computes every query
against every key of the row, masked ones included: seq_len^2 work per row, however short the records.
On GPUs flash_attention_2 avoids that with its varlen kernel (cu_seqlens from the same position_ids); on CPU
there is no varlen kernel, so `packed_sdpa` cuts the row at the restarts and runs causal SDPA on each record
alone: sum(len_i^2) work, the same function (the mask only ever zeroed cross-record terms). Measured on the
compare_sft model (10M Llama, seq 1024, ~6 records a row), forward + backward CPU time -27%, losses equal to
printed precision (bench/compare_sft.py, docs/benchmarks.md).

Why fp32 CPU ranks only: in bf16/fp16 the CPU kernel keeps memory per record length, and on GPUs cutting the
row needs the record boundaries on the host, one device sync per forward (launcher.models.attention.resolve
decides, for the ranks and the planner alike; flash_attention_2 is the GPU answer). The boundaries are
computed once per forward (all layers receive the same position_ids tensor) and, on CPU, cost no sync.
"""

from __future__ import annotations

import weakref
from typing import Any, List, Optional, Tuple

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from launcher.models.attention import PACKED_SDPA, resolve

__all__ = ["PACKED_SDPA", "packed_sdpa_forward", "record_bounds", "resolve"]


# (position_ids tensor, its records' bounds per row): the last forward's, shared by all its layers.
_last: Tuple[Optional[weakref.ref], List[List[Tuple[int, int]]]] = (None, [])


def record_bounds(position_ids: torch.Tensor) -> List[List[Tuple[int, int]]]:
    """[(start, end), ...] per row: a record starts where the position does not follow the one before."""
    global _last
    ref, bounds = _last
    if ref is not None and ref() is position_ids:
        return bounds
    pos = position_ids.detach().cpu()
    length = pos.shape[-1]
    bounds = []
    for row in pos:
        starts = [0] + (torch.nonzero(row[1:] != row[:-1] + 1).flatten() + 1).tolist()
        bounds.append(list(zip(starts, starts[1:] + [length])))
    _last = (weakref.ref(position_ids), bounds)
    return bounds


def packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs: Any,
) -> Tuple[torch.Tensor, None]:
    """query/key/value [batch, heads, seq, head_dim] -> ([batch, seq, heads, head_dim], None), like sdpa."""
    position_ids = kwargs.get("position_ids")
    if (attention_mask is not None or position_ids is None or position_ids.shape[0] != query.shape[0]
            or query.shape[2] != key.shape[2]):
        # A padding mask, positions shared by the batch, or a KV cache (generation): transformers' sdpa as is.
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows = []
    # split(), not slicing: a slice's backward writes its gradient into a zero-filled tensor of the whole input,
    # once per record (profiled: aten::fill_ 10% of a 100M model's step); split's backward is one cat.
    for bounds, q, k, v in zip(record_bounds(position_ids), query.split(1), key.split(1), value.split(1)):
        sizes = [e - s for s, e in bounds]
        parts = [
            sdpa_attention_forward(module, qr, kr, vr, None, dropout=dropout, scaling=scaling, is_causal=True)[0]
            for qr, kr, vr in zip(q.split(sizes, dim=2), k.split(sizes, dim=2), v.split(sizes, dim=2))
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return (rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
