"""`python -m launcher [overrides]` (and the `launcher` console script): prepare -> write run dir -> launch.

Everything before the launch is checked on this host, without torch or deepspeed (launcher.prepare), so a
bad override costs a second, not a queue wait. User errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from launcher.config.topology import batch_shape
from launcher.errors import ConfigError
from launcher.launch.rundir import write_files
from launcher.prepare import prepare, prepare_data

EXIT_USER_ERROR = 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        from launcher.config.reference import override_reference

        print(override_reference())
        return 0
    try:
        run = prepare(argv)
        if not run.cfg.dry_run:  # tokenize and pack here, before a local launch or sbatch, unless cached
            run.notes += prepare_data(run.cfg, run.topo, run.run_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    for note in run.notes:
        print(note, file=sys.stderr)
    write_files(run.run_dir, run.files, executable=("launch.sh",))
    shape = batch_shape(run.cfg, run.topo)
    print(
        f"run dir: {run.run_dir}\n"
        f"world: {run.topo.nodes} node(s) x {run.topo.ranks_per_node} {run.topo.accelerator} ranks; "
        f"batch {shape.micro_batch_size} micro x {shape.gradient_accumulation_steps} accum x "
        f"{shape.world_size} ranks = {shape.global_batch_size} sequences/step"
    )
    if run.cfg.cluster.name == "slurm":
        from launcher.launch.slurm import submit

        return submit(run.cfg, run.run_dir, run.files)
    if run.cfg.dry_run:
        print("dry run, nothing started. command (also in launch.sh):")
        print(" ".join(run.command))
        return 0
    from launcher.launch.local import launch_local

    return launch_local(run.run_dir, run.command, sys.argv[1:])
