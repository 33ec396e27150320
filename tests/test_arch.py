"""Architecture facts: presets count exactly the parameters of the real HF model class, config.json is
adopted (head_dim, biases, sliding window, tied embeddings), and untrainable checkpoints are refused."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from launcher.config.arch import adopt, from_hf
from launcher.config.schema import LauncherConfig
from launcher.errors import ConfigError
from launcher.plan.params import ModelShape, count_params, flops_per_token

# Published totals (each model card / safetensors index), reproduced by the formula and by HF's classes.
PRESETS = {
    "llama3_8b": 8_030_261_248,
    "llama3_2_3b": 3_212_749_824,
    "qwen2_5_7b": 7_615_616_512,
    "qwen3_8b": 8_190_735_360,
    "mistral_7b": 7_248_023_552,
    "gemma2_9b": 9_241_705_984,
    "phi3_mini": 3_821_079_552,
}


def preset(name):
    from launcher.config.compose import compose

    return compose([f"model={name}"])[0]


def meta_count(model_cfg) -> int:
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.hidden_size,
                  intermediate_size=model_cfg.intermediate_size, num_hidden_layers=model_cfg.num_hidden_layers,
                  num_attention_heads=model_cfg.num_attention_heads,
                  num_key_value_heads=model_cfg.num_key_value_heads,
                  tie_word_embeddings=model_cfg.tie_word_embeddings)
    if model_cfg.head_dim:
        fields["head_dim"] = model_cfg.head_dim
    config = AutoConfig.for_model(model_cfg.model_type, **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_counts_match_the_real_model_class(name):
    model = preset(name).model
    counted = count_params(ModelShape.from_cfg(model)).total
    assert counted == PRESETS[name] == meta_count(model)


def test_gemma2_head_dim_changes_flops_and_shapes():
    shape = ModelShape.from_cfg(preset("gemma2_9b").model)
    assert shape.head_dim == 256 and shape.q_width == 4096 != shape.hidden
    # Attention FLOPs use heads x head_dim (4096), not hidden (3584).
    counts = count_params(shape)
    assert flops_per_token(shape, counts, 1000) == 6 * counts.total + 12 * 42 * 16 * 256 * 1000
    # At 8192 tokens the 21 local layers see only their 4096-token window.
    assert flops_per_token(shape, counts, 8192) == 6 * counts.total + 12 * 42 * 16 * 256 * (4096 + 8192) / 2


def write_config(tmp_path, **hf):
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = OmegaConf.structured(LauncherConfig)
    cfg.model.path = str(tmp_path)
    return cfg


QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=1000, hidden_size=64,
             intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, tie_word_embeddings=True, sliding_window=4096, use_sliding_window=False,
             rope_theta=1e6, rms_norm_eps=1e-6)


def test_config_json_is_adopted(tmp_path):
    cfg = write_config(tmp_path, **QWEN2)
    adopt(cfg)
    m = cfg.model
    assert (m.model_type, m.vocab_size, m.head_dim, m.attention_bias, m.tie_word_embeddings, m.sliding_window,
            m.rope_theta) == ("qwen2", 1000, 16, True, True, None, 1e6)
    gemma = from_hf(dict(QWEN2, model_type="gemma2", head_dim=32, sliding_window=32, use_sliding_window=True))
    assert (gemma.head_dim, gemma.sliding_window, gemma.attention_bias) == (32, 32, False)


@pytest.mark.parametrize("extra,match", [
    ({"auto_map": {"AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}},
     r"model\.path: .* needs trust_remote_code .* not supported: their own checkpointing hooks"),
    ({"architectures": ["Gemma3ForConditionalGeneration"]},
     r"model\.path: .* is a Gemma3ForConditionalGeneration, not a text-only \*ForCausalLM"),
])
def test_untrainable_checkpoints_are_refused(tmp_path, extra, match):
    cfg = write_config(tmp_path, **dict(QWEN2, **extra))
    with pytest.raises(ConfigError, match=match):
        adopt(cfg)


@pytest.mark.parametrize("name,peak,p2p_off", [("1x4090", 165.2, False), ("1x3090", 71, False),
                                               ("1xa10", 125, False), ("8xl40s", 362, False),
                                               ("8x4090", 165.2, True)])
def test_fine_tuning_hardware_profiles(name, peak, p2p_off):
    from launcher.config.compose import compose

    hw = compose([f"hardware={name}"])[0].hardware
    assert hw.peak_tflops == peak and hw.bf16 and hw.gpu_memory_gib <= 48 and hw.host_ram_gib
    assert (hw.nccl_env.get("NCCL_P2P_DISABLE") == "1") == p2p_off


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_family_loads_in_the_training_dtype_with_its_counted_parameters(model_type, tmp_path):
    """A tiny random model of each family saved to disk: config.json adopted by the launcher counts exactly
    the parameters the worker's AutoModelForCausalLM load holds, in bf16, checkpointable."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.worker.model import build_model

    extra = {"head_dim": 32} if model_type in ("qwen3", "gemma2", "gemma3_text") else {}
    config = AutoConfig.for_model(model_type, vocab_size=96, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                  **extra)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path))
    cfg = OmegaConf.structured(LauncherConfig)
    cfg.model.path, cfg.precision.name, cfg.zero.stage = str(tmp_path), "bf16", 2
    if model_type == "gemma2":
        with pytest.raises(ConfigError, match=r"^model\.attn_implementation: gemma2 has no sdpa attention .* "
                                              r"set model\.attn_implementation=eager"):
            adopt(cfg)
        cfg.model.attn_implementation = "eager"
    adopt(cfg)
    model, _ = build_model(cfg, {}, rank=0)
    assert model.config.model_type == model_type and model.supports_gradient_checkpointing
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert count_params(ModelShape.from_cfg(cfg.model)).total == sum(p.numel() for p in model.parameters())
