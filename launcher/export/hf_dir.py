"""ZeRO checkpoint -> Hugging Face model directory (config.json, model*.safetensors, generation_config.json,
tokenizer files), written into a temporary sibling directory and renamed into place only when complete.

The weights come from DeepSpeed's own consolidation (`deepspeed.utils.zero_to_fp32`, lazy mode): the fp32
master partitions each rank saved, stitched back into full tensors. With ZeRO-3 each tensor is gathered only
when its output shard is written; with ZeRO-1/2 DeepSpeed concatenates the (memory-mapped) partitions into
one flat fp32 vector first. Either way no second full copy is made here: each shard is materialised in the
output dtype, written, and freed before the next one.

Everything that can fail on the user's input (run dir, step, checkpoint completeness, options) is checked
before torch is imported, so mistakes cost well under a second. torch, deepspeed and transformers are
imported lazily, inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional

from launcher.errors import ExportError
from launcher.export.locate import CHECKPOINTS, Checkpoint, find_checkpoint, load_run_config
from launcher.export.shards import DEFAULT_MAX_SHARD_SIZE, parse_size, torch_dtype, verify, write_weights
from launcher.export.swap import replace_dir

DTYPES = ("bf16", "fp16", "fp32")
EXPORT_INFO = "export.json"


@dataclass
class ExportResult:
    out: Path
    checkpoint: Checkpoint
    dtype: str
    files: List[str]
    n_params: int
    total_bytes: int
    seconds: float


def resolve_dtype(cfg: Any, dtype: Optional[str]) -> str:
    if dtype is None:
        return str(cfg.precision.name) if str(cfg.precision.name) in DTYPES else "fp32"  # the run's precision
    name = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}.get(
        str(dtype).lower(), str(dtype).lower())
    if name not in DTYPES:
        raise ExportError(f"dtype={dtype}: use one of {', '.join(DTYPES)}")
    return name


def check_out(out: Path, run_dir: Path) -> None:
    """Only an empty directory or an earlier export may be replaced: never a user's other files."""
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"out={out} exists and is not a directory")
        if any(out.iterdir()) and not (out / EXPORT_INFO).is_file():
            raise ExportError(f"out={out} exists and is not an export (no {EXPORT_INFO}); "
                              "choose another out= or remove it")
    resolved = out.resolve()
    for protected in (run_dir.resolve(), (run_dir / CHECKPOINTS).resolve()):
        if resolved == protected or protected.is_relative_to(resolved):
            raise ExportError(f"out={out} would replace {protected}; choose another out=")


def _hf_config(cfg: Any, dtype: str) -> Any:
    """config.json: the model dir's own config (model.path) when it is still there, else the run's model."""
    from transformers import AutoConfig

    from launcher.models.hf_config import llama_config

    path = cfg.model.path
    if path is not None and (Path(path) / "config.json").is_file():
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    else:
        config = llama_config(cfg.model)
    if not getattr(config, "architectures", None):
        config.architectures = ["LlamaForCausalLM"]
    config.use_cache = True  # training turned the KV cache off; generation wants it
    config.dtype = torch_dtype(dtype)
    return config


def _generation_config(cfg: Any, config: Any) -> Any:
    from transformers import GenerationConfig

    path = cfg.model.path
    if path is not None and (Path(path) / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(path, local_files_only=True)
    return GenerationConfig.from_model_config(config)


def _write_tokenizer(cfg: Any, run_dir: Path, out: Path) -> List[str]:
    """The tokenizer the run saved (<run_dir>/tokenizer), else the one the run would have used."""
    saved = run_dir / "tokenizer"
    if saved.is_dir() and any(saved.iterdir()):
        names = []
        for f in sorted(saved.iterdir()):
            if f.is_file():
                shutil.copy2(f, out / f.name)
                names.append(f.name)
        return names
    from launcher.models.tokenizer import TokenizerError, load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg.model.path)
    except TokenizerError as exc:  # load_tokenizer's own one-line error
        raise ExportError(str(exc)) from None
    return [Path(p).name for p in tokenizer.save_pretrained(str(out))]


def export(run_dir: Path, step: Optional[int] = None, out: Optional[Path] = None, dtype: Optional[str] = None,
           max_shard_size: Any = DEFAULT_MAX_SHARD_SIZE, log: Callable[[str], None] = print,
           merge: bool = False) -> ExportResult:
    """Export one checkpoint of a run as a Hugging Face model directory (LoRA runs: the PEFT adapter
    directory, or with merge the merged model). Raises ExportError on user errors."""
    started = time.perf_counter()
    run_dir = Path(run_dir).expanduser().absolute()
    ckpt = find_checkpoint(run_dir, step)
    cfg = load_run_config(run_dir)
    dtype = resolve_dtype(cfg, dtype)
    lora = str(cfg.get("adapter", {}).get("name", "none")) == "lora"
    if merge and not lora:
        raise ExportError("merge=true merges LoRA adapters; this run trained every weight (adapter=none)")
    max_bytes = parse_size(max_shard_size)
    out = Path(out).expanduser().absolute() if out is not None else run_dir / "hf"
    check_out(out, run_dir)
    for note in ckpt.notes:
        log(note)
    what = ("merged LoRA model" if merge else "LoRA adapter") if lora else "model"
    log(f"exporting {ckpt.path} (step {ckpt.step}, ZeRO-{ckpt.stage}) as {dtype} {what} -> {out}")

    import deepspeed
    import transformers

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if lora:
            from launcher.export.adapter import write_adapter

            files, n_params, total_bytes = write_adapter(cfg, ckpt, dtype, merge, tmp, log)
            files += _write_tokenizer(cfg, run_dir, tmp)
        else:
            config = _hf_config(cfg, dtype)
            files, n_params, total_bytes = write_weights(ckpt, config, dtype, tmp, max_bytes, log)
            config.save_pretrained(str(tmp))
            _generation_config(cfg, config).save_pretrained(str(tmp))
            files += ["config.json", "generation_config.json"]
            files += _write_tokenizer(cfg, run_dir, tmp)
            verify(tmp, files, config)
        info = {
            "run_dir": str(run_dir),
            "checkpoint": str(ckpt.path),
            "step": ckpt.step,
            "zero_stage": ckpt.stage,
            "dtype": dtype,
            "kind": ("merged" if merge else "adapter") if lora else "full",
            "n_params": n_params,
            "weights_bytes": total_bytes,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        files.append(EXPORT_INFO)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, ckpt, dtype, sorted(files), n_params, total_bytes, time.perf_counter() - started)


def summary(result: ExportResult) -> str:
    weights = [f for f in result.files if f.endswith(".safetensors")]
    if "adapter_config.json" in result.files:
        return (f"exported the LoRA adapter of step {result.checkpoint.step} ({result.n_params:,} params, "
                f"{result.dtype}) to {result.out} in {result.seconds:.1f} s\n"
                f"  load: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<model.path>), "
                f"{str(result.out)!r}); merged model: add merge=true")
    return (f"exported step {result.checkpoint.step} ({result.n_params:,} params, {result.dtype}, "
            f"{result.total_bytes / 1e6:.1f} MB in {len(weights)} safetensors file(s)) to {result.out} "
            f"in {result.seconds:.1f} s\n"
            f"  load: AutoModelForCausalLM.from_pretrained({str(result.out)!r}); "
            f"AutoTokenizer.from_pretrained({str(result.out)!r})")


def eprint(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
