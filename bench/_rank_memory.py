"""Rank side of bench/planner_accuracy.py: peak resident memory per rank over a few training steps.

Started by the real deepspeed runner on CPU ranks (DS_ACCELERATOR=cpu), once for a list of grid points
that run one after another in this process:
    deepspeed --num_gpus 2 --master_port P bench/_rank_memory.py <points.json> <out.json> <scratch dir>
points.json: {"steps": N, "warmup_seq": S, "points": [{"name": ..., "overrides": [launcher overrides]}]}.

Each point is built exactly as the training worker builds it (launcher.cli.prepare -> DeepSpeed JSON,
launcher.worker.model.build_model, launcher.worker.act_ckpt.enable, deepspeed.initialize) and trained
for a short warm-up step and `steps` full steps on random tokens (forward, engine.backward, engine.step,
as launcher/worker/train.py does).

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
from deepspeed.runtime.zero import parameter_offload  # noqa: E402
from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402,F401

from launcher.prepare import prepare  # noqa: E402
from launcher.worker import act_ckpt  # noqa: E402
from launcher.worker.model import build_model, count_parameters  # noqa: E402


def run_point(point: dict, scratch: Path, rank: int, steps: int, warmup_seq: int) -> dict:
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
    vocab = int(cfg.model.vocab_size)
    gen = torch.Generator().manual_seed(1000 + rank)
    # A short warm-up step first: it creates what persists from step to step (Adam's moments, torch's
    # AdamW allocates them lazily in the first step; ZeRO-3's recorded module trace, which turns on
    # prefetching and parameter reuse) at a fraction of a full step's cost. The measured steps that
    # follow are steady-state steps at the planned shape.
    shapes = [(micro, warmup_seq)] + [(micro, seq)] * steps
    batches = [torch.randint(0, vocab, shape, generator=gen) for shape in shapes]
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
        phases.append({"tokens": ids.numel(), "forward": fwd, "backward": bwd, "step": stp})
    warmup, measured = phases[0], phases[1:]
    seconds = time.perf_counter() - t0
    after_steps = rss()
    peak = max(max(p["forward"], p["backward"], p["step"]) for p in measured)
    engine.destroy()
    del engine, model, keep_alive
    deepspeed.checkpointing.reset()
    # DeepSpeed 0.19.8 keeps a ZeRO-3 model alive after destroy(): its root module stays in a module-level
    # list (parameter_offload.FWD_MODULE_STACK, appended at engine init, never popped) and in a class-level
    # functools.lru_cache of the parameter coordinator (keyed by coordinator and module). Its partitions,
    # optimizer state and hooks would inflate every later point in this process. The worker builds one
    # engine per process, so only a bench that builds several needs this.
    parameter_offload.FWD_MODULE_STACK.clear()
    for attr in vars(PartitionedParameterCoordinator).values():
        # The cached method sits inside an nvtx-instrumenting wrapper's closure.
        for obj in [attr, *(c.cell_contents for c in getattr(attr, "__closure__", None) or ())]:
            if hasattr(obj, "cache_clear"):
                obj.cache_clear()
    gc.collect()
    return {
        "name": name, "params": n_params, "layers_recomputed": recomputed, "rss_before": before,
        "init_peak": init_peak, "rss_after_init": after_init, "warmup": warmup, "phases": measured, "peak": peak,
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
    results = [run_point(p, scratch, rank, int(spec["steps"]), int(spec["warmup_seq"])) for p in spec["points"]]
    mine = {"rank": rank, "baseline": baseline, "points": results}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        out.write_text(json.dumps({"world_size": world, "ranks": gathered}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
