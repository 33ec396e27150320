"""The training loop each rank runs: build, resume, train, log, checkpoint, stop cleanly."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from launcher.models.tokenizer import load_tokenizer
from launcher.worker import act_ckpt, ckpt, metrics, signals
from launcher.worker.data import DataError, Rows, SampleOrder, build_packed, global_targets, micro_batches
from launcher.worker.model import build_model, count_parameters
from launcher.worker.status import EXIT_LOSS_SCALE_COLLAPSE, EXIT_USER_ERROR, StopRun, write_status


@dataclass
class Context:
    run_dir: Path
    cfg: Any
    ds_path: Path
    ds: Dict[str, Any]
    rank: int
    world: int


def prepare_data(ctx: Context, tokenizer: Any) -> Rows:
    """Rank 0 tokenizes and packs (cached); every rank learns of an error before any training step."""
    cache_dir = ctx.cfg.data.cache_dir or str(ctx.run_dir / "cache")
    result: list = [None, None]
    if ctx.rank == 0:
        try:
            result = [None, build_packed(ctx.cfg, tokenizer, cache_dir)]
        except DataError as exc:
            result = [str(exc), None]
    dist.broadcast_object_list(result, src=0)
    if result[0] is not None:
        raise StopRun(result[0], EXIT_USER_ERROR)
    rows = Rows(result[1])
    if ctx.rank == 0:
        print(f"[launcher] data: {_data_summary(rows)}", flush=True)
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
    rows = prepare_data(ctx, tokenizer)
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
    max_steps = int(cfg.train.max_steps)
    log = metrics.MetricsLog(ctx.run_dir, start) if rank == 0 else None
    micro, accum, glob = (
        ctx.ds["train_micro_batch_size_per_gpu"],
        ctx.ds["gradient_accumulation_steps"],
        ctx.ds["train_batch_size"],
    )
    seq = int(cfg.train.seq_len)
    order = SampleOrder(len(rows), cfg.seed)
    m = cfg.model
    # H = heads x head_dim (Gemma 2: 16 x 256 = 4096 for hidden 3584); a tied embedding is also the lm_head matmul.
    width = m.num_attention_heads * (m.get("head_dim") or m.hidden_size // m.num_attention_heads)
    flops_tok = metrics.flops_per_token(n_params, 0 if m.tie_word_embeddings else n_emb, m.num_hidden_layers,
                                        width, seq, n_trainable=n_train if frozen else None)
    peak = cfg.hardware.peak_tflops if engine.device.type == "cuda" else None
    if rank == 0:
        what = f"resuming at step {start}" if client else "starting"
        ac = f", activation checkpointing on {recomputed} layers" if recomputed else ""
        print(f"[launcher] {what}: {n_params:,} params ({n_train:,} trainable), {world} ranks, {micro} micro x "
              f"{accum} accum x {world} = {glob} sequences x {seq} tokens per step{ac}", flush=True)
    if start >= max_steps:
        if rank == 0:
            print(f"[launcher] already at step {start} >= train.max_steps={max_steps}; nothing to do", flush=True)
        return finish(ctx, engine, start, saved=True, keep_alive=keep_alive)

    bar = _progress(rank, start, max_steps)
    fp16 = cfg.precision.name == "fp16"
    steps_at_min_scale = 0
    saved_step = start
    window_start, window_steps = time.perf_counter(), 0
    step = start
    stop_signal = torch.zeros(1, dtype=torch.int32)
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
        scale = current_loss_scale(engine) if fp16 else None
        if fp16 and scale is not None and scale <= cfg.precision.min_loss_scale:
            steps_at_min_scale += 1
        else:
            steps_at_min_scale = 0

        if step % cfg.train.log_every == 0 or step == max_steps:
            loss_avg = torch.stack(losses).float().sum().reshape(1).cpu()  # world x this rank's share
            dist.all_reduce(loss_avg)
            mem = torch.tensor([metrics.peak_memory_bytes()], dtype=torch.float64)
            dist.all_reduce(mem, op=dist.ReduceOp.MAX)
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            if not fp16 and not math.isfinite(float(loss_avg.item())):
                raise StopRun(f"loss is {loss_avg.item()} at step {step}; lower train.lr or set train.grad_clip", 4)
            elapsed = time.perf_counter() - window_start
            tps = window_steps * glob * seq / elapsed
            record = {
                "step": step,
                "loss": float(loss_avg.item()) / world,
                "lr": float(engine.get_lr()[0]),
                "tokens_per_sec": round(tps, 1),
                "step_time_s": round(elapsed / window_steps, 4),
                "mfu": metrics.mfu(tps, flops_tok, world, peak),
                "mem_peak_gb": round(float(mem.item()) / 1e9, 4),
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

        stop_signal.fill_(1 if signals.received() else 0)
        dist.all_reduce(stop_signal, op=dist.ReduceOp.MAX)
        if step % cfg.train.save_every == 0 or step == max_steps or stop_signal.item():
            ckpt.save(engine, ckpt_dir, step, {"step": step, "consumed_samples": step * glob}, cfg.train.keep_last,
                      frozen=frozen)
            saved_step = step
        if stop_signal.item():
            if rank == 0:
                print(f"\n[launcher] {signals.received() or 'signal'} received: checkpointed at step {step}, "
                      "exiting; rerun the same command to resume", flush=True)
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
    if ctx.rank == 0:
        png = metrics.plot_loss(ctx.run_dir)
        write_status(ctx.run_dir, "completed", step)
        print(f"[launcher] finished at step {step}; metrics: {ctx.run_dir / 'metrics.jsonl'}"
              + (f", loss curve: {png}" if png else ""), flush=True)
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
    if rank != 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0)


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
        print(line, flush=True)
