"""Metrics: <run_dir>/metrics.jsonl (appended across resumes), peak memory per rank, MFU, loss curve PNG."""

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


def flops_per_token(n_params: int, n_embedding: int, layers: int, hidden: int, seq_len: int,
                    n_trainable: Optional[int] = None) -> float:
    """Model FLOPs per trained token: the matmul work actually done plus attention (PaLM appendix B).

    Full training: 6 x (N - embedding) + 12 x L x H x T (H = heads x head dim, T = sequence length).
    With a frozen base (LoRA, n_trainable given): forward 2 x N' + backward activation gradients 2 x N' +
    weight gradients only for the trainable parameters 2 x N_trainable, N' = N - embedding (N counts the
    adapters); the attention term is unchanged (its backward has no weights).
    """
    matmul = n_params - n_embedding
    weight_grads = matmul if n_trainable is None else n_trainable
    return 4.0 * matmul + 2.0 * weight_grads + 12.0 * layers * hidden * seq_len


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


def plot_loss(run_dir: Path) -> Optional[Path]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("loss") is not None]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], marker=".", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out
