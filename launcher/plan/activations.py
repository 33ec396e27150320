"""Activation memory per rank, in bytes (no torch): what HF's decoder layers save for backward, derived from
their shapes and checked against saved tensors (tests/test_plan.py, tests/test_packing.py), plus the loss's
logits and what activation checkpointing keeps. Used by launcher.plan.memory.estimate_memory."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from launcher.models.attention import PACKED_SDPA, resolve
from launcher.plan.params import ModelShape

# Cross-entropy on the logits (HF ForCausalLMLoss): logits.float() (fp32 copy) -> log_softmax (fp32,
# saved) -> nll_loss. At the start of backward nll_loss's gradient and log_softmax's gradient (both fp32,
# tokens x vocab) exist next to the saved log-softmax: 3 fp32 copies. (Forward peaks lower: the logits,
# their fp32 copy and the log-softmax, 10 B/element in bf16, 8 in fp32.)
LOGITS_FP32_COPIES = 3
# Whether the model output (and its logits, in the model dtype) stays alive through backward. The worker
# keeps only the loss (`loss = engine(input_ids=ids, labels=ids).loss`), so the logits are freed after
# forward; code that keeps `outputs` pays tokens x vocab x dtype bytes more.
LOGITS_HELD = False


def checkpointed_layers(layers: int, every: int) -> int:
    """Layers 0, k, 2k, ... are checkpointed (launcher.render.ds_config.checkpointed_layers does the same)."""
    return 0 if every <= 0 else len(range(0, layers, every))


def rms_norm_bytes(tokens: int, hidden: int, ab: int) -> int:
    """HF LlamaRMSNorm saves: the fp32 input (pow/mul; 4 B), the fp32 1/rms per token (4 B), the
    normalized tensor in the model dtype (for the weight's gradient) and its output weight x normalized
    (a separate tensor, saved by the projections that read it): tokens x (hidden x (4 + 2 ab) + 4)."""
    return tokens * (hidden * (4 + 2 * ab) + 4)


def layer_activation_bytes(shape: ModelShape, micro: int, seq: int, ab: int, packed: str = "") -> int:
    """Bytes one LlamaDecoderLayer saves for backward (HF, SDPA with native GQA, no dropout).

    Per token: 2 RMSNorms (rms_norm_bytes); attention: q after RoPE (h), k and v at GQA width (2 kv),
    SDPA's output (h; the kernels write it token-major, so HF's transpose(1, 2).contiguous() is free and
    o_proj saves the same storage), plus SDPA's fp32 logsumexp per head (RoPE saves only cos/sin, shared
    by all layers);
    SwiGLU MLP: gate output (SiLU input), SiLU output, up output, their product (down_proj input): 4 I.
    No s x s score matrix: SDPA's flash/efficient kernels recompute it in backward.
    """
    t = micro * seq
    h, kv, inter = shape.hidden, shape.kv_width, shape.intermediate
    norms = 2 * rms_norm_bytes(t, h, ab)
    attention = t * ab * (2 * shape.q_width + 2 * kv) + micro * shape.heads * seq * 4
    mlp = 4 * t * ab * inter
    return norms + attention + mlp + packed_attention_bytes(shape, micro, seq, ab, packed)


def packed_attention_bytes(shape: ModelShape, micro: int, seq: int, ab: int, layout: str) -> int:
    """Extra per layer for packed rows (restarting position_ids), by how attention keeps records apart:
    - "masked" (sdpa/eager on GPUs): transformers builds a block-diagonal mask, which each layer saves
      (micro x seq x seq in the activation dtype), and SDPA with a mask cannot take GQA k/v as they are, so
      HF repeats them to every head (k and v saved at q width). Measured on CPU (tests/test_packing.py).
    - "per_record" (sdpa on CPU ranks: launcher/worker/attention.py): no mask and native GQA, but each
      record's SDPA output is saved and their concatenation is a second copy (o_proj's input): + q width.
    - "" (flash attention's varlen path): neither."""
    if layout == "masked":
        return micro * seq * seq * ab + 2 * micro * seq * ab * (shape.q_width - shape.kv_width)
    if layout == "per_record":
        return micro * seq * ab * shape.q_width
    return 0


def attention_layout(cfg: DictConfig, accelerator: str) -> str:
    """How the ranks attend within packed rows (see packed_attention_bytes), by the rule the ranks use
    (launcher.models.attention.resolve)."""
    attn = resolve(str(cfg.model.get("attn_implementation", "sdpa")), accelerator, str(cfg.precision.name))
    if attn.startswith("flash"):
        return ""
    return "per_record" if attn == PACKED_SDPA else "masked"


def activation_terms(shape: ModelShape, setup: Any, micro: int, seq: int, ab: int,
                     packed: str = "") -> dict[str, int]:
    """Activations at the peak (start of backward, or the recompute of the last checkpointed layer)."""
    t = micro * seq
    layer = layer_activation_bytes(shape, micro, seq, ab, packed)
    n_ckpt = checkpointed_layers(shape.layers, setup.ac_every)
    layer_input = t * shape.hidden * ab  # what a checkpoint keeps: the layer's input hidden states
    kept_inputs = 0 if setup.cpu_checkpointing else n_ckpt * layer_input
    held_logits = t * shape.vocab * ab if LOGITS_HELD else 0
    forward_loss = t * shape.vocab * (ab + (4 if ab != 4 else 0) + 4)  # logits, fp32 copy, log-softmax
    loss_peak = held_logits + max(forward_loss, LOGITS_FP32_COPIES * t * shape.vocab * 4)
    # Backward of one layer: its gradients in flight, dominated by the MLP's (tokens x I), measured.
    layer_backward = t * shape.intermediate * ab
    recompute = layer if n_ckpt else 0
    return {
        "activations.layers_saved": (shape.layers - n_ckpt) * layer,
        "activations.checkpoint_inputs": kept_inputs,
        "activations.final_norm": rms_norm_bytes(t, shape.hidden, ab),
        # The loss peak and the recompute of the last checkpointed layer do not overlap in time.
        "activations.logits_or_recompute": max(loss_peak, held_logits + recompute + layer_backward),
    }
