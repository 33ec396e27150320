"""RSS per training phase of one planner-grid point, next to the planner's terms (not a timed test).

    .venv/bin/python bench/rss_phases.py s47p03 [--seed 47] [--workdir /tmp/rss] [launcher overrides...]

Runs the point (bench/planner_grid.py; a name prefix such as `s47p03`, or `hand`) through `python -m launcher`
for 2 steps with bench/rss_probe/sitecustomize.py loaded in the ranks, then prints rank 0's RSS at the start
and peak of every (step, phase) (forward, backward, step and the ZeRO optimizers' reduction functions) and the
plan's terms. How the planner's per-term corrections were found (docs/planner.md): the phase where the peak
sits says which terms to compare, and a jump inside backward's reduction says which buffer it is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from planner_grid import HAND_TRIED, SEED, held_out_points  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("point", help="a grid point's name prefix (e.g. s47p03) or 'hand'")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--workdir", default=None, help="keep the run dir and the probe's JSON here")
    parser.add_argument("overrides", nargs="*", help="extra launcher overrides")
    args = parser.parse_args(argv)
    points = [HAND_TRIED, *held_out_points(args.seed)]
    matches = [p for p in points if p["name"].startswith(args.point)]
    if len(matches) != 1:
        parser.error(f"{args.point!r} matches {len(matches)} points of seed {args.seed}")
    point = matches[0]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="rss_phases_"))
    run_dir, probe_dir = work / "run", work / "probe"
    overrides = [*point["overrides"], "train.max_steps=2", "train.log_every=1", *args.overrides]
    python_path = [str(ROOT / "bench" / "rss_probe"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, RSS_PROBE=str(probe_dir), PYTHONPATH=os.pathsep.join(filter(None, python_path)))
    proc = subprocess.run([sys.executable, "-m", "launcher", f"hydra.run.dir={run_dir}", *overrides], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("memory: rank"):
            print(line)
    if proc.returncode != 0:
        print(f"launch failed (rc {proc.returncode}); log tail:\n{(proc.stdout + proc.stderr)[-3000:]}")
        return 1
    print(f"\n{point['name']}: rank 0 RSS per phase (GiB)")
    for key, start, peak in json.loads((probe_dir / "rank0.json").read_text()):
        print(f"  {key:45s} start {start:.3f}  peak {peak:.3f}")
    plan = json.loads((run_dir / "run.json").read_text())["launches"][-1]["plan"]
    print(f"\nplan: peak {plan['peak_gib']} GiB; terms (GiB):")
    for key, value in plan["terms_bytes"].items():
        print(f"  {key:45s} {value / 2**30:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
