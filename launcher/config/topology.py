"""World shape: nodes x ranks per node, and the batch arithmetic that depends on it.

World size comes from the config (cluster.nodes x the hardware profile's GPUs per node), never from the
submitting host, except for `hardware=local`, which means "this node's GPUs, or CPU ranks if none".
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import List, Mapping, Optional

from omegaconf import DictConfig


@dataclass(frozen=True)
class Topology:
    nodes: int
    ranks_per_node: int
    # "cuda" on GPUs, "cpu" for DeepSpeed's CPU accelerator (gloo).
    accelerator: str

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


@dataclass(frozen=True)
class BatchShape:
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size


def visible_gpu_ids(env: Mapping[str, str]) -> Optional[List[str]]:
    """CUDA_VISIBLE_DEVICES as a list of ids ([] when it hides every GPU), None when it is unset."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    ids = [d.strip() for d in visible.split(",") if d.strip()]
    # CUDA stops at the first invalid id ("-1" hides everything after it).
    return ids[: ids.index("-1")] if "-1" in ids else ids


def detect_local_gpus() -> int:
    """GPUs visible on this node, without importing torch (CUDA_VISIBLE_DEVICES, then nvidia-smi)."""
    visible = visible_gpu_ids(os.environ)
    if visible is not None:
        return len(visible)
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def resolve_topology(cfg: DictConfig, local_gpus: int) -> Topology:
    hw = cfg.hardware
    if hw.gpus_per_node is None:
        if local_gpus > 0:
            return Topology(cfg.cluster.nodes, local_gpus, "cuda")
        return Topology(cfg.cluster.nodes, hw.cpu_ranks, "cpu")
    return Topology(cfg.cluster.nodes, hw.gpus_per_node, "cuda")


def batch_shape(cfg: DictConfig, topo: Topology) -> BatchShape:
    """Derive gradient accumulation; validate() has already checked divisibility."""
    micro = cfg.train.micro_batch_size
    glob = cfg.train.global_batch_size
    accum = 1 if glob is None else glob // (micro * topo.world_size)
    return BatchShape(micro, accum, topo.world_size)
