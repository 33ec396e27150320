"""What the CPU ranks' allocator settings cost in tokens/s (issue 13, must-have 1), interleaved A B A B.

    .venv/bin/python bench/malloc_cost.py [--runs 2] [--steps 12] [--warmup 3] [--workdir DIR] [overrides...]

The launcher starts CPU ranks with MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 (launch.sh,
.sbatch and .deepspeed_env alike; launcher/render/command.py CPU_RANK_MALLOC) so that a rank's RSS follows
its live tensors and the planner's CPU figures hold. Every large allocation then is a fresh mapping whose
pages fault in. This script renders run dirs with `python -m launcher dry_run=true` and prepares their data
(default: the hand-tried 24M point of issue 13, bench/planner_grid.py), deletes the two MALLOC_* exports
from half of them (glibc's defaults), runs each run dir's launch.sh in turn (with, without, with, without,
...) and reads metrics.jsonl: tokens/s of the steps after the warmup (median per run, median over runs) and
the peaks. One launch at a time; the 1-minute load average is printed before each. Last line: `ratio X`,
X = tokens/s with the settings / without (above 1: the settings cost nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from planner_grid import HAND_TRIED  # noqa: E402

SIDES = ("with", "without")


def render(run_dir: Path, steps: int, overrides: list[str], keep_malloc: bool) -> None:
    cmd = [sys.executable, "-m", "launcher", "dry_run=true", f"hydra.run.dir={run_dir}", f"train.max_steps={steps}",
           "train.log_every=1", "train.save_every=100000", *overrides]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    # Dry runs never prepare data; the ranks only read a finished cache (untimed, before the launch).
    subprocess.run([sys.executable, "-m", "launcher.data", "--run-dir", str(run_dir)], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    if not keep_malloc:
        script = run_dir / "launch.sh"
        lines = script.read_text().splitlines(keepends=True)
        kept = [line for line in lines if not line.startswith("export MALLOC_")]
        assert len(lines) - len(kept) == 2, "launch.sh no longer exports the two MALLOC_* settings"
        script.write_text("".join(kept))


def run_once(run_dir: Path, warmup: int) -> dict:
    load = os.getloadavg()[0]
    res = subprocess.run(["bash", str(run_dir / "launch.sh")], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"launch failed in {run_dir} (rc {res.returncode}):\n{(res.stdout + res.stderr)[-2000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if r["step"] > warmup]
    return {"tokens_s": statistics.median(r["tokens_per_sec"] for r in steady),
            "step_s": statistics.median(r["step_time_s"] for r in steady),
            "mem_gb": rows[-1]["mem_peak_gb"], "rss_gb": rows[-1].get("mem_peak_rss_gb", 0.0), "load": load}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="launches per side")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("overrides", nargs="*", help="launcher overrides (default: the hand-tried 24M point)")
    args = parser.parse_args(argv)
    overrides = args.overrides or HAND_TRIED["overrides"]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="malloc_cost_"))
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    for i in range(args.runs):
        for side in SIDES:
            run_dir = work / f"{side}_{i}"
            render(run_dir, args.steps, overrides, keep_malloc=side == "with")
            r = run_once(run_dir, args.warmup)
            results[side].append(r)
            print(f"run {i + 1} {side:7s}: {r['tokens_s']:.0f} tokens/s, {r['step_s']:.3f} s/step, mem_peak_gb "
                  f"{r['mem_gb']:.3f}, peak RSS {r['rss_gb']:.3f} GB (load before {r['load']:.2f})", flush=True)
    print(f"\n{' '.join(overrides)}; 2 CPU ranks, steps {args.warmup + 1}-{args.steps}, {args.runs} interleaved "
          "runs per side\n")
    print("| MALLOC_* settings | tokens/s (median) | step (s, median) | tokens/s per run | mem_peak_gb | peak RSS GB |")
    print("|---|---|---|---|---|---|")
    med = {}
    for side in SIDES:
        rs = results[side]
        med[side] = statistics.median(r["tokens_s"] for r in rs)
        print(f"| {side} | {med[side]:.0f} | {statistics.median(r['step_s'] for r in rs):.3f} | "
              f"{', '.join(str(round(r['tokens_s'])) for r in rs)} | {max(r['mem_gb'] for r in rs):.3f} | "
              f"{max(r['rss_gb'] for r in rs):.3f} |")
    print(f"\nratio {med['with'] / med['without']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
