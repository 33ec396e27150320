"""Checkpoints under <run_dir>/checkpoints/<tag>: DeepSpeed's engine state plus our client state (step,
data position) and each rank's RNG state. The `latest` pointer (DeepSpeed's format, so
`load_checkpoint` and `zero_to_fp32.py` understand it) is written atomically and only after every rank
has finished writing: a crash mid-save leaves the previous checkpoint as the one to resume from.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from launcher.worker import comm

LATEST = "latest"


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


def save(engine: Any, ckpt_dir: Path, step: int, client_state: Dict[str, Any], keep_last: int) -> str:
    tag = tag_for(step)
    rank = comm.rank()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    comm.barrier()  # every rank's shards and RNG files are on disk
    if rank == 0:
        (ckpt_dir / tag / "DONE").write_text(f"{step}\n")
        tmp = ckpt_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)
        for old in complete_tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    comm.barrier()
    return tag


def load(engine: Any, ckpt_dir: Path) -> Optional[Dict[str, Any]]:
    """Load the latest complete checkpoint into the engine; returns its client state (None: fresh start)."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"checkpoint {ckpt_dir / tag} could not be loaded")
    rng_file = ckpt_dir / tag / f"rng_rank{comm.rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
