"""The SLURM job entry: `python -m launcher.slurm_job [overrides]`, exec'd by slurm/train.sbatch inside an
allocation.

It reads the node count and GPUs per node from the allocation, composes with `cluster=slurm
cluster.nodes=<nodes>`, runs every launcher check (hardware profile vs allocation, batch arithmetic) before
any rank starts, writes the run dir and then execs the run's rendered sbatch script with bash, so both entry
points launch the same way. A user error is one line in the job log and exit code 2.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from typing import Optional, Sequence

from launcher.errors import ConfigError
from launcher.launch import lock
from launcher.launch.host import deepspeed_executable
from launcher.launch.resume import convert_checkpoint
from launcher.launch.rundir import write_files
from launcher.launch.slurm import allocation_from_env, check_allocation, job_overrides
from launcher.prepare import prepare, prepare_data
from launcher.render.sbatch import sbatch_name, slurm_files

EXIT_USER_ERROR = 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        alloc = allocation_from_env(os.environ)
        run = prepare(job_overrides(argv, alloc), local_gpus=alloc.gpus_per_node, on_node=True)
        notes = run.notes + check_allocation(run.cfg, run.topo, alloc)
        # One live run per run dir, held by this job (a requeued attempt takes its own lock back).
        lock.acquire(run.run_dir, lock.slurm_holder(alloc.job_id))
        if run.world_change is not None and not run.cfg.dry_run:  # resubmitted on another --nodes
            notes += convert_checkpoint(run.world_change)
        if not run.cfg.dry_run:  # a CPU job may tokenize; a GPU job needs the cache prepared before sbatch
            notes += prepare_data(run.cfg, run.topo, run.run_dir, may_tokenize=run.topo.accelerator == "cpu")
        _, files = slurm_files(
            run.cfg, run.topo, run.run_dir, run.files, deepspeed_executable(), cpus_per_node=alloc.cpus_per_node,
            user_env=os.environ,
        )
        try:
            write_files(run.run_dir, files)
        except OSError as exc:
            raise ConfigError("run dir", f"cannot write {run.run_dir}: {exc.strerror}; choose a writable "
                              "hydra.run.dir or name=") from None
    except ConfigError as exc:
        print(f"launcher: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    for note in notes:
        print(note, file=sys.stderr)
    os.environ.update(run.secret_env)  # the script exports them by name; never written
    script = run.run_dir / sbatch_name(run.cfg.name)
    print(
        f"launcher: job {alloc.job_id}: {alloc.nodes} node(s), {alloc.gpus_per_node} GPU(s) and "
        f"{alloc.cpus_per_node} CPU(s) per node -> {run.topo.nodes} x {run.topo.ranks_per_node} "
        f"{run.topo.accelerator} ranks\nlauncher: run dir {run.run_dir}; running {script}",
        flush=True,
    )
    if run.cfg.dry_run:
        lock.release(run.run_dir, lock.slurm_holder(alloc.job_id))
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
