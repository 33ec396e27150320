"""The plan: one row per candidate setup (ZeRO 1/2/3 x offload none/cpu x checkpointing none/full), plus
the configured setup itself, each with memory per rank, fit, host RAM and step-time estimates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from launcher.config.topology import Topology, batch_shape
from launcher.plan.capacity import Capacity, capacity
from launcher.plan.load import load_bytes_per_node
from launcher.plan.lora import adapter_counts
from launcher.plan.memory import CUDA_CONTEXT_RESERVE_GIB, GIB, MemoryBreakdown, estimate_memory
from launcher.plan.model_states import Setup
from launcher.plan.params import ModelShape, count_params, flops_per_token
from launcher.plan.perf import StepEstimate, estimate_step

GRID = [
    Setup(zero_stage=stage, offload=offload, ac_every=ac)
    for stage in (1, 2, 3)
    for offload in ("none", "cpu")
    for ac in (0, 1)
]


@dataclass
class Row:
    setup: Setup
    memory: MemoryBreakdown
    step: StepEstimate
    capacity: Capacity
    host_per_node: int  # host RAM per node: offloaded state of the local ranks (GPU), everything (CPU ranks)
    micro_batch_size: int
    world_size: int
    load_per_node: int = 0  # host RAM per node while the ranks load the model (launcher.plan.load)
    accelerator: str = "cuda"

    @property
    def device_fits(self) -> bool | None:
        usable = self.capacity.device_per_rank
        return None if usable is None else self.memory.total <= usable

    @property
    def host_fits(self) -> bool:
        usable = self.capacity.host_per_node
        return usable is None or max(self.host_per_node, self.load_per_node) <= usable

    @property
    def fits(self) -> bool | None:
        device = self.device_fits
        return None if device is None else device and self.host_fits

    def to_json(self) -> dict[str, Any]:
        m, s = self.memory, self.step
        usable = self.capacity.device_per_rank
        host_usable = self.capacity.host_per_node
        return {
            "zero_stage": self.setup.zero_stage,
            "offload": self.setup.offload,
            "offload_params": self.setup.offload_params,
            "activation_checkpointing": "none" if self.setup.ac_every == 0 else "full",
            "every_n_layers": max(1, self.setup.ac_every),
            "micro_batch_size": self.micro_batch_size,
            "model_states_gib": gib(m.model_states),
            "params_gib": gib(m.params),
            "grads_gib": gib(m.grads),
            "optimizer_gib": gib(m.optimizer),
            "activations_gib": gib(m.activations),
            "buffers_gib": gib(m.buffers),
            "overhead_gib": gib(m.overhead),
            "total_gib": gib(m.total),
            "usable_gib": None if usable is None else gib(usable),
            "fits": self.fits,
            "host_ram_gib_per_node": gib(self.host_per_node),
            "host_load_gib_per_node": gib(self.load_per_node),
            "host_usable_gib_per_node": None if host_usable is None else gib(host_usable),
            "step_time_s": _round(s.step_time_s, 3),
            "tokens_per_s": _round(s.tokens_per_s, 0),
            "tokens_per_s_per_gpu": _round(None if s.tokens_per_s is None else s.tokens_per_s / self.world_size, 0),
            "mfu": _round(s.mfu, 3),
            **self.expected_metrics(),
            "terms_bytes": dict(m.terms),
        }

    def expected_metrics(self) -> dict[str, float]:
        """The plan in the worker's metric names and unit (GB = 1e9 bytes), to set beside metrics.jsonl.
        GPU: the allocator's reservation is everything but the fixed framework term (NCCL buffers and the like
        sit outside it); the device's used memory adds the CUDA context. CPU: the process's peak RSS."""
        m = self.memory
        if self.accelerator == "cpu":
            return {"expect_mem_peak_gb": round(m.total / 1e9, 3)}
        return {"expect_mem_peak_gb": round((m.total - m.terms.get("overhead.fixed", 0)) / 1e9, 3),
                "expect_mem_device_used_gb": round((m.total + CUDA_CONTEXT_RESERVE_GIB * GIB) / 1e9, 3)}


def gib(nbytes: float) -> float:
    return round(nbytes / GIB, 2)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def evaluate(cfg: DictConfig, topo: Topology, setup: Setup, cap: Capacity,
             micro_batch_size: int | None = None) -> Row:
    """Memory, fit and speed of `setup` under cfg (micro_batch_size overrides cfg's)."""
    micro = int(cfg.train.micro_batch_size if micro_batch_size is None else micro_batch_size)
    shape = batch_shape(cfg, topo)
    # Same global batch: a smaller micro batch is made up by more accumulation.
    accum = max(1, shape.global_batch_size // (micro * topo.world_size)) if cfg.train.global_batch_size else 1
    memory = estimate_memory(cfg, topo, setup, micro, accum)
    step = estimate_step(cfg, topo, setup, accum, micro)
    if topo.accelerator == "cpu":
        host = memory.total * topo.ranks_per_node  # CPU ranks: everything is host RAM
    else:
        host = memory.host_offload_per_rank * topo.ranks_per_node
    load = load_bytes_per_node(cfg, topo, setup.zero_stage)
    return Row(setup, memory, step, cap, host, micro, topo.world_size, load, topo.accelerator)


@dataclass
class Plan:
    cfg: DictConfig
    topo: Topology
    capacity: Capacity
    current: Row
    candidates: list[Row]

    def to_json(self) -> dict[str, Any]:
        cfg, topo = self.cfg, self.topo
        shape = ModelShape.from_cfg(cfg.model)
        counts = count_params(shape)
        adapters = adapter_counts(cfg, shape)
        trainable = counts.total if adapters is None else adapters.total
        bs = batch_shape(cfg, topo)
        return {
            "model": str(cfg.model.name),
            "hardware": str(cfg.hardware.name),
            "world_size": topo.world_size,
            "nodes": topo.nodes,
            "ranks_per_node": topo.ranks_per_node,
            "accelerator": topo.accelerator,
            "precision": str(cfg.precision.name),
            "seq_len": int(cfg.train.seq_len),
            "micro_batch_size": bs.micro_batch_size,
            "gradient_accumulation_steps": bs.gradient_accumulation_steps,
            "parameters": counts.total,
            "trainable_parameters": trainable,
            "flops_per_token": flops_per_token(shape, counts, int(cfg.train.seq_len),
                                               None if adapters is None else trainable),
            "usable_gib": None if self.capacity.device_per_rank is None else gib(self.capacity.device_per_rank),
            "usable_source": self.capacity.source,
            "current": self.current.to_json(),
            "candidates": [row.to_json() for row in self.candidates],
        }


def build_plan(cfg: DictConfig, topo: Topology, host_mem_bytes: int | None = None,
               gpu_mem_bytes: int | None = None) -> Plan:
    cap = capacity(cfg, topo, host_mem_bytes, gpu_mem_bytes)
    current = evaluate(cfg, topo, Setup.from_cfg(cfg), cap)
    return Plan(cfg, topo, cap, current, [evaluate(cfg, topo, s, cap) for s in GRID])
