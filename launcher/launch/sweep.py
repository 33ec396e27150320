"""Run a sweep (`-m`): every point in its own run dir under the sweep dir, one after another locally or
one SLURM job each with cluster=slurm; <sweep dir>/sweep.json records each point; a table sums it up.

Rerunning the same sweep resumes: a point already completed with the same overrides is skipped, any other
point reruns in its run dir (the ranks resume from its last checkpoint). `launcher sweep <dir>` reprints
the table later, e.g. for a submitted sweep.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from launcher.config.sweep import Sweep, point_dir, quoted

SWEEP_FILE = "sweep.json"


def run_sweep(sweep: Sweep, run_point: Callable[[List[str]], int], slurm: bool) -> int:
    """Run (or submit) each point; returns 0 when every point succeeded, else the first failure's code."""
    root = Path(sweep.sweep_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    old = {p["run_dir"]: p for p in _load(root).get("points", [])}
    points: List[Dict[str, Any]] = []
    for i, point in enumerate(sweep.points):
        run_dir = str(Path(point_dir(str(root), point)))
        overrides = [*sweep.base, *point]
        prev = old.get(run_dir, {})
        points.append({"index": i, "overrides": overrides, "run_dir": run_dir, "job_id": prev.get("job_id"),
                       "exit_code": prev.get("exit_code")})
    record = {"sweep_dir": str(root), "swept": list(sweep.swept), "base": list(sweep.base), "slurm": slurm,
              "points": points}
    _save(root, record)
    print(f"sweep: {len(points)} point(s) in {root} ({' '.join(sweep.swept)})", flush=True)
    first_failure = 0
    for p in points:
        state = point_state(p)
        if state == "completed" and old.get(p["run_dir"], {}).get("overrides") == p["overrides"]:
            print(f"[{p['index']}] {' '.join(p['overrides'])}: completed before, skipped", flush=True)
            continue
        if slurm and state in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED"):
            print(f"[{p['index']}] job {p['job_id']} is {state}, not resubmitted", flush=True)
            continue
        print(f"\n[{p['index']}] {' '.join(p['overrides'])}", flush=True)
        code = run_point([*p["overrides"], quoted("hydra.run.dir", p["run_dir"])])
        p["exit_code"] = code
        if slurm:
            p["job_id"] = _submitted_job(Path(p["run_dir"])) or p["job_id"]
        _save(root, record)
        if code != 0 and not first_failure:
            first_failure = code
    print()
    print(summary_table(root), end="", flush=True)
    if slurm:
        print(f"status later: launcher sweep {root}")
    return first_failure


def point_state(p: Dict[str, Any]) -> str:
    """completed/failed/preempted/running (status.json), a SLURM queue state, or pending/not started."""
    run_dir = Path(p["run_dir"])
    status = _read_json(run_dir / "status.json")
    queued = _queue_state(p.get("job_id")) if p.get("job_id") else None
    if queued:
        return queued
    if status.get("state"):
        return str(status["state"])
    if p.get("exit_code") not in (None, 0):
        return f"failed (exit {p['exit_code']})"
    return "submitted" if p.get("job_id") else "not started"


def summary_table(root: Path) -> str:
    record = _load(root)
    if not record:
        return f"no {SWEEP_FILE} in {root}\n"
    rows = [("#", "status", "step", "loss", "tok/s", "overrides", "run dir")]
    for p in record["points"]:
        last = _last_metrics(Path(p["run_dir"]))
        status = _read_json(Path(p["run_dir"]) / "status.json")
        rows.append((
            str(p["index"]),
            point_state(p) + (f" job {p['job_id']}" if p.get("job_id") else ""),
            str(status["step"] if status.get("step", -1) >= 0 else last.get("step", "-")),
            f"{last['loss']:.4f}" if last.get("loss") is not None else "-",
            f"{last['tokens_per_sec']:.0f}" if last.get("tokens_per_sec") is not None else "-",
            " ".join(o for o in p["overrides"] if o not in record.get("base", [])),
            os.path.relpath(p["run_dir"], root),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"sweep {root}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


def show_main(argv: Sequence[str]) -> int:
    """`launcher sweep <sweep dir>`: print the sweep's table (SLURM states included)."""
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: launcher sweep <sweep dir>   (prints the status table of a sweep started with -m)",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    root = Path(argv[0]).resolve()
    if not (root / SWEEP_FILE).is_file():
        print(f"error: sweep: no {SWEEP_FILE} in {root}; pass the sweep dir printed by `launcher -m ...`",
              file=sys.stderr)
        return 2
    print(summary_table(root), end="")
    return 0


def _last_metrics(run_dir: Path) -> Dict[str, Any]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    for line in reversed(path.read_text().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return {}


def _queue_state(job_id: str) -> Optional[str]:
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def _submitted_job(run_dir: Path) -> Optional[str]:
    return _read_json(run_dir / "submitted.json").get("job_id")


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _load(root: Path) -> Dict[str, Any]:
    return _read_json(root / SWEEP_FILE)


def _save(root: Path, record: Dict[str, Any]) -> None:
    tmp = root / f".{SWEEP_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, root / SWEEP_FILE)
