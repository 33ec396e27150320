"""Decisions from the plan: pre-flight refusal with the cheapest change that fits, and zero=auto.

Order of preference (fastest first, the issue's rule): no offload before CPU offload (the host Adam step
and PCIe copies cost far more than anything else); no checkpointing before checkpointing every k-th
layer (largest k first: fewest layers recomputed) before checkpointing all layers (+1/3 compute); then
the lowest ZeRO stage (least communication). A smaller micro batch (same global batch, more
accumulation) is only suggested when no setup fits at the configured one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from omegaconf import DictConfig

from launcher.config.topology import Topology
from launcher.errors import ConfigError
from launcher.plan.candidates import Row, evaluate
from launcher.plan.capacity import Capacity, capacity
from launcher.plan.memory import GIB
from launcher.plan.model_states import Setup

# zero=auto only picks a setup predicted to use at most this share of the usable memory (the plan's target
# error is 10%), unless nothing else fits.
AUTO_HEADROOM = 0.9


@dataclass(frozen=True)
class PreflightResult:
    fits: bool
    message: str
    needed_gib: float
    usable_gib: float | None
    # Overrides that make it fit (the cheapest change), e.g. ["zero=stage3"]; empty when it fits or none does.
    suggestion: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Choice:
    zero_stage: int
    offload: str  # "none" | "cpu"
    activation_checkpointing: str  # "none" | "full"
    every_n_layers: int
    reason: str
    offload_params: bool = False
    # The same choice as launcher overrides, to compose the final config with.
    overrides: list[str] = field(default_factory=list)


def ac_levels(layers: int) -> list[int]:
    """0 (none), then every k-th layer for each distinct number of checkpointed layers, fewest first, then 1."""
    levels, seen = [0], set()
    for k in range(layers, 1, -1):
        count = math.ceil(layers / k)
        if count not in seen and count < layers:
            seen.add(count)
            levels.append(k)
    return levels + [1]


def preference_order(layers: int, stages: Sequence[int] = (1, 2, 3), offloads: Sequence[str] = ("none", "cpu"),
                     ac: Sequence[int] | None = None, offload_params: bool = True) -> Iterator[Setup]:
    for offload in offloads:
        for every in (ac_levels(layers) if ac is None else ac):
            for stage in stages:
                yield Setup(stage, offload, False, every)
    if offload_params and "cpu" in offloads and 3 in stages:
        for every in (ac_levels(layers) if ac is None else ac):
            yield Setup(3, "cpu", True, every)


def setup_overrides(setup: Setup, micro: int | None = None) -> list[str]:
    out = [f"zero=stage{setup.zero_stage}", f"offload={setup.offload}"]
    if setup.offload_params:
        out.append("offload.params=true")
    if setup.ac_every == 0:
        out.append("activation_checkpointing=none")
    else:
        out += ["activation_checkpointing=full", f"activation_checkpointing.every_n_layers={setup.ac_every}"]
    if micro is not None:
        out.append(f"train.micro_batch_size={micro}")
    return out


def _diff(current: Setup, new: Setup, micro: int | None) -> list[str]:
    old = set(setup_overrides(current))
    changed = [o for o in setup_overrides(new, micro) if o not in old]
    if current.ac_every == 0 and new.ac_every == 1:
        changed = [o for o in changed if o != "activation_checkpointing.every_n_layers=1"]
    return changed


def _first_fit(cfg: DictConfig, topo: Topology, cap: Capacity, order: Sequence[Setup],
               headroom: float = 1.0) -> tuple[Row | None, Row | None]:
    """The first setup in `order` that fits within headroom x usable, and the one just before it."""
    previous = None
    for setup in order:
        row = evaluate(cfg, topo, setup, cap)
        if row.fits and row.memory.total <= headroom * (cap.device_per_rank or 0):
            return row, previous
        previous = row
    return None, previous


def _cheapest_fit(cfg: DictConfig, topo: Topology, cap: Capacity, current: Setup,
                  order: Sequence[Setup]) -> Row | None:
    """The fitting setup that changes least: no offload if at all possible, then the configured micro batch
    if possible, then the fewest changed overrides, then the earlier (faster) one in `order`."""
    best = None
    for micro in [None, *_smaller_micros(cfg)]:
        for i, setup in enumerate(order):
            if best is not None and setup.offload != "none" and best[0][0] == 0:
                continue  # already have a fit without offload
            row = evaluate(cfg, topo, setup, cap, micro)
            if row.fits:
                key = (setup.offload != "none", micro is not None, len(_diff(current, setup, micro)), i)
                if best is None or key < best[0]:
                    best = (key, row)
        if best is not None and best[0][0] == 0:
            break  # a smaller micro batch cannot beat a fit without offload at this one
    return None if best is None else best[1]


def _smaller_micros(cfg: DictConfig) -> list[int]:
    micro = int(cfg.train.micro_batch_size)
    return [m for m in range(micro - 1, 0, -1) if micro % m == 0]


def _g(nbytes: float) -> str:
    """GiB as the table shows them (rounded to 0.01 first, as in the JSON, then printed to 0.1)."""
    return f"{round(nbytes / GIB, 2):.1f}"


def _unit(topo: Topology) -> str:
    return "GPU" if topo.accelerator == "cuda" else "rank"


def preflight(cfg: DictConfig, topo: Topology, host_mem_bytes: int | None = None,
              gpu_mem_bytes: int | None = None) -> PreflightResult:
    """Plan the configured setup; if it is predicted not to fit, say by how much and the cheapest change."""
    cap = capacity(cfg, topo, host_mem_bytes, gpu_mem_bytes)
    current_setup = Setup.from_cfg(cfg)
    row = evaluate(cfg, topo, current_setup, cap)
    need, unit, hw = round(row.memory.total / GIB, 2), _unit(topo), cfg.hardware.name
    if cap.device_per_rank is None:
        return PreflightResult(True, f"plan: needs {need:.1f} GiB/{unit}; {cap.source}, not checked", need, None)
    usable = round(cap.device_per_rank / GIB, 2)
    if row.fits:
        speed = ""
        if row.step.tokens_per_s is not None:
            speed = (f"; ~{row.step.step_time_s:.2f} s/step, {row.step.tokens_per_s / topo.world_size:,.0f} "
                     f"tokens/s/{unit}, MFU {row.step.mfu:.2f}")
        return PreflightResult(True, f"plan: needs {need:.1f} GiB/{unit} of {usable:.1f} GiB usable on {hw}{speed}",
                               need, usable)
    if row.device_fits and row.load_per_node > row.host_per_node:
        what = "model.path" if cfg.model.path is not None else "the model"
        head = (f"loading {what} needs {row.load_per_node / GIB:.0f} GiB host RAM per node ({topo.ranks_per_node} "
                f"ranks x {row.load_per_node / topo.ranks_per_node / GIB:.1f} GiB, each rank a full copy under "
                f"ZeRO-{current_setup.zero_stage}), {cap.host_per_node / GIB:.0f} GiB usable on {hw} "
                "(hardware.host_ram_gib)")
    elif row.device_fits:
        head = (f"needs {row.host_per_node / GIB:.0f} GiB host RAM per node for the offloaded optimizer, "
                f"{cap.host_per_node / GIB:.0f} GiB usable on {hw}")
    else:
        head = f"needs {need:.1f} GiB/{unit}, {usable:.1f} GiB usable on {hw} ({cap.source})"
    layers = int(cfg.model.num_hidden_layers)
    fit = _cheapest_fit(cfg, topo, cap, current_setup, list(preference_order(layers)))
    if fit is None:
        smallest = min((evaluate(cfg, topo, s, cap, 1) for s in preference_order(layers, ac=(1,))),
                       key=lambda r: r.memory.total)
        overrides = " ".join(setup_overrides(smallest.setup, 1))
        overrides = overrides.replace(" activation_checkpointing.every_n_layers=1", "")
        tail = (f"nothing fits: even the smallest setup, {overrides}, needs {_g(smallest.memory.total)} "
                f"GiB/{unit}; use more nodes (cluster.nodes), a shorter train.seq_len or a smaller model")
        return PreflightResult(False, f"{head}; {tail}", need, usable)
    micro = None if fit.micro_batch_size == int(cfg.train.micro_batch_size) else fit.micro_batch_size
    change = _diff(current_setup, fit.setup, micro)
    tail = f"{' '.join(change)} fits at {_g(fit.memory.total)} GiB"
    if fit.setup.offload == "cpu":
        tail += f" (+{fit.host_per_node / GIB:.0f} GiB host RAM per node)"
    return PreflightResult(False, f"{head}; {tail}", need, usable, change)


def _describe(setup: Setup, layers: int) -> str:
    offload = "no offload" if setup.offload == "none" else "CPU optimizer offload"
    if setup.offload_params:
        offload += " + parameter offload"
    if setup.ac_every == 0:
        ac = "no activation checkpointing"
    elif setup.ac_every == 1:
        ac = "checkpointing every layer"
    else:
        n = len(range(0, layers, setup.ac_every))
        ac = f"checkpointing one layer in {setup.ac_every} ({n} of {layers})"
    return f"ZeRO-{setup.zero_stage}, {offload}, {ac}"


def choose_auto(cfg: DictConfig, topo: Topology, auto_zero: bool = True, auto_offload: bool = True,
                auto_ac: bool = True, host_mem_bytes: int | None = None, gpu_mem_bytes: int | None = None,
                headroom: float = AUTO_HEADROOM) -> Choice:
    """zero=auto / activation_checkpointing=auto: the fastest setup predicted to fit in headroom x usable.

    What is not auto stays as configured (auto_zero=False keeps cfg.zero.stage, and so on). Raises
    ConfigError when nothing fits (the message gives the numbers), like a failed pre-flight.
    """
    cap = capacity(cfg, topo, host_mem_bytes, gpu_mem_bytes)
    current = Setup.from_cfg(cfg)
    layers = int(cfg.model.num_hidden_layers)
    order = list(preference_order(
        layers,
        stages=(1, 2, 3) if auto_zero else (current.zero_stage,),
        offloads=("none", "cpu") if auto_offload else (current.offload,),
        ac=None if auto_ac else (current.ac_every,),
        offload_params=auto_offload and auto_zero,
    ))
    if cap.device_per_rank is None:
        # Unknown memory: the most memory-saving setup among the allowed ones, without offload if allowed.
        frugal = Setup(
            zero_stage=3 if auto_zero else current.zero_stage,
            offload="none" if auto_offload else current.offload,
            offload_params=False if auto_offload else current.offload_params,
            ac_every=1 if auto_ac else current.ac_every,
        )
        return _choice(frugal, f"{_describe(frugal, layers)}: {cap.source}, so the most memory-saving setup")
    fit, before = _first_fit(cfg, topo, cap, order, headroom)
    unit = _unit(topo)
    if fit is None:
        fit, before = _first_fit(cfg, topo, cap, order)  # nothing with headroom: take a tight fit
    if fit is None:
        smallest = min((evaluate(cfg, topo, s, cap) for s in order), key=lambda r: r.memory.total)
        raise ConfigError(
            "zero",
            f"auto: no setup fits {_g(cap.device_per_rank)} GiB/{unit} on {cfg.hardware.name}; the smallest, "
            f"{_describe(smallest.setup, layers)}, needs {_g(smallest.memory.total)} GiB; lower "
            f"train.micro_batch_size or train.seq_len, or add nodes",
        )
    tight = "" if fit.memory.total <= headroom * cap.device_per_rank else f", less than {1 - headroom:.0%} headroom"
    reason = (f"{_describe(fit.setup, layers)}: the fastest setup predicted to fit "
              f"({_g(fit.memory.total)} of {_g(cap.device_per_rank)} GiB/{unit} on {cfg.hardware.name}"
              f"{tight})")
    if before is not None:
        reason += f"; {_describe(before.setup, layers)} would need {_g(before.memory.total)} GiB"
        if before.fits:
            reason += f", more than {headroom:.0%} of it"
    return _choice(fit.setup, reason)


def _choice(setup: Setup, reason: str) -> Choice:
    return Choice(
        zero_stage=setup.zero_stage,
        offload=setup.offload,
        activation_checkpointing="none" if setup.ac_every == 0 else "full",
        every_n_layers=max(1, setup.ac_every),
        reason=reason,
        offload_params=setup.offload_params,
        overrides=setup_overrides(setup),
    )
