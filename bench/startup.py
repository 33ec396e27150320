"""Startup: seconds from the command to the end of the first optimizer step, 2 CPU ranks.

A  `python -m launcher <overrides> hydra.run.dir=<fresh dir>`: the real command, nothing pre-built but the
   DeepSpeed JIT ops (scripts/setup.sh builds them). It composes and checks the config, writes the run dir,
   starts `deepspeed` on launch.sh; the ranks build the byte tokenizer, tokenize and pack the built-in
   corpus into the run dir's cache, build and initialise the model, start DeepSpeed, check for a checkpoint,
   train step 1 and log it. The end of step 1 is the time metrics.jsonl gets its first line (rank 0 writes
   it right after step 1 with train.log_every=1; with train.max_steps=1 nothing writes it afterwards, so its
   mtime is that moment).
B  `deepspeed --num_gpus 2 --master_port P bench/_bare_rank.py ...`: a minimal hand-written script building
   the same Llama with the same DeepSpeed JSON (rendered by the launcher) and training one optimizer step on
   random tokens, in the same environment as launch.sh exports (DS_ACCELERATOR, OMP_NUM_THREADS). Rank 0
   writes time.time() right after the step.

Runs alternate A B A B ... (--runs each, default 5), one launch at a time; medians are reported. The machine
load (1-minute load average) is printed before each launch: other work on the machine shows up as time.

TORCH_EXTENSIONS_DIR: every rank JIT-loads DeepSpeed's shm comm op under a lock in the extension dir, and
rebuilds it when the dir was last built by a different command line. Other work on a shared machine that uses
the default ~/.cache/torch_extensions can hold that lock or force a rebuild (30-100 s) in the middle of a timed
launch, so both A and B use build/bench_torch_extensions (seeded from the user's extension dir, brought up to
date once, untimed): "ops already built" for both.

    .venv/bin/python bench/startup.py [--runs 5] [--workdir DIR] [launcher overrides ...]

The last line is `ratio Y` with Y = median A / median B (lower is better for the launcher).
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
import time
from pathlib import Path

from _launch_util import free_port, launch_env, launch_port, private_extensions_dir, remove_shm_buffers, render_run

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
DEFAULT_OVERRIDES = ["train.max_steps=1", "train.log_every=1"]


def run(cmd: list, cwd: Path, env: dict, log: Path, timeout: float = 600) -> float:
    """Start cmd, wait for it; return the start time (time.time() just before the process is created)."""
    with open(log, "w") as f:
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{log.read_text()[-3000:]}")
    return t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workdir", default=None, help="scratch dir (default: a new temp dir, removed after)")
    parser.add_argument("overrides", nargs="*", help="extra launcher overrides for both (model, batch, zero)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_startup_"))
    work.mkdir(parents=True, exist_ok=True)
    overrides = DEFAULT_OVERRIDES + args.overrides
    env_a = dict(os.environ, PYTHONPATH=str(REPO), TORCH_EXTENSIONS_DIR=str(private_extensions_dir()))

    # The JSON and architecture B uses: rendered by the launcher itself (dry run: nothing started).
    render = work / "rendered"
    render_run(overrides, render, env_a)
    from omegaconf import OmegaConf

    sys.path.insert(0, str(REPO))
    from launcher.models.hf_config import llama_config

    cfg = OmegaConf.load(render / "config.yaml")
    arch = work / "llama_config.json"
    llama_config(cfg.model).to_json_file(str(arch))
    env_b = launch_env(render, env_a)
    bare = [str(Path(PY).parent / "deepspeed"), "--num_gpus", str(cfg.hardware.cpu_ranks)]

    a_times, b_times, a_wall, b_wall, a_front, loads = [], [], [], [], [], []
    for i in range(args.runs):
        # A: the launcher, fresh run dir (a reused one would resume).
        run_dir = work / f"ours_{i}"
        shutil.rmtree(run_dir, ignore_errors=True)
        loads.append(os.getloadavg()[0])
        t0 = run([PY, "-m", "launcher", *overrides, f"hydra.run.dir={run_dir}"], REPO, env_a, work / f"ours_{i}.log")
        a_wall.append(time.time() - t0)
        remove_shm_buffers(launch_port(run_dir))
        metrics = run_dir / "metrics.jsonl"
        first = json.loads(metrics.read_text().splitlines()[0])
        assert first["step"] == 1, first
        a_times.append(metrics.stat().st_mtime - t0)
        # The front end (compose, validate, plan) is done when it writes launch.sh, just before starting it.
        a_front.append((run_dir / "launch.sh").stat().st_mtime - t0)
        # B: the bare script.
        out = work / f"bare_{i}.txt"
        out.unlink(missing_ok=True)
        loads.append(os.getloadavg()[0])
        port = free_port()
        t0 = run([*bare, "--master_port", str(port), str(REPO / "bench/_bare_rank.py"),
                  str(render / "ds_config.json"), str(arch), str(cfg.train.seq_len), str(out)],
                 work, env_b, work / f"bare_{i}.log")
        b_wall.append(time.time() - t0)
        remove_shm_buffers(port)
        b_times.append(float(out.read_text().split()[0]) - t0)
        print(f"round {i + 1}: launcher {a_times[-1]:.2f} s, bare {b_times[-1]:.2f} s "
              f"(load {loads[-2]:.2f} / {loads[-1]:.2f})", flush=True)

    med_a, med_b = statistics.median(a_times), statistics.median(b_times)
    print()
    print(f"Startup to the end of the first optimizer step, 2 CPU ranks, {args.runs} interleaved runs each "
          f"(overrides: {' '.join(overrides)}; 1-min load avg during runs: {min(loads):.2f}-{max(loads):.2f})")
    print()
    print("| command | first step, median (s) | all runs (s) | whole launch, median (s) |")
    print("|---|---|---|---|")
    print(f"| `python -m launcher` | {med_a:.2f} | {', '.join(f'{t:.2f}' for t in a_times)} | "
          f"{statistics.median(a_wall):.2f} |")
    print(f"| `deepspeed bench/_bare_rank.py` | {med_b:.2f} | {', '.join(f'{t:.2f}' for t in b_times)} | "
          f"{statistics.median(b_wall):.2f} |")
    print()
    print(f"Of the launcher's time, its front end (python -m launcher up to writing the run dir, before the "
          f"`deepspeed` runner starts) took {statistics.median(a_front):.2f} s (median).")
    print()
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"ratio {med_a / med_b:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
