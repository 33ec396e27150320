"""Per-rank memory of one training setup, term by term, in bytes (no torch, no deepspeed).

total = params + grads + optimizer (model states) + activations + buffers + overhead, where
- model states and ZeRO's gradient/reduction buffers come from launcher.plan.model_states (the ZeRO paper,
  section 5, plus what DeepSpeed 0.19 actually allocates);
- activations are what HF's LlamaDecoderLayer saves for backward, derived from its shapes;
- buffers are the larger of the backward-time communication buffers and the optimizer-step temporaries
  beyond the activations they replace (activations are freed before the step);
- overhead is a fixed framework term plus allocator fragmentation (constants below).
Every term is kept in `MemoryBreakdown.terms` ("group.name" -> bytes) so measurements can be compared
term by term. On CPU ranks the "device" is host memory, and offloaded state lands in the same memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig

from launcher.config.topology import Topology
from launcher.plan import lora
from launcher.plan.activations import activation_terms, attention_layout, checkpointed_layers
from launcher.plan.model_states import Setup, model_state_terms, precision_bytes
from launcher.plan.params import ModelShape, count_params

GIB = 1024**3

# --- constants (sources in docs/planner.md) ---------------------------------------------------------
# GPU: the CUDA context (driver, kernels, cuBLAS/cuDNN handles) lives outside PyTorch's allocator.
CUDA_CONTEXT_RESERVE_GIB = 1.0
# GPU: NCCL communicator buffers, cuBLAS workspaces, DeepSpeed's small tensors.
GPU_FRAMEWORK_OVERHEAD_GIB = 1.0
# CPU rank: anonymous memory of a Python process with torch, deepspeed, transformers and gloo loaded, as it is
# while training (the worker's CPU mem_peak_gb leaves out file-backed pages: the mapped libraries, ~0.12 GiB
# per rank here, resident by an amount that depends on the page cache). Measured (bench/planner_accuracy.py
# --groups fitted, 2 CPU ranks, torch 2.13, deepspeed 0.19.8): peak minus the modelled tensors = 442-446 MiB
# of RSS at the ZeRO-1/2 fitted points, of which 117-125 MiB file-backed (peak RSS - mem_peak_gb there).
CPU_RANK_BASELINE_GIB = 0.315
# Host memory left to the OS and other processes when the CPU ranks share this node's RAM.
HOST_OS_RESERVE_GIB = 1.0
# Caching-allocator fragmentation, as a fraction of the memory that comes and goes each step.
FRAGMENTATION = 0.05


@dataclass
class MemoryBreakdown:
    params: int
    grads: int
    optimizer: int
    activations: int
    buffers: int
    overhead: int
    host_offload_per_rank: int  # host memory the offloaded state needs, per rank
    terms: dict[str, int] = field(default_factory=dict)

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.model_states + self.activations + self.buffers + self.overhead


def estimate_memory(cfg: DictConfig, topo: Topology, setup: Setup, micro_batch_size: int | None = None,
                    accum: int = 1) -> MemoryBreakdown:
    """Peak bytes per rank for `setup` with cfg's model, precision, batch shape and bucket sizes.

    accum: gradient accumulation steps (ZeRO-1 keeps full gradients across micro-steps when > 1).
    """
    shape = ModelShape.from_cfg(cfg.model)
    counts = count_params(shape)
    micro = int(cfg.train.micro_batch_size if micro_batch_size is None else micro_batch_size)
    prec = precision_bytes(str(cfg.precision.name))
    adapters = lora.adapter_counts(cfg, shape)
    # LoRA: optimizer, gradients and buckets follow the adapters; the frozen base is weights only.
    terms = model_state_terms(cfg, topo, setup, adapters or counts, prec, accum)
    if adapters is not None:
        terms.update(lora.frozen_base_terms(cfg, topo.world_size, setup.zero_stage, setup.offload_params, counts,
                                            prec.param))
    packed = attention_layout(cfg, topo.accelerator)
    terms.update(activation_terms(shape, setup, micro, int(cfg.train.seq_len), prec.activation, packed))
    if adapters is not None:
        n_kept = shape.layers - checkpointed_layers(shape.layers, setup.ac_every) + (1 if setup.ac_every else 0)
        terms.update(lora.activation_terms(cfg, shape, n_kept, micro * int(cfg.train.seq_len), prec.activation))
    if setup.cpu_checkpointing:
        n_ckpt = checkpointed_layers(shape.layers, setup.ac_every)
        terms["host.checkpoint_inputs"] = n_ckpt * micro * int(cfg.train.seq_len) * shape.hidden * prec.activation
    return _assemble(terms, topo)


# Which column an offloaded (host.*) term joins when the ranks themselves run on the host.
HOST_COLUMN = {
    "host.param_partition": "params",
    "host.param_staging": "params",
    "host.grad_partition": "grads",
    "host.fp32_grads": "grads",
    "host.grad_staging": "grads",
    "host.accumulated_grads": "grads",
    "host.fp32_master": "optimizer",
    "host.adam_moments": "optimizer",
    "host.checkpoint_inputs": "activations",
}


def _assemble(terms: dict[str, int], topo: Topology) -> MemoryBreakdown:
    def group(name: str) -> int:
        return sum(v for k, v in terms.items() if k.startswith(name + "."))

    host = group("host")
    params, grads, optimizer, activations = group("params"), group("grads"), group("optimizer"), group("activations")
    # Buffers at the peak: backward-time buffers, or what the optimizer step adds to the model states
    # beyond the activations, which are freed by then. ("step." repeats buffers that persist into it.)
    # "bwdend." buffers (CPU ranks, ZeRO-1/2) exist only once backward has freed the activations.
    buffers = max(group("buffers"), group("step") - activations, group("bwdend") - activations)
    if topo.accelerator == "cpu":
        # CPU ranks: the offloaded state is in the same (host) memory as everything else.
        columns = {"params": params, "grads": grads, "optimizer": optimizer, "activations": activations}
        for key, value in terms.items():
            if key.startswith("host."):
                columns[HOST_COLUMN[key]] += value
        params, grads, optimizer, activations = (columns[c] for c in ("params", "grads", "optimizer", "activations"))
        fixed = CPU_RANK_BASELINE_GIB * GIB
    else:
        fixed = GPU_FRAMEWORK_OVERHEAD_GIB * GIB
    overhead = int(fixed + FRAGMENTATION * (activations + buffers))
    terms = dict(terms, **{"overhead.fixed": int(fixed), "overhead.fragmentation": overhead - int(fixed)})
    return MemoryBreakdown(params, grads, optimizer, activations, buffers, overhead, host, terms)
