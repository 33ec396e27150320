"""Finding the checkpoint to export: the newest complete one (or `step=`), checked for every shard its ZeRO
stage and world size imply. No torch: mistakes here cost well under a second."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from launcher.errors import ExportError

CHECKPOINTS = "checkpoints"
DONE = "DONE"
TAG_RE = re.compile(r"^step_(\d+)$")


@dataclass
class Checkpoint:
    run_dir: Path
    ckpt_dir: Path  # <run_dir>/checkpoints
    tag: str
    step: int
    stage: int
    world: int
    notes: List[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.ckpt_dir / self.tag


def load_run_config(run_dir: Path) -> Any:
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{run_dir} is not a launcher run dir (no config.yaml)")
    try:
        return OmegaConf.load(path)
    except Exception as exc:  # noqa: BLE001 - a broken YAML file is a user-facing problem
        raise ExportError(f"cannot read {path}: {exc}") from None


def _steps(tags: List[str]) -> str:
    return ", ".join(str(int(TAG_RE.match(t).group(1))) for t in tags) if tags else "none"  # type: ignore[union-attr]


def _world_size(run_dir: Path) -> Optional[int]:
    """Data-parallel ranks of the run: train_batch_size / (micro batch x accumulation) in ds_config.json."""
    try:
        ds = json.loads((run_dir / "ds_config.json").read_text())
        return int(ds["train_batch_size"]) // (
            int(ds["train_micro_batch_size_per_gpu"]) * int(ds["gradient_accumulation_steps"]))
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def expected_files(stage: int, world: int) -> List[str]:
    """The shard files (glob patterns) a complete ZeRO checkpoint written by `world` ranks contains."""
    optim = [f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    if stage == 3:
        return [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)] + optim
    return ["mp_rank_00_model_states.pt"] + optim


def checkpoint_world(path: Path, run_dir: Path) -> int:
    """Ranks that wrote the checkpoint: each saves its RNG state (launcher.worker.ckpt) before DONE exists;
    without those files, the run's current shape (ds_config.json)."""
    return len(list(path.glob("rng_rank*.pt"))) or _world_size(run_dir) or 1


def check_complete(path: Path, stage: int, world: int) -> None:
    if not (path / DONE).is_file():
        raise ExportError(f"checkpoint {path} is incomplete: no {DONE} marker (its save was interrupted)")
    missing = []
    for pattern in expected_files(stage, world):
        hits = [p for p in path.glob(pattern) if p.is_file() and p.stat().st_size > 0]
        if not hits:
            missing.append(pattern.lstrip("*"))
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ExportError(f"checkpoint {path} is incomplete: missing or empty {shown} "
                          f"(ZeRO-{stage}, {world} ranks)")


def find_checkpoint(run_dir: Path, step: Optional[int] = None) -> Checkpoint:
    """The checkpoint to export: `step`, or the newest complete one. Raises ExportError with advice."""
    if not run_dir.is_dir():
        raise ExportError(f"no checkpoint in {run_dir}: no such directory; train first")
    cfg = load_run_config(run_dir)
    ckpt_dir = run_dir / CHECKPOINTS
    tags = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir() and TAG_RE.match(p.name)) \
        if ckpt_dir.is_dir() else []
    if not tags:
        raise ExportError(f"no checkpoint in {run_dir}; train first")
    complete = [t for t in tags if (ckpt_dir / t / DONE).is_file()]
    incomplete = [t for t in tags if t not in complete]
    stage = int(cfg.zero.stage)
    notes: List[str] = []
    if step is None:
        if not complete:
            raise ExportError(f"no complete checkpoint in {ckpt_dir}: step(s) {_steps(incomplete)} have no {DONE} "
                              "marker (interrupted saves); resume training to write a complete one")
        tag = complete[-1]
        newer = [t for t in incomplete if t > tag]
        if newer:
            notes.append(f"note: skipping incomplete checkpoint(s) at step {_steps(newer)} (no {DONE} marker)")
    else:
        tag = f"step_{step:08d}"
        if tag not in tags:
            extra = f" (incomplete: {_steps(incomplete)})" if incomplete else ""
            raise ExportError(f"step={step}: no checkpoint for step {step} in {ckpt_dir}; "
                              f"available steps: {_steps(complete)}{extra}")
    world = checkpoint_world(ckpt_dir / tag, run_dir)
    try:
        check_complete(ckpt_dir / tag, stage, world)
    except ExportError as exc:
        raise ExportError(f"{exc}; complete steps: {_steps(complete)}") from None
    return Checkpoint(run_dir, ckpt_dir, tag, int(TAG_RE.match(tag).group(1)), stage, world, notes)  # type: ignore
