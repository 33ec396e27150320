"""precision=auto (the default): bf16 where the hardware has it, fp16 on GPUs without it, fp32 on CPU ranks.

Decided from the hardware profile (hardware.bf16) or, with hardware=local on a GPU node (also inside a
SLURM job), from the GPUs found there (compute capability 8.0+ = Ampere or newer has bf16). No torch.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig

from launcher.config.topology import Topology

BF16_MIN_COMPUTE_CAPABILITY = 8.0  # A100 (8.0), H100 (9.0); V100 (7.0) and T4 (7.5) have no bf16


def choose_precision(cfg: DictConfig, topo: Topology, local_bf16: Optional[bool] = None) -> Tuple[str, str]:
    """(precision option, reason). `local_bf16`: whether this node's GPUs have bf16 (None: ask nvidia-smi)."""
    if topo.accelerator == "cpu":
        return "fp32", "CPU ranks: fp32 (bf16/fp16 on CPU are slower here and fp16 needs AVX512-FP16)"
    hw = cfg.hardware
    if hw.gpus_per_node is not None:  # a named GPU profile says what it has
        if hw.bf16:
            return "bf16", f"hardware={hw.name} supports bf16"
        return "fp16", f"hardware={hw.name} has no bf16 (hardware.bf16=false): fp16 with dynamic loss scaling"
    has_bf16 = local_gpus_have_bf16() if local_bf16 is None else local_bf16
    if has_bf16:
        return "bf16", "this node's GPUs support bf16 (compute capability >= 8.0)"
    return "fp16", "this node's GPUs have no bf16 (compute capability < 8.0): fp16 with dynamic loss scaling"


def resolve_auto_precision(cfg: DictConfig, topo: Topology,
                           overrides: Sequence[str]) -> Tuple[List[str], Dict[str, Any]]:
    """precision=auto -> (overrides with precision=<choice>, note for config.yaml's notes.precision). As an
    override, so the chosen group file's values (fp16 loss scaling) apply; precision.* field overrides stay."""
    choice, reason = choose_precision(cfg, topo)
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "precision"]
    return [*kept, f"precision={choice}"], {"chosen": choice, "reason": reason}


def local_gpus_have_bf16() -> bool:
    """Every visible GPU reports compute capability >= 8.0 (nvidia-smi; False when it cannot tell)."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout
        caps = [float(line) for line in out.split() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return False
    return bool(caps) and min(caps) >= BF16_MIN_COMPUTE_CAPABILITY
