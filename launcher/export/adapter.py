"""Export of a LoRA run: the PEFT adapter directory (adapter_config.json + adapter_model.safetensors), or with
merge=true the merged full model in the export dtype.

The checkpoint holds only the trainable parameters (saved with exclude_frozen_parameters), so DeepSpeed's
consolidation gathers just the adapters, never the base, at any ZeRO stage. They are loaded into a fresh
PEFT model on the base from model.path (offline, on CPU, no DeepSpeed) and saved through PEFT's own
save_pretrained, so `PeftModel.from_pretrained(base, out)` and serving stacks that read PEFT's format load it.
Merging happens here, after training, never under ZeRO-3.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, List, Tuple

from launcher.errors import ExportError
from launcher.export.locate import Checkpoint
from launcher.export.shards import torch_dtype
from launcher.export.zero_state import consolidated_state_dict

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _base_model(cfg: Any, dtype: str) -> Any:
    from transformers import AutoModelForCausalLM

    path = cfg.model.path
    if path is None or not (Path(path) / "config.json").is_file():
        raise ExportError(f"the frozen base is read from model.path={path}, which is missing; "
                          "restore it there (the checkpoint holds only the adapters)")
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype(dtype))


@contextmanager
def _plain_loading() -> Iterator[None]:
    """train.export_at_end runs this in rank 0 of a finished ZeRO-3 run, whose HfDeepSpeedConfig is still
    registered: transformers would then load the base partitioned, in collectives the other ranks (waiting
    for the export) never join. Load a plain CPU model instead, and put the registration back after."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def adapted_model(cfg: Any, ckpt: Checkpoint, dtype: str, log: Callable[[str], None]) -> Tuple[Any, int]:
    """The base from model.path with the checkpoint's trained adapters; returns (PeftModel, adapter params)."""
    import torch
    from peft import get_peft_model

    from launcher.models.lora import lora_config

    state = consolidated_state_dict(ckpt)
    with _plain_loading():
        model = get_peft_model(_base_model(cfg, dtype), lora_config(cfg), autocast_adapter_dtype=False)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(trainable) - set(state))
    extra = sorted(set(state) - set(trainable))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the adapter config does not make"
        raise ExportError(f"checkpoint {ckpt.path} {what} ({len(missing)} missing, {len(extra)} unexpected); "
                          "was it written with a different adapter config?")
    with torch.no_grad():
        for name, param in trainable.items():
            # ZeRO-3: contiguous() gathers this tensor's partitions from every rank's shard.
            param.copy_(state[name].contiguous().reshape(param.shape).to(param.dtype))
    n = sum(p.numel() for p in trainable.values())
    log(f"loaded {len(trainable)} adapter tensors ({n:,} params) onto the base from {cfg.model.path}")
    return model, n


def write_adapter(cfg: Any, ckpt: Checkpoint, dtype: str, merge: bool, tmp: Path,
                  log: Callable[[str], None]) -> Tuple[List[str], int, int]:
    """Writes the adapter dir (or the merged model) into tmp; returns (files, params written, bytes)."""
    model, n_adapter = adapted_model(cfg, ckpt, dtype, log)
    if merge:
        merged = model.merge_and_unload()
        merged.config.use_cache = True
        merged.save_pretrained(str(tmp))
        files = sorted(p.name for p in tmp.iterdir())
        n = sum(p.numel() for p in merged.parameters())
    else:
        model.save_pretrained(str(tmp))
        _check_adapter_file(tmp / "adapter_model.safetensors", n_adapter)
        files, n = list(ADAPTER_FILES), n_adapter
    size = sum(p.stat().st_size for p in tmp.iterdir() if p.suffix == ".safetensors")
    return files, n, size


def _check_adapter_file(path: Path, expected: int) -> None:
    """Never an empty adapter file (the ZeRO-3 pitfall): every adapter element is in it."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        got = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    if got != expected or expected == 0:
        raise ExportError(f"{path.name} holds {got:,} adapter values, expected {expected:,}")


def _numel(shape: List[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
