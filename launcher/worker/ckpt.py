"""Checkpoints under <run_dir>/checkpoints/<tag>: DeepSpeed's engine state plus our client state (step,
data position) and each rank's RNG state. The `latest` pointer (DeepSpeed's format, so
`load_checkpoint` and `zero_to_fp32.py` understand it) is written atomically and only after every rank
has finished writing: a crash mid-save leaves the previous checkpoint as the one to resume from.

Durable, not just ordered: each rank fsyncs its shards, rank 0 fsyncs the DONE marker and the directories
before `latest` moves, so a power loss cannot leave `latest` naming a tag whose data never reached the disk.
A tag without DONE (a save cut by a crash) is never resumed from and is removed at the next successful save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from launcher.export.swap import fsync_path, fsync_tree
from launcher.worker import comm

LATEST = "latest"
# The checkpoint's shape, read by the launcher (launcher.launch.resume) before a resume on another world size.
INFO = "launcher.json"
UNIVERSAL_SUFFIX = "_universal"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# For tests only: a checkpoint that takes this many seconds longer (a real 8B ZeRO-3 save takes minutes).
SLOW_SAVE_ENV = "LAUNCHER_TEST_SLOW_SAVE_S"


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    """The tag `latest` names if it is complete, else the newest complete tag (None: no checkpoint)."""
    pointer = ckpt_dir / LATEST
    tag = pointer.read_text().strip() if pointer.is_file() else None
    if tag and (ckpt_dir / tag / "DONE").is_file():
        return tag
    done = complete_tags(ckpt_dir)
    return done[-1] if done else None


def incomplete_tags(ckpt_dir: Path) -> List[str]:
    return sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir() and not (p / "DONE").is_file())


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
    rank = comm.rank()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=frozen)
    torch.save(_rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    slow = float(os.environ.get(SLOW_SAVE_ENV, "0"))
    if slow:
        time.sleep(slow)
    fsync_tree(ckpt_dir / tag)  # this rank's files (and, harmlessly, its peers' on a shared filesystem)
    comm.barrier()  # every rank's shards and RNG files are on disk
    if rank == 0:
        _write_durable(ckpt_dir / tag / INFO, json.dumps(checkpoint_info(engine, step), indent=1) + "\n")
        _write_durable(ckpt_dir / tag / "DONE", f"{step}\n")
        fsync_path(ckpt_dir / tag)
        fsync_path(ckpt_dir)
        _write_durable(ckpt_dir / f".{LATEST}.tmp", tag)
        os.replace(ckpt_dir / f".{LATEST}.tmp", ckpt_dir / LATEST)
        fsync_path(ckpt_dir)
        for old in complete_tags(ckpt_dir)[:-keep_last] + [t for t in incomplete_tags(ckpt_dir) if t != tag]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        # A normal checkpoint at this world size now exists: universal copies made for this resume are spent.
        for spent in ckpt_dir.glob(f"*{UNIVERSAL_SUFFIX}"):
            shutil.rmtree(spent, ignore_errors=True)
        (ckpt_dir / "latest_universal").unlink(missing_ok=True)
    comm.barrier()
    return tag


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_info(engine: Any, step: int) -> Dict[str, Any]:
    offload = engine.zero_offload_optimizer()  # DeepSpeedZeroOffloadOptimizerConfig or None
    device = getattr(offload, "device", None) if offload else None
    return {
        "step": step,
        "world_size": comm.world_size(),  # data-parallel size: no tensor or pipeline parallelism here
        "zero_stage": int(engine.zero_optimization_stage()),
        "global_batch": int(engine.train_batch_size()),
        "micro_batch": int(engine.train_micro_batch_size_per_gpu()),
        "gradient_accumulation": int(engine.gradient_accumulation_steps()),
        "offload_device": str(getattr(device, "value", device) or "none"),
        "frozen_params": any(not p.requires_grad for p in engine.module.parameters()),
    }


def load(engine: Any, ckpt_dir: Path, frozen: bool = False) -> Optional[Dict[str, Any]]:
    """Load the latest complete checkpoint into the engine; returns its client state (None: fresh start).
    frozen: the checkpoint holds only the trainable parameters; the frozen ones keep their loaded values.
    With `load_universal` set (the launcher converted a checkpoint saved at another world size), the
    universal copy named by `latest_universal` is loaded instead; per-rank RNG state does not carry over."""
    if engine.load_universal_checkpoint():
        pointer = ckpt_dir / "latest_universal"
        tag = pointer.read_text().strip()
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"universal checkpoint {ckpt_dir / tag} could not be loaded")
        return client_state
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=not frozen)
    if path is None:
        raise RuntimeError(f"checkpoint {ckpt_dir / tag} could not be loaded")
    rng_file = ckpt_dir / tag / f"rng_rank{comm.rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
