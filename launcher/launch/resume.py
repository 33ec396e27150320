"""Resume on a different world size: read the checkpoint's shape, keep its global batch, convert ZeRO state.

DeepSpeed refuses to load ZeRO optimizer state saved at another data-parallel size. Its universal
checkpoint format (`deepspeed.checkpoint.ds_to_universal`, loaded with `"checkpoint": {"load_universal":
true}`) stores each parameter's fp32 value and Adam moments whole, so any world can re-partition them.
Here, before any rank starts:

1. `plan_world_change` reads `launcher.json` (written by the worker into every checkpoint tag) and, when its
   world size differs from the new one, keeps the recorded global batch and re-derives micro x accumulation
   for the new world (or refuses, naming the sizes that divide it);
2. `convert_checkpoint` runs the converter once into `<tag>_universal`, after a free-disk check, and marks
   the result complete (`CONVERTED`) so a crashed conversion is redone rather than loaded.

The worker then loads the universal copy (it follows `latest_universal`), saves normal checkpoints at the
new size, and removes universal copies once a newer normal checkpoint exists. No torch, no deepspeed import:
the converter runs as a subprocess.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from omegaconf import DictConfig

from launcher.config.topology import Topology
from launcher.errors import ConfigError

CHECKPOINT_INFO = "launcher.json"  # written by launcher.worker.ckpt into each tag
CONVERTED = "CONVERTED"
UNIVERSAL_SUFFIX = "_universal"


@dataclass(frozen=True)
class WorldChange:
    tag_dir: Path
    step: int
    old_world: int
    new_world: int
    zero_stage: int
    global_batch: int
    micro: int

    @property
    def universal_dir(self) -> Path:
        return self.tag_dir.with_name(self.tag_dir.name + UNIVERSAL_SUFFIX)

    def describe(self) -> str:
        return (f"resume: checkpoint {self.tag_dir.name} was saved on {self.old_world} rank(s), this launch has "
                f"{self.new_world}: converting its ZeRO-{self.zero_stage} state to a universal checkpoint and "
                f"keeping the global batch of {self.global_batch} ({self.micro} micro x "
                f"{self.global_batch // (self.micro * self.new_world)} accum x {self.new_world} ranks)")


def latest_checkpoint_info(ckpt_dir: Path) -> Optional[tuple[Path, dict]]:
    """The latest complete checkpoint tag (DeepSpeed's `latest` pointer, DONE marker present) and its info."""
    pointer = ckpt_dir / "latest"
    if not pointer.is_file():
        return None
    tag_dir = ckpt_dir / pointer.read_text().strip()
    info = tag_dir / CHECKPOINT_INFO
    if not (tag_dir / "DONE").is_file() or not info.is_file():
        return None  # a checkpoint from before launcher.json: same-size resume only, checked by DeepSpeed
    return tag_dir, json.loads(info.read_text())


def finished_step(run_dir: Path, max_steps: int) -> Optional[int]:
    """The latest checkpoint's step when it has reached max_steps (a relaunch has nothing to train)."""
    found = latest_checkpoint_info(run_dir / "checkpoints")
    step = int(found[1]["step"]) if found else None
    return step if step is not None and step >= max_steps else None


def adopt_checkpoint_batch(cfg: DictConfig, topo: Topology, run_dir: Path) -> Optional[WorldChange]:
    """Set the config's batch from the run's latest checkpoint (the global batch never changes on a resume);
    return the world change when the checkpoint was saved at another data-parallel size."""
    found = latest_checkpoint_info(run_dir / "checkpoints")
    if found is None:
        return None
    tag_dir, info = found
    saved_global, saved_world = int(info["global_batch"]), int(info["world_size"])
    asked = cfg.train.global_batch_size
    if asked is not None and int(asked) != saved_global:
        raise ConfigError(
            "train.global_batch_size",
            f"{asked} differs from the {saved_global} this run was trained with (checkpoint {tag_dir.name}); a "
            f"resume keeps the global batch so the data position stays exact: drop the override or set "
            f"train.global_batch_size={saved_global}, or start a new run with name=<new name>",
        )
    new_world = topo.world_size
    micro = _micro_for(saved_global, new_world, int(cfg.train.micro_batch_size), tag_dir.name, saved_world)
    cfg.train.global_batch_size = saved_global
    cfg.train.micro_batch_size = micro
    if new_world == saved_world or int(info["step"]) >= int(cfg.train.max_steps):
        return None  # same shape, or finished: nothing to convert
    if info.get("frozen_params"):
        raise ConfigError(
            "hardware",
            f"checkpoint {tag_dir.name} holds frozen parameters (adapters) saved on {saved_world} rank(s); DeepSpeed's "
            f"universal conversion needs optimizer state for every parameter: resume on {saved_world} rank(s)",
        )
    if info.get("offload_device") == "nvme":
        raise ConfigError(
            "offload",
            f"checkpoint {tag_dir.name} keeps optimizer state on NVMe, which DeepSpeed 0.19.8 does not load from a "
            f"universal checkpoint: resume on {saved_world} rank(s)",
        )
    return WorldChange(tag_dir, int(info["step"]), saved_world, new_world, int(info["zero_stage"]), saved_global,
                       micro)


def _micro_for(glob: int, world: int, wanted: int, tag: str, saved_world: int) -> int:
    """The largest micro batch <= the configured one with micro x accum x world == glob."""
    if glob % world != 0:
        valid = [w for w in range(1, glob + 1) if glob % w == 0]
        raise ConfigError(
            "hardware",
            f"the global batch of {glob} sequences (checkpoint {tag}, {saved_world} rank(s)) cannot be split over "
            f"{world} ranks; resume on one of {', '.join(map(str, valid))} ranks (hardware.cpu_ranks / "
            f"hardware.gpus_per_node x cluster.nodes)",
        )
    per_rank = glob // world
    return max(m for m in range(1, min(wanted, per_rank) + 1) if per_rank % m == 0)


def universal_ds_config(ds: dict) -> dict:
    return {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}


def convert_checkpoint(change: WorldChange, python: str = sys.executable) -> List[str]:
    """Convert change.tag_dir into <tag>_universal (once); returns lines to print. Raises ConfigError when
    the disk is too small or the converter fails (its last output line is named)."""
    out = change.universal_dir
    if (out / CONVERTED).is_file():
        _point_latest_universal(out)
        return [f"resume: using {out.name} (converted earlier)"]
    if out.exists():
        shutil.rmtree(out)  # a conversion that crashed: redo it rather than load half of it
    need = 2 * _optimizer_bytes(change.tag_dir)  # the universal copy plus the converter's temp folder
    free = shutil.disk_usage(change.tag_dir.parent).free
    if free < need:
        raise ConfigError(
            "checkpoint",
            f"converting {change.tag_dir.name} to a universal checkpoint needs ~{need / 2**30:.1f} GiB free in "
            f"{change.tag_dir.parent}, {free / 2**30:.1f} GiB are; free space or resume on {change.old_world} rank(s)",
        )
    cmd = [python, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(change.tag_dir),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    if change.zero_stage in (1, 2):
        cmd.append("--inject_missing_state")  # plain HF models carry no universal_checkpoint_info
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit code {proc.returncode}"
        raise ConfigError(
            "checkpoint",
            f"converting {change.tag_dir.name} to a universal checkpoint failed ({why}); "
            f"resume on {change.old_world} rank(s)",
        )
    shutil.rmtree(out / "tmp", ignore_errors=True)
    (out / CONVERTED).write_text(f"{change.step} {change.old_world}\n")
    _point_latest_universal(out)
    return [f"resume: converted {change.tag_dir.name} ({change.old_world} ranks) to {out.name} "
            f"for {change.new_world} ranks"]


def _point_latest_universal(out: Path) -> None:
    # The converter writes this pointer itself; rewrite it when reusing a conversion (atomic replace).
    tmp = out.parent / ".latest_universal.tmp"
    tmp.write_text(out.name)
    tmp.replace(out.parent / "latest_universal")


def _optimizer_bytes(tag_dir: Path) -> int:
    return sum(f.stat().st_size for f in tag_dir.glob("*optim_states.pt"))
