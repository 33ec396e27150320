"""`launcher [train|plan|export|data|sweep] ...` (also `python -m launcher ...`): the one console script.

Bare overrides mean train: parse Hydra's flags (launcher.config.flags) -> prepare -> write run dir ->
launch, or with -m one such run per sweep point. Everything before the launch is checked on this host,
without torch or deepspeed (launcher.prepare), so a bad override costs a second, not a queue wait. User
errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence

from launcher.config.flags import parse_flags
from launcher.errors import ConfigError
from launcher.launch import lock
from launcher.launch.rundir import write_files
from launcher.prepare import prepare, prepare_data

EXIT_USER_ERROR = 2
SUBCOMMANDS = ("train", "plan", "export", "data", "sweep")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sub = argv[0] if argv and argv[0] in SUBCOMMANDS else "train"
    rest = argv[1:] if argv and argv[0] == sub else argv
    if sub == "plan":
        from launcher.plan.__main__ import main as plan_main

        return plan_main(rest)
    if sub == "export":
        from launcher.export.cli import main as export_main

        return export_main(rest)
    if sub == "data":
        from launcher.data.__main__ import main as data_main

        return data_main(rest)
    if sub == "sweep":
        from launcher.launch.sweep import show_main

        return show_main(rest)
    try:
        return _train(rest)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def _train(argv: List[str]) -> int:
    flags = parse_flags(argv)
    if flags.help:
        from launcher.config.reference import override_reference

        print(override_reference())
        return 0
    if flags.shell_completion:
        from launcher.config.completion import shell_completion

        print(shell_completion(flags.shell_completion, os.environ.get("COMP_LINE", "")), end="")
        return 0
    if flags.cfg:
        from launcher.render.show import show_cfg

        print(show_cfg(flags.overrides, flags.cfg, flags.resolve, flags.package), end="")
        return 0
    if flags.info:
        from launcher.render.show import show_info

        print(show_info(flags.overrides, flags.info), end="")
        return 0
    if flags.multirun:
        from launcher.config.compose import compose
        from launcher.config.sweep import expand
        from launcher.launch.sweep import run_sweep

        sweep = expand(flags.overrides)
        cluster = compose([*sweep.base, *sweep.points[0]])[0].cluster.name  # an experiment may set it
        return run_sweep(sweep, _run_point, slurm=cluster == "slurm")
    return run(flags.overrides)


def _run_point(overrides: List[str]) -> int:
    """One sweep point: its errors are its own (recorded in sweep.json), the sweep goes on."""
    try:
        return run(overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def run(overrides: List[str]) -> int:
    """One run: prepare -> write the run dir -> submit (cluster=slurm) or launch here."""
    from launcher.render.summary import run_summary

    run = prepare(overrides)
    for note in run.notes:
        if not note.startswith("plan"):  # the plan line is part of the summary
            print(note, file=sys.stderr)
    from launcher.launch.resume import convert_checkpoint, finished_step

    if not run.cfg.dry_run and run.cfg.cluster.name != "slurm":
        done = finished_step(run.run_dir, int(run.cfg.train.max_steps))
        if done is not None:  # no rank starts, nothing is rewritten
            print(f"run dir: {run.run_dir}\nalready at step {done} >= train.max_steps={run.cfg.train.max_steps}; "
                  "nothing to do (raise train.max_steps to train further)")
            return 0
    if not run.cfg.dry_run:  # tokenize and pack here, before a local launch or sbatch, unless cached
        defer = run.cfg.cluster.name == "slurm" and bool(run.cfg.cluster.prepare_job)
        for note in prepare_data(run.cfg, run.topo, run.run_dir, defer=defer):
            print(note, file=sys.stderr)
    # One live run per run dir (prepare already refused a live one, naming it): taken before anything in it is
    # rewritten, held by the runner's session once it starts; a dry run or a SLURM submission only checks it.
    holder = lock.local_holder(os.getpid())
    try:
        lock.acquire(run.run_dir, holder)
        if run.world_change is not None and not run.cfg.dry_run and run.cfg.cluster.name != "slurm":
            for line in convert_checkpoint(run.world_change):  # a failed conversion changes nothing
                print(line, file=sys.stderr)
        write_files(run.run_dir, run.files, executable=("launch.sh",))
    except (OSError, ConfigError) as exc:
        lock.release(run.run_dir, holder)
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError("run dir", f"cannot write {run.run_dir}: {exc.strerror}; choose a writable "
                          "hydra.run.dir or name=") from None
    os.environ.update(run.secret_env)  # passed to the ranks by name (launch.sh / .sbatch), never written
    if run.cfg.dry_run or run.cfg.cluster.name == "slurm":
        lock.release(run.run_dir, holder)  # the job takes it itself when it starts
    print(run_summary(run.cfg, run.topo, str(run.run_dir), run.notes), flush=True)
    if run.cfg.cluster.name == "slurm":
        from launcher.launch.slurm import submit

        return submit(run.cfg, run.run_dir, run.files)
    if run.cfg.dry_run:
        print("dry run, nothing started. command (also in launch.sh):")
        print(" ".join(run.command))
        return 0
    from launcher.launch.local import launch_local

    return launch_local(run.run_dir, run.command, overrides)
