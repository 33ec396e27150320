"""Memory and step-time planner: what a setup needs per rank before anything launches.

Pure arithmetic on the composed config and the topology; imports neither torch nor deepspeed.
Entry points: `build_plan` (the table of candidates), `preflight` (refuse what will not fit, naming the
cheapest change that does) and `choose_auto` (zero=auto / activation_checkpointing=auto).
"""

from launcher.plan.candidates import GRID, Plan, Row, build_plan, evaluate
from launcher.plan.capacity import Capacity, capacity, read_meminfo_total
from launcher.plan.decide import Choice, PreflightResult, choose_auto, preflight
from launcher.plan.memory import MemoryBreakdown, estimate_memory
from launcher.plan.model_states import Setup
from launcher.plan.params import ModelShape, ParamCounts, count_params, flops_per_token, mfu
from launcher.plan.perf import StepEstimate, estimate_step

__all__ = [
    "GRID",
    "Capacity",
    "Choice",
    "MemoryBreakdown",
    "ModelShape",
    "ParamCounts",
    "Plan",
    "PreflightResult",
    "Row",
    "Setup",
    "StepEstimate",
    "build_plan",
    "capacity",
    "choose_auto",
    "count_params",
    "estimate_memory",
    "estimate_step",
    "evaluate",
    "flops_per_token",
    "mfu",
    "preflight",
    "read_meminfo_total",
]
