"""Metrics: <run_dir>/metrics.jsonl (appended across resumes) and memory per rank. (MFU: the planner's own
function, launcher.plan.params.mfu, so both count FLOPs the same way; loss.png: plot.py)"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List

import torch


def memory_bytes() -> Dict[str, float]:
    """This rank's memory, named by what it measures.

    GPU: mem_peak_gb = torch.cuda.max_memory_reserved (what the caching allocator took from the device at
    its peak: the unit of the planner's per-rank terms), mem_allocated_peak_gb = max_memory_allocated (live
    tensors only), mem_device_used_gb = device total - free now (mem_get_info): the allocator's reservation
    plus what sits outside it (CUDA context, NCCL buffers, cuBLAS workspaces; the planner's
    CUDA_CONTEXT_RESERVE + GPU_FRAMEWORK_OVERHEAD). CPU: mem_peak_gb = peak RSS of this process (VmHWM).
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        free, total = torch.cuda.mem_get_info()
        return {
            "mem_peak_gb": float(torch.cuda.max_memory_reserved()),
            "mem_allocated_peak_gb": float(torch.cuda.max_memory_allocated()),
            "mem_device_used_gb": float(total - free),
        }
    return {"mem_peak_gb": float(_vmhwm())}


def memory_source() -> str:
    return "cuda_max_memory_reserved" if torch.cuda.is_available() and torch.cuda.is_initialized() else "rss_vmhwm"


def _vmhwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class MetricsLog:
    """Rank 0 appends one JSON object per logged step. On resume, lines past the checkpoint are dropped
    (they belong to steps that will be trained again)."""

    def __init__(self, run_dir: Path, resume_step: int) -> None:
        self.path = run_dir / "metrics.jsonl"
        kept: List[str] = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except ValueError:
                    continue  # a line cut by a crash
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", buffering=1)

    def write(self, record: Dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()
