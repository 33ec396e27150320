"""Checkpoints under <run_dir>/checkpoints/<tag>: DeepSpeed's engine state plus our client state (step,
data position) and each rank's RNG state. The `latest` pointer (DeepSpeed's format, so
`load_checkpoint` and `zero_to_fp32.py` understand it) is written atomically and only after every rank
has finished writing: a crash mid-save leaves the previous checkpoint as the one to resume from.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"
INFO = "launcher.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (ckpt_dir / tag).is_dir() else None


def complete_tags(ckpt_dir: Path) -> List[str]:
    """Tags that were fully written (each has a DONE marker), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.parent.name for p in ckpt_dir.glob("step_*/DONE"))


def _rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine: Any, ckpt_dir: Path, step: int, client_state: Dict[str, Any], keep_last: int,
         frozen: bool = False) -> str:
    """frozen: a frozen base (LoRA): only the trainable parameters and their optimizer state are written."""
    tag = tag_for(step)
    rank = dist.get_rank()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=frozen)
    torch.save(_rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    dist.barrier()  # every rank's shards and RNG files are on disk
    if rank == 0:
        # frozen_params: the checkpoint lacks the frozen base (reloaded from model.path on resume).
        (ckpt_dir / tag / INFO).write_text(json.dumps({"step": step, "frozen_params": frozen}) + "\n")
        (ckpt_dir / tag / "DONE").write_text(f"{step}\n")
        tmp = ckpt_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)
        for old in complete_tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()
    return tag


def load(engine: Any, ckpt_dir: Path, frozen: bool = False) -> Optional[Dict[str, Any]]:
    """Load the latest complete checkpoint into the engine; returns its client state (None: fresh start).
    frozen: the checkpoint holds only the trainable parameters; the frozen ones keep their loaded values."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=not frozen)
    if path is None:
        raise RuntimeError(f"checkpoint {ckpt_dir / tag} could not be loaded")
    rng_file = ckpt_dir / tag / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
