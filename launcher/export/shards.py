"""Writing the weights: safetensors shards in the output dtype (each materialised, written and freed before the
next, so no second full copy exists), the index for more than one shard, and a re-read of what was written."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

from launcher.errors import ExportError
from launcher.export.locate import Checkpoint
from launcher.export.zero_state import consolidated_state_dict, expected_shapes

DEFAULT_MAX_SHARD_SIZE = "5GB"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_size(text: Any) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500*2**20, 1000000 -> 1000000 (HF's convention: KB/MB/GB are decimal)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE_RE.match(str(text))
        if not m:
            raise ExportError(f"max_shard_size={text}: use a size like 5GB, 500MB or 2GiB")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])
    if value <= 0:
        raise ExportError(f"max_shard_size={text}: must be positive")
    return value


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, _TORCH_DTYPES[name])


def shard_plan(entries: List[Tuple[str, int]], max_bytes: int) -> List[List[str]]:
    """Greedy, order-preserving: a new shard when the next tensor would overflow; big tensors sit alone."""
    shards: List[List[str]] = [[]]
    size = 0
    for name, nbytes in entries:
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_weights(ckpt: Checkpoint, config: Any, dtype: str, tmp: Path, max_bytes: int,
                   log: Callable[[str], None]) -> Tuple[List[str], int, int]:
    import gc

    import torch
    from safetensors.torch import save_file

    target = torch_dtype(dtype)
    expected, tied = expected_shapes(config)
    lazy = consolidated_state_dict(ckpt)

    # Aliases (tied embeddings: lm_head.weight is embed_tokens.weight) are stored once, like save_pretrained.
    first_name: Dict[int, str] = {}
    names: List[str] = []
    for name, value in lazy.items():
        if id(value) in first_name and name in tied:
            continue
        first_name.setdefault(id(value), name)
        names.append(name)
    problems = []
    unexpected = [n for n in names if n not in expected]
    missing = [n for n in expected if n not in names and n not in tied]
    wrong = [f"{n} {tuple(lazy[n].shape)} vs {expected[n]}" for n in names
             if n in expected and tuple(lazy[n].shape) != expected[n]]
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:3]}")
    if missing:
        problems.append(f"missing tensors {missing[:3]}")
    if wrong:
        problems.append(f"shape mismatch {wrong[:3]}")
    if problems:
        raise ExportError(f"checkpoint {ckpt.path} does not match the run's model config: "
                          + "; ".join(problems))

    def nbytes(name: str) -> int:
        value = lazy[name]
        numel = 1
        for d in value.shape:
            numel *= int(d)
        floating = value.dtype.is_floating_point
        return numel * (torch.empty((), dtype=target if floating else value.dtype).element_size())

    sizes = [(n, nbytes(n)) for n in names]
    plan = shard_plan(sizes, max_bytes)
    total_bytes = sum(s for _, s in sizes)
    n_params = sum(int(torch.Size(lazy[n].shape).numel()) for n in names)
    files: List[str] = []
    weight_map: Dict[str, str] = {}
    for i, shard in enumerate(plan, 1):
        fname = "model.safetensors" if len(plan) == 1 else f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for name in shard:
            t = lazy[name].contiguous()  # ZeRO-3: gathers this tensor's partitions from every rank's shard
            t = t.to(dtype=target if t.is_floating_point() else t.dtype, copy=True).contiguous()
            tensors[name] = t
            weight_map[name] = fname
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        _chmod_like_umask(tmp / fname)  # safetensors creates its files 0600
        files.append(fname)
        written = sum(t.numel() * t.element_size() for t in tensors.values())
        log(f"  wrote {fname} ({len(shard)} tensors, {written / 1e6:.1f} MB)")
        del tensors
        for name in shard:  # drop DeepSpeed's references as we go
            lazy[name] = None
        gc.collect()
    if len(plan) > 1:
        index = {"metadata": {"total_size": total_bytes, "total_parameters": n_params}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        files.append("model.safetensors.index.json")
    return files, n_params, total_bytes


def _chmod_like_umask(path: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def verify(tmp: Path, files: List[str], config: Any) -> None:
    """Re-read the written safetensors headers: every tensor the HF model needs is there, in its shape."""
    from safetensors import safe_open

    expected, tied = expected_shapes(config)
    found: Dict[str, Tuple[int, ...]] = {}
    for f in files:
        if f.endswith(".safetensors"):
            with safe_open(str(tmp / f), framework="pt") as st:
                for k in st.keys():
                    found[k] = tuple(st.get_slice(k).get_shape())
    bad = [k for k in expected if k not in tied and found.get(k) != expected[k]]
    bad += [k for k in found if k not in expected]
    if bad:
        raise ExportError(f"the written weights do not match the model config (e.g. {bad[:3]}); nothing exported")
