"""SLURM renders: the per-run sbatch script, DeepSpeed hostfiles and the per-node no-ssh runner argv.

Pure: config and paths in, text out; no I/O, no subprocess (submitting lives in launcher.launch.slurm).
Every value that reaches a shell line is quoted with shlex.quote, so an override such as
`name='$(touch x)'` stays text. `cluster.setup` lines are the one exception: they are shell code by design.

Inside the job, one `srun` task per node runs the deepspeed runner with `--no_ssh --node_rank
$SLURM_NODEID`. The runner needs a hostfile for `--num_nodes > 1` (without one it forces
master_addr=127.0.0.1 and refuses), so the script writes one from `scontrol show hostnames`.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from omegaconf import DictConfig

from launcher.config.topology import Topology, batch_shape
from launcher.render import rundir
from launcher.render.command import PACKAGE_ROOT, export_lines, rank_environment, worker_args
from launcher.render.prepare_sbatch import PREPARE_SCRIPT, prepare_script
from launcher.render.sbatch_options import (  # noqa: F401
    FIND_PYTHON_AFTER_SETUP,
    check_setup,
    cpus_per_task,
    sbatch_options,
    time_seconds,
)

# MASTER_PORT = base + job id % span: distinct for jobs that share a node, stable across a requeue
# (same job id), and below Linux's ephemeral range (32768+).
PORT_BASE = 20000
PORT_SPAN = 10000
class ShellVar(str):
    """An argument that is a shell variable, expanded where the line runs: renders as "$NAME"."""

    def render(self) -> str:
        return f'"${self}"'


Arg = Union[str, ShellVar]
# Set in the batch shell (the same on every node) or by srun per node (SLURM_NODEID).
HOSTFILE, MASTER_ADDR, MASTER_PORT, NODE_RANK = (
    ShellVar(v) for v in ("HOSTFILE", "MASTER_ADDR", "MASTER_PORT", "SLURM_NODEID")
)


def shell_join(argv: Sequence[Arg]) -> str:
    return " ".join(a.render() if isinstance(a, ShellVar) else shlex.quote(a) for a in argv)


@dataclass(frozen=True)
class JobPaths:
    """Where things are on the cluster's shared filesystem (absolute paths)."""

    run_dir: str
    # The rendered script itself, named in messages ("resubmit with sbatch ...").
    script: str
    deepspeed: str
    python: str
    # Prepended to PYTHONPATH so every rank imports this launcher (the checkout's root).
    pythonpath: str
    # Prepended to PATH: the environment (venv) that rendered the script runs the job.
    bin_dir: str


def master_port(cfg: DictConfig) -> Arg:
    return str(cfg.cluster.master_port) if cfg.cluster.master_port else MASTER_PORT


def nossh_runner_args(
    nodes: int,
    ranks_per_node: int,
    run_dir: str,
    hostfile: Arg = HOSTFILE,
    master_addr: Arg = MASTER_ADDR,
    port: Arg = MASTER_PORT,
    node_rank: Arg = NODE_RANK,
) -> List[Arg]:
    """Runner arguments for one node of a no-ssh launch (after the `deepspeed` executable)."""
    return [
        "--hostfile", hostfile,
        "--num_nodes", str(nodes),
        "--node_rank", node_rank,
        "--master_addr", master_addr,
        "--master_port", port,
        "--no_ssh",
        "--num_gpus", str(ranks_per_node),
        *worker_args(run_dir),
    ]  # fmt: skip


def sbatch_script(cfg: DictConfig, topo: Topology, env: Mapping[str, str], paths: JobPaths) -> str:
    """<run_dir>/<name>.sbatch: the allocation, the environment, one runner per node, requeue on warning."""
    shape = batch_shape(cfg, topo)
    q = shlex.quote
    setup = [str(line) for line in cfg.cluster.setup]
    # cluster.setup may switch the Python environment: then the job runs the `deepspeed` and python found on
    # PATH after it, not the submitting host's absolute paths.
    deepspeed = "deepspeed" if setup else paths.deepspeed
    runner = shell_join([deepspeed, *nossh_runner_args(topo.nodes, topo.ranks_per_node, paths.run_dir)])
    # The runner renumbers this node's GPUs 0..n-1 under --no_ssh (it sets CUDA_VISIBLE_DEVICES itself); the
    # ranks map their local rank back to the GPUs SLURM gave the step (launcher/worker/devices.py).
    job_gpus = ['export LAUNCHER_JOB_GPUS="${CUDA_VISIBLE_DEVICES-${SLURM_JOB_GPUS-}}"']
    if topo.accelerator != "cuda":
        job_gpus = []
    node_cmd = "\n".join(
        [
            'trap "" USR1 TERM',
            *job_gpus,
            (
                'getent hosts "$MASTER_ADDR" >/dev/null || '
                '{ echo "launcher: error: node $(hostname) cannot resolve the master address $MASTER_ADDR" >&2; '
                'exit 1; }'
            ),
            f"exec {runner}",
        ]
    )
    port = master_port(cfg)
    port_line = (
        f"export MASTER_PORT={q(port)}"
        if not isinstance(port, ShellVar)
        else f"export MASTER_PORT=$(({PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN}))"
    )
    check_setup(setup)
    lines = [
        "#!/bin/bash",
        f"# Generated by `python -m launcher cluster=slurm`; submit with: sbatch {q(paths.script)}",
        (
            f"# {topo.nodes} node(s) x {topo.ranks_per_node} {topo.accelerator} ranks; batch "
            f"{shape.micro_batch_size} micro x {shape.gradient_accumulation_steps} accum x {shape.world_size} ranks "
            f"= {shape.global_batch_size} sequences/step"
        ),
        *(f"#SBATCH {opt}" for opt in sbatch_options(cfg, topo, paths.run_dir)),
        "set -uo pipefail",
        f"RUN_DIR={q(paths.run_dir)}",
        f"MAX_REQUEUES={int(cfg.cluster.max_requeues)}",
        'log() { echo "launcher [$(date +%T)] $*"; }',
        'fail() { echo "launcher [$(date +%T)] error: $*" >&2; exit 1; }',
        "",
    ]
    lines += [
        "# What every rank needs; srun --export=ALL carries it to each node's runner and its ranks. The profile's",
        "# variables come before cluster.setup, so a site module can override them.",
        *export_lines(env),
    ]
    if setup:
        lines += ["# Site setup (cluster.setup): its python and deepspeed run the job", *setup,
                  FIND_PYTHON_AFTER_SETUP + 'fail "no python on PATH after cluster.setup"',
                  ""]
    else:
        lines += [f"PYTHON={q(paths.python)}", f'export PATH={q(paths.bin_dir)}"${{PATH:+:$PATH}}"']
    lines += [
        f'export PYTHONPATH={q(paths.pythonpath)}"${{PYTHONPATH:+:$PYTHONPATH}}"',
        'cd "$RUN_DIR" || fail "cannot enter the run dir $RUN_DIR (it must be on a filesystem every node sees)"',
        "# One live run per run dir: this job holds it (a requeued attempt takes its own lock back).",
        '"$PYTHON" -m launcher.launch.lock acquire "$RUN_DIR" || exit 2',
        "",
        "# Rank 0 runs on the first node; the hostfile lists the nodes in SLURM_NODEID order.",
        'mapfile -t HOSTS < <(timeout 60 scontrol show hostnames "$SLURM_JOB_NODELIST")',
        (
            f'[ "${{#HOSTS[@]}}" -eq {topo.nodes} ] || '
            f'fail "the allocation has ${{#HOSTS[@]}} node(s), this run needs {topo.nodes} (cluster.nodes)"'
        ),
        'export MASTER_ADDR="${HOSTS[0]}"',
        port_line,
        "# The batch shell runs on the first node, the master: its port must be free there (a listener, not a",
        "# TIME_WAIT left by the previous attempt, which SO_REUSEADDR allows, as torch's TCPStore does).",
        (
            "\"$PYTHON\" -c 'import socket as S, sys; s = S.socket(); s.setsockopt(S.SOL_SOCKET, S.SO_REUSEADDR, 1); "
            "s.bind((\"\", int(sys.argv[1])))' \"$MASTER_PORT\" "
            '2>/dev/null || fail "MASTER_PORT $MASTER_PORT is in use on $(hostname); set cluster.master_port to '
            'a free port"'
        ),
        'export HOSTFILE="$RUN_DIR/hostfile.$SLURM_JOB_ID"',
        f'printf \'%s slots={topo.ranks_per_node}\\n\' "${{HOSTS[@]}}" > "$HOSTFILE"',
        'rm -f "$RUN_DIR/status.json"  # the ranks write it; a leftover must not decide this attempt',
        (
            'log "job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)): '
            f'{topo.nodes} node(s) x {topo.ranks_per_node} ranks, master $MASTER_ADDR:$MASTER_PORT"'
        ),
        "",
        "# USR1 to this shell (the warning timer below, --signal=B:USR1, `scancel -b --signal=USR1`) is passed to the",
        "# job step, whose ranks checkpoint at the next step boundary and exit 0 with status.json state=preempted;",
        "# then the job requeues. SIGTERM (plain scancel, the time limit) reaches the ranks from Slurm directly:",
        "# they checkpoint too, but Slurm SIGKILLs them KillWait seconds later (docs/slurm.md), and no requeue.",
        "WARNED=0",
        (
            'trap \'WARNED=1; log "got USR1 (time limit or preemption ahead): forwarding it to the ranks"; '
            'kill -USR1 "$SRUN_PID" 2>/dev/null\' USR1'
        ),
        "trap 'log \"got TERM: the ranks checkpoint and stop; no requeue\"' TERM",
        "",
        "# One task per node: the deepspeed runner without ssh starts that node's ranks. The runner ignores USR1",
        "# and TERM: if it died, slurmstepd would SIGKILL the step while the ranks save. launch.py ignores USR1",
        "# and passes TERM on; each rank installs its own handler for both.",
        "SRUN_PID=",
        (
            'srun --ntasks-per-node=1 --kill-on-bad-exit=1 --export=ALL --cpus-per-task="${SLURM_CPUS_PER_TASK:-'
            '$SLURM_CPUS_ON_NODE}" \\'
        ),
        f"  bash -c {q(node_cmd)} &",
        "SRUN_PID=$!",
        "",
        f"# The warning: cluster.signal_seconds ({cfg.cluster.signal_seconds} s) before the job's real time limit "
        "(squeue %L,",
        "# time left as [D-]HH:MM:SS), whatever script submitted the job.",
        "TIMER_PID=",
        'LEFT=$(timeout 30 squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null) || LEFT=',
        'case "$LEFT" in',
        '  ""|*[!0-9:-]*) log "no time limit known (squeue: ${LEFT:-no answer}): no warning timer" ;;',
        "  *) D=0; S=0; case \"$LEFT\" in *-*) D=${LEFT%%-*}; LEFT=${LEFT#*-} ;; esac",
        '     IFS=: read -ra PARTS <<< "$LEFT"; for P in "${PARTS[@]}"; do S=$((S * 60 + 10#$P)); done',
        f"     WARN_IN=$((D * 86400 + S - {int(cfg.cluster.signal_seconds)})); [ \"$WARN_IN\" -gt 0 ] || WARN_IN=1",
        '     log "time left $((D * 86400 + S)) s: warning the ranks in $WARN_IN s"',
        '     (sleep "$WARN_IN" && kill -USR1 $$) & TIMER_PID=$! ;;',
        "esac",
        'while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; done  # a trap interrupts wait',
        'wait "$SRUN_PID"; RC=$?',
        '[ -n "$TIMER_PID" ] && kill "$TIMER_PID" 2>/dev/null',
        "",
        "# A rank killed by SIGKILL (OOM killer, lost node) cannot report: settle writes state=failed then, records",
        "# the end of this launch in run.json and releases the lock.",
        'read -r STATE STEP < <("$PYTHON" -m launcher.launch.settle "$RUN_DIR" "$RC")',
        'if [ "$STATE" = preempted ] && [ "$WARNED" = 1 ]; then',
        '  if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then',
        (
            f'    fail "checkpointed at step $STEP after $MAX_REQUEUES requeue(s) (cluster.max_requeues); resume with: '
            f'sbatch {_dq(paths.script)}"'
        ),
        "  fi",
        '  log "checkpointed at step $STEP; requeueing (restart $((${SLURM_RESTART_COUNT:-0} + 1)) of $MAX_REQUEUES)"',
        '  timeout 60 scontrol requeue "$SLURM_JOB_ID" && exit 0',
        f'  fail "scontrol requeue failed; resume with: sbatch {_dq(paths.script)}"',
        "fi",
        'if [ "$STATE" = preempted ]; then',
        f'  log "stopped by a signal, checkpointed at step $STEP; resume with: sbatch {_dq(paths.script)}"',
        '  exit "$RC"',
        "fi",
        'if [ "$RC" -ne 0 ]; then',
        f'  fail "a node exited with $RC (logs above); the last checkpoint resumes with: sbatch {_dq(paths.script)}"',
        "fi",
        'log "finished: state=$STATE step=$STEP"',
    ]
    return "\n".join(lines) + "\n"


def _dq(text: str) -> str:
    """Text inside a double-quoted shell string: escape what double quotes still expand."""
    return re.sub(r'([\\"$`])', r"\\\1", text)


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
    user_env: Optional[Mapping[str, str]] = None,
) -> Tuple[List[str], Dict[str, str]]:
    """The run dir for cluster=slurm: <name>.sbatch instead of launch.sh. Returns (command, files)."""
    script = run_dir / sbatch_name(cfg.name)
    # GPU nodes rendered on the login node: cores unknown (None), so OMP_NUM_THREADS is left to the in-job
    # render (launcher.slurm_job), which passes the allocation's SLURM_CPUS_ON_NODE.
    cpus = cpus_per_node or cpus_per_task(topo)
    paths = JobPaths(
        run_dir=str(run_dir),
        script=str(script),
        deepspeed=deepspeed_bin,
        python=sys.executable,
        pythonpath=PACKAGE_ROOT,
        bin_dir=str(Path(sys.executable).parent),
    )
    command = ["sbatch", str(script)]
    out = {k: v for k, v in files.items() if k != "launch.sh"}
    out[script.name] = sbatch_script(cfg, topo, rank_environment(cfg, topo, cpus, user_env), paths)
    if cfg.cluster.prepare_job:
        out[PREPARE_SCRIPT] = prepare_script(cfg, paths.run_dir, paths.script, paths.python, paths.pythonpath)
    out["run.json"] = rundir.with_command(files["run.json"], rundir.run_info(sys.argv, command))
    return command, out
