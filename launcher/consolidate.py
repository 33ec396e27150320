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
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

CHECKPOINTS = "checkpoints"
DONE = "DONE"
TAG_RE = re.compile(r"^step_(\d+)$")
DTYPES = ("bf16", "fp16", "fp32")
DEFAULT_MAX_SHARD_SIZE = "5GB"
EXPORT_INFO = "export.json"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class ExportError(Exception):
    """A user-facing problem: printed as one `error: ...` line, exit code 2."""


@dataclass
class Checkpoint:
    run_dir: Path
    ckpt_dir: Path  # <run_dir>/checkpoints
    tag: str
    step: int
    stage: int
    world: int
    notes: List[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.ckpt_dir / self.tag


@dataclass
class ExportResult:
    out: Path
    checkpoint: Checkpoint
    dtype: str
    files: List[str]
    n_params: int
    total_bytes: int
    seconds: float


# ----------------------------------------------------------------------------------------------------------
# Checks that need no torch


def parse_size(text: Any) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500*2**20, 1000000 -> 1000000 (HF's convention: KB/MB/GB are decimal)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE_RE.match(str(text))
        if not m:
            raise ExportError(f"max_shard_size={text}: use a size like 5GB, 500MB or 2GiB")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])
    if value <= 0:
        raise ExportError(f"max_shard_size={text}: must be positive")
    return value


def load_run_config(run_dir: Path) -> Any:
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{run_dir} is not a launcher run dir (no config.yaml)")
    try:
        return OmegaConf.load(path)
    except Exception as exc:  # noqa: BLE001 - a broken YAML file is a user-facing problem
        raise ExportError(f"cannot read {path}: {exc}") from None


def _steps(tags: List[str]) -> str:
    return ", ".join(str(int(TAG_RE.match(t).group(1))) for t in tags) if tags else "none"  # type: ignore[union-attr]


def _world_size(run_dir: Path) -> Optional[int]:
    """Data-parallel ranks of the run: train_batch_size / (micro batch x accumulation) in ds_config.json."""
    try:
        ds = json.loads((run_dir / "ds_config.json").read_text())
        return int(ds["train_batch_size"]) // (
            int(ds["train_micro_batch_size_per_gpu"]) * int(ds["gradient_accumulation_steps"]))
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def expected_files(stage: int, world: int) -> List[str]:
    """The shard files (glob patterns) a complete ZeRO checkpoint written by `world` ranks contains."""
    optim = [f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    if stage == 3:
        return [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)] + optim
    return ["mp_rank_00_model_states.pt"] + optim


def checkpoint_world(path: Path, run_dir: Path) -> int:
    """Ranks that wrote the checkpoint: each saves its RNG state (launcher.worker.ckpt) before DONE exists;
    without those files, the run's current shape (ds_config.json)."""
    return len(list(path.glob("rng_rank*.pt"))) or _world_size(run_dir) or 1


def check_complete(path: Path, stage: int, world: int) -> None:
    if not (path / DONE).is_file():
        raise ExportError(f"checkpoint {path} is incomplete: no {DONE} marker (its save was interrupted)")
    missing = []
    for pattern in expected_files(stage, world):
        hits = [p for p in path.glob(pattern) if p.is_file() and p.stat().st_size > 0]
        if not hits:
            missing.append(pattern.lstrip("*"))
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ExportError(f"checkpoint {path} is incomplete: missing or empty {shown} "
                          f"(ZeRO-{stage}, {world} ranks)")


def find_checkpoint(run_dir: Path, step: Optional[int] = None) -> Checkpoint:
    """The checkpoint to export: `step`, or the newest complete one. Raises ExportError with advice."""
    if not run_dir.is_dir():
        raise ExportError(f"no checkpoint in {run_dir}: no such directory; train first")
    cfg = load_run_config(run_dir)
    ckpt_dir = run_dir / CHECKPOINTS
    tags = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir() and TAG_RE.match(p.name)) \
        if ckpt_dir.is_dir() else []
    if not tags:
        raise ExportError(f"no checkpoint in {run_dir}; train first")
    complete = [t for t in tags if (ckpt_dir / t / DONE).is_file()]
    incomplete = [t for t in tags if t not in complete]
    stage = int(cfg.zero.stage)
    notes: List[str] = []
    if step is None:
        if not complete:
            raise ExportError(f"no complete checkpoint in {ckpt_dir}: step(s) {_steps(incomplete)} have no {DONE} "
                              "marker (interrupted saves); resume training to write a complete one")
        tag = complete[-1]
        newer = [t for t in incomplete if t > tag]
        if newer:
            notes.append(f"note: skipping incomplete checkpoint(s) at step {_steps(newer)} (no {DONE} marker)")
    else:
        tag = f"step_{step:08d}"
        if tag not in tags:
            extra = f" (incomplete: {_steps(incomplete)})" if incomplete else ""
            raise ExportError(f"step={step}: no checkpoint for step {step} in {ckpt_dir}; "
                              f"available steps: {_steps(complete)}{extra}")
    world = checkpoint_world(ckpt_dir / tag, run_dir)
    try:
        check_complete(ckpt_dir / tag, stage, world)
    except ExportError as exc:
        raise ExportError(f"{exc}; complete steps: {_steps(complete)}") from None
    return Checkpoint(run_dir, ckpt_dir, tag, int(TAG_RE.match(tag).group(1)), stage, world, notes)  # type: ignore


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


# ----------------------------------------------------------------------------------------------------------
# The export itself (imports torch lazily)


_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, _TORCH_DTYPES[name])


def _shard_plan(entries: List[Tuple[str, int]], max_bytes: int) -> List[List[str]]:
    """Greedy, order-preserving: a new shard when the next tensor would overflow; big tensors sit alone."""
    shards: List[List[str]] = [[]]
    size = 0
    for name, nbytes in entries:
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _hf_config(cfg: Any, dtype: str) -> Any:
    """config.json: the model dir's own config (model.path) when it is still there, else the run's model."""
    from transformers import AutoConfig

    from launcher.worker.model import llama_config

    path = cfg.model.path
    if path is not None and (Path(path) / "config.json").is_file():
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    else:
        config = llama_config(cfg.model)
    if not getattr(config, "architectures", None):
        config.architectures = ["LlamaForCausalLM"]
    config.use_cache = True  # training turned the KV cache off; generation wants it
    config.dtype = _torch_dtype(dtype)
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
    from launcher.worker.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg.model.path)
    except SystemExit as exc:  # load_tokenizer's own one-line error
        raise ExportError(str(exc).removeprefix("error: ")) from None
    return [Path(p).name for p in tokenizer.save_pretrained(str(out))]


def _consolidated_state_dict(ckpt: Checkpoint) -> Dict[str, Any]:
    """DeepSpeed's lazy consolidation: name -> tensor (ZeRO-1/2 views) or GatheredTensor (ZeRO-3)."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()
    try:
        # DeepSpeed prints progress lines and tqdm bars (on stderr) that say nothing useful here.
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.ckpt_dir), tag=ckpt.tag, lazy_mode=True)
    except Exception as exc:  # noqa: BLE001 - torch.load/pickle/DeepSpeed errors on damaged or missing shards
        raise ExportError(f"checkpoint {ckpt.path} is incomplete or unreadable: {_first_sentence(exc)}") from None


def _first_sentence(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    return text.split(". ")[0].rstrip(".")


def _expected_shapes(config: Any) -> Tuple[Dict[str, Tuple[int, ...]], set]:
    """The HF model's state-dict shapes (built on the meta device: no memory), and its tied keys."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out_emb is not None and in_emb is not None:
            for name, module in model.named_modules():
                if module is out_emb:
                    tied.add(f"{name}.weight")
    return shapes, tied


def _write_weights(ckpt: Checkpoint, config: Any, dtype: str, tmp: Path, max_bytes: int,
                   log: Callable[[str], None]) -> Tuple[List[str], int, int]:
    import gc

    import torch
    from safetensors.torch import save_file

    target = _torch_dtype(dtype)
    expected, tied = _expected_shapes(config)
    lazy = _consolidated_state_dict(ckpt)

    # Aliases (tied embeddings: lm_head.weight is embed_tokens.weight) are stored once, like save_pretrained.
    first_name: Dict[int, str] = {}
    names: List[str] = []
    for name, value in lazy.items():
        if id(value) in first_name and name in tied:
            continue
        first_name.setdefault(id(value), name)
        names.append(name)
    problems = []
    unexpected = [n for n in names if n not in expected]
    missing = [n for n in expected if n not in names and n not in tied]
    wrong = [f"{n} {tuple(lazy[n].shape)} vs {expected[n]}" for n in names
             if n in expected and tuple(lazy[n].shape) != expected[n]]
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:3]}")
    if missing:
        problems.append(f"missing tensors {missing[:3]}")
    if wrong:
        problems.append(f"shape mismatch {wrong[:3]}")
    if problems:
        raise ExportError(f"checkpoint {ckpt.path} does not match the run's model config: "
                          + "; ".join(problems))

    def nbytes(name: str) -> int:
        value = lazy[name]
        numel = 1
        for d in value.shape:
            numel *= int(d)
        floating = value.dtype.is_floating_point
        return numel * (torch.empty((), dtype=target if floating else value.dtype).element_size())

    sizes = [(n, nbytes(n)) for n in names]
    plan = _shard_plan(sizes, max_bytes)
    total_bytes = sum(s for _, s in sizes)
    n_params = sum(int(torch.Size(lazy[n].shape).numel()) for n in names)
    files: List[str] = []
    weight_map: Dict[str, str] = {}
    for i, shard in enumerate(plan, 1):
        fname = "model.safetensors" if len(plan) == 1 else f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for name in shard:
            t = lazy[name].contiguous()  # ZeRO-3: gathers this tensor's partitions from every rank's shard
            t = t.to(dtype=target if t.is_floating_point() else t.dtype, copy=True).contiguous()
            tensors[name] = t
            weight_map[name] = fname
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        _chmod_like_umask(tmp / fname)  # safetensors creates its files 0600
        files.append(fname)
        written = sum(t.numel() * t.element_size() for t in tensors.values())
        log(f"  wrote {fname} ({len(shard)} tensors, {written / 1e6:.1f} MB)")
        del tensors
        for name in shard:  # drop DeepSpeed's references as we go
            lazy[name] = None
        gc.collect()
    if len(plan) > 1:
        index = {"metadata": {"total_size": total_bytes, "total_parameters": n_params}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        files.append("model.safetensors.index.json")
    return files, n_params, total_bytes


def _chmod_like_umask(path: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _verify(tmp: Path, files: List[str], config: Any) -> None:
    """Re-read the written safetensors headers: every tensor the HF model needs is there, in its shape."""
    from safetensors import safe_open

    expected, tied = _expected_shapes(config)
    found: Dict[str, Tuple[int, ...]] = {}
    for f in files:
        if f.endswith(".safetensors"):
            with safe_open(str(tmp / f), framework="pt") as st:
                for k in st.keys():
                    found[k] = tuple(st.get_slice(k).get_shape())
    bad = [k for k in expected if k not in tied and found.get(k) != expected[k]]
    bad += [k for k in found if k not in expected]
    if bad:
        raise ExportError(f"the written weights do not match the model config (e.g. {bad[:3]}); nothing exported")


def export(run_dir: Path, step: Optional[int] = None, out: Optional[Path] = None, dtype: Optional[str] = None,
           max_shard_size: Any = DEFAULT_MAX_SHARD_SIZE, log: Callable[[str], None] = print) -> ExportResult:
    """Export one checkpoint of a run as a Hugging Face model directory. Raises ExportError on user errors."""
    started = time.perf_counter()
    run_dir = Path(run_dir).expanduser().absolute()
    ckpt = find_checkpoint(run_dir, step)
    cfg = load_run_config(run_dir)
    dtype = resolve_dtype(cfg, dtype)
    max_bytes = parse_size(max_shard_size)
    out = Path(out).expanduser().absolute() if out is not None else run_dir / "hf"
    check_out(out, run_dir)
    for note in ckpt.notes:
        log(note)
    log(f"exporting {ckpt.path} (step {ckpt.step}, ZeRO-{ckpt.stage}) as {dtype} -> {out}")

    import deepspeed
    import transformers

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        config = _hf_config(cfg, dtype)
        files, n_params, total_bytes = _write_weights(ckpt, config, dtype, tmp, max_bytes, log)
        config.save_pretrained(str(tmp))
        _generation_config(cfg, config).save_pretrained(str(tmp))
        files += ["config.json", "generation_config.json"]
        files += _write_tokenizer(cfg, run_dir, tmp)
        _verify(tmp, files, config)
        info = {
            "run_dir": str(run_dir),
            "checkpoint": str(ckpt.path),
            "step": ckpt.step,
            "zero_stage": ckpt.stage,
            "dtype": dtype,
            "n_params": n_params,
            "weights_bytes": total_bytes,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        files.append(EXPORT_INFO)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, ckpt, dtype, sorted(files), n_params, total_bytes, time.perf_counter() - started)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished export into place; an earlier export there is swapped out, then deleted."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.export-old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def summary(result: ExportResult) -> str:
    weights = [f for f in result.files if f.endswith(".safetensors")]
    return (f"exported step {result.checkpoint.step} ({result.n_params:,} params, {result.dtype}, "
            f"{result.total_bytes / 1e6:.1f} MB in {len(weights)} safetensors file(s)) to {result.out} "
            f"in {result.seconds:.1f} s\n"
            f"  load: AutoModelForCausalLM.from_pretrained({str(result.out)!r}); "
            f"AutoTokenizer.from_pretrained({str(result.out)!r})")


def eprint(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
