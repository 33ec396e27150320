"""CPU efficiency: our worker's training FLOP rate against the fp32 matmul rate this machine reaches, same run.

For each model (default a ~25M and a ~100M Llama, byte vocabulary) at one fixed shape: seq_len 1024, micro 2,
no accumulation, 2 CPU ranks (global 4 sequences = 4096 tokens per step), ZeRO-2, fp32, no activation
checkpointing, the built-in text corpus (packed without padding: every token is real):

  achieved  = tokens/s (metrics.jsonl, steps after --warmup) x FLOPs per token, the MFU formula
              (launcher.plan.params.flops_per_token: 6 x matmul parameters + 12 x layers x heads x head_dim x
              seq_len), summed over both ranks;
  matmul    = fp32 torch.mm rate of 2 processes at once with the ranks' thread setting (OMP_NUM_THREADS from
              the rendered launch.sh, torch.set_num_threads likewise), measured right before and after every
              training launch (A B A B ...): square 2048^3 (the machine's rate) and, for context, the model's
              MLP shape [micro x seq_len, hidden] x [hidden, intermediate];
  efficiency = achieved / median of the square-matmul measurements around that launch.

With --profile (default on) one more launch of the last model runs bench/_profile_rank.py: the same engine, data
and step as the worker, one step under torch.profiler on rank 0, self CPU time grouped into matmul, attention,
optimizer, communication and the rest: what limits the efficiency.

    PYTHONPATH=. .venv/bin/python bench/cpu_efficiency.py [--steps 4] [--warmup 1] [--models 25m,100m]
                                                          [--no-profile] [--profile-model 25m] [--workdir DIR]

The last line is `efficiency X` for the last (largest) model.
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
from typing import Dict, List

from _launch_util import free_port, launch_env, launch_port, private_extensions_dir, remove_shm_buffers, render_run

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
# name -> (hidden, intermediate, layers, heads); KV heads = heads, vocabulary 320 (tiny_llama's byte tokenizer).
# 25m: 8 x (4 x 512^2 + 3 x 512 x 1376) = 25.3M; 100m: 14 x (4 x 768^2 + 3 x 768 x 2048) = 99.1M.
MODELS = {"3m": (256, 688, 4, 4), "25m": (512, 1376, 8, 8), "100m": (768, 2048, 14, 12)}  # 3m: a quick check
SEQ, MICRO, WORLD = 1024, 2, 2

MATMUL = r"""
import sys, time, torch
threads, m, k, n, seconds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
torch.set_num_threads(threads)
a, b = torch.randn(m, k), torch.randn(k, n)
for _ in range(2):
    torch.mm(a, b)
count, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    torch.mm(a, b)
    count += 1
print(2.0 * m * k * n * count / (time.perf_counter() - start))
"""


def matmul_rate(threads: int, m: int, k: int, n: int, seconds: float = 3.0) -> float:
    """Summed FLOP/s of WORLD processes doing fp32 m x k x n matmuls at the same time."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs = [subprocess.Popen([PY, "-c", MATMUL, str(threads), str(m), str(k), str(n), str(seconds)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(WORLD)]
    return sum(float(p.communicate()[0].strip()) for p in procs)


def overrides_for(name: str, steps: int, cache: Path) -> List[str]:
    hidden, inter, layers, heads = MODELS[name]
    return [f"model.hidden_size={hidden}", f"model.intermediate_size={inter}", f"model.num_hidden_layers={layers}",
            f"model.num_attention_heads={heads}", f"model.num_key_value_heads={heads}",
            f"model.max_position_embeddings={SEQ}", f"train.seq_len={SEQ}", f"train.micro_batch_size={MICRO}",
            f"train.global_batch_size={MICRO * WORLD}", f"hardware.cpu_ranks={WORLD}", "zero=stage2",
            "precision=fp32", "activation_checkpointing=none", f"train.max_steps={steps}", "train.log_every=1",
            f"train.save_every={steps}", f"data.cache_dir={cache}"]


def flops_per_token(render: Path) -> tuple:
    from omegaconf import OmegaConf

    from launcher.plan.params import ModelShape, count_params, flops_per_token

    cfg = OmegaConf.load(render / "config.yaml")
    shape = ModelShape.from_cfg(cfg.model)
    counts = count_params(shape)
    return flops_per_token(shape, counts, SEQ), counts.total


def run(cmd: list, cwd: Path, env: dict, log: Path, timeout: float = 1800) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{log.read_text()[-3000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1, help="steps dropped from the timing")
    parser.add_argument("--models", default="25m,100m", help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler launch")
    parser.add_argument("--profile-model", default=None, help="model to profile (default: the last of --models)")
    parser.add_argument("--workdir", default=None, help="scratch dir (default: a new temp dir, removed after)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_eff_"))
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    base = dict(os.environ, PYTHONPATH=str(REPO), TORCH_EXTENSIONS_DIR=str(private_extensions_dir()))
    names = args.models.split(",")

    results: Dict[str, dict] = {}
    loads = [os.getloadavg()[0]]
    threads = None
    squares: List[float] = []
    for name in names:
        overrides = overrides_for(name, args.steps, work / "cache")
        render = work / f"rendered_{name}"
        render_run(overrides, render, base)
        threads = int(launch_env(render, base).get("OMP_NUM_THREADS", "1"))
        hidden, inter, _, _ = MODELS[name]
        before = matmul_rate(threads, 2048, 2048, 2048)
        mlp = matmul_rate(threads, MICRO * SEQ, hidden, inter)
        loads.append(os.getloadavg()[0])
        run_dir = work / f"run_{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run([PY, "-m", "launcher", *overrides, f"hydra.run.dir={run_dir}"], REPO, base, work / f"run_{name}.log")
        remove_shm_buffers(launch_port(run_dir))
        loads.append(os.getloadavg()[0])
        after = matmul_rate(threads, 2048, 2048, 2048)
        squares += [before, after]
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steady = recs[args.warmup:]
        tokens_s = len(steady) * MICRO * WORLD * SEQ / sum(r["step_time_s"] for r in steady)
        fpt, n_params = flops_per_token(render)
        achieved = tokens_s * fpt
        machine = statistics.median([before, after])
        results[name] = {"params": n_params, "tokens_s": tokens_s, "achieved": achieved, "machine": machine,
                         "mlp": mlp, "step": statistics.median(r["step_time_s"] for r in steady),
                         "eff": achieved / machine, "mem": recs[-1]["mem_peak_gb"], "fpt": fpt}
        r = results[name]
        print(f"{name}: {n_params / 1e6:.1f}M params, {r['step']:.2f} s/step, {tokens_s:.0f} tokens/s, "
              f"{fpt / 1e6:.0f} MFLOP/token -> {achieved / 1e9:.1f} GFLOP/s; matmul 2048^3 {before / 1e9:.1f} / "
              f"{after / 1e9:.1f} GFLOP/s (before/after), MLP shape {mlp / 1e9:.1f}; efficiency {r['eff']:.3f} "
              f"(load {loads[-2]:.2f} / {loads[-1]:.2f})", flush=True)

    profile = None
    prof_name = args.profile_model or names[-1]
    if not args.no_profile:
        name = prof_name
        if name not in names:
            render_run(overrides_for(name, args.steps, work / "cache"), work / f"rendered_{name}", base)
        render = work / f"rendered_{name}"
        out = work / "profile.json"
        port = free_port()
        run([str(Path(PY).parent / "deepspeed"), "--num_gpus", str(WORLD), "--master_port", str(port),
             str(REPO / "bench/_profile_rank.py"), str(render), str(out)], work, launch_env(render, base),
            work / "profile.log")
        remove_shm_buffers(port)
        profile = json.loads(out.read_text())
        loads.append(os.getloadavg()[0])

    print()
    print(f"2 CPU ranks x {threads} thread(s), seq_len {SEQ}, micro {MICRO}, no accumulation, ZeRO-2, fp32, no "
          f"checkpointing, steps {args.warmup + 1}-{args.steps}; 1-min load avg {min(loads):.2f}-{max(loads):.2f}")
    print()
    print("| model | parameters | step (s) | tokens/s | MFLOP/token | achieved GFLOP/s | matmul 2048^3 GFLOP/s "
          "| matmul MLP shape GFLOP/s | efficiency | peak RSS per rank (GB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['params'] / 1e6:.1f}M | {r['step']:.2f} | {r['tokens_s']:.0f} | {r['fpt'] / 1e6:.0f} | "
              f"{r['achieved'] / 1e9:.1f} | {r['machine'] / 1e9:.1f} | {r['mlp'] / 1e9:.1f} | {r['eff']:.3f} | "
              f"{r['mem']:.2f} |")
    if profile is not None:
        print()
        print(f"Profile of one step, rank 0, {prof_name} ({profile['step_s']:.2f} s wall under the profiler): "
              + ", ".join(f"{k} {v:.2f} s" for k, v in profile["phases"].items()) + ". Self CPU time by group:")
        print()
        print("| group | seconds | share |")
        print("|---|---|---|")
        groups = dict(profile["groups"])
        # Wall time of the step not inside any op on this thread: waiting for the other rank, Python.
        groups["outside ops (waits, Python)"] = max(0.0, profile["step_s"] - sum(groups.values()))
        total = sum(groups.values())
        for group, sec in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"| {group} | {sec:.2f} | {sec / total:.1%} |")
        print()
        print("Top ops by self CPU time:")
        for op, sec, calls in profile["top"]:
            print(f"  {sec:7.3f} s  {calls:5d} calls  {op}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"efficiency {results[names[-1]]['eff']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
