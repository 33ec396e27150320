"""Prepare a run: compose -> resolve auto -> validate -> preflight -> render, writing nothing.

One PreparedRun, used alike by the CLI (`python -m launcher`) and the SLURM job entry
(`python -m launcher.slurm_job`), so both launch exactly the same way. No torch, no deepspeed.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from omegaconf import DictConfig, open_dict

from launcher.config import secrets
from launcher.config.compose import compose
from launcher.config.precision import resolve_auto_precision
from launcher.config.resolve import absolutize_paths, adopt_hf_architecture, check_interpolations
from launcher.config.topology import Topology, detect_local_gpus, resolve_topology, visible_gpu_ids
from launcher.config.validate import (
    check_cpu_precision,
    check_model_to_train,
    check_model_weights,
    check_monitor_packages,
    check_node_has_gpus,
    validate,
)
from launcher.errors import ConfigError
from launcher.launch import lock
from launcher.launch import rundir as rundir_io
from launcher.launch.gpus import check_gpu_model, query_gpus, smallest_memory_bytes
from launcher.launch.host import cpu_flags, deepspeed_executable, free_port, usable_cpus
from launcher.launch.resume import WorldChange, adopt_checkpoint_batch, universal_ds_config
from launcher.plan.record import run_plan
from launcher.render import rundir
from launcher.render.command import deepspeed_args, launch_script, rank_environment
from launcher.render.ds_config import build_ds_config


@dataclass
class PreparedRun:
    cfg: DictConfig
    topo: Topology
    run_dir: Path
    files: Dict[str, str]
    command: List[str]
    notes: List[str]
    # Set when the run's latest checkpoint was saved at another world size (launcher.launch.resume).
    world_change: Optional[WorldChange] = None
    # Secret variables the ranks need (hardware.nccl_env): exported by name, put in the launch's environment.
    secret_env: Dict[str, str] = field(default_factory=dict)


def prepare(overrides: Sequence[str], local_gpus: Optional[int] = None, check_resume: bool = True,
            on_node: Optional[bool] = None) -> PreparedRun:
    """Compose and validate the config and render every artifact, writing nothing.

    on_node: this host is where the ranks run (default: cluster=local; the SLURM job entry passes True), so
    its GPUs are compared with the hardware profile and their measured memory is what the planner uses.
    """
    cfg, run_dir_text, topo, local_gpus = compose_resolved(overrides, local_gpus)
    on_node = cfg.cluster.name == "local" if on_node is None else on_node
    # The ranks launch on this node: its CUDA_VISIBLE_DEVICES decides which GPUs they use.
    visible = visible_gpu_ids(os.environ) if on_node else None
    gpus = query_gpus() if on_node and not cfg.dry_run and topo.accelerator == "cuda" else None
    gpu_mem = smallest_memory_bytes(gpus or [], visible)
    auto_note = None
    if cfg.zero.auto or cfg.activation_checkpointing.name == "auto":
        overrides, auto_note = _resolve_auto(cfg, topo, overrides, gpu_mem)
        cfg, run_dir_text, topo, local_gpus = compose_resolved(overrides, local_gpus)
        with open_dict(cfg.notes):
            cfg.notes["auto"] = auto_note
    run_dir = Path(run_dir_text).resolve()
    rundir_io.check_run_dir(run_dir)
    lock.refuse_if_live(run_dir)  # a live run's dir is neither read for a resume nor rewritten
    # A resume keeps the checkpoint's global batch (micro x accum re-derived for this world) before validating.
    world_change = adopt_checkpoint_batch(cfg, topo, run_dir) if check_resume else None
    notes = validate(cfg, topo)
    if not cfg.dry_run:
        if cfg.cluster.name == "local":
            check_node_has_gpus(cfg, topo, local_gpus, visible)
        notes += check_gpu_model(cfg, gpus or [], visible)
        check_cpu_precision(cfg, topo, cpu_flags())
        check_monitor_packages(cfg)
        check_model_weights(cfg)
        check_model_to_train(cfg)
    notes += _preflight(cfg, topo, gpu_mem)
    if auto_note:
        notes.append(f"auto: {' '.join(auto_note['chosen'])} ({auto_note['reason']})")
    if check_resume:
        rundir_io.check_resumable(run_dir, cfg)

    ds = build_ds_config(cfg, topo)
    if world_change is not None:
        ds = universal_ds_config(ds)
        notes.append(world_change.describe())
    port = cfg.cluster.master_port or free_port()
    env = rank_environment(cfg, topo, usable_cpus(), os.environ)
    deepspeed_bin = deepspeed_executable()
    args = deepspeed_args(cfg, topo, str(run_dir), port, visible)
    command = [deepspeed_bin, *args]
    files = {
        "config.yaml": rundir.config_yaml(cfg),
        "ds_config.json": rundir.to_json(ds),
        "launch.sh": launch_script(env, deepspeed_bin, args, str(run_dir)),
        "run.json": rundir.to_json(rundir.run_info(sys.argv, command)),
    }
    if cfg.cluster.name == "slurm":
        from launcher.render.sbatch import slurm_files

        command, files = slurm_files(cfg, topo, run_dir, files, deepspeed_bin)
    elif cfg.cluster.name == "hostfile":
        from launcher.render.hostfile import hostfile_files

        command, files = hostfile_files(cfg, topo, run_dir, files, deepspeed_bin, env, port)
    # This launch's run.json entry carries the plan the worker compares its measured peak with at the end.
    files["run.json"] = rundir.to_json(dict(json.loads(files["run.json"]), plan=run_plan(cfg, topo)))
    return PreparedRun(cfg, topo, run_dir, files, command, notes, world_change, secrets.split_env(env)[1])


def compose_resolved(overrides: Sequence[str], local_gpus: Optional[int] = None):
    """Compose, make paths absolute, adopt model.path / hostfile facts, resolve the world shape and
    precision=auto.
    Returns (cfg, run dir text, topology, local GPU count)."""
    cfg, run_dir_text = compose(overrides)
    check_interpolations(cfg)
    absolutize_paths(cfg)
    adopt_hf_architecture(cfg)
    if cfg.cluster.name == "hostfile":
        from launcher.config.hostfile import adopt_hostfile

        adopt_hostfile(cfg)  # cluster.nodes = the hostfile's hosts
    if local_gpus is None and cfg.cluster.name == "slurm":
        local_gpus = 0  # the submit host says nothing about the nodes: GPU jobs name a GPU hardware profile
    local_gpus = detect_local_gpus() if local_gpus is None else local_gpus
    topo = resolve_topology(cfg, local_gpus)
    if cfg.precision.name == "auto":  # the hardware decides; the run name then carries the resolved precision
        overrides, note = resolve_auto_precision(cfg, topo, overrides)
        cfg, run_dir_text, topo, local_gpus = compose_resolved(overrides, local_gpus)
        with open_dict(cfg.notes):
            cfg.notes["precision"] = note
    return cfg, run_dir_text, topo, local_gpus


def _resolve_auto(cfg: DictConfig, topo: Topology, overrides: Sequence[str], gpu_mem: Optional[int] = None):
    """zero=auto / activation_checkpointing=auto: the planner's fastest setup predicted to fit, as overrides."""
    from launcher.plan import choose_auto

    auto_zero = bool(cfg.zero.auto)
    auto_offload = auto_zero and not any(o.startswith("offload=") for o in overrides)
    auto_ac = cfg.activation_checkpointing.name == "auto"
    choice = choose_auto(cfg, topo, auto_zero=auto_zero, auto_offload=auto_offload, auto_ac=auto_ac,
                         gpu_mem_bytes=gpu_mem)
    decided = (("zero",) if auto_zero else ()) + (("offload",) if auto_offload else ()) + (
        ("activation_checkpointing",) if auto_ac else ())
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in decided
            and not (auto_ac and o.startswith("activation_checkpointing.every_n_layers="))]
    return [*kept, *choice.overrides], {"chosen": list(choice.overrides), "reason": choice.reason}


def prepare_data(cfg: DictConfig, topo: Topology, run_dir: Path, may_tokenize: bool = True,
                 defer: bool = False) -> List[str]:
    """The packed data cache before any rank starts (never for dry runs): reused when complete, else tokenized
    here when `may_tokenize` (the submitting host, a CPU job) and refused otherwise (a GPU job does not sit on
    its GPUs while it tokenizes); `defer`: left to the cluster.prepare_job job submitted ahead of training.
    Returns notes; data errors are ConfigErrors (bad records, vocab mismatch)."""
    from launcher.data import cache_complete, cache_path, prepare_cache
    from launcher.data.cache import cache_root, check_shared
    from launcher.data.records import DataError
    from launcher.models.tokenizer import TokenizerError

    try:
        check_shared(cache_root(cfg, run_dir), topo.nodes)
        if cache_complete(cfg, run_dir):
            return [f"data: reusing {cache_path(cfg, run_dir)}"]
        if defer:
            return [f"data: {cache_path(cfg, run_dir)} is prepared by a CPU job the training job waits for "
                    "(cluster.prepare_job)"]
        if not may_tokenize:
            raise DataError(
                f"data.cache_dir: the packed data {cache_path(cfg, run_dir)} is not prepared and a GPU job does not "
                "tokenize; submit with `python -m launcher` (it prepares before sbatch) or run "
                "`python -m launcher.data <same overrides>` on a host that sees data.cache_dir first")
        return [f"data: prepared {prepare_cache(cfg, run_dir)}"]
    except (DataError, TokenizerError) as exc:
        key, _, message = str(exc).partition(": ")
        raise ConfigError(key, message) from None


def _preflight(cfg: DictConfig, topo: Topology, gpu_mem: Optional[int] = None) -> List[str]:
    """Refuse a config the planner predicts will not fit (force=true launches anyway). gpu_mem: one GPU's
    measured memory (nvidia-smi) when the ranks run here; otherwise the profile's gpu_memory_gib."""
    from launcher.plan import preflight

    result = preflight(cfg, topo, gpu_mem_bytes=gpu_mem)
    if not result.fits and not cfg.force:
        raise ConfigError("plan", f"{result.message}; force=true launches anyway")
    return [f"plan: {result.message}" if not result.message.startswith("plan") else result.message]
