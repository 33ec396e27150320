"""Which attention implementation the ranks load (no torch): one rule for the worker (launcher.worker.attention,
which registers the implementation) and the planner (launcher.plan.activations, which counts its memory)."""

from __future__ import annotations

PACKED_SDPA = "packed_sdpa"


def resolve(requested: str, device_type: str, precision: str) -> str:
    """The implementation a rank loads: `sdpa` on fp32 CPU ranks runs record by record (same result, less work).

    Not in bf16/fp16: torch's CPU flash-attention kernel for reduced precision JIT-builds and keeps a kernel
    per distinct shape, and records come in every length, so a rank's RSS grew by 50-90 MB per training
    iteration without levelling off (2-layer Llama, seq 2048, records of 20-300 tokens: 518 -> 1,097 MB after
    12 iterations, against a flat 426 MB for the masked kernel and a flat 473 MB for fp32 per record).
    Not on GPUs: cutting a row at its records needs the positions on the host (a device sync per forward);
    flash_attention_2 is the GPU answer."""
    if requested == "sdpa" and device_type == "cpu" and precision == "fp32":
        return PACKED_SDPA
    return requested
