"""Config -> DeepSpeed JSON, key by key. Pure: no I/O, no torch, no deepspeed.

Every key written here is a DeepSpeed key (no launcher-only keys), so the files also work unchanged as
`transformers.Trainer --deepspeed` configs.
"""

from __future__ import annotations

from typing import Any, Dict

from omegaconf import DictConfig

from launcher.config.topology import Topology, batch_shape

# We log through metrics.jsonl; DeepSpeed's own per-N-steps print would duplicate it.
STEPS_PER_PRINT = 1_000_000


def build_ds_config(cfg: DictConfig, topo: Topology) -> Dict[str, Any]:
    shape = batch_shape(cfg, topo)
    ds: Dict[str, Any] = {
        # micro x accum x world, e.g. 4 x 2 x 2 = 16 sequences per optimizer step.
        "train_batch_size": shape.global_batch_size,
        "train_micro_batch_size_per_gpu": shape.micro_batch_size,
        "gradient_accumulation_steps": shape.gradient_accumulation_steps,
        # Always explicit: DeepSpeed 0.19 silently clips at 1.0 when the key is absent.
        "gradient_clipping": float(cfg.train.grad_clip),
        "steps_per_print": STEPS_PER_PRINT,
        # DeepSpeed's throughput timer synchronises the device before and after every micro batch (a host
        # stall per step on GPUs); metrics.jsonl times every step without it. Off unless monitor.deepspeed_timers.
        "wall_clock_breakdown": bool(cfg.monitor.deepspeed_timers),
        "timers": {"throughput": {"enabled": bool(cfg.monitor.deepspeed_timers),
                                  "synchronized": bool(cfg.monitor.deepspeed_timers)}},
        "optimizer": _optimizer(cfg, topo),
        "scheduler": _scheduler(cfg),
        "zero_optimization": _zero(cfg),
    }
    precision = cfg.precision.name
    if precision == "fp16":
        ds["fp16"] = _fp16(cfg)
    elif precision == "bf16":
        ds["bf16"] = {"enabled": True}
    if cfg.activation_checkpointing.enabled:
        ds["activation_checkpointing"] = _activation_checkpointing(cfg)
    monitor = _monitor(cfg)
    ds.update(monitor)
    return ds


def _optimizer(cfg: DictConfig, topo: Topology) -> Dict[str, Any]:
    train = cfg.train
    params: Dict[str, Any] = {
        "lr": float(train.lr),
        "betas": [float(train.beta1), float(train.beta2)],
        "eps": float(train.eps),
        "weight_decay": float(train.weight_decay),
    }
    if topo.accelerator == "cpu" and cfg.offload.optimizer == "none":
        # On CPU ranks DeepSpeed would JIT-build a CPU "fused" Adam (~1 min); torch's AdamW is as fast here.
        params["torch_adam"] = True
    return {"type": "AdamW", "params": params}


def _scheduler(cfg: DictConfig) -> Dict[str, Any]:
    train = cfg.train
    warmup = min(int(train.warmup_steps), int(train.max_steps))
    # DeepSpeed's schedulers refuse 0 warmup steps; one "warmup" step that starts at the peak is none.
    start_lr = 0.0 if warmup > 0 else float(train.lr)
    warmup = max(1, warmup)
    if train.schedule == "constant":
        return {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": start_lr,
                "warmup_max_lr": float(train.lr),
                "warmup_num_steps": warmup,
                "warmup_type": "linear",
            },
        }
    if train.schedule == "linear":
        return {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": start_lr,
                "warmup_max_lr": float(train.lr),
                "warmup_num_steps": warmup,
                "warmup_type": "linear",
                "total_num_steps": int(train.max_steps),
            },
        }
    # Cosine from lr down to min_lr (ratio) after a linear warmup from 0.
    return {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": int(train.max_steps),
            "warmup_min_ratio": start_lr / float(train.lr),
            "warmup_num_steps": warmup,
            "cos_min_ratio": float(train.min_lr) / float(train.lr),
            "warmup_type": "linear",
        },
    }


def _zero(cfg: DictConfig) -> Dict[str, Any]:
    zero = cfg.zero
    out: Dict[str, Any] = {
        "stage": int(zero.stage),
        "overlap_comm": bool(zero.overlap_comm),
        "contiguous_gradients": bool(zero.contiguous_gradients),
        "reduce_bucket_size": int(zero.reduce_bucket_size),
    }
    if zero.stage in (1, 2):
        out["allgather_bucket_size"] = int(zero.allgather_bucket_size)
    if cfg.offload.optimizer == "cpu":
        out["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(cfg.offload.pin_memory)}
    if zero.stage == 3:
        if cfg.offload.params:
            out["offload_param"] = {"device": "cpu", "pin_memory": bool(cfg.offload.pin_memory)}
        out["stage3_prefetch_bucket_size"] = int(zero.stage3_prefetch_bucket_size)
        out["stage3_param_persistence_threshold"] = int(zero.stage3_param_persistence_threshold)
        out["stage3_max_live_parameters"] = int(zero.stage3_max_live_parameters)
        out["stage3_max_reuse_distance"] = int(zero.stage3_max_reuse_distance)
        out["stage3_gather_16bit_weights_on_model_save"] = bool(zero.stage3_gather_16bit_weights_on_model_save)
    return out


def _fp16(cfg: DictConfig) -> Dict[str, Any]:
    p = cfg.precision
    return {
        "enabled": True,
        # 0 = dynamic loss scaling.
        "loss_scale": 0,
        "initial_scale_power": int(p.initial_scale_power),
        "loss_scale_window": int(p.loss_scale_window),
        "hysteresis": int(p.hysteresis),
        "min_loss_scale": float(p.min_loss_scale),
    }


def _activation_checkpointing(cfg: DictConfig) -> Dict[str, Any]:
    ac = cfg.activation_checkpointing
    # The engine ignores this block for HF models; the worker feeds it to deepspeed.checkpointing.configure.
    return {
        "partition_activations": bool(ac.partition_activations),
        "cpu_checkpointing": bool(ac.cpu_checkpointing),
        "contiguous_memory_optimization": bool(ac.contiguous_memory_optimization),
        # One contiguous buffer per checkpointed layer.
        "number_checkpoints": checkpointed_layers(cfg),
        "synchronize_checkpoint_boundary": False,
        "profile": False,
    }


def checkpointed_layers(cfg: DictConfig) -> int:
    n = int(cfg.model.num_hidden_layers)
    every = int(cfg.activation_checkpointing.every_n_layers)
    return len(range(0, n, every))


def _monitor(cfg: DictConfig) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if cfg.monitor.tensorboard:
        out["tensorboard"] = {"enabled": True, "output_path": "tensorboard", "job_name": str(cfg.name)}
    if cfg.monitor.wandb:
        out["wandb"] = {"enabled": True, "project": str(cfg.monitor.wandb_project)}
    if cfg.monitor.csv:
        out["csv_monitor"] = {"enabled": True, "output_path": "csv", "job_name": str(cfg.name)}
    return out
