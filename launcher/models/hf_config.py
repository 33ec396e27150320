"""The launcher's model config -> a transformers config (built without weights: plans, exports, the ranks)."""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig

# HF Llama's initializer_range; the ranks initialise every matrix from normal(0, INIT_STD).
INIT_STD = 0.02


def llama_config(model_cfg: Any) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=model_cfg.vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_hidden_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_key_value_heads=model_cfg.num_key_value_heads,
        max_position_embeddings=model_cfg.max_position_embeddings,
        rope_theta=model_cfg.rope_theta,
        rms_norm_eps=model_cfg.rms_norm_eps,
        tie_word_embeddings=model_cfg.tie_word_embeddings,
        initializer_range=INIT_STD,
        attn_implementation=model_cfg.attn_implementation,
        use_cache=False,
        bos_token_id=256,
        eos_token_id=257,
        # No pad_token_id: it would give the embedding a padding_idx that HF zeroes at construction, which
        # fails on the empty partitions zero.Init creates (packed sequences never pad anyway).
    )
