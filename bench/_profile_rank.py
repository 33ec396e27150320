"""Rank side of bench/cpu_efficiency.py --profile: the worker's training step under torch.profiler.

    deepspeed --num_gpus 2 --master_port P bench/_profile_rank.py <rendered run dir> <out.json>

The same model (launcher.worker.model.build_model), DeepSpeed JSON, packed rows and step as the worker
(launcher/worker/train.py: engine(**batch, use_cache=False, num_items_in_batch=...), engine.backward(...,
scale_wrt_gas=False), engine.step()); one warm-up step, then one step profiled. Rank 0 writes the step's
wall time per phase (forward, backward including ZeRO-2's gradient reduction, optimizer step including the
parameter all-gather), the profiler's self CPU time grouped by kind of op, and the top ops.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Dict

GROUPS = (  # first match wins, on the lower-cased op name
    ("communication", ("all_reduce", "allreduce", "reduce_scatter", "all_gather", "allgather", "broadcast",
                       "c10d", "gloo", "record_param_comms", "barrier", "shm")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "softmax")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("optimizer", ("adam", "_foreach", "lerp", "addcdiv", "addcmul")),
    ("copies and casts", ("copy_", "aten::to", "_to_copy", "contiguous", "clone", "cat", "index", "embedding")),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other elementwise (norms, activations, adds, ...)"


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    run_dir, out = Path(args[0]), Path(args[1])

    import deepspeed
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf
    from torch.profiler import ProfilerActivity, profile

    from launcher.models.tokenizer import load_tokenizer
    from launcher.worker.data import Rows, SampleOrder, build_packed, global_targets, micro_batches
    from launcher.worker.model import build_model

    cfg = OmegaConf.load(run_dir / "config.yaml")
    ds_path = run_dir / "ds_config.json"
    ds = json.loads(ds_path.read_text())
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.seed)
    rows = Rows(build_packed(cfg, load_tokenizer(cfg.model.path), cfg.data.cache_dir))
    order = SampleOrder(len(rows), cfg.seed)
    model, _ = build_model(cfg, ds, rank)
    model.train()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=str(ds_path))
    micro, accum, glob = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
                          ds["train_batch_size"])

    def step(s: int, phases: Dict[str, float]) -> None:
        per_rank = max(global_targets(rows, order, s, glob), 1) / world
        for batch in micro_batches(rows, order, s, glob, micro, accum, rank, world):
            inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
            t0 = time.perf_counter()
            loss = engine(**inputs, use_cache=False, num_items_in_batch=per_rank).loss
            t1 = time.perf_counter()
            engine.backward(loss, scale_wrt_gas=False)
            t2 = time.perf_counter()
            engine.step()
            t3 = time.perf_counter()
            for key, dt in (("forward", t1 - t0), ("backward + gradient reduction", t2 - t1),
                            ("optimizer step + parameter all-gather", t3 - t2)):
                phases[key] = phases.get(key, 0.0) + dt

    step(0, {})
    dist.barrier()
    phases: Dict[str, float] = {}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step(1, phases)
        wall = time.perf_counter() - start
    if rank == 0:
        groups: Dict[str, float] = {}
        events = prof.key_averages()
        for ev in events:
            groups[group_of(ev.key)] = groups.get(group_of(ev.key), 0.0) + ev.self_cpu_time_total / 1e6
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
        out.write_text(json.dumps({
            "step_s": wall,
            "phases": phases,
            "groups": groups,
            "top": [[e.key, e.self_cpu_time_total / 1e6, e.count] for e in top],
        }))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
