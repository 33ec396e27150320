"""How much memory a rank may use: the profile's GPU memory, or this node's RAM for CPU ranks.

Both sources are injectable (tests, a submit host planning for another machine); nothing here needs the
GPUs to be present: a profile's gpu_memory_gib / host_ram_gib are used as given.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from omegaconf import DictConfig

from launcher.config.topology import Topology
from launcher.plan.memory import CUDA_CONTEXT_RESERVE_GIB, GIB, HOST_OS_RESERVE_GIB


@dataclass(frozen=True)
class Capacity:
    device_per_rank: int | None  # usable bytes per rank (GPU memory, or a share of host RAM)
    host_per_node: int | None  # usable host bytes per node (offloaded state); None: unknown
    source: str  # how device_per_rank was derived, for messages


def read_meminfo_total(path: str = "/proc/meminfo") -> int | None:
    """This node's MemTotal in bytes, or None where /proc/meminfo is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def query_gpu_memory() -> int | None:
    """Smallest total memory of this node's GPUs (nvidia-smi), or None without GPUs."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout
        sizes = [int(float(x)) * 1024**2 for x in out.split() if x.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return min(sizes) if sizes else None


def capacity(cfg: DictConfig, topo: Topology, host_mem_bytes: int | None = None,
             gpu_mem_bytes: int | None = None) -> Capacity:
    """Usable memory per rank and host memory per node.

    host_mem_bytes: a node's RAM (default: hardware.host_ram_gib, else this node's /proc/meminfo when the
    profile is this node). gpu_mem_bytes: one GPU's memory (default: hardware.gpu_memory_gib, else
    nvidia-smi for hardware=local).
    """
    hw = cfg.hardware
    this_node = hw.gpus_per_node is None  # hardware=local describes the machine we run on
    host = host_mem_bytes
    if host is None and hw.host_ram_gib is not None:
        host = int(float(hw.host_ram_gib) * GIB)
    if host is None and this_node:
        host = read_meminfo_total()
    host_usable = None if host is None else max(0, host - int(HOST_OS_RESERVE_GIB * GIB))
    if topo.accelerator == "cpu":
        if host_usable is None:
            return Capacity(None, None, "host RAM unknown")
        per_rank = host_usable // topo.ranks_per_node
        source = (f"{host / GIB:.1f} GiB host RAM - {HOST_OS_RESERVE_GIB:g} GiB reserve, "
                  f"/ {topo.ranks_per_node} CPU ranks")
        return Capacity(per_rank, host_usable, source)
    gpu = gpu_mem_bytes
    if gpu is None and hw.gpu_memory_gib is not None:
        gpu = int(float(hw.gpu_memory_gib) * GIB)
    if gpu is None and this_node:
        gpu = query_gpu_memory()
    if gpu is None:
        return Capacity(None, host_usable, "GPU memory unknown (set hardware.gpu_memory_gib)")
    source = f"{gpu / GIB:g} GiB - {CUDA_CONTEXT_RESERVE_GIB:g} GiB CUDA context"
    return Capacity(gpu - int(CUDA_CONTEXT_RESERVE_GIB * GIB), host_usable, source)
