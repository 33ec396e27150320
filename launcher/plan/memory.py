"""Per-rank memory of one training setup, term by term, in bytes (no torch, no deepspeed).

total = params + grads + optimizer (model states) + activations + buffers + overhead, where
- model states follow the ZeRO paper (Rajbhandari et al. 2020, section 5) plus what DeepSpeed 0.19
  actually allocates (read in runtime/zero/stage_1_and_2.py and stage3.py; see the comments per term);
- activations are what HF's LlamaDecoderLayer saves for backward, derived from its shapes;
- buffers are the larger of the backward-time communication buffers and the optimizer-step temporaries
  beyond the activations they replace (activations are freed before the step);
- overhead is a fixed framework term plus allocator fragmentation (constants below).
Every term is kept in `MemoryBreakdown.terms` ("group.name" -> bytes) so measurements can be compared
term by term. On CPU ranks the "device" is host memory, and offloaded state lands in the same memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

from omegaconf import DictConfig

from launcher.plan.params import ModelShape, ParamCounts, count_params
from launcher.topology import Topology

GIB = 1024**3

# --- constants (sources in docs/planner.md) ---------------------------------------------------------
# fp32 Adam: master copy of the weights (DeepSpeed clones it even when the model is fp32) + m + v.
MASTER_BYTES = 4
ADAM_BYTES = 8
# DeepSpeed's default ZeRO-3 sub_group_size (elements); the step's fp32 gradient exists per sub-group.
SUB_GROUP_SIZE = 1_000_000_000
# GPU: the CUDA context (driver, kernels, cuBLAS/cuDNN handles) lives outside PyTorch's allocator.
CUDA_CONTEXT_RESERVE_GIB = 1.0
# GPU: NCCL communicator buffers, cuBLAS workspaces, DeepSpeed's small tensors.
GPU_FRAMEWORK_OVERHEAD_GIB = 1.0
# CPU rank: resident size of a Python process with torch, deepspeed, transformers and gloo loaded.
CPU_RANK_BASELINE_GIB = 0.4
# Host memory left to the OS and other processes when the CPU ranks share this node's RAM.
HOST_OS_RESERVE_GIB = 1.0
# Caching-allocator fragmentation, as a fraction of the memory that comes and goes each step.
FRAGMENTATION = 0.05
# Cross-entropy on the logits (HF ForCausalLMLoss): logits.float() (fp32 copy) -> log_softmax (fp32,
# saved) -> nll_loss. At the start of backward nll_loss's gradient and log_softmax's gradient (both fp32,
# tokens x vocab) exist next to the saved log-softmax: 3 fp32 copies, plus the model-dtype logits the
# model output still holds.
LOGITS_FP32_COPIES = 3


@dataclass(frozen=True)
class Setup:
    """One choice of ZeRO stage, offload and activation checkpointing."""

    zero_stage: int
    offload: str = "none"  # "none" | "cpu": optimizer state and step on the host
    offload_params: bool = False  # ZeRO-3 parameter partitions on the host too
    ac_every: int = 0  # 0: no checkpointing; k: checkpoint every k-th decoder layer (1 = full)
    cpu_checkpointing: bool = False

    @property
    def activation_checkpointing(self) -> str:
        return "none" if self.ac_every == 0 else "full" if self.ac_every == 1 else f"every_{self.ac_every}"

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> "Setup":
        ac = cfg.activation_checkpointing
        return cls(
            zero_stage=int(cfg.zero.stage),
            offload=str(cfg.offload.optimizer),
            offload_params=bool(cfg.offload.params),
            ac_every=int(ac.every_n_layers) if ac.enabled else 0,
            cpu_checkpointing=bool(ac.enabled and ac.cpu_checkpointing),
        )


@dataclass(frozen=True)
class Precision:
    param: int  # bytes per trained weight (16-bit or fp32)
    grad: int
    activation: int


def precision_bytes(name: str) -> Precision:
    # bf16/fp16: DeepSpeed casts the whole model (no autocast), so weights, grads and activations are 16-bit.
    return Precision(4, 4, 4) if name == "fp32" else Precision(2, 2, 2)


def checkpointed_layers(layers: int, every: int) -> int:
    """Layers 0, k, 2k, ... are checkpointed (launcher.ds_config.checkpointed_layers does the same)."""
    return 0 if every <= 0 else len(range(0, layers, every))


@dataclass
class MemoryBreakdown:
    params: int
    grads: int
    optimizer: int
    activations: int
    buffers: int
    overhead: int
    host_offload_per_rank: int  # host memory the offloaded state needs, per rank
    terms: Dict[str, int] = field(default_factory=dict)

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.model_states + self.activations + self.buffers + self.overhead


def layer_activation_bytes(shape: ModelShape, micro: int, seq: int, ab: int) -> int:
    """Bytes one LlamaDecoderLayer saves for backward (HF, SDPA with native GQA, no dropout).

    Per token: 2 RMSNorms x (fp32 copy of the input, saved by pow/mul: 4 B + normalized output in the
    model dtype, saved by the weight multiply and shared by the projections that read it: ab) h;
    attention: q after RoPE (h), k and v at GQA width (2 kv), SDPA's output (h) and its contiguous
    transposed copy that o_proj saves (h), plus SDPA's fp32 logsumexp per head (RoPE saves only cos/sin);
    SwiGLU MLP: gate output (SiLU input), SiLU output, up output, their product (down_proj input): 4 I.
    No s x s score matrix: SDPA's flash/efficient kernels recompute it in backward.
    """
    t = micro * seq
    h, kv, inter = shape.hidden, shape.kv_width, shape.intermediate
    norms = 2 * t * h * (4 + ab)
    attention = t * ab * (h + 2 * kv + h + h) + micro * shape.heads * seq * 4
    mlp = 4 * t * ab * inter
    return norms + attention + mlp


def activation_terms(shape: ModelShape, setup: Setup, micro: int, seq: int, ab: int) -> Dict[str, int]:
    """Activations at the peak (start of backward, or the recompute of the last checkpointed layer)."""
    t = micro * seq
    layer = layer_activation_bytes(shape, micro, seq, ab)
    n_ckpt = checkpointed_layers(shape.layers, setup.ac_every)
    layer_input = t * shape.hidden * ab  # what a checkpoint keeps: the layer's input hidden states
    kept_inputs = 0 if setup.cpu_checkpointing else n_ckpt * layer_input
    held_logits = t * shape.vocab * ab  # the model output keeps its logits through backward
    loss_peak = held_logits + LOGITS_FP32_COPIES * t * shape.vocab * 4
    # Backward of one layer: its gradients in flight, dominated by the MLP's (2 tensors of t x I).
    layer_backward = 2 * t * shape.intermediate * ab
    recompute = layer if n_ckpt else 0
    return {
        "activations.layers_saved": (shape.layers - n_ckpt) * layer,
        "activations.checkpoint_inputs": kept_inputs,
        "activations.final_norm": t * shape.hidden * (4 + ab),
        # The loss peak and the recompute of the last checkpointed layer do not overlap in time.
        "activations.logits_or_recompute": max(loss_peak, held_logits + recompute + layer_backward),
    }


def estimate_memory(cfg: DictConfig, topo: Topology, setup: Setup,
                    micro_batch_size: Optional[int] = None) -> MemoryBreakdown:
    """Peak bytes per rank for `setup` with cfg's model, precision, batch shape and bucket sizes."""
    shape = ModelShape.from_cfg(cfg.model)
    counts = count_params(shape)
    micro = int(cfg.train.micro_batch_size if micro_batch_size is None else micro_batch_size)
    prec = precision_bytes(str(cfg.precision.name))
    terms = model_state_terms(cfg, topo, setup, counts, prec)
    terms.update(activation_terms(shape, setup, micro, int(cfg.train.seq_len), prec.activation))
    if setup.cpu_checkpointing:
        n_ckpt = checkpointed_layers(shape.layers, setup.ac_every)
        terms["host.checkpoint_inputs"] = n_ckpt * micro * int(cfg.train.seq_len) * shape.hidden * prec.activation
    return _assemble(terms, topo)


def model_state_terms(cfg: DictConfig, topo: Topology, setup: Setup, counts: ParamCounts,
                      prec: Precision) -> Dict[str, int]:
    zero = cfg.zero
    p_all, n = counts.total, topo.world_size
    part = math.ceil(p_all / n)  # this rank's partition (DeepSpeed's alignment padding is negligible)
    pb, gb = prec.param, prec.grad
    offload = setup.offload == "cpu"
    on_cpu = topo.accelerator == "cpu"
    # torch.empty buckets: a GPU's caching allocator reserves them whole; on CPU only touched pages count.
    bucket = min(int(zero.reduce_bucket_size), p_all) if on_cpu else int(zero.reduce_bucket_size)
    # The fp32 gradient partition for the step: a cast copy, except in fp32 where .to() is a no-op.
    fp32_cast = 0 if gb == 4 else 4
    t: Dict[str, int] = {}
    if setup.zero_stage in (1, 2):
        t["params.model"] = pb * p_all  # bit16_groups_flat: every rank holds all weights
        if setup.zero_stage == 1:
            # Stage 1 never frees param.grad in backward (only stage 2 does); with gradient accumulation
            # the full gradients persist across micro-steps.
            t["grads.full"] = gb * p_all
        if not offload:
            t["grads.partition"] = gb * part  # contiguous grads_in_partition
            # ipg reduce buckets: 2 with overlap_comm (double-buffered), 1 without.
            t["buffers.reduce_bucket"] = bucket * gb * (2 if zero.overlap_comm else 1) \
                if zero.contiguous_gradients else 0
            t["step.flat_grad_copy"] = gb * part  # flatten(averaged_gradients) in step()
            t["step.fp32_grad"] = fp32_cast * part  # ... .to(fp32) as the master partition's .grad
        else:
            t["buffers.reduce_bucket"] = bucket * gb * (2 if zero.overlap_comm else 1)
            t["buffers.offload_grad_staging"] = gb * counts.largest_tensor  # temp_grad_buffer_for_gpu_offload
            t["host.param_staging"] = pb * part  # param_buffer_of_bit16_for_cpu_offload_groups
            t["host.grad_staging"] = gb * counts.largest_tensor  # temp_grad_buffer_for_cpu_offload
    else:
        persistent = counts.persistent(int(zero.stage3_param_persistence_threshold))
        t["params.persistent"] = pb * persistent  # small tensors ZeRO-3 never partitions
        t["host.param_partition" if setup.offload_params else "params.partition"] = pb * part
        # grad_partitions_flat_buffer lives on the optimizer's device (the host when offloading).
        t["host.grad_partition" if offload else "grads.partition"] = gb * part
        # Gathered weights: the current module, the prefetch bucket, and modules kept for reuse within
        # stage3_max_reuse_distance; stage3_max_live_parameters bounds the total (at least one module).
        window = int(zero.stage3_max_reuse_distance) + counts.largest_tensor + int(zero.stage3_prefetch_bucket_size)
        gathered = min(p_all, max(counts.largest_tensor, min(int(zero.stage3_max_live_parameters), window)))
        t["buffers.stage3_gathered_params"] = pb * gathered
        t["buffers.stage3_module_grad"] = gb * counts.largest_tensor  # full-size grad before reduce-scatter
        t["buffers.reduce_bucket"] = gb * bucket if (zero.contiguous_gradients or offload) else 0
        if not offload:
            sub = min(part, SUB_GROUP_SIZE)
            t["step.flat_grad_copy"] = gb * sub
            t["step.fp32_grad"] = fp32_cast * sub
    if offload:
        t["host.fp32_master"] = MASTER_BYTES * part
        t["host.adam_moments"] = ADAM_BYTES * part
        t["host.fp32_grads"] = 4 * part  # the master partition's .grad (pinned, allocated at init)
    else:
        t["optimizer.fp32_master"] = MASTER_BYTES * part
        t["optimizer.adam_moments"] = ADAM_BYTES * part
    return t


# Which column an offloaded (host.*) term joins when the ranks themselves run on the host.
HOST_COLUMN = {
    "host.param_partition": "params",
    "host.param_staging": "params",
    "host.grad_partition": "grads",
    "host.fp32_grads": "grads",
    "host.grad_staging": "grads",
    "host.fp32_master": "optimizer",
    "host.adam_moments": "optimizer",
    "host.checkpoint_inputs": "activations",
}


def _assemble(terms: Dict[str, int], topo: Topology) -> MemoryBreakdown:
    def group(name: str) -> int:
        return sum(v for k, v in terms.items() if k.startswith(name + "."))

    host = group("host")
    params, grads, optimizer, activations = group("params"), group("grads"), group("optimizer"), group("activations")
    # Buffers at the peak: backward-time buffers, or the step's temporaries beyond the freed activations.
    buffers = max(group("buffers"), group("step") - activations)
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
