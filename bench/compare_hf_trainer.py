"""Training throughput: the launcher's worker beside `transformers.Trainer` + DeepSpeed, same run, 2 CPU ranks.

Both sides train the same run, rendered once by the launcher (`python -m launcher ... dry_run=true`):
  - the same Llama (launcher.worker.model.build_model: same architecture, bitwise the same initial weights),
  - the same packed rows of the built-in corpus in the same order (built once here into a shared
    data.cache_dir with launcher.worker.data.build_packed; both read sample k of the run as packed row
    SampleOrder.row(k)), so both see identical micro batches on each rank,
  - the same DeepSpeed JSON (ZeRO stage, precision, micro batch x accumulation x ranks, AdamW, schedule,
    clipping): ours reads it, Trainer gets it as TrainingArguments(deepspeed=...), with the Trainer arguments
    set from it (transformers checks they agree),
  - 2 CPU ranks each through the `deepspeed` runner, with the environment launch.sh exports
    (DS_ACCELERATOR=cpu, OMP_NUM_THREADS) and one bench-private TORCH_EXTENSIONS_DIR (see below).
The per-step losses of the two are compared as a check that they really train the same thing.

A  `python -m launcher <overrides> train.log_every=1 hydra.run.dir=<fresh>`: step times are metrics.jsonl's
   `step_time_s` (wall time per step, everything in the loop included: data, forward/backward/step, the
   per-step loss/memory logging and the stop-signal check).
B  `deepspeed ... bench/_hf_trainer_rank.py <rendered run dir> <out.json>`: step times are the differences
   of TrainerCallback.on_step_end timestamps (everything in Trainer's loop included; it logs the loss every
   step too, logging_steps=1).
The first --warmup steps of every run are dropped; a run's step time is the median of the rest; runs
alternate A B A B ... (--runs each, default 3), one launch at a time, and the table shows the medians over
runs. "Fastest step" (the median over runs of each run's fastest steady step) is shown beside it: on a
machine shared with other work it is the less load-sensitive of the two. Peak memory is each rank's peak
RSS (VmHWM), the larger of the two ranks (the launcher's mem_peak_rss_gb).

TORCH_EXTENSIONS_DIR: DeepSpeed JIT-loads its shm comm op in every rank, under a lock in the extension dir,
rebuilding it when the dir was last built by a different command line. Other work on a shared machine that
uses the default ~/.cache/torch_extensions can hold that lock or force rebuilds (30-100 s) in the middle of
a timed launch, so both sides use build/bench_torch_extensions (seeded from the user's extension dir, built
once, untimed).

    .venv/bin/python bench/compare_hf_trainer.py [--runs 3] [--steps 30] [--warmup 5] [--workdir DIR]
                                                 [launcher overrides ...]

The last line is `ratio X` with X = our tokens/s / Trainer tokens/s (median over runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _launch_util import free_port, launch_env, launch_port, private_extensions_dir, remove_shm_buffers, render_run

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
# 3.0M parameters (tiny_llama widened to hidden 256: 4 layers, 4 heads, 2 KV heads, byte vocabulary);
# 4 micro x 2 accum x 2 ranks x 128 = 2048 tokens per step, ZeRO-2, fp32: 0.35-0.7 s per step on 2 shared cores.
DEFAULT_OVERRIDES = [
    "model.hidden_size=256", "model.intermediate_size=688",
    "train.seq_len=128", "train.micro_batch_size=4", "train.global_batch_size=16",
]


def run(cmd: list, cwd: Path, env: dict, log: Path, timeout: float = 900) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{log.read_text()[-3000:]}")


def measure(overrides: list, work: Path, runs: int, steps: int, warmup: int, label: str = "") -> dict:
    """Render the run, build its packed rows once, then alternate launcher and Trainer launches (`runs` each).
    Returns per-run step times, memory and losses of both sides plus what the table needs. Also used by
    bench/compare_lora.py (adapter=lora overrides: the Trainer side then wraps the model with PEFT)."""
    overrides = overrides + [f"train.max_steps={steps}", "train.log_every=1", f"data.cache_dir={work / 'cache'}"]
    base = dict(os.environ, PYTHONPATH=str(REPO), TORCH_EXTENSIONS_DIR=str(private_extensions_dir()))
    render = work / "rendered"
    render_run(overrides, render, base)
    sys.path.insert(0, str(REPO))
    from omegaconf import OmegaConf

    from launcher.models.tokenizer import load_tokenizer
    from launcher.worker.data import build_packed

    cfg = OmegaConf.load(render / "config.yaml")
    ds = json.loads((render / "ds_config.json").read_text())
    build_packed(cfg, load_tokenizer(cfg.model.path), cfg.data.cache_dir)  # shared by both, untimed
    env_b = launch_env(render, base)
    deepspeed = [str(Path(PY).parent / "deepspeed"), "--num_gpus", str(cfg.hardware.cpu_ranks)]

    ours, hf, loads, loss_diffs = [], [], [], []
    for i in range(runs):
        run_dir = work / f"ours_{i}"
        shutil.rmtree(run_dir, ignore_errors=True)
        loads.append(os.getloadavg()[0])
        run([PY, "-m", "launcher", *overrides, f"hydra.run.dir={run_dir}"], REPO, base, work / f"ours_{i}.log")
        remove_shm_buffers(launch_port(run_dir))
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, steps + 1)), "expected one metrics line per step"
        steady = [r["step_time_s"] for r in rows[warmup:]]
        ours.append({"step": statistics.median(steady), "fastest": min(steady),
                     "mem": rows[-1].get("mem_peak_rss_gb", rows[-1]["mem_peak_gb"]),  # VmHWM, as Trainer's
                     "losses": [r["loss"] for r in rows]})

        out = work / f"hf_{i}.json"
        out.unlink(missing_ok=True)
        loads.append(os.getloadavg()[0])
        port = free_port()
        run([*deepspeed, "--master_port", str(port), str(REPO / "bench/_hf_trainer_rank.py"), str(render),
             str(out)], work, env_b, work / f"hf_{i}.log")
        remove_shm_buffers(port)
        result = json.loads(out.read_text())
        stamps = result["stamps"]
        assert len(stamps) == steps + 1, "expected a timestamp per step"
        times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        hf.append({"step": statistics.median(times[warmup:]), "fastest": min(times[warmup:]),
                   "mem": max(result["peak_rss_per_rank"]) / 1e9,
                   "losses": result["losses"]})
        loss_diffs.append(max(abs(a - b) for a, b in zip(ours[-1]["losses"], hf[-1]["losses"], strict=True)))
        print(f"{label}round {i + 1}: launcher {ours[-1]['step']:.4f} s/step, Trainer {hf[-1]['step']:.4f} s/step "
              f"(load {loads[-2]:.2f} / {loads[-1]:.2f}; max |loss diff| {loss_diffs[-1]:.1e})", flush=True)
    n_params = None
    for line in (work / "ours_0.log").read_text().splitlines():
        if "[launcher] starting:" in line:
            n_params = line.split("starting:")[1].split(" params")[0].strip()
    return {"ours": ours, "hf": hf, "loads": loads, "loss_diffs": loss_diffs, "ds": ds, "cfg": cfg,
            "n_params": n_params, "tokens_per_step": ds["train_batch_size"] * int(cfg.train.seq_len)}


def table(m: dict, names: tuple, runs: int, steps: int, warmup: int) -> tuple:
    """Prints the setup line and the markdown table; returns (our tokens/s / Trainer's, the same at each side's
    fastest step)."""
    ds, cfg, tokens_per_step = m["ds"], m["cfg"], m["tokens_per_step"]

    def row(name: str, side: list) -> tuple:
        step = statistics.median(r["step"] for r in side)
        per_run = ", ".join(f"{tokens_per_step / r['step']:.0f}" for r in side)
        fastest = statistics.median(r["fastest"] for r in side)
        mem = statistics.median(r["mem"] for r in side)
        print(f"| {name} | {tokens_per_step / step:.0f} | {step:.4f} | {per_run} | {fastest:.4f} | {mem:.2f} |")
        return tokens_per_step / step, fastest

    print()
    print(f"Training throughput, 2 CPU ranks, {m['n_params']} parameters, ZeRO-{ds['zero_optimization']['stage']}, "
          f"{'bf16' if 'bf16' in ds else 'fp16' if 'fp16' in ds else 'fp32'}, "
          f"{ds['train_micro_batch_size_per_gpu']} micro x {ds['gradient_accumulation_steps']} accum x 2 ranks x "
          f"{cfg.train.seq_len} tokens = {tokens_per_step} tokens/step; steps {warmup + 1}-{steps} of "
          f"each run, {runs} interleaved runs each; 1-min load avg during runs "
          f"{min(m['loads']):.2f}-{max(m['loads']):.2f}; per-step losses of the two agree within "
          f"{max(m['loss_diffs']):.1e}")
    print()
    print("| trainer | tokens/s (median) | step time (s, median) | tokens/s per run | fastest step (s) | "
          "peak RSS per rank (GB) |")
    print("|---|---|---|---|---|---|")
    a, a_fast = row(names[0], m["ours"])
    b, b_fast = row(names[1], m["hf"])
    print()
    return a / b, b_fast / a_fast


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of every run")
    parser.add_argument("--workdir", default=None, help="scratch dir (default: a new temp dir, removed after)")
    parser.add_argument("overrides", nargs="*", help="launcher overrides replacing the default model/batch")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_hf_"))
    work.mkdir(parents=True, exist_ok=True)
    m = measure(args.overrides or DEFAULT_OVERRIDES, work, args.runs, args.steps, args.warmup)
    ratio, fastest = table(m, ("launcher (`python -m launcher`)", "transformers.Trainer + DeepSpeed"), args.runs,
                           args.steps, args.warmup)
    print(f"by fastest steps (our tokens/s / Trainer tokens/s at each side's fastest step): {fastest:.3f}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"ratio {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
