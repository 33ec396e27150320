"""Metrics: <run_dir>/metrics.jsonl (appended across resumes), peak memory per rank, MFU. (loss.png: plot.py)"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch


def peak_memory_bytes() -> int:
    """CUDA max allocated on GPU; peak RSS (VmHWM) of this process on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def flops_per_token(n_params: int, n_embedding: int, layers: int, hidden: int, seq_len: int) -> float:
    """6 x (N - embedding) + 12 x L x H x T (PaLM appendix B; attention over T tokens, H = heads x head dim)."""
    return 6.0 * (n_params - n_embedding) + 12.0 * layers * hidden * seq_len


def mfu(tokens_per_sec: float, flops_tok: float, world: int, peak_tflops: Optional[float]) -> Optional[float]:
    if not peak_tflops:
        return None
    return tokens_per_sec * flops_tok / (world * peak_tflops * 1e12)


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
