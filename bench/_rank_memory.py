"""Rank side of bench/planner_accuracy.py: peak resident memory per rank over a few training steps.

Started by the real deepspeed runner on CPU ranks (DS_ACCELERATOR=cpu), once for a list of grid points
that run one after another in this process:
    deepspeed --num_gpus 2 --master_port P bench/_rank_memory.py <points.json> <out.json> <scratch dir>
points.json: [{"name": ..., "overrides": [launcher overrides...]}, ...].

Each point is built exactly as the training worker builds it (launcher.cli.prepare -> DeepSpeed JSON,
launcher.worker.model.build_model, launcher.worker.act_ckpt.enable, deepspeed.initialize) and trained
for `steps` steps on random tokens (forward, engine.backward, engine.step, as launcher/worker/train.py).

Memory is the kernel's view of the process: VmRSS and VmHWM from /proc/self/status, the high-water mark
reset by writing 5 to /proc/self/clear_refs at the start of each phase (forward, backward, step), so the
peak of a step is the largest phase peak. It includes everything a rank holds: libraries, the Python
heap, gloo and DeepSpeed's shared-memory comm buffers, torch's tensors. Recorded too: the process
baseline (after imports and init_distributed, before any model) and the RSS just before each point is
built (what earlier points left behind). Rank 0 writes every rank's numbers to out.json.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss() -> int:
    return status_kib("VmRSS") * 1024


def hwm() -> int:
    return status_kib("VmHWM") * 1024


# Everything the training worker imports, loaded before the baseline is read.
import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402,F401

from launcher.cli import prepare  # noqa: E402
from launcher.worker import act_ckpt  # noqa: E402
from launcher.worker.model import build_model, count_parameters  # noqa: E402


def run_point(point: dict, scratch: Path, rank: int, steps: int) -> dict:
    name = point["name"]
    gc.collect()
    before = rss()
    run = prepare([*point["overrides"], f"hydra.run.dir={scratch / name}"], local_gpus=0, check_resume=False)
    cfg = run.cfg
    ds_path = scratch / f"{name}_rank{rank}.json"
    ds_path.write_text(run.files["ds_config.json"])
    ds = json.loads(run.files["ds_config.json"])
    t0 = time.perf_counter()
    reset_peak()
    model, keep_alive = build_model(cfg, ds, rank)
    recomputed = act_ckpt.enable(model, cfg, str(ds_path)) if cfg.activation_checkpointing.enabled else 0
    model.train()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    n_params, _ = count_parameters(engine.module)
    init_peak, after_init = hwm(), rss()
    micro, seq = int(ds["train_micro_batch_size_per_gpu"]), int(cfg.train.seq_len)
    gen = torch.Generator().manual_seed(1000 + rank)
    batches = [torch.randint(0, int(cfg.model.vocab_size), (micro, seq), generator=gen) for _ in range(steps)]
    gc.collect()
    phases = []
    for ids in batches:
        reset_peak()
        loss = engine(input_ids=ids, labels=ids).loss
        fwd = hwm()
        reset_peak()
        engine.backward(loss)
        bwd = hwm()
        reset_peak()
        engine.step()
        stp = hwm()
        del loss
        phases.append({"forward": fwd, "backward": bwd, "step": stp})
    seconds = time.perf_counter() - t0
    after_steps = rss()
    peak = max(max(p.values()) for p in phases)
    engine.destroy()
    del engine, model, keep_alive
    deepspeed.checkpointing.reset()
    gc.collect()
    return {
        "name": name, "params": n_params, "layers_recomputed": recomputed, "rss_before": before,
        "init_peak": init_peak, "rss_after_init": after_init, "phases": phases, "peak": peak,
        "rss_after_steps": after_steps, "rss_after_free": rss(), "seconds": round(seconds, 1),
    }


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    points_path, out, scratch = Path(args[0]), Path(args[1]), Path(args[2])
    spec = json.loads(points_path.read_text())
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    # One collective so that gloo / DeepSpeed's comm backend have set up their buffers.
    dist.barrier()
    dist.all_reduce(torch.zeros(1))
    gc.collect()
    baseline = {"rss": rss(), "hwm": hwm()}
    results = [run_point(p, scratch, rank, int(spec["steps"])) for p in spec["points"]]
    mine = {"rank": rank, "baseline": baseline, "points": results}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        out.write_text(json.dumps({"world_size": world, "ranks": gathered}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
