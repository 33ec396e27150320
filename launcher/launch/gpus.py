"""The GPUs this node actually has (nvidia-smi), compared with the hardware profile before any rank starts.

`hardware=8xh100` on A100-40GB nodes would otherwise pass every check (only the GPU count is compared) and
the plan would assume 80 GiB and the H100's peak. Without nvidia-smi (a CPU host, a submit host) nothing is
checked. nvidia-smi lists every GPU of the node whatever CUDA_VISIBLE_DEVICES says; the check uses the
visible ones when their indices are known.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from launcher.errors import ConfigError

QUERY = ["nvidia-smi", "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader"]
# A profile's gpu_memory_gib is nominal: an H100 SXM "80 GB" reports 81559 MiB = 79.6 GiB, an A100 80GB
# 81920 MiB, an A100 40GB 40960 MiB. Measured memory within this fraction of the profile's matches it.
MEMORY_TOLERANCE = 0.08
GIB_PER_MIB = 1 / 1024


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    compute_cap: str


def parse_query(text: str) -> List[Gpu]:
    """`NVIDIA H100 80GB HBM3, 81559 MiB, 9.0` lines -> Gpu records (unparseable lines are skipped)."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            continue
        m = re.match(r"^([\d.]+)\s*MiB$", parts[1])
        if not m:
            continue
        gpus.append(Gpu(parts[0], float(m.group(1)) * GIB_PER_MIB, parts[2]))
    return gpus


def query_gpus(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> Optional[List[Gpu]]:
    """This node's GPUs, or None when nvidia-smi is absent or fails (nothing to check)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = run(QUERY, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_query(out.stdout) if out.returncode == 0 else None


def select_visible(gpus: Sequence[Gpu], visible: Optional[Sequence[str]]) -> List[Gpu]:
    if not visible or not all(v.isdigit() and int(v) < len(gpus) for v in visible):
        return list(gpus)
    return [gpus[int(v)] for v in visible]


def matches(profile: DictConfig, gpu: Gpu) -> bool:
    """The profile's gpu_name (a regular expression, case-insensitive) and memory (within the tolerance)."""
    if profile.get("gpu_name") and not re.search(str(profile.gpu_name), gpu.name, re.IGNORECASE):
        return False
    want = profile.get("gpu_memory_gib")
    return want is None or abs(gpu.memory_gib - float(want)) <= MEMORY_TOLERANCE * float(want)


def profiles() -> List[DictConfig]:
    from launcher.config.compose import config_dir

    return [OmegaConf.load(p) for p in sorted((config_dir() / "hardware").glob("*.yaml"))]


def check_gpu_model(cfg: DictConfig, gpus: Sequence[Gpu], visible: Optional[Sequence[str]] = None) -> List[str]:
    """Refuse a profile whose GPU is not the node's (one line naming both and the profile that fits);
    force=true turns the refusal into a note. Returns note lines."""
    hw = cfg.hardware
    used = select_visible(gpus, visible)
    if hw.gpus_per_node is None or not used or not hw.get("gpu_name"):
        return []
    odd = next((g for g in used if not matches(hw, g)), None)
    if odd is None:
        return []
    fits = [str(p.name) for p in profiles() if p.get("gpus_per_node") and p.get("gpu_name") and matches(p, odd)]
    fix = f"use hardware={fits[0]}" if fits else "use hardware=local (no profile describes this GPU)"
    message = (f"hardware={hw.name} expects {hw.gpu_name} GPUs with {float(hw.gpu_memory_gib):g} GiB but this node "
               f"has {odd.name} with {odd.memory_gib:.1f} GiB; {fix}")
    if cfg.force:
        return [f"note: {message} (force=true: launching anyway)"]
    raise ConfigError("hardware", f"{message}, or force=true to launch anyway")


def smallest_memory_bytes(gpus: Sequence[Gpu], visible: Optional[Sequence[str]] = None) -> Optional[int]:
    used = select_visible(gpus, visible)
    return int(min(g.memory_gib for g in used) * 1024**3) if used else None
