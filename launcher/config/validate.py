"""One validation step before anything launches: each rule raises ConfigError(key, fix) on the first
violation; recommendations come back as warning lines. Pure: the caller passes in what it detected."""

from __future__ import annotations

import importlib.util
import os
from typing import List, Optional, Sequence

from omegaconf import DictConfig

from launcher.config.adapter import check_adapter
from launcher.config.topology import Topology
from launcher.errors import ConfigError

POSITIVE_INTS = (
    "train.micro_batch_size",
    "train.seq_len",
    "train.max_steps",
    "train.save_every",
    "train.log_every",
    "train.keep_last",
    "cluster.nodes",
    "hardware.cpu_ranks",
    "model.vocab_size",
    "model.hidden_size",
    "model.intermediate_size",
    "model.num_hidden_layers",
    "model.num_attention_heads",
    "model.num_key_value_heads",
    "model.max_position_embeddings",
    "activation_checkpointing.every_n_layers",
    "precision.max_steps_at_min_scale",
)
CHOICES = {
    "offload.optimizer": ("none", "cpu"),
    "precision.name": ("fp32", "fp16", "bf16"),
    "train.schedule": ("cosine", "linear", "constant"),
    "cluster.name": ("local", "slurm", "hostfile"),
    "data.format": ("text", "alpaca", "sharegpt", "messages"),
    "data.overlong": ("truncate", "drop"),
}


def _get(cfg: DictConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(cfg: DictConfig, topo: Topology) -> List[str]:
    """Raise ConfigError for the first invalid value or combination; return recommendation lines."""
    _check_scalars(cfg)
    _check_batch(cfg, topo)
    _check_combinations(cfg)
    _check_model_shape(cfg)
    _check_paths(cfg)
    _check_cluster(cfg, topo)
    check_adapter(cfg)
    return _recommendations(cfg)


def check_node_has_gpus(cfg: DictConfig, topo: Topology, local_gpus: int,
                        visible: Optional[Sequence[str]] = None) -> None:
    """A real (not dry) local launch needs the GPUs the profile asks for on this node; CUDA_VISIBLE_DEVICES
    (visible) limits them and must hold GPU indices (DeepSpeed's --include takes no UUIDs)."""
    if cfg.cluster.name != "local" or topo.accelerator != "cuda":
        return
    if visible and not all(v.isdigit() for v in visible):
        raise ConfigError(
            "CUDA_VISIBLE_DEVICES",
            f'"{",".join(visible)}" is not a list of GPU indices; DeepSpeed selects GPUs by index, so use '
            "e.g. CUDA_VISIBLE_DEVICES=0,1 (nvidia-smi -L lists them)",
        )
    if cfg.hardware.gpus_per_node is None:
        return
    if visible and len(visible) < topo.ranks_per_node:
        raise ConfigError(
            "hardware",
            f'needs {topo.ranks_per_node} GPUs per node but CUDA_VISIBLE_DEVICES="{",".join(visible)}" makes '
            f"{len(visible)} visible; use hardware=local (one rank per visible GPU), widen CUDA_VISIBLE_DEVICES, "
            "or dry_run=true to only render",
        )
    if local_gpus < topo.ranks_per_node:
        raise ConfigError(
            "hardware",
            f"hardware={cfg.hardware.name} needs {topo.ranks_per_node} GPUs per node but this node has "
            f"{local_gpus}; use hardware=local here, cluster=slurm to submit, or dry_run=true to only render",
        )


def check_cpu_precision(cfg: DictConfig, topo: Topology, cpu_flags: set) -> None:
    """CPU ranks compute fp16 only with native fp16 units (DeepSpeed's CPU accelerator refuses it otherwise)."""
    if topo.accelerator != "cpu" or cfg.precision.name != "fp16":
        return
    if not cpu_flags & {"avx512_fp16", "amx_fp16"}:
        raise ConfigError(
            "precision",
            "precision=fp16 on CPU ranks needs a CPU with AVX512-FP16 or AMX-FP16, which this one lacks; "
            "use precision=bf16 or precision=fp32 here (fp16 runs on GPUs)",
        )


def check_model_to_train(cfg: DictConfig) -> None:
    """A real launch trains weights from model.path, or a Llama built from the config (the byte tokenizer)."""
    if cfg.data.format != "text" and cfg.data.path is None:
        raise ConfigError("data.path", f"data.format={cfg.data.format} needs your data: set data.path=<file.jsonl>")
    if cfg.adapter.name != "none" and importlib.util.find_spec("peft") is None:
        raise ConfigError("adapter", f"adapter={cfg.adapter.name} needs PEFT: pip install 'peft>=0.21.2,<0.22' "
                                     "(or the launcher's [lora] extra)")
    if cfg.model.path is not None:
        return
    if cfg.adapter.name != "none":
        raise ConfigError("model.path", f"adapter={cfg.adapter.name} adapts pretrained weights: set "
                                        "model.path=<local Hugging Face model dir>")
    if cfg.model.model_type != "llama":
        raise ConfigError(
            "model.path",
            f"model={cfg.model.name} ({cfg.model.model_type}) describes an architecture for plans and dry runs; "
            "set model.path=<local Hugging Face model dir> to train it",
        )
    if cfg.data.format != "text":
        raise ConfigError("model.path", f"data.format={cfg.data.format} needs a model whose tokenizer has a chat "
                                        "template; set model.path=<local Hugging Face model dir>")


def check_monitor_packages(cfg: DictConfig) -> None:
    """DeepSpeed's monitors import their packages only inside the ranks; fail here instead."""
    import importlib.util

    for key, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if cfg.monitor[key] and importlib.util.find_spec(package) is None:
            raise ConfigError(f"monitor.{key}", f"needs the {package} package: pip install {package}")


def _check_scalars(cfg: DictConfig) -> None:
    for key in POSITIVE_INTS:
        value = _get(cfg, key)
        if value <= 0:
            raise ConfigError(key, f"must be a positive integer, got {value}")
    train = cfg.train
    for key in ("lr", "min_lr", "eps"):
        if not train[key] > 0 and not (key == "min_lr" and train[key] == 0):
            raise ConfigError(f"train.{key}", f"must be a positive number, got {train[key]}")
    if train.min_lr > train.lr:
        raise ConfigError("train.min_lr", f"{train.min_lr} is above train.lr={train.lr}; set it <= train.lr")
    if train.warmup_steps < 0:
        raise ConfigError("train.warmup_steps", f"must be >= 0, got {train.warmup_steps}")
    if train.grad_clip < 0:
        raise ConfigError("train.grad_clip", f"must be >= 0 (0 disables clipping), got {train.grad_clip}")
    if train.weight_decay < 0:
        raise ConfigError("train.weight_decay", f"must be >= 0, got {train.weight_decay}")
    for key in ("beta1", "beta2"):
        if not 0 <= train[key] < 1:
            raise ConfigError(f"train.{key}", f"must be in [0, 1), got {train[key]}")
    for key, choices in CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(key, f"'{_get(cfg, key)}' is not one of {', '.join(choices)}")
    if cfg.zero.stage not in (1, 2, 3):
        raise ConfigError("zero.stage", f"{cfg.zero.stage} is not a ZeRO stage; use zero=stage1|stage2|stage3")
    if cfg.precision.min_loss_scale <= 0:
        raise ConfigError("precision.min_loss_scale", "must be > 0")


def _check_batch(cfg: DictConfig, topo: Topology) -> None:
    micro, glob, world = cfg.train.micro_batch_size, cfg.train.global_batch_size, topo.world_size
    per_step = micro * world
    if glob is None:
        return _check_seq_len(cfg)
    if glob <= 0:
        raise ConfigError("train.global_batch_size", f"must be a positive integer or null, got {glob}")
    if glob % per_step != 0:
        lower = max(per_step, glob // per_step * per_step)
        raise ConfigError(
            "train.global_batch_size",
            f"{glob} != micro_batch_size x accumulation x world_size: {micro} x accum x {world} "
            f"({topo.nodes} node(s) x {topo.ranks_per_node} ranks) needs a multiple of {per_step}; "
            f"set train.global_batch_size={lower} or {lower + per_step}",
        )
    _check_seq_len(cfg)


def _check_seq_len(cfg: DictConfig) -> None:
    if cfg.train.seq_len > cfg.model.max_position_embeddings:
        raise ConfigError(
            "train.seq_len",
            f"{cfg.train.seq_len} exceeds model.max_position_embeddings={cfg.model.max_position_embeddings}",
        )


def _check_combinations(cfg: DictConfig) -> None:
    if cfg.offload.params and cfg.zero.stage != 3:
        raise ConfigError(
            "offload.params", f"parameter offload needs ZeRO-3 (zero=stage{cfg.zero.stage}); set zero=stage3"
        )
    if cfg.offload.params and cfg.offload.optimizer == "none":
        raise ConfigError("offload.params", "parameter offload also needs optimizer offload; set offload=cpu")
    ac = cfg.activation_checkpointing
    if ac.cpu_checkpointing and not ac.partition_activations:
        raise ConfigError(
            "activation_checkpointing.cpu_checkpointing",
            "needs partition_activations (DeepSpeed moves the partitioned copy); "
            "set activation_checkpointing.partition_activations=true",
        )
    if ac.contiguous_memory_optimization and not ac.partition_activations:
        raise ConfigError(
            "activation_checkpointing.contiguous_memory_optimization",
            "needs partition_activations; set activation_checkpointing.partition_activations=true",
        )
    flags = (ac.partition_activations, ac.cpu_checkpointing, ac.contiguous_memory_optimization)
    if any(flags) and not ac.enabled:
        raise ConfigError(
            "activation_checkpointing.enabled",
            "checkpointing options are set but checkpointing is off; use activation_checkpointing=full",
        )
    if ac.every_n_layers > cfg.model.num_hidden_layers:
        raise ConfigError(
            "activation_checkpointing.every_n_layers",
            f"{ac.every_n_layers} > model.num_hidden_layers={cfg.model.num_hidden_layers}",
        )
    if cfg.cluster.name == "hostfile" and not cfg.cluster.hostfile:
        raise ConfigError("cluster.hostfile", "cluster=hostfile needs cluster.hostfile=<path to a hostfile>")


def _check_model_shape(cfg: DictConfig) -> None:
    m = cfg.model
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            "model.num_attention_heads", f"{m.num_attention_heads} does not divide hidden_size={m.hidden_size}"
        )
    if m.num_attention_heads % m.num_key_value_heads:
        raise ConfigError(
            "model.num_key_value_heads",
            f"{m.num_key_value_heads} does not divide num_attention_heads={m.num_attention_heads}",
        )


def _check_paths(cfg: DictConfig) -> None:
    if cfg.model.path is not None:
        if not os.path.isdir(cfg.model.path):
            raise ConfigError("model.path", f"{cfg.model.path} is not a directory; give a local HF model dir")
        if not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
            raise ConfigError("model.path", f"{cfg.model.path} has no config.json; give a local HF model dir")
    if cfg.data.path is not None and not os.path.exists(cfg.data.path):
        raise ConfigError("data.path", f"{cfg.data.path} does not exist; give a local file or folder")
    if not 0 <= cfg.data.max_bad_fraction < 1:
        raise ConfigError("data.max_bad_fraction", f"must be in [0, 1), got {cfg.data.max_bad_fraction}")
    if cfg.cluster.hostfile is not None and not os.path.isfile(cfg.cluster.hostfile):
        raise ConfigError("cluster.hostfile", f"{cfg.cluster.hostfile} does not exist")


def check_model_weights(cfg: DictConfig) -> None:
    """A launch needs the weights; a dry run or a plan needs only config.json (the architecture)."""
    if cfg.model.path is not None and not any(os.path.isfile(os.path.join(cfg.model.path, f)) for f in WEIGHT_FILES):
        raise ConfigError("model.path", f"{cfg.model.path} has no weights ({' or '.join(WEIGHT_FILES[::2])}); "
                          "finish the download, or drop model.path to train from scratch")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _check_cluster(cfg: DictConfig, topo: Topology) -> None:
    if cfg.cluster.name == "local" and topo.nodes > 1:
        raise ConfigError("cluster.nodes", f"{topo.nodes} with cluster=local, which runs on this node only; use "
                          "cluster=slurm or cluster=hostfile for several nodes, or drop cluster.nodes")
    if cfg.cluster.prepare_job and cfg.cluster.name != "slurm":
        raise ConfigError("cluster.prepare_job", f"a data preparation job needs cluster=slurm (this is "
                          f"cluster={cfg.cluster.name}, which prepares on this host before the ranks start); drop it")
    if cfg.cluster.prepare_cpus < 1:
        raise ConfigError("cluster.prepare_cpus", f"must be >= 1, got {cfg.cluster.prepare_cpus}")
    port = cfg.cluster.master_port
    if port is not None and not (isinstance(port, int) and 1024 <= port <= 65535):
        raise ConfigError("cluster.master_port", f"{port} is not a port in 1024..65535; pick a free one or drop it "
                          "(a free port is chosen)")


def _recommendations(cfg: DictConfig) -> List[str]:
    notes = []
    if cfg.precision.name == "fp16" and cfg.hardware.bf16:
        notes.append(
            f"note: precision=fp16 on {cfg.hardware.name}, which supports bf16; precision=bf16 needs no loss "
            "scaling and cannot collapse to a zero scale"
        )
    ac = cfg.activation_checkpointing
    if ac.partition_activations:
        notes.append(
            "note: partition_activations shards activations only across tensor-parallel ranks; with pure data "
            "parallelism each rank keeps a full copy (it enables cpu_checkpointing)"
        )
    return notes
