"""Which GPUs this rank sees, fixed before torch initialises CUDA.

Inside a SLURM job the node's runner is started with `--no_ssh --num_gpus N` and sets every rank's
CUDA_VISIBLE_DEVICES to 0..N-1 (DeepSpeed's launch.py), whatever GPUs SLURM gave the step. The sbatch script
passes the step's own list as LAUNCHER_JOB_GPUS (its CUDA_VISIBLE_DEVICES, else SLURM_JOB_GPUS); here the
runner's ids, which index the node's slots, are mapped back to those GPUs, so cuda:LOCAL_RANK is the
allocation's GPU LOCAL_RANK. CPU ranks (DS_ACCELERATOR=cpu) see no GPU at all, so a GPU host runs them the
same as a CPU host. Pure string logic, no torch: unit-tested in tests/test_gpu_path.py.
"""

from __future__ import annotations

from typing import Dict, Mapping, MutableMapping, Optional


def rank_visible_devices(env: Mapping[str, str]) -> Optional[str]:
    """The CUDA_VISIBLE_DEVICES this rank should run with, or None to keep the one it has."""
    if env.get("DS_ACCELERATOR") == "cpu":
        return ""
    job = [g.strip() for g in env.get("LAUNCHER_JOB_GPUS", "").split(",") if g.strip()]
    if not job:
        return None
    runner = [g.strip() for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if not runner:
        return ",".join(job)
    if not all(r.isdigit() and int(r) < len(job) for r in runner):
        return None  # not the runner's renumbering: leave what the environment says
    return ",".join(job[int(r)] for r in runner)


def apply(env: MutableMapping[str, str]) -> Dict[str, str]:
    """Set CUDA_VISIBLE_DEVICES for this rank (call before importing torch); returns what changed."""
    value = rank_visible_devices(env)
    if value is None or env.get("CUDA_VISIBLE_DEVICES") == value:
        return {}
    env["CUDA_VISIBLE_DEVICES"] = value
    return {"CUDA_VISIBLE_DEVICES": value}
