"""Architecture facts of a Hugging Face causal LM, read from its config.json (no torch, no transformers).

These are what planning and checks need: the shapes (layers, hidden, heads, kv heads, head_dim, intermediate,
vocab), attention biases, tied embeddings, sliding windows, extra norms, and whether the launcher can train
the model at all: a text-only `*ForCausalLM`, without remote code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

from launcher.errors import ConfigError

# RMSNorm/LayerNorm weights per decoder layer beyond input + post-attention (each `hidden` wide), and the
# per-head q/k norms (each head_dim wide). Read in transformers 5.24's modeling files.
EXTRA_HIDDEN_NORMS = {"gemma2": 2, "gemma3_text": 2, "olmo2": 0}
QK_NORMS = {"qwen3": 2, "qwen3_moe": 2, "gemma3_text": 2, "olmo2": 0}
# Share of the decoder layers that use the sliding window when config.json sets one (Gemma 2 alternates
# local and global layers; Gemma 3 has 5 local per global); other families apply it to every layer.
SLIDING_LAYER_SHARE = {"gemma2": 0.5, "gemma3_text": 5 / 6}
# Families transformers 5.24 refuses to run with sdpa (Gemma 2's attention logit soft-capping).
NO_SDPA = {"gemma2"}
# model_type -> attention biases on q/k/v when config.json does not say (Qwen2 has them, without a key).
QKV_BIAS_BY_TYPE = {"qwen2": True}


@dataclass(frozen=True)
class Arch:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: Optional[int]
    rope_theta: Optional[float]
    rms_norm_eps: Optional[float]

    def as_model_keys(self) -> Dict[str, Any]:
        """The launcher's model.* keys these facts set."""
        keys = dict(self.__dict__)
        keys.pop("rope_theta")
        keys.pop("rms_norm_eps")
        if self.rope_theta is not None:
            keys["rope_theta"] = float(self.rope_theta)
        if self.rms_norm_eps is not None:
            keys["rms_norm_eps"] = float(self.rms_norm_eps)
        return keys


def read_config(model_path: str) -> Dict[str, Any]:
    path = os.path.join(model_path, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError("model.path", f"cannot read {path}: {exc}") from None


def check_trainable(hf: Dict[str, Any], model_path: str) -> None:
    """Refuse what the launcher cannot train, with the reason."""
    if hf.get("auto_map"):
        raise ConfigError(
            "model.path",
            f"{model_path} needs trust_remote_code (config.json has auto_map); remote-code models (ChatGLM, "
            "InternLM2, Baichuan, ...) are not supported: their own checkpointing hooks ignore the launcher's "
            "activation-checkpoint function. Use a checkpoint converted to a transformers architecture",
        )
    archs = hf.get("architectures") or []
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise ConfigError(
            "model.path",
            f"{model_path} is a {archs[0]}, not a text-only *ForCausalLM; multimodal and other heads are not "
            "supported (for Gemma 3, use a text-only checkpoint such as gemma-3-1b)",
        )
    if "text_config" in hf and "num_hidden_layers" not in hf:
        raise ConfigError("model.path", f"{model_path} nests its language model in text_config (a multimodal "
                                        "wrapper); give a text-only causal LM")


def from_hf(hf: Dict[str, Any]) -> Arch:
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    model_type = str(hf.get("model_type", "llama"))
    theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    return Arch(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_hidden_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", QKV_BIAS_BY_TYPE.get(model_type, False))),
        sliding_window=int(window) if window else None,
        rope_theta=float(theta) if theta is not None else None,
        rms_norm_eps=hf.get("rms_norm_eps"),
    )


def adopt(cfg: Any) -> None:
    """With model.path, the model.* architecture keys come from its config.json."""
    if cfg.model.path is None or not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        return
    hf = read_config(cfg.model.path)
    check_trainable(hf, cfg.model.path)
    try:
        arch = from_hf(hf)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError("model.path", f"config.json lacks or mangles {exc}; not a decoder-only LM config") from None
    for key, value in arch.as_model_keys().items():
        cfg.model[key] = value
    if arch.model_type in NO_SDPA and cfg.model.attn_implementation == "sdpa":
        raise ConfigError("model.attn_implementation", f"{arch.model_type} has no sdpa attention in transformers "
                                                       "(logit soft-capping); set model.attn_implementation=eager "
                                                       "(or flash_attention_2 on GPUs)")
