"""Step time, tokens/s and MFU of one setup from the hardware profile (no torch, no deepspeed).

step_time = compute + exposed ZeRO communication + CPU-offload optimizer step, per optimizer step:
- compute: model FLOPs (launcher.plan.params.flops_per_token) x recompute factor, at ACHIEVABLE_FRACTION
  of the profile's dense peak (hardware.peak_tflops; x FP32_PEAK_RATIO for precision=fp32);
- communication: the bytes each rank moves in ZeRO's collectives (ring algorithms move (N-1)/N of the
  buffer per rank) over the slowest link a rank uses, derated by the efficiencies below; overlap_comm
  hides OVERLAP of it behind compute;
- offload: the host Adam step (memory-bound) and the PCIe copies of gradients and weights.
Without peak_tflops (hardware=local) every figure is None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig

from launcher.config.topology import Topology
from launcher.plan import lora
from launcher.plan.activations import checkpointed_layers
from launcher.plan.model_states import Setup, precision_bytes
from launcher.plan.params import ModelShape, count_params, flops_per_token, mfu

# Fraction of dense peak that the matmul-bound compute reaches (torchtitan reports 57% MFU for
# Llama-3-8B on A100s; DeepSpeed ZeRO-3 7B runs report ~40% all-in).
ACHIEVABLE_FRACTION = 0.55
# precision=fp32: matmuls run at the GPU's FP32 rate, not the bf16 tensor-core peak the profile gives
# (A100 19.5 vs 312, H100 SXM 67 vs 989 TFLOP/s: ~1/16; PyTorch leaves TF32 off for matmuls by default).
FP32_PEAK_RATIO = 1 / 16
# hardware.intra_node_gbps is NVLink's bidirectional figure (A100 600 GB/s); NCCL's achieved bus
# bandwidth is about 230-250 GB/s on DGX A100, i.e. ~0.4 of it.
INTRA_NODE_EFFICIENCY = 0.4
# hardware.inter_node_gbps is the node's one-way network bandwidth (8 x 200 Gb/s = 200 GB/s); ~80% is reached.
INTER_NODE_EFFICIENCY = 0.8
# Share of ZeRO's communication hidden behind compute with zero.overlap_comm=true.
OVERLAP = 0.5
# Host memory bandwidth one node's CPU Adam reaches (GB/s): DeepSpeedCPUAdam is memory-bound.
HOST_ADAM_GBPS = 100.0
# Bytes CPU Adam moves per parameter: read fp32 weight, grad, m, v (16); write weight, m, v (12);
# write the 16-bit weight copy sent back to the GPU (2).
HOST_ADAM_BYTES_PER_PARAM = 30
# PCIe gen4 x16 per GPU, achieved GB/s, for gradients to the host and weights back.
PCIE_GBPS = 20.0


@dataclass(frozen=True)
class StepEstimate:
    step_time_s: float | None
    tokens_per_s: float | None
    mfu: float | None
    compute_s: float | None
    comm_s: float | None  # exposed (not overlapped) communication
    offload_s: float | None
    tokens_per_step: int


NO_ESTIMATE = {"step_time_s": None, "tokens_per_s": None, "mfu": None, "compute_s": None, "comm_s": None,
               "offload_s": None}


def rank_bandwidth_gbps(cfg: DictConfig, topo: Topology) -> float | None:
    """Achieved GB/s per rank of a ring collective: NVLink inside a node; across nodes NCCL runs one ring
    per NIC, and a node boundary carries one rank's worth of ring traffic in all, so the node's network
    bandwidth (not a per-GPU share of it) bounds the ring. The slower of the two wins."""
    hw = cfg.hardware
    if hw.intra_node_gbps is None:
        return None
    intra = float(hw.intra_node_gbps) * INTRA_NODE_EFFICIENCY
    if topo.nodes == 1:
        return intra
    if hw.inter_node_gbps is None:
        return None
    return min(intra, float(hw.inter_node_gbps) * INTER_NODE_EFFICIENCY)


def comm_bytes_per_rank(stage: int, params: int, param_bytes: int, grad_bytes: int, world: int,
                        accum: int) -> float:
    """Bytes a rank sends per optimizer step (ZeRO paper section 7: stage 1/2 = 2 Psi, stage 3 = 3 Psi).

    stage 1: one gradient reduce-scatter at the accumulation boundary + the weight all-gather after step;
    stage 2: a gradient reduce-scatter every micro-step (gradients are partitioned as they are produced)
             + the weight all-gather after the step;
    stage 3: per micro-step, weights all-gathered in forward and again in backward + the gradient
             reduce-scatter.
    """
    if world <= 1:
        return 0.0
    ring = (world - 1) / world
    grads, weights = params * grad_bytes, params * param_bytes
    if stage == 1:
        volume = grads + weights
    elif stage == 2:
        volume = accum * grads + weights
    else:
        volume = accum * (2 * weights + grads)
    return volume * ring


def estimate_step(cfg: DictConfig, topo: Topology, setup: Setup, accum: int,
                  micro_batch_size: int | None = None) -> StepEstimate:
    shape = ModelShape.from_cfg(cfg.model)
    counts = count_params(shape)
    micro = int(cfg.train.micro_batch_size if micro_batch_size is None else micro_batch_size)
    seq = int(cfg.train.seq_len)
    tokens_per_rank = micro * accum * seq
    tokens_per_step = tokens_per_rank * topo.world_size
    peak = cfg.hardware.peak_tflops
    if peak is None or topo.accelerator != "cuda":
        return StepEstimate(**NO_ESTIMATE, tokens_per_step=tokens_per_step)
    adapters = lora.adapter_counts(cfg, shape)
    model_flops = flops_per_token(shape, counts, seq, adapters.total if adapters else None)
    # Recomputing a checkpointed layer repeats its forward: +1/3 of its 6-FLOPs-per-parameter cost.
    recomputed = checkpointed_layers(shape.layers, setup.ac_every) / shape.layers
    prec = precision_bytes(str(cfg.precision.name))
    rate = float(peak) * 1e12 * ACHIEVABLE_FRACTION * (FP32_PEAK_RATIO if prec.param == 4 else 1.0)
    compute_s = tokens_per_rank * model_flops * (1 + recomputed / 3) / rate

    volume = comm_bytes_per_rank(setup.zero_stage, (adapters or counts).total, prec.param, prec.grad,
                                 topo.world_size, accum)
    if adapters is not None and setup.zero_stage == 3:  # the frozen base is still gathered, twice per micro-step
        volume += accum * 2 * counts.total * prec.param * (topo.world_size - 1) / topo.world_size
    bandwidth = rank_bandwidth_gbps(cfg, topo)
    if volume and bandwidth is None:
        return StepEstimate(**NO_ESTIMATE, tokens_per_step=tokens_per_step)
    comm_s = volume / (bandwidth * 1e9) if volume else 0.0
    comm_s *= 1 - (OVERLAP if cfg.zero.overlap_comm else 0.0)

    offload_s = 0.0
    if setup.offload == "cpu":
        part = math.ceil((adapters or counts).total / topo.world_size)
        adam = part * topo.ranks_per_node * HOST_ADAM_BYTES_PER_PARAM / (HOST_ADAM_GBPS * 1e9)
        pcie_bytes = part * (accum * prec.grad + prec.param)
        if setup.offload_params:
            pcie_bytes += part * prec.param * 2 * accum  # partitions fetched for forward and backward
        offload_s = adam + pcie_bytes / (PCIE_GBPS * 1e9)

    step = compute_s + comm_s + offload_s
    tokens_per_s = tokens_per_step / step
    achieved = mfu(tokens_per_s, model_flops, topo.world_size, peak)
    return StepEstimate(step, tokens_per_s, achieved, compute_s, comm_s, offload_s, tokens_per_step)
