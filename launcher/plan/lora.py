"""What a LoRA run (adapter=lora) changes in the plan (no torch, no peft).

- The frozen base is held at its dtype's bytes per parameter (2 in bf16/fp16, 4 in fp32), with no gradient
  and no optimizer state: whole on every rank under ZeRO-1/2, partitioned only under ZeRO-3.
- The adapters are what trains: gradients, fp32 master and Adam moments, buckets and step temporaries follow
  the full-training formulas with the adapter parameter count (ParamCounts of the adapters).
- Activations: each adapted linear also saves lora_A's output (tokens x r) for lora_B's gradient, and with
  dropout > 0 its dropped-out input (tokens x in features).
- FLOPs per token: 4 x N' + 2 x N_trainable + attention (launcher.plan.params.flops_per_token).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

from omegaconf import DictConfig

from launcher.plan.params import ModelShape, ParamCounts

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
MLP = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_lora(cfg: DictConfig) -> bool:
    adapter = cfg.get("adapter")
    return adapter is not None and str(adapter.name) == "lora"


def _features(shape: ModelShape) -> Dict[str, Tuple[int, int]]:
    """(in, out) features of each linear layer name (Llama naming; Phi-3's fused ones too)."""
    h, q, kv, i = shape.hidden, shape.q_width, shape.kv_width, shape.intermediate
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "qkv_proj": (h, q + 2 * kv),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h), "gate_up_proj": (h, 2 * i),
            "lm_head": (h, shape.vocab)}


def targets(cfg: DictConfig) -> Tuple[str, ...]:
    names = tuple(str(t) for t in cfg.adapter.target_modules)
    return ALL_LINEAR if names == ("all-linear",) else names


def adapter_counts(cfg: DictConfig, shape: ModelShape) -> Optional[ParamCounts]:
    """The trainable parameters of a LoRA run, as ParamCounts (None: not a LoRA run).
    r x (in + out) per adapted linear (lora_A: r x in, lora_B: out x r); modules_to_save train whole."""
    if not is_lora(cfg):
        return None
    r, feats, names = int(cfg.adapter.r), _features(shape), targets(cfg)
    attention = sum(r * sum(feats[n]) for n in names if n in ATTENTION)
    mlp = sum(r * sum(feats[n]) for n in names if n in MLP)
    lm_head = r * sum(feats["lm_head"]) if "lm_head" in names else 0
    saved = [str(m) for m in cfg.adapter.modules_to_save]
    lm_head += shape.vocab * shape.hidden if "lm_head" in saved else 0
    embedding = shape.vocab * shape.hidden if "embed_tokens" in saved else 0
    largest = max([r * max(feats[n]) for n in names if n in feats] + [lm_head, embedding, 1])
    return ParamCounts(embedding=embedding, attention_per_layer=attention, mlp_per_layer=mlp, norms_per_layer=0,
                       layers=shape.layers, final_norm=0, lm_head=lm_head, largest_tensor=largest,
                       hidden=shape.hidden)


def frozen_base_terms(cfg: DictConfig, world: int, zero_stage: int, offload_params: bool, base: ParamCounts,
                      param_bytes: int) -> Dict[str, int]:
    """The frozen base's memory per rank: no gradient, no optimizer state."""
    if zero_stage in (1, 2):
        return {"params.frozen_base": param_bytes * base.total}  # ZeRO-1/2 never partition weights
    z = cfg.zero
    where = "host" if offload_params else "params"
    window = int(z.stage3_max_reuse_distance) + base.largest_tensor + int(z.stage3_prefetch_bucket_size)
    gathered = min(base.total, max(base.largest_tensor, min(int(z.stage3_max_live_parameters), window)))
    return {
        "params.frozen_persistent": param_bytes * base.persistent(int(z.stage3_param_persistence_threshold)),
        f"{where}.frozen_partition": param_bytes * math.ceil(base.total / world),
        # Layers are gathered for forward and for the backward through them, as in full training.
        "buffers.stage3_gathered_params": param_bytes * gathered,
    }


def activation_terms(cfg: DictConfig, shape: ModelShape, layers_kept: int, tokens: int, ab: int) -> Dict[str, int]:
    """Per layer whose activations are held: lora_A outputs (tokens x r each) and, with dropout, inputs."""
    r, feats, names = int(cfg.adapter.r), _features(shape), [n for n in targets(cfg) if n != "lm_head"]
    per_layer = sum(tokens * r * ab for _ in names)
    if float(cfg.adapter.dropout) > 0:
        per_layer += sum(tokens * feats[n][0] * ab for n in names if n in feats)
    return {"activations.lora": layers_kept * per_layer}
