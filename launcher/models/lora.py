"""The PEFT LoraConfig a run's `adapter` group describes: one definition for the ranks (training) and the
export (rebuilding the same adapted model to load the checkpoint into). peft is imported lazily."""

from __future__ import annotations

from typing import Any

ALL_LINEAR = "all-linear"


def lora_config(cfg: Any) -> Any:
    from peft import LoraConfig

    a = cfg.adapter
    targets = list(a.target_modules)
    return LoraConfig(
        r=int(a.r), lora_alpha=int(a.alpha), lora_dropout=float(a.dropout), bias=str(a.bias),
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets,
        modules_to_save=list(a.modules_to_save) or None, task_type="CAUSAL_LM",
    )
