"""The training loop each rank runs: build, resume, train, log, checkpoint, stop cleanly."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from launcher.models.tokenizer import load_tokenizer
from launcher.plan.params import ModelShape, count_params, flops_per_token, mfu
from launcher.worker import act_ckpt, ckpt, comm, console, memory_plan, metrics, signals
from launcher.worker.data import DataError, Rows, SampleOrder, cache_path, global_targets, is_complete, micro_batches
from launcher.worker.model import build_model, count_parameters
from launcher.worker.status import EXIT_LOSS_SCALE_COLLAPSE, EXIT_USER_ERROR, StopRun, progress, write_status


@dataclass
class Context:
    run_dir: Path
    cfg: Any
    ds_path: Path
    ds: Dict[str, Any]
    rank: int
    world: int


def prepare_data(ctx: Context) -> Rows:
    """Memory-map the packed rows the launcher prepared before it started the ranks. A rank never tokenizes:
    every rank checks it sees the finished cache (one small all_gather, no waiting), so a cache missing on a
    node (not on a shared filesystem) or never prepared stops every rank with the reason before any step."""
    import socket

    try:
        path = cache_path(ctx.cfg, ctx.run_dir)  # the key fingerprints data.path: this node must see it too
        ok = is_complete(path)
    except DataError as exc:
        path, ok = f"({exc})", False
    seen = comm.gather_objects((socket.gethostname(), ok))
    missing = sorted({host for host, ok in seen if not ok})
    if missing:
        raise StopRun(
            f"data: the packed data {path} is missing or incomplete on {', '.join(missing)}; ranks only read a "
            "finished cache: launch with `python -m launcher` (it prepares the data first) or run "
            "`python -m launcher.data <same overrides>`, on a filesystem every node sees (data.cache_dir)",
            EXIT_USER_ERROR,
        )
    rows = Rows(path)
    if ctx.rank == 0:
        console.say(f"[launcher] data: {_data_summary(rows)}")
    if len(rows) < ctx.ds["train_batch_size"]:
        raise StopRun(
            f"data.path: only {len(rows)} sequences of {ctx.cfg.train.seq_len} tokens, fewer than one global "
            f"batch ({ctx.ds['train_batch_size']}); add data or lower train.global_batch_size/seq_len",
            EXIT_USER_ERROR,
        )
    return rows


def _data_summary(rows: Rows) -> str:
    stats = rows.meta.get("stats", {})
    parts = [f"{len(rows)} rows x {rows.seq_len} tokens", f"{stats.get('targets', 0):,} target tokens"]
    for key in ("records", "bad", "truncated", "dropped", "padding_fraction"):
        if stats.get(key):
            parts.append(f"{key} {stats[key]}")
    return ", ".join(parts)


def adapter_name(cfg: Any) -> str:
    """Run dirs written before the adapter group existed have no `adapter` key: full fine-tuning."""
    adapter = cfg.get("adapter")
    return "none" if adapter is None else str(adapter.name)


def current_loss_scale(engine: Any) -> Optional[float]:
    opt = engine.optimizer
    scale = getattr(opt, "cur_scale", None)
    if scale is None:
        scale = getattr(opt, "loss_scale", None)
    return None if scale is None else float(scale)


def train(ctx: Context) -> int:
    import deepspeed

    cfg, rank, world = ctx.cfg, ctx.rank, ctx.world
    if rank == 0:
        write_status(ctx.run_dir, "running", -1)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model.path)
    rows = prepare_data(ctx)
    if rank == 0 and not (ctx.run_dir / "tokenizer").is_dir():
        tokenizer.save_pretrained(str(ctx.run_dir / "tokenizer"))

    if cfg.precision.name == "fp16":
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            raise StopRun("precision=fp16: this device has no fp16 support (on CPU: no AVX512-FP16/AMX-FP16); "
                          "use precision=bf16 or precision=fp32", EXIT_USER_ERROR)
    model, keep_alive = build_model(cfg, ctx.ds, rank)
    recomputed = act_ckpt.enable(model, cfg, str(ctx.ds_path)) if cfg.activation_checkpointing.enabled else 0
    frozen = adapter_name(cfg) != "none"
    if frozen:
        from launcher.worker.adapters import lora

        model = lora.apply(model, cfg, checkpointing=recomputed > 0)
    model.train()
    # Only what trains goes to the optimizer: no state and no empty parameter groups for the frozen base.
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=str(ctx.ds_path))
    n_params, n_emb = count_parameters(engine.module)
    n_train = count_parameters(engine.module, trainable_only=True)[0]
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is not None and hasattr(scaler, "raise_error_at_min_scale"):
        # DeepSpeed would raise a bare Exception (traceback on every rank) on the first overflow at the
        # minimum scale; our own check below stops after precision.max_steps_at_min_scale with advice.
        scaler.raise_error_at_min_scale = False

    ckpt_dir = ctx.run_dir / "checkpoints"
    client = ckpt.load(engine, ckpt_dir, frozen=frozen)
    start = int(client["step"]) if client else 0
    progress.step = start
    max_steps = int(cfg.train.max_steps)
    log = metrics.MetricsLog(ctx.run_dir, start) if rank == 0 else None
    micro, accum, glob = (
        ctx.ds["train_micro_batch_size_per_gpu"],
        ctx.ds["gradient_accumulation_steps"],
        ctx.ds["train_batch_size"],
    )
    seq = int(cfg.train.seq_len)
    order = SampleOrder(len(rows), cfg.seed)
    shape = ModelShape.from_cfg(cfg.model)
    # The planner's count (tied lm_head included); a frozen base (LoRA) does no weight-gradient matmuls.
    flops_tok = flops_per_token(shape, count_params(shape), seq, n_train if frozen else None)
    peak = cfg.hardware.peak_tflops if engine.device.type == "cuda" else None
    if rank == 0:
        what = f"resuming at step {start}" if client else "starting"
        ac = f", activation checkpointing on {recomputed} layers" if recomputed else ""
        console.say(f"[launcher] {what}: {n_params:,} params ({n_train:,} trainable), {world} ranks, {micro} "
                    f"micro x {accum} accum x {world} = {glob} sequences x {seq} tokens per step{ac}")
    if start >= max_steps:
        if rank == 0:
            console.say(f"[launcher] already at step {start} >= train.max_steps={max_steps}; nothing to do")
        return finish(ctx, engine, start, saved=True, keep_alive=keep_alive)

    metrics.start_training_phase()  # peaks from here on: the training phase (build and data prep before)
    bar = _progress(rank, start, max_steps)
    fp16 = cfg.precision.name == "fp16"
    steps_at_min_scale = 0
    saved_step = start
    window_start, window_steps = time.perf_counter(), 0
    step = start
    for step in range(start + 1, max_steps + 1):
        losses = []
        # Loss = sum of token losses over the whole global batch / its target tokens, whatever the split:
        # each micro batch's loss is its sum / (targets / world), DeepSpeed averages gradients over the
        # `world` ranks, and scale_wrt_gas=False stops it dividing by the accumulation steps.
        per_rank = max(global_targets(rows, order, step - 1, glob), 1) / world
        for batch in micro_batches(rows, order, step - 1, glob, micro, accum, rank, world):
            inputs = {k: torch.from_numpy(v).to(engine.device) for k, v in batch.items()}
            # position_ids restart per record and no attention_mask: attention stays within records.
            loss = engine(**inputs, use_cache=False, num_items_in_batch=per_rank).loss
            engine.backward(loss, scale_wrt_gas=False)
            engine.step()
            losses.append(loss.detach())
        window_steps += 1
        progress.step = step
        scale = current_loss_scale(engine) if fp16 else None
        if fp16 and scale is not None and scale <= cfg.precision.min_loss_scale:
            steps_at_min_scale += 1
        else:
            steps_at_min_scale = 0

        if step % cfg.train.log_every == 0 or step == max_steps:
            loss = comm.global_loss(losses)
            mem_here = metrics.memory_bytes()
            mem = dict(zip(mem_here, comm.max_over_ranks(list(mem_here.values()))))
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            if not fp16 and not math.isfinite(loss):
                raise StopRun(f"loss is {loss} at step {step}; lower train.lr or set train.grad_clip", 4)
            elapsed = time.perf_counter() - window_start
            tps = window_steps * glob * seq / elapsed
            record = {
                "step": step,
                "loss": loss,
                "lr": float(engine.get_lr()[0]),
                "tokens_per_sec": round(tps, 1),
                "tokens_per_sec_per_gpu": round(tps / world, 1),  # the planner's unit (per rank on CPU)
                "step_time_s": round(elapsed / window_steps, 4),
                "mfu": mfu(tps, flops_tok, world, peak),
                # Max over ranks, bytes / 1e9; what each key measures: launcher.worker.metrics.memory_bytes.
                **{k: round(v / 1e9, 4) for k, v in mem.items()},
                "mem_source": metrics.memory_source(),
                "params": n_params,
                "trainable_params": n_train,
            }
            if fp16:
                record["loss_scale"] = scale
                record["skipped_steps"] = int(engine.skipped_steps)
            if log is not None:
                log.write(record)
                _report(bar, record)
            if engine.monitor.enabled:
                engine.monitor.write_events([(f"Train/{k}", v, step) for k, v in record.items()
                                             if k != "step" and isinstance(v, (int, float))])
            window_start, window_steps = time.perf_counter(), 0
        if bar is not None:
            bar.update(1)
        if fp16 and steps_at_min_scale >= cfg.precision.max_steps_at_min_scale:
            raise StopRun(
                f"fp16 loss scale has sat at min_loss_scale={cfg.precision.min_loss_scale} for "
                f"{steps_at_min_scale} steps ({int(engine.skipped_steps)} steps skipped for overflow): the model "
                "has stopped learning. Use precision=bf16 (A100/H100), or lower precision.initial_scale_power "
                "or train.lr; resume from the last checkpoint with a new run name",
                EXIT_LOSS_SCALE_COLLAPSE,
            )

        stop = comm.any_rank(bool(signals.received()))
        if step % cfg.train.save_every == 0 or step == max_steps or stop:
            saving = time.perf_counter()
            ckpt.save(engine, ckpt_dir, step, {"step": step, "consumed_samples": step * glob}, cfg.train.keep_last,
                      frozen=frozen)
            window_start += time.perf_counter() - saving  # step timing (tokens/s, MFU) excludes saves
            saved_step = step
        if stop:
            if rank == 0:
                console.say(f"\n[launcher] {signals.received() or 'signal'} received: checkpointed at step {step}, "
                            "exiting; rerun the same command to resume")
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
            if rank == 0:
                write_status(ctx.run_dir, "preempted", step)
            _teardown(engine, keep_alive)
            return 0
    if bar is not None:
        bar.close()
    if log is not None:
        log.close()
    return finish(ctx, engine, step, saved=saved_step == step, keep_alive=keep_alive)


def finish(ctx: Context, engine: Any, step: int, saved: bool, keep_alive: Any) -> int:
    memory_plan.report(ctx.run_dir, ctx.rank)  # collective: `memory: rank N planned X GiB, measured Y GiB`
    if ctx.rank == 0:
        from launcher.worker.plot import plot_run

        png, plot_note = plot_run(ctx.run_dir)
        if plot_note:
            console.say(f"[launcher] {plot_note}")
        write_status(ctx.run_dir, "completed", step)
        console.say(f"[launcher] finished at step {step}; metrics: {ctx.run_dir / 'metrics.jsonl'}"
                    + (f", loss curve: {png}" if png else ""))
    if ctx.cfg.train.export_at_end:
        from launcher.worker.export_hook import export_at_end

        export_at_end(ctx, engine)
    _teardown(engine, keep_alive)
    return 0


def _teardown(engine: Any, keep_alive: Any) -> None:
    # ZeRO-3 hooks hold references to the partitioned model; release them before process-group teardown.
    if int(engine.zero_optimization_stage()) == 3:
        engine.destroy()
    del keep_alive


def _progress(rank: int, start: int, total: int) -> Any:
    return console.Progress(start, total) if rank == 0 else None


def _report(bar: Any, r: Dict[str, Any]) -> None:
    parts = [f"step {r['step']}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}", f"{r['tokens_per_sec']:.0f} tok/s",
             f"mem {r['mem_peak_gb']:.2f} GB"]
    if r.get("mfu") is not None:
        parts.append(f"mfu {r['mfu']:.1%}")
    if "loss_scale" in r:
        parts.append(f"scale {r['loss_scale']:g} skipped {r['skipped_steps']}")
    line = " | ".join(parts)
    if bar is not None:
        bar.write(line)
    else:
        console.say(line)
