"""SLURM on the submitting side and inside the job: `sbatch` submission, and the allocation the job was given
(nodes, GPUs and CPUs per node) checked against the config. The in-job entry is launcher/slurm_job.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

from omegaconf import DictConfig

from launcher.config.topology import Topology
from launcher.data import cache_complete
from launcher.errors import ConfigError
from launcher.render.prepare_sbatch import PREPARE_SCRIPT
from launcher.render.sbatch import sbatch_name

EXIT_USER_ERROR = 2
SLURM_TIMEOUT_S = 60


def submit(cfg: DictConfig, run_dir: Path, files: Mapping[str, str]) -> int:
    """cluster=slurm after the run dir is written: print the script (dry run) or hand it to sbatch."""
    script = run_dir / sbatch_name(cfg.name)
    if cfg.dry_run:
        print(f"dry run, nothing submitted. {script}:")
        print(files[script.name], end="")
        if cfg.cluster.prepare_job:
            print(f"and the data job submitted first (training waits for it), {run_dir / PREPARE_SCRIPT}:")
            print(files[PREPARE_SCRIPT], end="")
        return 0
    if shutil.which("sbatch") is None:
        print(f"error: sbatch is not on PATH; submit from a SLURM login node with: sbatch {script}", file=sys.stderr)
        return EXIT_USER_ERROR
    after: List[str] = []
    if cfg.cluster.prepare_job and not cache_complete(cfg, run_dir):
        prep = run_dir / PREPARE_SCRIPT
        prep_id = _sbatch([str(prep)], str(prep))
        if prep_id is None:
            return EXIT_USER_ERROR
        print(f"submitted job {prep_id}: {prep} (tokenizes and packs the data on CPUs; log "
              f"{run_dir}/slurm-{prep_id}.out)")
        # afterok: training starts only on a finished cache; if preparing fails, Slurm cancels the training
        # job instead of leaving it pending forever (DependencyNeverSatisfied).
        after = [f"--dependency=afterok:{prep_id}", "--kill-on-invalid-dep=yes"]
    job_id = _sbatch([*after, str(script)], str(script))
    if job_id is None:
        return EXIT_USER_ERROR
    # For `launcher sweep <dir>` and anyone else asking later which job runs this run dir.
    (run_dir / "submitted.json").write_text(json.dumps({"job_id": job_id, "script": str(script)}) + "\n")
    print(
        f"submitted job {job_id}: {script}{' (after the data job)' if after else ''}\n"
        f"  watch:  squeue -j {job_id}; tail -f {run_dir}/slurm-{job_id}.out\n"
        f"  stop:   scancel --signal=USR1 {job_id}   (the ranks checkpoint and stop; plain scancel gives them "
        "only the site's KillWait, see docs/slurm.md)\n"
        f"  resume: sbatch {script}   (continues from the last checkpoint)"
    )
    return 0


def _sbatch(args: List[str], script: str) -> Optional[str]:
    """sbatch --parsable ARGS: the job id, or None after one error line."""
    try:
        # sbatch passes this environment on (--export=ALL): secret variables reach the job by name.
        proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, check=False,
                              timeout=SLURM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"error: sbatch did not answer within {SLURM_TIMEOUT_S} s (slurmctld busy or down?); retry with: "
              f"sbatch {script}", file=sys.stderr)
        return None
    if proc.returncode != 0:
        print(f"error: sbatch refused {script}: {proc.stderr.strip()}", file=sys.stderr)
        return None
    return proc.stdout.strip().split(";")[0]


@dataclass(frozen=True)
class Allocation:
    job_id: str
    nodes: int
    gpus_per_node: int
    cpus_per_node: int


def allocation_from_env(env: Mapping[str, str]) -> Allocation:
    """What the job was given, from SLURM's variables in the batch step."""
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        raise ConfigError(
            "slurm", "not inside a SLURM job; submit with: sbatch [--nodes=N] slurm/train.sbatch [overrides]"
        )
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    gpus = _count_gpus(env.get("SLURM_GPUS_ON_NODE"))
    if gpus is None:
        gpus = _count_gpus(env.get("SLURM_GPUS_PER_NODE"))
    cpus = int(str(env.get("SLURM_CPUS_ON_NODE") or "1").split("(")[0])
    return Allocation(job_id, nodes, gpus or 0, cpus)


def _count_gpus(value: Optional[str]) -> Optional[int]:
    """GPUs in "8", "h100:8" or "h100:8(S:0-1)" (-> 8); None when unset."""
    if value is None or not value.strip():
        return None
    m = re.match(r"^(?:[^:,]*:)?(\d+)", value.strip())
    return int(m.group(1)) if m else None


def job_overrides(argv: Sequence[str], alloc: Allocation) -> List[str]:
    """The user's overrides plus what the allocation decides; conflicting overrides are errors."""
    for arg in argv:
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if key == "cluster" and value != "slurm":
            raise ConfigError("cluster", f"slurm/train.sbatch runs cluster=slurm; drop '{arg}'")
        if key == "cluster.nodes" and value.strip() != str(alloc.nodes):
            raise ConfigError(
                "cluster.nodes",
                f"{value} but the allocation has {alloc.nodes} node(s); submit with sbatch --nodes={value} "
                "or drop cluster.nodes (it comes from the allocation)",
            )
    return ["cluster=slurm", *argv, f"cluster.nodes={alloc.nodes}"]


def check_allocation(cfg: DictConfig, topo: Topology, alloc: Allocation) -> List[str]:
    """The hardware profile against the allocation; returns note lines."""
    want = cfg.hardware.gpus_per_node
    if want is not None and alloc.gpus_per_node != want:
        raise ConfigError(
            "hardware",
            f"hardware={cfg.hardware.name} runs {want} GPU ranks per node but the allocation has "
            f"{alloc.gpus_per_node} GPU(s) per node; submit with --gpus-per-node={want}, or pick the profile "
            "of these nodes (hardware=local takes what the allocation has)",
        )
    if topo.nodes != alloc.nodes:
        raise ConfigError("cluster.nodes", f"{topo.nodes} but the allocation has {alloc.nodes} node(s)")
    notes = []
    if topo.accelerator == "cpu" and alloc.cpus_per_node < topo.ranks_per_node:
        notes.append(
            f"note: {topo.ranks_per_node} CPU ranks per node share {alloc.cpus_per_node} CPU(s); submit with "
            f"--cpus-per-task={topo.ranks_per_node} or set hardware.cpu_ranks={alloc.cpus_per_node}"
        )
    return notes
