"""LoRA through PEFT's own API (get_peft_model; transformers' adapter API in 5.24 demands PEFT >= 0.22, which
does not exist yet). Called after the base model is built (under ZeRO-3 already partitioned at load) and after
activation checkpointing is wired, before deepspeed.initialize:

  base (HfDeepSpeedConfig -> from_pretrained) -> act_ckpt.enable -> apply() -> deepspeed.initialize(trainable)

The LoRA layers are created after zero.Init has exited: ordinary tensors, which deepspeed.initialize
broadcasts from rank 0 and partitions. Their initialisation (lora_A Kaiming-uniform, lora_B zero) draws from
torch's global generator, seeded here with cfg.seed, so every stage and a plain PEFT reference start equal.
"""

from __future__ import annotations

from typing import Any, List, Set

import torch

from launcher.models.lora import ALL_LINEAR, lora_config
from launcher.worker.status import EXIT_USER_ERROR, StopRun


def linear_names(model: torch.nn.Module) -> List[str]:
    """The distinct last-name components of the model's nn.Linear modules (q_proj, ..., lm_head)."""
    seen: Set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            seen.add(name.rsplit(".", 1)[-1])
    return sorted(seen)


def check_targets(model: torch.nn.Module, targets: List[str]) -> None:
    if targets == [ALL_LINEAR]:
        return
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise StopRun(f"adapter.target_modules: {', '.join(missing)} matches no module of {type(model).__name__}; "
                      f"its linear layers are {', '.join(linear_names(model))} (or [{ALL_LINEAR}])", EXIT_USER_ERROR)


def apply(model: Any, cfg: Any, checkpointing: bool) -> Any:
    """Freeze the base, add the adapters; returns the PeftModel (its trainable parameters = the adapters)."""
    from peft import get_peft_model

    check_targets(model, list(cfg.adapter.target_modules))
    if checkpointing:
        # DeepSpeed's checkpoint is reentrant (an autograd.Function): if no input of a checkpointed layer
        # requires grad (frozen embeddings), its output does not either and the adapters inside get no
        # gradient at all. So the embedding output must require grad. transformers' enable_input_require_grads
        # makes it a leaf; partition_activations then rewrites that leaf's .data to a flat buffer and the
        # backward fails on its shape. A clone of a detached copy is a non-leaf with its own shape record.
        # (get_peft_model also registers transformers' hook when checkpointing is on; ours runs first, so
        # that one then finds a tensor that already requires grad and does nothing.)
        model.get_input_embeddings().register_forward_hook(_embeddings_require_grad)
    torch.manual_seed(int(cfg.seed))
    # autocast_adapter_dtype=False: adapters in the base dtype (DeepSpeed keeps their fp32 master copy);
    # fp32 adapters in a bf16 ZeRO-3 model break its all-gathers (DeepSpeed #8072).
    return get_peft_model(model, lora_config(cfg), autocast_adapter_dtype=False)


def _embeddings_require_grad(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return output.detach().requires_grad_(True).clone()


def trainable_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
