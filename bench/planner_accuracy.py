"""Planner accuracy: predicted vs measured peak memory per rank, on 2 CPU ranks.

    .venv/bin/python bench/planner_accuracy.py [--models 25M,100M] [--steps 1] [--json out.json] [--glibc-defaults]

Grid: two Llama sizes (~26M and ~100M parameters) x ZeRO stage 1/2/3 x activation checkpointing
none/full, fp32, no offload, no gradient accumulation, on the local profile's 2 CPU ranks. For each
model, one launch of the real runner (`deepspeed --num_gpus 2 ... bench/_rank_memory.py`) builds the six
engines one after another exactly as the training worker does and measures each rank's peak resident
set (VmHWM, reset per phase through /proc/self/clear_refs) over a short warm-up step (seq 32; it creates
Adam's moments and ZeRO-3's module trace) and `--steps` full steps;
the measured figure is the larger rank's peak over the full steps. The prediction is the planner's total
for the same composed config: `launcher.plan.estimate_memory(cfg, topo, Setup.from_cfg(cfg), accum=1)`,
which on CPU ranks includes its fixed per-rank baseline (`CPU_RANK_BASELINE_GIB`). Both are whole-process
figures: nothing is subtracted from the measurement.

Ranks run with MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 (freed tensors go back to the OS,
so RSS follows live tensors; without them glibc keeps freed memory and RSS is noisy, see
docs/planner.md), OMP_NUM_THREADS=1 and DS_ACCELERATOR=cpu. Launches run one at a time.
Prints a table of the runtime baseline, a per-point diagnostic table, the markdown result table and,
as the last line, `max error X%` (error = (predicted - measured) / measured).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launcher.plan import Setup, estimate_memory  # noqa: E402
from launcher.plan.memory import CPU_RANK_BASELINE_GIB, GIB  # noqa: E402
from launcher.prepare import prepare  # noqa: E402

MIB = 1024**2
# name -> (architecture overrides, seq_len, micro_batch_size). Shapes chosen so that activations and
# model states are both a large share of the peak.
MODELS = {
    "25M": ([
        "model.vocab_size=8000", "model.hidden_size=512", "model.intermediate_size=1408",
        "model.num_hidden_layers=6", "model.num_attention_heads=8", "model.num_key_value_heads=4",
    ], 1024, 2),
    "100M": ([
        "model.vocab_size=16000", "model.hidden_size=768", "model.intermediate_size=2048",
        "model.num_hidden_layers=12", "model.num_attention_heads=12", "model.num_key_value_heads=4",
    ], 512, 2),
}
STAGES = (1, 2, 3)
CHECKPOINTING = ("none", "full")
WORLD = 2  # hardware=local: cpu_ranks
WARMUP_SEQ = 32
TARGET = 10.0  # percent
RANK_ENV = {
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "0",
}


def overrides(model: str, stage: int, ac: str) -> list[str]:
    arch, seq, micro = MODELS[model]
    return [
        f"zero=stage{stage}", f"activation_checkpointing={ac}", "offload=none", "precision=fp32",
        "hardware=local", *arch, "model.max_position_embeddings=1024", f"train.seq_len={seq}",
        f"train.micro_batch_size={micro}", f"train.global_batch_size={micro * WORLD}", "dry_run=true",
    ]


def point_name(model: str, stage: int, ac: str) -> str:
    return f"{model}_z{stage}_{ac}"


def predict(model: str, stage: int, ac: str, scratch: Path):
    run = prepare([*overrides(model, stage, ac), f"hydra.run.dir={scratch / 'plan'}"], local_gpus=0,
                  check_resume=False)
    assert run.topo.accelerator == "cpu" and run.topo.world_size == WORLD, run.topo
    return estimate_memory(run.cfg, run.topo, Setup.from_cfg(run.cfg), accum=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_shm_buffers(port: int) -> None:
    """DeepSpeed's CPU shared-memory allreduce (deepspeed_shm_comm, 0.19.8) creates one 66 MiB file per
    rank, /dev/shm/deepspeed_allreduce_buffer_<n>_<master addr>_<master port>_<rank>, and never removes
    it: tmpfs pages that stay in RAM after the ranks exit. Remove this launch's (its port is ours)."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        try:
            os.remove(path)
        except OSError:
            pass


def measure(model: str, steps: int, scratch: Path, glibc_defaults: bool = False) -> dict:
    """The six grid points of `model`: one launch that builds them one after another, or, with glibc's
    allocator defaults (freed memory stays in the process, so a point would inherit the previous one's
    heap), one launch per point."""
    points = [{"name": point_name(model, s, ac), "overrides": overrides(model, s, ac)}
              for s in STAGES for ac in CHECKPOINTING]
    if not glibc_defaults:
        return launch(model, points, steps, scratch, glibc_defaults)
    merged = None
    for point in points:
        got = launch(point["name"], [point], steps, scratch, glibc_defaults)
        if merged is None:
            merged = got
        else:
            for into, rank in zip(merged["ranks"], got["ranks"], strict=True):
                into["points"] += rank["points"]
    return merged


def launch(tag: str, points: list[dict], steps: int, scratch: Path, glibc_defaults: bool = False) -> dict:
    """One deepspeed launch measuring `points` one after another."""
    spec = scratch / f"{tag}_points.json"
    spec.write_text(json.dumps({"steps": steps, "warmup_seq": WARMUP_SEQ, "points": points}))
    out = scratch / f"{tag}_measured.json"
    env = dict(os.environ, **RANK_ENV)
    if glibc_defaults:
        for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
            env.pop(key)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    deepspeed = Path(sys.executable).parent / "deepspeed"
    port = free_port()
    cmd = [str(deepspeed), "--num_gpus", str(WORLD), "--master_port", str(port),
           str(REPO / "bench" / "_rank_memory.py"), str(spec), str(out), str(scratch)]
    log = scratch / f"{tag}_launch.log"
    try:
        with open(log, "w") as f:
            res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=scratch, timeout=1200)
    finally:
        remove_shm_buffers(port)
    if res.returncode != 0 or not out.exists():
        sys.exit(f"launch for {tag} failed (exit {res.returncode}); last lines of {log}:\n"
                 + "\n".join(log.read_text().splitlines()[-30:]))
    return json.loads(out.read_text())


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.3f}"


def mib(nbytes: float) -> str:
    return f"{nbytes / MIB:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    # One is enough: after the warm-up step the state is periodic; with --steps 2 every phase peak of the
    # second full step equalled the first's to 1 MiB (the ZeRO-3 + checkpointing forward peak varied by
    # 44 MiB, below that point's backward peak).
    parser.add_argument("--steps", type=int, default=1, help="full-shape steps measured after the warm-up step")
    parser.add_argument("--json", help="also write every measurement and prediction here")
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="run the ranks without the MALLOC_* settings, as `python -m launcher` does "
                             "(informational; one launch per point, as freed memory then stays in the process)")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")

    started = time.perf_counter()
    rows, baselines, dump = [], [], {}
    with tempfile.TemporaryDirectory(prefix="planner_accuracy_") as tmp:
        scratch = Path(tmp)
        for model in models:
            t0 = time.perf_counter()
            measured = measure(model, args.steps, scratch, args.glibc_defaults)
            elapsed = time.perf_counter() - t0
            ranks = measured["ranks"]
            baselines.append((model, [r["baseline"]["rss"] for r in ranks],
                              [r["points"][-1]["rss_after_free"] for r in ranks], elapsed))
            for i, pt in enumerate(ranks[0]["points"]):
                per_rank = [r["points"][i] for r in ranks]
                stage, ac = int(pt["name"].split("_z")[1][0]), pt["name"].rsplit("_", 1)[1]
                mem = predict(model, stage, ac, scratch)
                peak = max(p["peak"] for p in per_rank)
                rows.append({
                    "model": model, "params": pt["params"], "stage": stage, "ckpt": ac,
                    "predicted": mem.total, "measured": peak,
                    "error_pct": 100.0 * (mem.total - peak) / peak,
                    "measured_per_rank": [p["peak"] for p in per_rank],
                    "rss_before": max(p["rss_before"] for p in per_rank),
                    "rss_after_steps": max(p["rss_after_steps"] for p in per_rank),
                    "phase_peaks": {k: max(ph[k] for p in per_rank for ph in p["phases"])
                                    for k in ("forward", "backward", "step")},
                    "predicted_terms": {"params": mem.params, "grads": mem.grads, "optimizer": mem.optimizer,
                                        "activations": mem.activations, "buffers": mem.buffers,
                                        "overhead": mem.overhead},
                    "seconds": max(p["seconds"] for p in per_rank),
                })
            dump[model] = measured
    total_s = time.perf_counter() - started

    print(f"Runtime baseline per rank (RSS after imports + init_distributed, before any model), vs the "
          f"planner's CPU_RANK_BASELINE_GIB = {CPU_RANK_BASELINE_GIB} GiB ({CPU_RANK_BASELINE_GIB * 1024:.0f} MiB):")
    for model, base, after, elapsed in baselines:
        print(f"  launch {model}: fresh {'/'.join(mib(b) for b in base)} MiB; after its last engine was freed "
              f"{'/'.join(mib(a) for a in after)} MiB (ranks 0/1); launch took {elapsed:.0f} s")
    print()
    print("Diagnostics, MiB (max over ranks; phase peaks over the measured steps; predicted terms: "
          "params / grads / optimizer / activations / buffers / overhead):")
    print("| point | before build | after steps | fwd peak | bwd peak | step peak | predicted terms | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ph, t = r["phase_peaks"], r["predicted_terms"]
        terms = " / ".join(mib(t[k]) for k in ("params", "grads", "optimizer", "activations", "buffers", "overhead"))
        print(f"| {point_name(r['model'], r['stage'], r['ckpt'])} | {mib(r['rss_before'])} | "
              f"{mib(r['rss_after_steps'])} | {mib(ph['forward'])} | {mib(ph['backward'])} | {mib(ph['step'])} | "
              f"{terms} | {r['seconds']:.0f} |")
    print()
    print("| model | params | stage | ckpt | predicted GiB | measured GiB | error % |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['params']:,} | {r['stage']} | {r['ckpt']} | {gib(r['predicted'])} | "
              f"{gib(r['measured'])} | {r['error_pct']:+.1f} |")
    worst = max(rows, key=lambda r: abs(r["error_pct"]))
    print()
    malloc = "glibc defaults" if args.glibc_defaults else "MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0"
    print(f"{len(rows)} points, {args.steps} measured steps each, {malloc}, bench took {total_s:.0f} s; target "
          f"<= {TARGET:.0f}%; worst: {point_name(worst['model'], worst['stage'], worst['ckpt'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "baselines": baselines, "raw": dump,
                                               "seconds": total_s}, indent=1))
    print(f"max error {abs(worst['error_pct']):.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
