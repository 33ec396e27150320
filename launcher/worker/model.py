"""The model each rank trains: any Hugging Face causal LM loaded from model.path (AutoModelForCausalLM, in the
training dtype), or a Llama built from the config.

Under ZeRO-3 the model is constructed partitioned (deepspeed.zero.Init, or HfDeepSpeedConfig before
from_pretrained), so no rank ever holds a full copy. Weights built from the config are initialised per
parameter from (seed, parameter name), so every ZeRO stage, with or without zero.Init, and the plain
PyTorch reference start from bitwise-identical weights.
"""

from __future__ import annotations

import zlib
from typing import Any, Dict, Optional, Tuple

import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedModel

from launcher.models.hf_config import INIT_STD, llama_config
from launcher.worker import attention
from launcher.worker.status import EXIT_USER_ERROR, StopRun

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def init_parameter(name: str, param: torch.Tensor, seed: int) -> None:
    """HF Llama's init (normal(0, 0.02) for matrices, ones for norms), seeded by (seed, name)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    with torch.no_grad():
        if param.dim() == 1:
            param.fill_(1.0)
        else:
            values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, INIT_STD, generator=gen)
            param.copy_(values.to(param.dtype))


def init_weights(model: torch.nn.Module, seed: int, zero3: bool, rank: int) -> None:
    if not zero3:
        for name, param in model.named_parameters():
            init_parameter(name, param, seed)
        return
    import deepspeed

    # One module at a time: gather its partitions, rank 0 writes, DeepSpeed re-partitions on exit.
    for module_name, module in model.named_modules():
        params = list(module.named_parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
            if rank == 0:
                for pname, param in params:
                    init_parameter(f"{module_name}.{pname}" if module_name else pname, param, seed)


def training_dtype(precision: str) -> torch.dtype:
    """The dtype DeepSpeed trains the weights in (it casts the whole model; no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def build_model(
    cfg: Any, ds_config: Dict[str, Any], rank: int
) -> Tuple[PreTrainedModel, Optional[object]]:
    """Returns (model, keep_alive). keep_alive must outlive training when it is an HfDeepSpeedConfig."""
    zero3 = cfg.zero.stage == 3
    attn = attention.resolve(str(cfg.model.attn_implementation), _device_type(), str(cfg.precision.name))
    if cfg.model.path is not None:
        keep_alive = None
        if zero3:
            from transformers.integrations import HfDeepSpeedConfig

            # Must exist before from_pretrained: it makes HF load straight into ZeRO-3 partitions.
            keep_alive = HfDeepSpeedConfig(ds_config)
        # In the training dtype, straight from the checkpoint's tensors: an 8B model is 16 GB per rank in bf16,
        # not 32 GB in fp32. Under ZeRO-1/2 every rank of a node holds one such copy while loading (the
        # planner's host.load_per_node term).
        try:
            # trust_remote_code stays off: remote-code models are refused at launch (launcher.config.arch).
            model = AutoModelForCausalLM.from_pretrained(
                cfg.model.path, local_files_only=True, dtype=DTYPES[cfg.precision.name],
                attn_implementation=attn, trust_remote_code=False,
            )
        except (ValueError, OSError, ImportError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            message = f"model.path: cannot load {cfg.model.path} as a causal LM: {first}"
            raise StopRun(message, EXIT_USER_ERROR) from None
        model.config.use_cache = False
        return model, keep_alive
    config = llama_config(cfg.model)
    config._attn_implementation = attn
    if zero3:
        import deepspeed

        # Parameters are created already partitioned, in the training dtype the config implies.
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = LlamaForCausalLM(config)
    else:
        model = LlamaForCausalLM(config)
    init_weights(model, cfg.seed, zero3, rank)
    return model, None


def _device_type() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> Tuple[int, int]:
    """(total, embedding) parameter counts, ZeRO-3 partitioned or not; trainable_only: those that train."""
    total = emb = 0
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        if "embed_tokens" in name:
            emb += n
    return total, emb
