"""Activation checkpointing that acts: DeepSpeed's `activation_checkpointing` JSON block is ignored by the
engine and by HF models (they call torch.utils.checkpoint). Here the block configures
deepspeed.checkpointing and its checkpoint function is handed to every (n-th) HF decoder layer.
"""

from __future__ import annotations

from typing import Any


def enable(model: Any, cfg: Any, ds_config_path: str) -> int:
    """Wire deepspeed.checkpointing into the HF decoder layers; returns how many layers recompute."""
    import deepspeed
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not getattr(model, "supports_gradient_checkpointing", False):
        from launcher.worker.status import EXIT_USER_ERROR, StopRun

        raise StopRun(f"activation_checkpointing: {type(model).__name__} does not support activation checkpointing "
                      "(its decoder layers cannot recompute); use activation_checkpointing=none", EXIT_USER_ERROR)
    # Buffers from a previous engine in this process would be reused with the wrong shapes.
    deepspeed.checkpointing.reset()
    deepspeed.checkpointing.configure(None, deepspeed_config=ds_config_path)
    # The reentrant variant: DeepSpeed's non-reentrant one fails in backward under ZeRO-3 (0.19.8).
    model._set_gradient_checkpointing(
        enable=True,
        gradient_checkpointing_func=deepspeed.checkpointing.checkpoint,
        every_n_layers=cfg.activation_checkpointing.every_n_layers,
    )
    model.config.use_cache = False
    return sum(
        1 for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
    )


def disable(model: Any) -> None:
    model._set_gradient_checkpointing(enable=False)
