"""Runs on 2 real ranks (deepspeed runner): activation checkpointing off vs on, ZeRO-2 and ZeRO-3, one
forward+backward on the same batch. Records per-rank peak RSS growth during forward and forward+backward
(VmHWM reset through /proc/self/clear_refs) and the full gradients. Rank 0 writes the comparison as JSON.
Usage: deepspeed --num_gpus 2 tests/ranks/ac_probe.py <out.json> <scratch dir>"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from launcher.prepare import prepare
from launcher.worker import act_ckpt
from launcher.worker.model import build_model

SHAPE = ["model.hidden_size=256", "model.intermediate_size=704", "model.num_attention_heads=8",
         "model.num_key_value_heads=4", "model.num_hidden_layers=4", "train.seq_len=512",
         "train.micro_batch_size=8", "train.grad_clip=0", "dry_run=true"]


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def probe(stage: int, ac: str, scratch: Path, rank: int) -> dict:
    run = prepare([f"zero=stage{stage}", f"activation_checkpointing={ac}", *SHAPE,
                   f"hydra.run.dir={scratch / f'z{stage}_{ac}'}"], local_gpus=0, check_resume=False)
    ds_path = scratch / f"ds_z{stage}_{ac}_rank{rank}.json"
    ds_path.write_text(run.files["ds_config.json"])
    ds = json.loads(run.files["ds_config.json"])
    model, _ = build_model(run.cfg, ds, rank)
    layers = act_ckpt.enable(model, run.cfg, str(ds_path)) if ac == "full" else 0
    model.train()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    gen = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, run.cfg.model.vocab_size, (8, 512), generator=gen)
    gc.collect()
    reset_peak()
    base = rss_kb("VmRSS:")
    loss = engine(input_ids=ids, labels=ids).loss
    fwd = rss_kb("VmHWM:") - base
    engine.backward(loss)
    total = rss_kb("VmHWM:") - base
    grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()}
    if stage == 3:
        engine.destroy()
    del engine, model
    gc.collect()
    deepspeed.checkpointing.reset()
    return {"layers": layers, "loss": float(loss), "fwd_mb": fwd / 1024, "fwd_bwd_mb": total / 1024, "grads": grads}


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, scratch = Path(args[0]), Path(args[1])
    deepspeed.init_distributed()
    rank = dist.get_rank()
    torch.set_num_threads(1)
    results = {}
    for stage in (2, 3):
        off = probe(stage, "none", scratch, rank)
        on = probe(stage, "full", scratch, rank)
        diff = max(float((off["grads"][n] - on["grads"][n]).abs().max()) for n in off["grads"])
        peaks = torch.tensor([off["fwd_mb"], on["fwd_mb"], off["fwd_bwd_mb"], on["fwd_bwd_mb"]], dtype=torch.float64)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        results[f"zero{stage}"] = {
            "layers_recomputed": on["layers"], "loss_off": off["loss"], "loss_on": on["loss"],
            "max_grad_diff": diff, "n_grads": len(off["grads"]),
            "fwd_peak_mb_off": peaks[0].item(), "fwd_peak_mb_on": peaks[1].item(),
            "fwd_bwd_peak_mb_off": peaks[2].item(), "fwd_bwd_peak_mb_on": peaks[3].item(),
        }
    if rank == 0:
        out.write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
