"""Launch-time checks of `adapter=lora` (pure, no torch/peft): the values, QLoRA refused, target modules
against the linear layer names of the model's architecture, tied embeddings with a trained embedding/lm_head.

The ranks check target_modules again against the modules the loaded model really has
(launcher.worker.adapters.lora), so architectures missing from DECODER_LINEARS are still checked before step 1.
"""

from __future__ import annotations

from typing import Dict, Tuple

from omegaconf import DictConfig

from launcher.errors import ConfigError

ALL_LINEAR = "all-linear"
_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# model_type -> names of the linear layers inside a decoder layer (read in transformers 5.24's modeling files).
DECODER_LINEARS: Dict[str, Tuple[str, ...]] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2")},
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}
# Outside the decoder layers; adaptable when named explicitly.
OUTER_LINEARS = ("lm_head",)
BIAS = ("none", "all", "lora_only")


def check_adapter(cfg: DictConfig) -> None:
    a = cfg.adapter
    if a.name == "none":
        return
    if a.name != "lora":
        raise ConfigError("adapter", f"no adapter '{a.name}'; use adapter=none or adapter=lora")
    if a.load_in_4bit or a.load_in_8bit:
        bits = "load_in_4bit" if a.load_in_4bit else "load_in_8bit"
        raise ConfigError(f"adapter.{bits}", "QLoRA (a 4-/8-bit base) is not supported (it needs bitsandbytes on a "
                                             f"GPU); set adapter.{bits}=false to train LoRA on a 16-bit base")
    if a.r < 1:
        raise ConfigError("adapter.r", f"{a.r} must be >= 1 (the adapter rank, e.g. adapter.r=16)")
    if a.alpha <= 0:
        raise ConfigError("adapter.alpha", f"{a.alpha} must be > 0 (scale = alpha / r, e.g. adapter.alpha=32)")
    if not 0.0 <= a.dropout < 1.0:
        raise ConfigError("adapter.dropout", f"{a.dropout} must be in [0, 1), e.g. adapter.dropout=0.05")
    if a.bias not in BIAS:
        raise ConfigError("adapter.bias", f"'{a.bias}' is not one of {', '.join(BIAS)}")
    _check_targets(cfg)
    _check_tied(cfg)


def _check_targets(cfg: DictConfig) -> None:
    targets = list(cfg.adapter.target_modules)
    if not targets:
        raise ConfigError("adapter.target_modules", f"is empty; name modules or use [{ALL_LINEAR}]")
    if ALL_LINEAR in targets and len(targets) > 1:
        raise ConfigError("adapter.target_modules", f"{ALL_LINEAR} already covers every linear layer; use it alone")
    known = DECODER_LINEARS.get(str(cfg.model.model_type))
    if known is None or targets == [ALL_LINEAR]:
        return  # checked on the ranks against the loaded model's modules
    unknown = [t for t in targets if t not in known + OUTER_LINEARS]
    if unknown:
        raise ConfigError("adapter.target_modules", f"{', '.join(unknown)} matches no module of "
                          f"{cfg.model.model_type}; its linear layers are {', '.join(known + OUTER_LINEARS)} "
                          f"(or [{ALL_LINEAR}])")


def _check_tied(cfg: DictConfig) -> None:
    if not cfg.model.tie_word_embeddings:
        return
    trained = [m for m in list(cfg.adapter.modules_to_save) + list(cfg.adapter.target_modules)
               if m in ("embed_tokens", "lm_head")]
    if trained:
        other = "lm_head" if trained[0] == "embed_tokens" else "input embedding"
        raise ConfigError("adapter.modules_to_save", f"{trained[0]} is tied to the {other} in this model "
                          "(tie_word_embeddings); training one copy would untie them: leave it out of "
                          "adapter.modules_to_save and adapter.target_modules")
