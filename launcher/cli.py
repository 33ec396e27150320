"""`python -m launcher [overrides]`: compose -> validate -> render -> write run dir -> launch.

Everything before the launch is checked on this host, without torch or deepspeed, so a bad override costs
a second, not a queue wait. User errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from launcher import rundir
from launcher.command import deepspeed_args, launch_script, rank_environment
from launcher.compose import compose
from launcher.ds_config import build_ds_config
from launcher.errors import ConfigError
from launcher.topology import Topology, batch_shape, detect_local_gpus, resolve_topology
from launcher.validate import check_cpu_precision, check_monitor_packages, check_node_has_gpus, validate

EXIT_USER_ERROR = 2
HF_ARCH_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
)


@dataclass
class PreparedRun:
    cfg: DictConfig
    topo: Topology
    run_dir: Path
    files: Dict[str, str]
    command: List[str]
    notes: List[str]


def prepare(overrides: Sequence[str], local_gpus: Optional[int] = None, check_resume: bool = True) -> PreparedRun:
    """Compose and validate the config and render every artifact, writing nothing."""
    cfg, run_dir_text, topo, local_gpus = _compose_resolved(overrides, local_gpus)
    auto_note = None
    if cfg.zero.auto or cfg.activation_checkpointing.name == "auto":
        overrides, auto_note = _resolve_auto(cfg, topo, overrides)
        cfg, run_dir_text, topo, local_gpus = _compose_resolved(overrides, local_gpus)
        with open_dict(cfg.notes):
            cfg.notes["auto"] = auto_note
    notes = validate(cfg, topo)
    if not cfg.dry_run:
        check_node_has_gpus(cfg, topo, local_gpus)
        check_cpu_precision(cfg, topo, _cpu_flags())
        check_monitor_packages(cfg)
    notes += _preflight(cfg, topo)
    if auto_note:
        notes.append(f"auto: {' '.join(auto_note['chosen'])} ({auto_note['reason']})")
    run_dir = Path(run_dir_text).resolve()
    if check_resume:
        rundir.check_resumable(run_dir, cfg)

    ds = build_ds_config(cfg, topo)
    port = cfg.cluster.master_port or _free_port()
    env = rank_environment(cfg, topo, os.cpu_count() or 1)
    deepspeed_bin = _deepspeed_executable()
    args = deepspeed_args(cfg, topo, str(run_dir), port)
    command = [deepspeed_bin, *args]
    files = {
        "config.yaml": rundir.config_yaml(cfg),
        "ds_config.json": rundir.to_json(ds),
        "launch.sh": launch_script(env, deepspeed_bin, args, str(run_dir)),
        "run.json": rundir.to_json(rundir.run_info(sys.argv, command)),
    }
    if cfg.cluster.name == "slurm":
        from launcher.slurm_job import slurm_files

        command, files = slurm_files(cfg, topo, run_dir, files, deepspeed_bin)
    elif cfg.cluster.name == "hostfile":
        from launcher.hostfile import hostfile_files

        command, files = hostfile_files(cfg, topo, run_dir, files, deepspeed_bin, env, port)
    return PreparedRun(cfg, topo, run_dir, files, command, notes)


def _compose_resolved(overrides: Sequence[str], local_gpus: Optional[int]):
    """Compose, make paths absolute, adopt model.path / hostfile facts, and resolve the world shape."""
    cfg, run_dir_text = compose(overrides)
    _absolutize_paths(cfg)
    if cfg.model.path is not None and os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        _adopt_hf_architecture(cfg)
    if cfg.cluster.name == "hostfile":
        from launcher.hostfile import adopt_hostfile

        adopt_hostfile(cfg)  # cluster.nodes = the hostfile's hosts
    if local_gpus is None and cfg.cluster.name == "slurm":
        local_gpus = 0  # the submit host says nothing about the nodes: GPU jobs name a GPU hardware profile
    local_gpus = detect_local_gpus() if local_gpus is None else local_gpus
    return cfg, run_dir_text, resolve_topology(cfg, local_gpus), local_gpus


def _resolve_auto(cfg: DictConfig, topo: Topology, overrides: Sequence[str]):
    """zero=auto / activation_checkpointing=auto: the planner's fastest setup predicted to fit, as overrides."""
    from launcher.plan import choose_auto

    auto_zero = bool(cfg.zero.auto)
    auto_offload = auto_zero and not any(o.startswith("offload=") for o in overrides)
    auto_ac = cfg.activation_checkpointing.name == "auto"
    choice = choose_auto(cfg, topo, auto_zero=auto_zero, auto_offload=auto_offload, auto_ac=auto_ac)
    decided = (("zero",) if auto_zero else ()) + (("offload",) if auto_offload else ()) + (
        ("activation_checkpointing",) if auto_ac else ())
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in decided
            and not (auto_ac and o.startswith("activation_checkpointing.every_n_layers="))]
    return [*kept, *choice.overrides], {"chosen": list(choice.overrides), "reason": choice.reason}


def _preflight(cfg: DictConfig, topo: Topology) -> List[str]:
    """Refuse a config the planner predicts will not fit (force=true launches anyway)."""
    from launcher.plan import preflight

    result = preflight(cfg, topo)
    if not result.fits and not cfg.force:
        raise ConfigError("plan", f"{result.message}; force=true launches anyway")
    return [f"plan: {result.message}" if not result.message.startswith("plan") else result.message]


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        from launcher.reference import override_reference

        print(override_reference())
        return 0
    try:
        run = prepare(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    for note in run.notes:
        print(note, file=sys.stderr)
    rundir.write_files(run.run_dir, run.files, executable=("launch.sh",))
    shape = batch_shape(run.cfg, run.topo)
    print(
        f"run dir: {run.run_dir}\n"
        f"world: {run.topo.nodes} node(s) x {run.topo.ranks_per_node} {run.topo.accelerator} ranks; "
        f"batch {shape.micro_batch_size} micro x {shape.gradient_accumulation_steps} accum x "
        f"{shape.world_size} ranks = {shape.global_batch_size} sequences/step"
    )
    if run.cfg.cluster.name == "slurm":
        from launcher.slurm_job import submit

        return submit(run)
    if run.cfg.dry_run:
        print("dry run, nothing started. command (also in launch.sh):")
        print(" ".join(run.command))
        return 0
    return _launch_local(run)


def _launch_local(run: PreparedRun) -> int:
    import json
    import signal
    import subprocess

    from launcher.jit_locks import check_jit_locks

    for note in check_jit_locks():
        print(note, file=sys.stderr)
    print(f"launching: bash {run.run_dir / 'launch.sh'}", flush=True)
    # Own session: a terminal Ctrl-C reaches only this process, which stops the ranks in order below.
    proc = subprocess.Popen(["bash", str(run.run_dir / "launch.sh")], start_new_session=True)

    def stop_ranks(signum: int, frame: object) -> None:
        # Signal the ranks themselves: they agree on the next step boundary, checkpoint and exit 0, and the
        # runner then exits normally. (DeepSpeed's local runner dies on SIGTERM without passing it on.)
        import psutil

        print(f"\n{signal.Signals(signum).name}: asking the ranks to checkpoint and stop ...", file=sys.stderr)
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "launcher.worker" in " ".join(child.cmdline()):
                    child.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, stop_ranks)
    code = proc.wait()
    from launcher.shm import remove_shm_files

    remove_shm_files(_master_port(run.command))  # left by ranks that were killed
    status_file = run.run_dir / "status.json"
    status = json.loads(status_file.read_text()) if status_file.is_file() else {}
    kept = [rundir.redact(a) for a in sys.argv[1:] if not a.startswith("train.max_steps=")]
    again = " ".join(["python -m launcher", *kept])
    if status.get("state") == "preempted":
        print(f"stopped by signal after checkpointing step {status['step']}. resume: {again}")
        return 0
    if code == 0:
        print(f"done. run dir: {run.run_dir}\n  resume/extend: {again} train.max_steps=<more>")
        print(f"  export:        python -m launcher.export run_dir={run.run_dir}")
    else:
        print(f"launch failed with exit code {code}; logs above, artifacts in {run.run_dir}", file=sys.stderr)
        print(f"  resume from the last checkpoint: {again}", file=sys.stderr)
    return code


def _absolutize_paths(cfg: DictConfig) -> None:
    # launch.sh runs the ranks inside the run dir, so relative paths must be made absolute here.
    for node, key in ((cfg.model, "path"), (cfg.data, "path"), (cfg.data, "cache_dir"), (cfg.cluster, "hostfile")):
        if node[key] is not None:
            node[key] = os.path.abspath(os.path.expanduser(str(node[key])))


def _adopt_hf_architecture(cfg: DictConfig) -> None:
    """With model.path, the architecture comes from its config.json (so planning and checks see it)."""
    import json

    path = os.path.join(cfg.model.path, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError("model.path", f"cannot read {path}: {exc}") from None
    for key in HF_ARCH_KEYS:
        if key in hf and hf[key] is not None:
            cfg.model[key] = hf[key]
    theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None:
        cfg.model.rope_theta = float(theta)


def _master_port(command: Sequence[str]) -> int:
    return int(command[list(command).index("--master_port") + 1])


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _deepspeed_executable() -> str:
    beside = Path(sys.executable).parent / "deepspeed"
    if beside.is_file():
        return str(beside)
    import shutil

    return shutil.which("deepspeed") or "deepspeed"


def config_to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
