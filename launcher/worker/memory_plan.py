"""The closing memory line: the plan recorded at launch (run.json "plan", launcher.plan.record) next to
what each rank measured, one line per rank on rank 0's terminal:

    memory: rank 0 planned 1.87 GiB, measured 1.80 GiB (+3.9%); training phase 1.80 GiB

The figure compared is the lifetime peak (the one that decides an OOM): peak RSS on CPU ranks; on a GPU the
allocator's peak reservation, with the device's used memory beside it. (+: the plan is above the measurement.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from launcher.worker import comm, console, metrics

GIB = 1024**3


def read_plan(run_dir: Path) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads((run_dir / "run.json").read_text())
        launches = data.get("launches") or [data]  # one entry per launch (launcher.launch.settle)
        return launches[-1].get("plan")
    except (OSError, ValueError):
        return None  # a run dir from before plans were recorded


def lines(plan: Dict[str, Any], per_rank: List[Dict[str, float]]) -> List[str]:
    """One line per rank: planned vs measured lifetime peak (GiB) and the error (planned - measured) / measured."""
    out = []
    gpu = plan.get("accelerator") == "cuda"
    planned = plan["expect_gib"]["reserved" if gpu else "rss"]
    for rank, mem in enumerate(per_rank):
        measured, train = mem["mem_peak_gb"] / GIB, mem["mem_train_peak_gb"] / GIB
        line = (f"memory: rank {rank} planned {planned:.2f} GiB, measured {measured:.2f} GiB "
                f"({100 * (planned - measured) / measured:+.1f}%); training phase {train:.2f} GiB")
        if gpu and "mem_device_used_gb" in mem:
            used = mem["mem_device_used_gb"] / GIB
            want = plan["expect_gib"]["device_used"]
            line += f"; device used {used:.2f} GiB, planned {want:.2f} GiB ({100 * (want - used) / used:+.1f}%)"
        out.append(line)
    return out


def report(run_dir: Path, rank: int) -> None:
    """Every rank calls this (it gathers); rank 0 prints the lines."""
    per_rank = comm.gather_objects(metrics.memory_bytes())
    plan = read_plan(run_dir)
    if rank == 0 and plan is not None:
        for line in lines(plan, per_rank):
            console.say(line)
