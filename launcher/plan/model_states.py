"""Model states and ZeRO's gradient/reduction buffers per rank, term by term, in bytes (no torch, no deepspeed).

The ZeRO paper's (p + g + K) Psi (Rajbhandari et al. 2020, section 5) plus what DeepSpeed 0.19 actually
allocates, read in runtime/zero/stage_1_and_2.py and stage3.py (see the comments per term) and measured per
training phase on CPU ranks (bench/rss_phases.py). launcher.plan.memory adds activations and overhead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig

from launcher.config.topology import Topology
from launcher.plan.params import ParamCounts

# fp32 Adam: master copy of the weights (DeepSpeed clones it even when the model is fp32) + m + v.
MASTER_BYTES = 4
ADAM_BYTES = 8
# DeepSpeed's default ZeRO-3 sub_group_size (elements); the step's fp32 gradient exists per sub-group.
SUB_GROUP_SIZE = 1_000_000_000


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
    def from_cfg(cls, cfg: DictConfig) -> Setup:
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


def model_state_terms(cfg: DictConfig, topo: Topology, setup: Setup, counts: ParamCounts, prec: Precision,
                      accum: int = 1) -> dict[str, int]:
    """Model states ("params."/"grads."/"optimizer."), backward-time buffers ("buffers."), what exists
    during the optimizer step besides the model states ("step."), and offloaded state ("host.")."""
    if setup.zero_stage not in (1, 2, 3):
        raise ValueError(f"ZeRO stage {setup.zero_stage} is not planned (1, 2 or 3); resolve zero=auto first")
    zero = cfg.zero
    p_all, n = counts.total, topo.world_size
    part = math.ceil(p_all / n)  # this rank's partition (DeepSpeed's alignment padding is negligible)
    pb, gb = prec.param, prec.grad
    offload = setup.offload == "cpu"
    on_cpu = topo.accelerator == "cpu"
    contiguous = bool(zero.contiguous_gradients) or offload  # DeepSpeed forces it with offload
    # The fp32 gradient partition for the step: a cast copy, except in fp32 where .to() is a no-op.
    fp32_cast = 0 if gb == 4 else 4
    # Without offload on CPU ranks the launcher picks torch's AdamW (torch_adam): its single-tensor path
    # allocates sqrt(v) and sqrt(v)/bias_correction (2 fp32 partitions). GPU FusedAdam and
    # DeepSpeedCPUAdam update in place.
    adam_temps = 2 * 4 if on_cpu and not offload else 0
    t: dict[str, int] = {}
    if setup.zero_stage in (1, 2):
        t["params.model"] = pb * p_all  # bit16_groups_flat: every rank holds all weights
        # ipg reduce buckets (torch.empty, reduce_bucket_size elements): 2 with overlap_comm (double
        # buffering), 1 without. A GPU's caching allocator reserves them whole; on CPU only the pages the
        # gradients are copied into count, at most the model's size.
        buckets = 2 if zero.overlap_comm else 1
        n_bucket = int(zero.reduce_bucket_size)
        bucket_elems = min(p_all, buckets * n_bucket) if on_cpu else buckets * n_bucket
        # On CPU ranks the buckets and grads_in_partition are re-created (torch.empty) every backward and
        # released at its end (_release_ipg_buffers); their pages are first touched as gradients arrive,
        # while the activations are being freed, so they peak at the end of backward, not with the
        # activations ("bwdend.", measured: bench/planner_accuracy.py). A GPU's caching allocator keeps
        # them reserved: they add to the activations there.
        late = "bwdend" if on_cpu else "buffers"
        grads_full = setup.zero_stage == 1 and (accum > 1 or not contiguous)
        # ZeRO-1 reduces only at the accumulation boundary: param.grad stays whole on every rank across the
        # other micro-steps; on the boundary, with contiguous_gradients, each grad is moved into the bucket
        # and aliases it, so on CPU ranks the bucket adds no pages of its own (measured with and without
        # CPU offload: seed-13 point h09, seed-29 point p15 of bench/planner_grid.py).
        t[f"{late}.reduce_buckets"] = gb * bucket_elems if contiguous and not (grads_full and on_cpu) else 0
        if grads_full and on_cpu:
            # Whole gradients until step(), which first frees those outside this rank's partition
            # (free_grad_in_param_list(params_not_in_partition); measured: seed-29 point p15). A GPU's
            # caching allocator keeps those blocks reserved, and Adam's partition-sized temporaries need not
            # fit in them: there the whole gradients stay a model state (ZeRO paper).
            t["grads.full_in_partition"] = gb * part
            t["buffers.full_grads_outside_partition"] = gb * (p_all - part)
            t["bwdend.full_grads_outside_partition"] = gb * (p_all - part)
        elif grads_full:
            t["grads.full"] = gb * p_all
        if accum > 1 and setup.zero_stage == 2 and not offload:
            # ZeRO-2 reduces every micro-step; between micro-steps the reduced partition stays alive
            # (all_grad_tensors holds views of that backward's grads_in_partition) and the next backward adds
            # its own partition into it: one more partition through forward and backward of micro-steps 2..k,
            # gone by the optimizer step (measured: seed-29 points p02, p11, p12).
            t["buffers.accumulated_partition"] = gb * part
            if on_cpu:
                t["bwdend.accumulated_partition"] = gb * part
        if accum > 1 and offload and setup.zero_stage == 2:
            # async_accumulate_grad_in_cpu_via_gpu: a host buffer per parameter of this rank's partition
            # (accumulated_grads_in_cpu, whole parameters in the training dtype), created on the first
            # reduction and kept for the rest of the run.
            t["host.accumulated_grads"] = gb * part
        if offload:
            # The reduction at the end of backward (average_tensor -> allreduce_and_scatter -> allreduce_bucket)
            # all-reduces a flattened copy of the bucket's gradients, up to reduce_bucket_size elements at a
            # time, next to the bucket (measured on CPU ranks with offload: +1.0 x the bucket, h04/h09).
            t[f"{late}.reduce_flatten"] = gb * min(p_all, n_bucket)
        if not offload:
            t["bwdend.grad_partition" if on_cpu else "grads.partition"] = gb * part  # contiguous grads_in_partition
            # End of backward: averaged_gradients, a fresh flat copy of the partition, is built before the
            # buckets and grads_in_partition are released; in step() it replaces grads_in_partition.
            t[f"{late}.flat_grad_partition"] = gb * part
            if on_cpu:
                # step(): the master partition's .grad is the flat partition cast to fp32; in fp32 the cast is a
                # no-op and the flat copy itself is the grad. A 16-bit flat copy is dropped after the cast,
                # before Adam's temporaries (measured: bf16 ZeRO-1/2 points p10/p11 of the seed-29 grid).
                t["step.fp32_grad"] = 4 * part
            else:
                t["step.fp32_grad"] = fp32_cast * part  # .to(fp32) as the master partition's .grad
            t["step.adam_temporaries"] = adam_temps * part
        else:
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
        # One ipg bucket per dtype, allocated once and kept (so it is there during the step too).
        bucket = gb * (min(int(zero.reduce_bucket_size), p_all) if on_cpu else int(zero.reduce_bucket_size))
        t["buffers.reduce_bucket"] = bucket if contiguous else 0
        t["step.reduce_bucket"] = t["buffers.reduce_bucket"]
        # The reduction (__avg_scatter_grads -> reduce_scatter_coalesced) concatenates the bucket's gradients
        # into one padded flat copy, up to reduce_bucket_size elements. On CPU ranks it runs once, at the end
        # of backward (the bucket holds the whole model), and gloo's reduce_scatter_tensor makes one more
        # copy of its input (NCCL does not): measured +1.0 x and +2.0 x the bucket (bench/planner_accuracy.py,
        # held-out point h06; a 2-process gloo reduce-scatter of 256 MiB peaks 1 x input + output higher).
        flat = gb * min(int(zero.reduce_bucket_size), p_all)
        if on_cpu:
            t["bwdend.reduce_bucket"] = t["buffers.reduce_bucket"]
            t["bwdend.stage3_module_grad"] = t["buffers.stage3_module_grad"]
            t["bwdend.reduce_flat_copy"] = flat
            t["bwdend.gloo_reduce_scatter_copy"] = flat
        else:
            t["buffers.reduce_flat_copy"] = flat
        if not offload:
            # Per sub-group: flatten(averaged_gradients) copy, then its fp32 cast as the master's .grad.
            sub = min(part, SUB_GROUP_SIZE)
            t["step.flat_grad_copy"] = gb * sub
            t["step.fp32_grad"] = fp32_cast * sub
            t["step.adam_temporaries"] = adam_temps * sub
    if offload:
        t["host.fp32_master"] = MASTER_BYTES * part
        t["host.adam_moments"] = ADAM_BYTES * part
        t["host.fp32_grads"] = 4 * part  # the master partition's .grad (pinned, allocated at init)
    else:
        t["optimizer.fp32_master"] = MASTER_BYTES * part
        t["optimizer.adam_moments"] = ADAM_BYTES * part
    return t
