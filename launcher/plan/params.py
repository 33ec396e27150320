"""Exact parameter counts and FLOPs per token of a Llama model, from the config alone (no torch).

Layout of Hugging Face's `LlamaForCausalLM` (no biases: attention_bias = mlp_bias = False):
  embed_tokens            V x h
  per decoder layer       q_proj h x h, k_proj h x kv, v_proj h x kv, o_proj h x h        (kv = n_kv_heads x head_dim)
                          gate_proj h x I, up_proj h x I, down_proj I x h
                          input_layernorm h, post_attention_layernorm h                  (RMSNorm weights)
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

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_width(self) -> int:
        """Width of k and v (GQA: n_kv_heads x head_dim, narrower than hidden)."""
        return self.kv_heads * self.head_dim

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
    h, i, kv, v = shape.hidden, shape.intermediate, shape.kv_width, shape.vocab
    attention = h * h + 2 * h * kv + h * h
    mlp = 3 * h * i
    return ParamCounts(
        embedding=v * h,
        attention_per_layer=attention,
        mlp_per_layer=mlp,
        norms_per_layer=2 * h,
        layers=shape.layers,
        final_norm=h,
        lm_head=0 if shape.tied else v * h,
        largest_tensor=max(v * h, h * i, h * h),
        hidden=h,
    )


def flops_per_token(shape: ModelShape, counts: ParamCounts, seq_len: int) -> float:
    """Model FLOPs per trained token: 6 x (N - embedding) + 12 x L x H x Q x T.

    PaLM (Chowdhery et al. 2022) appendix B, torchtitan's convention: 6 FLOPs per parameter per token
    (forward 2, backward 4) for every matmul weight, the input embedding excluded (a lookup, not a
    matmul; with tied embeddings the same matrix is the lm_head matmul, so nothing is subtracted), plus
    the attention score/value matmuls 12 x layers x heads x head_dim x seq_len. Recompute is not included
    (MFU counts model FLOPs, not hardware FLOPs).
    """
    matmul_params = counts.total - (0 if shape.tied else counts.embedding)
    attention = 12 * shape.layers * shape.heads * shape.head_dim * seq_len
    return float(6 * matmul_params + attention)


def mfu(tokens_per_sec: float, flops_tok: float, gpus: int, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the GPUs' dense peak. The planner and the worker's
    metrics both call this, with flops_per_token above, so a prediction and a measurement compare directly.
    None without a peak (CPU ranks)."""
    if not peak_tflops or gpus <= 0:
        return None
    return tokens_per_sec * flops_tok / (gpus * float(peak_tflops) * 1e12)
