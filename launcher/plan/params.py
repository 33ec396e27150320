"""Exact parameter counts and FLOPs per token of a decoder-only causal LM, from the config alone (no torch).

Layout of Hugging Face's `LlamaForCausalLM` and its relatives (Qwen2/3, Mistral, Gemma 2, Phi-3):
  embed_tokens            V x h
  per decoder layer       q_proj h x q, k_proj h x kv, v_proj h x kv, o_proj q x h   (q = n_heads x head_dim,
                          (+ q, kv, kv biases with attention_bias: Qwen2)             kv = n_kv_heads x head_dim)
                          gate_proj h x I, up_proj h x I, down_proj I x h            (Phi-3 fuses qkv and gate/up:
                                                                                     same counts)
                          input_layernorm h, post_attention_layernorm h               (RMSNorm weights)
                          (+ pre/post_feedforward_layernorm h, h: Gemma 2/3; + q_norm, k_norm head_dim: Qwen3)
  norm (final RMSNorm)    h
  lm_head                 h x V, unless tie_word_embeddings (then it is embed_tokens itself)
Llama-3-8B: embedding 525,336,576, 218,112,000 per layer, 8,030,261,248 in all; 70B: 70,553,706,496.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool
    head_dim_: int = 0  # 0: hidden / heads
    attention_bias: bool = False
    model_type: str = "llama"
    sliding_window: int = 0  # 0: every layer attends to the whole sequence

    @property
    def head_dim(self) -> int:
        return self.head_dim_ or self.hidden // self.heads

    @property
    def q_width(self) -> int:
        """Width of q and of o_proj's input (Gemma 2: 16 heads x 256 = 4096 for hidden 3584)."""
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Width of k and v (GQA: n_kv_heads x head_dim, narrower than hidden)."""
        return self.kv_heads * self.head_dim

    @property
    def norms_per_layer(self) -> int:
        from launcher.config.arch import EXTRA_HIDDEN_NORMS, QK_NORMS

        return (2 + EXTRA_HIDDEN_NORMS.get(self.model_type, 0)) * self.hidden + QK_NORMS.get(
            self.model_type, 0) * self.head_dim

    @classmethod
    def from_cfg(cls, model: DictConfig) -> ModelShape:
        return cls(
            vocab=int(model.vocab_size),
            hidden=int(model.hidden_size),
            intermediate=int(model.intermediate_size),
            layers=int(model.num_hidden_layers),
            heads=int(model.num_attention_heads),
            kv_heads=int(model.num_key_value_heads),
            tied=bool(model.tie_word_embeddings),
            head_dim_=int(model.get("head_dim") or 0),
            attention_bias=bool(model.get("attention_bias", False)),
            model_type=str(model.get("model_type", "llama")),
            sliding_window=int(model.get("sliding_window") or 0),
        )


@dataclass(frozen=True)
class ParamCounts:
    embedding: int
    attention_per_layer: int
    mlp_per_layer: int
    norms_per_layer: int
    layers: int
    final_norm: int
    lm_head: int  # 0 when tied to the embedding
    # The biggest single weight (embedding / lm_head for Llama 3). Every Llama leaf module (a Linear, the
    # embedding) holds one weight, so this is also the most ZeRO-3 gathers for one module at once.
    largest_tensor: int
    hidden: int

    @property
    def per_layer(self) -> int:
        return self.attention_per_layer + self.mlp_per_layer + self.norms_per_layer

    @property
    def total(self) -> int:
        return self.embedding + self.layers * self.per_layer + self.final_norm + self.lm_head

    @property
    def norm_weights(self) -> int:
        """RMSNorm weights (2 per layer + the final one): tiny tensors ZeRO-3 keeps unpartitioned."""
        return self.layers * self.norms_per_layer + self.final_norm

    def persistent(self, threshold: int) -> int:
        """Elements ZeRO-3 keeps whole on every rank: tensors below stage3_param_persistence_threshold."""
        return self.norm_weights if self.hidden < threshold else 0


def count_params(shape: ModelShape) -> ParamCounts:
    h, i, q, kv, v = shape.hidden, shape.intermediate, shape.q_width, shape.kv_width, shape.vocab
    attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if shape.attention_bias else 0)
    mlp = 3 * h * i
    return ParamCounts(
        embedding=v * h,
        attention_per_layer=attention,
        mlp_per_layer=mlp,
        norms_per_layer=shape.norms_per_layer,
        layers=shape.layers,
        final_norm=h,
        lm_head=0 if shape.tied else v * h,
        largest_tensor=max(v * h, h * i, h * q),
        hidden=h,
    )


def flops_per_token(shape: ModelShape, counts: ParamCounts, seq_len: int, trainable: int | None = None) -> float:
    """Model FLOPs per trained token: 6 x (N - embedding) + 12 x L x H x Q x T.

    PaLM (Chowdhery et al. 2022) appendix B, torchtitan's convention: 6 FLOPs per parameter per token
    (forward 2, backward 4) for every matmul weight, the input embedding excluded (a lookup, not a
    matmul; with tied embeddings the same matrix is the lm_head matmul, so nothing is subtracted), plus
    the attention score/value matmuls 12 x layers x heads x head_dim x seq_len. Recompute is not included
    (MFU counts model FLOPs, not hardware FLOPs). Sliding-window layers (Mistral v0.1: all; Gemma 2: every
    other one) attend to at most `sliding_window` tokens, so their T is min(seq_len, window).
    With a frozen base (LoRA, `trainable` = adapter parameters): forward 2 N + activation gradients 2 N +
    weight gradients 2 x trainable only, i.e. 4 x N + 2 x trainable (+ the adapters' own matmuls: 6 each).
    """
    from launcher.config.arch import SLIDING_LAYER_SHARE

    matmul_params = counts.total - (0 if shape.tied else counts.embedding)
    share = SLIDING_LAYER_SHARE.get(shape.model_type, 1.0) if shape.sliding_window else 0.0
    context = share * min(seq_len, shape.sliding_window or seq_len) + (1 - share) * seq_len
    attention = 12 * shape.layers * shape.heads * shape.head_dim * context
    if trainable is not None:
        return float(4 * matmul_params + 6 * trainable + attention)
    return float(6 * matmul_params + attention)


def mfu(tokens_per_sec: float, flops_tok: float, gpus: int, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the GPUs' dense peak. The planner and the worker's
    metrics both call this, with flops_per_token above, so a prediction and a measurement compare directly.
    None without a peak (CPU ranks)."""
    if not peak_tflops or gpus <= 0:
        return None
    return tokens_per_sec * flops_tok / (gpus * float(peak_tflops) * 1e12)
