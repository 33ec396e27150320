"""Metrics: <run_dir>/metrics.jsonl (appended across resumes) and memory per rank. (MFU: the planner's own
function, launcher.plan.params.mfu, so both count FLOPs the same way; loss.png: plot.py)"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List

import torch

# Peaks before the training phase (model build, data preparation), kept when the counters are reset.
_before_training: Dict[str, float] = {}


def _on_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def start_training_phase() -> None:
    """Remember the peaks so far and restart the peak counters: from here on, the training-phase peak.

    CPU: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS (Linux >= 4.0). GPU:
    torch.cuda.reset_peak_memory_stats. The lifetime peak (mem_peak_gb) stays the larger of both phases.
    """
    global _before_training
    _before_training = _phase_peaks()
    if _on_gpu():
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # no reset: the training-phase peak then equals the lifetime peak


def _phase_peaks() -> Dict[str, float]:
    if _on_gpu():
        return {"reserved": float(torch.cuda.max_memory_reserved()),
                "allocated": float(torch.cuda.max_memory_allocated())}
    status = _status_bytes("VmHWM", "RssFile")
    return {"rss": float(status["VmHWM"]), "file": float(status["RssFile"])}


def memory_bytes() -> Dict[str, float]:
    """This rank's memory in bytes, named by what it measures.

    mem_peak_gb: the lifetime peak (model build and data preparation included: an OOM there is still an
    OOM), the figure the planner must not under-predict; mem_train_peak_gb: the peak since
    start_training_phase. GPU: peaks of torch.cuda.max_memory_reserved (what the caching allocator took
    from the device: the unit of the planner's per-rank terms), mem_allocated_peak_gb = max_memory_allocated
    (live tensors only), mem_device_used_gb = device total - free now (mem_get_info): the allocator's
    reservation plus what sits outside it (CUDA context, NCCL buffers, cuBLAS workspaces; the planner's
    CUDA_CONTEXT_RESERVE + GPU_FRAMEWORK_OVERHEAD). CPU: peaks of this process's RSS (VmHWM) less its
    file-backed pages (RssFile, read with it): the anonymous and shared memory, what an OOM is made of.
    File-backed pages are the mapped shared libraries (torch's alone is 430 MB) and data shards: shared by
    every rank on the host, reclaimable, and resident by an amount that depends on the page cache, not on
    the run (a freshly installed venv maps ~65 MB more of the same libraries than one read back from disk;
    RssAnon identical). mem_peak_rss_gb: VmHWM itself, the figure other tools' "peak RSS" compares with.
    """
    now = _phase_peaks()
    before = _before_training or now
    if _on_gpu():
        free, total = torch.cuda.mem_get_info()
        return {
            "mem_peak_gb": max(before["reserved"], now["reserved"]),
            "mem_train_peak_gb": now["reserved"],
            "mem_allocated_peak_gb": max(before["allocated"], now["allocated"]),
            "mem_device_used_gb": float(total - free),
        }
    return {
        "mem_peak_gb": max(before["rss"] - before["file"], now["rss"] - now["file"]),
        "mem_train_peak_gb": now["rss"] - now["file"],
        "mem_peak_rss_gb": max(before["rss"], now["rss"]),
    }


def memory_source() -> str:
    return "cuda_max_memory_reserved" if _on_gpu() else "rss_vmhwm_less_file"


def _status_bytes(*keys: str) -> Dict[str, int]:
    """Fields of /proc/self/status in bytes (0 where the kernel lacks one: RssFile needs Linux >= 4.5)."""
    found = dict.fromkeys(keys, 0)
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in found:
                found[name] = int(value.split()[0]) * 1024
    return found


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
