"""The plan a run records in its run dir (run.json "plan"), for the worker's closing comparison
`memory: planned X GiB, measured Y GiB (+Z%)` (launcher.worker.memory_plan). Pure: no torch, no I/O."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from launcher.config.topology import Topology, batch_shape
from launcher.plan.memory import CUDA_CONTEXT_RESERVE_GIB, GIB, estimate_memory
from launcher.plan.model_states import Setup


def run_plan(cfg: DictConfig, topo: Topology) -> dict[str, Any]:
    """The configured setup's predicted peak per rank, its terms, and what each measured figure should read.

    peak_gib: the planner's total per rank (what the pre-flight check compares with usable memory).
    expect: the same plan in the worker's measured quantities (GiB): on CPU ranks the process's peak RSS
    (`rss`) is the total; on a GPU the allocator's reservation (`reserved`) is the total minus the fixed
    framework term, and the device's used memory (`device_used`) adds the CUDA context to the total.
    """
    mem = estimate_memory(cfg, topo, Setup.from_cfg(cfg), accum=batch_shape(cfg, topo).gradient_accumulation_steps)
    total = mem.total
    if topo.accelerator == "cpu":
        expect = {"rss": total / GIB}
    else:
        expect = {"reserved": (total - mem.terms.get("overhead.fixed", 0)) / GIB,
                  "device_used": total / GIB + CUDA_CONTEXT_RESERVE_GIB}
    return {
        "peak_gib": round(total / GIB, 4),
        "accelerator": topo.accelerator,
        "expect_gib": {k: round(v, 4) for k, v in expect.items()},
        "columns_gib": {k: round(getattr(mem, k) / GIB, 4)
                        for k in ("params", "grads", "optimizer", "activations", "buffers", "overhead")},
        "terms_bytes": dict(mem.terms),
    }
