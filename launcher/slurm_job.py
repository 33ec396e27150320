"""SLURM I/O: the cluster=slurm run-dir files, `sbatch` submission, and the in-job entry of slurm/train.sbatch.

`python -m launcher.slurm_job [overrides]` runs inside an allocation (slurm/train.sbatch execs it): it reads
the node count and GPUs per node from the allocation, composes with `cluster=slurm cluster.nodes=<nodes>`,
runs every launcher check (hardware profile vs allocation, batch arithmetic) before any rank starts, writes
the run dir and then execs the run's rendered sbatch script with bash, so both entry points launch the
same way. A user error is one line in the job log and exit code 2.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple

from omegaconf import DictConfig

from launcher import rundir, slurm
from launcher.command import PACKAGE_ROOT, rank_environment
from launcher.errors import ConfigError
from launcher.topology import Topology

if TYPE_CHECKING:
    from launcher.cli import PreparedRun

EXIT_USER_ERROR = 2


def sbatch_name(name: str) -> str:
    """<name>.sbatch with anything unusual in the run name replaced (the name itself stays in --job-name)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return f"{stem or 'run'}.sbatch"


def slurm_files(
    cfg: DictConfig,
    topo: Topology,
    run_dir: Path,
    files: Mapping[str, str],
    deepspeed_bin: str,
    cpus_per_node: Optional[int] = None,
) -> Tuple[List[str], Dict[str, str]]:
    """The run dir for cluster=slurm: <name>.sbatch instead of launch.sh. Returns (command, files)."""
    script = run_dir / sbatch_name(cfg.name)
    cpus = cpus_per_node or slurm.cpus_per_task(topo) or 1
    paths = slurm.JobPaths(
        run_dir=str(run_dir),
        script=str(script),
        deepspeed=deepspeed_bin,
        python=sys.executable,
        pythonpath=PACKAGE_ROOT,
        bin_dir=str(Path(sys.executable).parent),
    )
    command = ["sbatch", str(script)]
    out = {k: v for k, v in files.items() if k != "launch.sh"}
    out[script.name] = slurm.sbatch_script(cfg, topo, rank_environment(cfg, topo, cpus), paths)
    out["run.json"] = rundir.to_json(rundir.run_info(sys.argv, command))
    return command, out


def submit(run: "PreparedRun") -> int:
    """cluster=slurm after the run dir is written: print the script (dry run) or hand it to sbatch."""
    script = run.run_dir / sbatch_name(run.cfg.name)
    if run.cfg.dry_run:
        print(f"dry run, nothing submitted. {script}:")
        print(run.files[script.name], end="")
        return 0
    if shutil.which("sbatch") is None:
        print(f"error: sbatch is not on PATH; submit from a SLURM login node with: sbatch {script}", file=sys.stderr)
        return EXIT_USER_ERROR
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"error: sbatch refused {script}: {proc.stderr.strip()}", file=sys.stderr)
        return proc.returncode
    job_id = proc.stdout.strip().split(";")[0]
    print(
        f"submitted job {job_id}: {script}\n"
        f"  watch:  squeue -j {job_id}; tail -f {run.run_dir}/slurm-{job_id}.out\n"
        f"  stop:   scancel {job_id}   (the ranks checkpoint on SIGTERM)\n"
        f"  resume: sbatch {script}   (continues from the last checkpoint)"
    )
    return 0


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    from launcher.cli import _deepspeed_executable, prepare

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        alloc = allocation_from_env(os.environ)
        run = prepare(job_overrides(argv, alloc), local_gpus=alloc.gpus_per_node)
        notes = run.notes + check_allocation(run.cfg, run.topo, alloc)
        _, files = slurm_files(
            run.cfg, run.topo, run.run_dir, run.files, _deepspeed_executable(), cpus_per_node=alloc.cpus_per_node
        )
    except ConfigError as exc:
        print(f"launcher: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    for note in notes:
        print(note, file=sys.stderr)
    rundir.write_files(run.run_dir, files)
    script = run.run_dir / sbatch_name(run.cfg.name)
    print(
        f"launcher: job {alloc.job_id}: {alloc.nodes} node(s), {alloc.gpus_per_node} GPU(s) and "
        f"{alloc.cpus_per_node} CPU(s) per node -> {run.topo.nodes} x {run.topo.ranks_per_node} "
        f"{run.topo.accelerator} ranks\nlauncher: run dir {run.run_dir}; running {script}",
        flush=True,
    )
    if run.cfg.dry_run:
        print(files[script.name], end="")
        return 0
    # Same process, so the batch shell that SLURM signals (--signal=B:USR1) is the script's bash. Python
    # ignores SIGPIPE, and an exec would pass that on to the script's pipelines.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    bash = shutil.which("bash") or "/bin/bash"
    os.execv(bash, [bash, str(script)])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
