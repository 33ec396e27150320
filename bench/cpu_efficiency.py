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
  efficiency = achieved / median of the square-matmul measurements around that launch, computed two ways:
              by wall time (FLOP/s over FLOP/s), and per CPU second (the FLOPs of the steady steps / the CPU
              seconds the two ranks received meanwhile, sampled every 0.5 s, over the matmul FLOPs per CPU
              second of its processes). On a quiet machine the ranks run at 100% of a core each and the two
              agree; on a shared machine the wall-time rates depend on the share each got, and the per-CPU-second
              figure is the one that means something. The last line uses it.

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
count, start, cpu = 0, time.perf_counter(), time.process_time()
while time.perf_counter() - start < seconds:
    torch.mm(a, b)
    count += 1
flops = 2.0 * m * k * n * count
print(flops / (time.perf_counter() - start), flops, time.process_time() - cpu)
"""


def matmul_rate(threads: int, m: int, k: int, n: int, seconds: float = 3.0) -> tuple:
    """(summed FLOP/s of WORLD processes doing fp32 m x k x n matmuls at the same time, FLOPs per CPU second)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs = [subprocess.Popen([PY, "-c", MATMUL, str(threads), str(m), str(k), str(n), str(seconds)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(WORLD)]
    outs = [[float(x) for x in p.communicate()[0].split()] for p in procs]
    return sum(o[0] for o in outs), sum(o[1] for o in outs) / sum(o[2] for o in outs)


def launch_with_cpu_times(cmd: list, env: dict, log: Path, metrics: Path) -> list:
    """Run the launch; every 0.5 s record (metrics.jsonl lines, summed CPU seconds of the worker ranks), so the
    CPU time the ranks received during the steady steps is known. On a shared machine the ranks get a share of
    the cores; FLOPs per CPU second compares them with the matmul rate per CPU second whatever the load."""
    import time

    import psutil

    samples = []
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        cpu: Dict[int, float] = {}
        while proc.poll() is None:
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    if "launcher.worker" in " ".join(child.cmdline()):
                        cpu[child.pid] = sum(child.cpu_times()[:2])
            except psutil.Error:
                pass
            lines = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
            samples.append((lines, sum(cpu.values())))
            time.sleep(0.5)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{log.read_text()[-3000:]}")
    return samples


def steady_cpu_seconds(samples: list, warmup: int, steps: int) -> float:
    """Rank CPU seconds from the end of step `warmup` to the end of step `steps` (0.5 s sampling)."""
    first = next(c for n, c in samples if n >= warmup)
    last = next(c for n, c in samples if n >= steps)
    return last - first


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
    # (formula FLOPs per token, the same without attention's 12 L H Q T, parameters)
    return flops_per_token(shape, counts, SEQ), flops_per_token(shape, counts, 0), counts.total


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
        before, before_cpu = matmul_rate(threads, 2048, 2048, 2048)
        mlp, _ = matmul_rate(threads, MICRO * SEQ, hidden, inter)
        loads.append(os.getloadavg()[0])
        run_dir = work / f"run_{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        samples = launch_with_cpu_times([PY, "-m", "launcher", *overrides, f"hydra.run.dir={run_dir}"], base,
                                        work / f"run_{name}.log", run_dir / "metrics.jsonl")
        remove_shm_buffers(launch_port(run_dir))
        loads.append(os.getloadavg()[0])
        after, after_cpu = matmul_rate(threads, 2048, 2048, 2048)
        squares += [before, after]
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steady = recs[args.warmup:]
        tokens = len(steady) * MICRO * WORLD * SEQ
        tokens_s = tokens / sum(r["step_time_s"] for r in steady)
        fpt, fpt_matmul, n_params = flops_per_token(render)
        achieved = tokens_s * fpt
        machine = statistics.median([before, after])
        per_cpu = tokens * fpt / steady_cpu_seconds(samples, args.warmup, args.steps)
        machine_cpu = statistics.median([before_cpu, after_cpu])
        results[name] = {"params": n_params, "tokens_s": tokens_s, "achieved": achieved, "machine": machine,
                         "mlp": mlp, "step": statistics.median(r["step_time_s"] for r in steady),
                         "eff_wall": achieved / machine, "per_cpu": per_cpu, "machine_cpu": machine_cpu,
                         "eff": per_cpu / machine_cpu, "fpt": fpt,
                         "mem": recs[-1].get("mem_peak_rss_gb", recs[-1]["mem_peak_gb"]),
                         # Lower bound: the weight matmuls only. The formula counts attention over the whole
                         # seq_len; fp32 CPU ranks attend within each record (launcher/worker/attention.py), less.
                         "eff_weights": per_cpu * fpt_matmul / fpt / machine_cpu}
        r = results[name]
        print(f"{name}: {n_params / 1e6:.1f}M params, {r['step']:.2f} s/step, {tokens_s:.0f} tokens/s, "
              f"{fpt / 1e6:.0f} MFLOP/token -> {achieved / 1e9:.1f} GFLOP/s wall, {per_cpu / 1e9:.1f} GFLOP per "
              f"rank CPU second; matmul 2048^3 {before / 1e9:.1f} / {after / 1e9:.1f} GFLOP/s (before/after), "
              f"{machine_cpu / 1e9:.1f} GFLOP per CPU second, MLP shape {mlp / 1e9:.1f} GFLOP/s; efficiency "
              f"{r['eff']:.3f} per CPU second ({r['eff_weights']:.3f} counting weight matmuls only), "
              f"{r['eff_wall']:.3f} by wall time "
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
          "| efficiency (wall) | achieved GFLOP per rank CPU s | matmul GFLOP per CPU s | efficiency (CPU time) "
          "| efficiency, weight matmuls only (CPU time) | peak RSS per rank (GB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['params'] / 1e6:.1f}M | {r['step']:.2f} | {r['tokens_s']:.0f} | {r['fpt'] / 1e6:.0f} | "
              f"{r['achieved'] / 1e9:.1f} | {r['machine'] / 1e9:.1f} | {r['eff_wall']:.3f} | "
              f"{r['per_cpu'] / 1e9:.1f} | {r['machine_cpu'] / 1e9:.1f} | {r['eff']:.3f} | {r['eff_weights']:.3f} | "
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
