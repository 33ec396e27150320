"""Memory planner: exact parameter counts, the memory arithmetic (checked against hand calculations),
the CLI's output, pre-flight refusal and zero=auto. Fast: no ranks, no GPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.config.compose import compose
from launcher.config.topology import Topology
from launcher.errors import ConfigError
from launcher.plan import (
    Setup,
    build_plan,
    capacity,
    choose_auto,
    count_params,
    estimate_memory,
    estimate_step,
    flops_per_token,
    preflight,
    read_meminfo_total,
)
from launcher.plan.params import ModelShape
from launcher.plan.perf import ACHIEVABLE_FRACTION

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
A100 = Topology(1, 8, "cuda")
CPU2 = Topology(1, 2, "cpu")
HOST_24G = 24684092 * 1024  # this machine's MemTotal
PSI_8B = 8_030_261_248
PSI_70B = 70_553_706_496
# llama3_8b in bf16 at seq 8192, micro batch 2 on one DGX A100 (the 8xh100 experiment's train shape).
LONG_8B = ["model=llama3_8b", "hardware=8xa100", "precision=bf16", "train.seq_len=8192", "train.micro_batch_size=2"]


def cfg_of(*overrides: str):
    return compose(list(overrides))[0]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.plan", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)


# --- parameter counts ------------------------------------------------------------------------------

def _meta_count(model_cfg) -> int:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size, num_hidden_layers=model_cfg.num_hidden_layers,
        num_attention_heads=model_cfg.num_attention_heads, num_key_value_heads=model_cfg.num_key_value_heads,
        max_position_embeddings=model_cfg.max_position_embeddings, tie_word_embeddings=model_cfg.tie_word_embeddings,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


@pytest.mark.parametrize("overrides", [
    ["model=tiny_llama"],
    ["model=tiny_llama", "model.tie_word_embeddings=true"],
    ["model=llama3_8b"],
    ["model=llama3_70b"],
])
def test_param_count_matches_meta_model(overrides):
    cfg = cfg_of(*overrides)
    assert count_params(ModelShape.from_cfg(cfg.model)).total == _meta_count(cfg.model)


def test_param_counts_match_field_notes():
    c8 = count_params(ModelShape.from_cfg(cfg_of("model=llama3_8b").model))
    assert (c8.total, c8.embedding, c8.lm_head, c8.per_layer) == (PSI_8B, 525_336_576, 525_336_576, 218_112_000)
    c70 = count_params(ModelShape.from_cfg(cfg_of("model=llama3_70b").model))
    assert (c70.total, c70.per_layer) == (PSI_70B, 855_654_400)


def test_flops_per_token_hand_calculation():
    cfg = cfg_of("model=llama3_8b")
    shape = ModelShape.from_cfg(cfg.model)
    # 6 x (N - embedding) + 12 x layers x heads x head_dim x seq
    expected = 6 * (PSI_8B - 525_336_576) + 12 * 32 * 32 * 128 * 8192
    assert flops_per_token(shape, count_params(shape), 8192) == expected


# --- memory arithmetic -----------------------------------------------------------------------------

def _states(cfg, topo, stage, offload="none", accum=1):
    return estimate_memory(cfg, topo, Setup(stage, offload), accum=accum).model_states


def test_model_states_shrink_with_stage():
    cfg = cfg_of(*LONG_8B)
    # With gradient accumulation ZeRO-1 keeps whole gradients, ZeRO-2 a partition, ZeRO-3 also partitions weights.
    s1, s2, s3 = (_states(cfg, A100, stage, accum=4) for stage in (1, 2, 3))
    assert s3 < s2 < s1
    # Without accumulation DeepSpeed's ZeRO-1 moves each gradient into the reduce bucket as ZeRO-2 does.
    assert _states(cfg, A100, 1) == _states(cfg, A100, 2)
    # World size 1: nothing to partition.
    one = Topology(1, 1, "cuda")
    assert _states(cfg, one, 3) == pytest.approx(_states(cfg, one, 2), rel=0.01)


def test_model_states_hand_calculation_bf16():
    cfg = cfg_of(*LONG_8B)
    part = PSI_8B / 8
    # ZeRO-2: 2-byte weights everywhere, 2-byte grads and 12-byte Adam state (fp32 master + m + v) partitioned.
    assert _states(cfg, A100, 2) == pytest.approx(2 * PSI_8B + (2 + 12) * part, rel=1e-6)
    # ZeRO-1 with accumulation: + the whole 2-byte gradients.
    assert _states(cfg, A100, 1, accum=4) == pytest.approx(2 * PSI_8B + 2 * PSI_8B + (2 + 12) * part, rel=1e-6)
    # ZeRO-3: everything partitioned, plus the RMSNorm weights (65 x 4096, below the persistence threshold).
    assert _states(cfg, A100, 3) == pytest.approx((2 + 2 + 12) * part + 2 * 65 * 4096, rel=1e-6)
    # CPU offload: the optimizer state leaves the GPU.
    assert _states(cfg, A100, 2, "cpu") == pytest.approx(2 * PSI_8B, rel=1e-6)


def test_fp32_optimizer_keeps_master_copy():
    cfg = cfg_of("model=llama3_8b", "hardware=8xa100", "precision=fp32")
    m = estimate_memory(cfg, A100, Setup(2))
    # fp32: 4 B weights + 4 B grads (ZeRO paper) + 8 B Adam m/v, and DeepSpeed's fp32 master clone (4 B).
    assert m.optimizer == pytest.approx((8 + 4) * PSI_8B / 8, rel=1e-6)
    assert m.params == 4 * PSI_8B


def test_activations_hand_calculation_llama3_8b():
    cfg = cfg_of(*LONG_8B)
    tokens = 2 * 8192
    h, kv, inter, vocab = 4096, 1024, 14336, 128256
    norm = h * (4 + 2 + 2) + 4  # RMSNorm: fp32 input, bf16 normalized, bf16 output, fp32 1/rms
    per_token_layer = (2 * norm
                       + 2 * (h + 2 * kv + h)  # q, k, v (GQA width), SDPA output (= o_proj input)
                       + 4 * 2 * inter  # SwiGLU: gate, up, silu(gate), product
                       + 32 * 4)  # fp32 logsumexp per head
    layers = 32 * tokens * per_token_layer
    logits = tokens * vocab * 3 * 4  # 3 fp32 tensors in the loss's backward (log-softmax, 2 gradients)
    # Packed rows under sdpa: each layer saves the block-diagonal mask (micro x s x s, bf16) and k/v
    # repeated to all 32 heads (+2 x (h - kv) per token); flash attention (varlen) needs neither.
    packed = 32 * (2 * 8192 * 8192 * 2 + tokens * 2 * 2 * (h - kv))
    m = estimate_memory(cfg, A100, Setup(1))
    assert m.activations == layers + packed + tokens * norm + logits
    flash = estimate_memory(cfg_of(*LONG_8B, "model.attn_implementation=flash_attention_2"), A100, Setup(1))
    assert flash.activations == layers + tokens * norm + logits
    assert layers > 79 * GIB  # the layers alone overflow an 80 GB A100, so no stage fits without checkpointing
    full = estimate_memory(cfg, A100, Setup(1, ac_every=1))
    # Full checkpointing keeps 32 layer inputs (bf16) and the loss peak (larger than one recomputed layer).
    assert full.activations == 32 * tokens * h * 2 + tokens * norm + logits


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_saved_activations_match_a_real_forward(dtype_name):
    """What HF's Llama saves for backward (saved-tensor hooks, deduplicated by storage) equals the
    per-layer formula + final norm + the saved fp32 log-softmax, up to RoPE's shared cos/sin."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from launcher.plan.activations import layer_activation_bytes, rms_norm_bytes
    from launcher.plan.model_states import precision_bytes

    vocab, hidden, inter, layers, heads, kv_heads, seq, micro = 320, 128, 352, 4, 4, 2, 64, 2
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=seq,
        attn_implementation="sdpa")
    dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
    model = transformers.LlamaForCausalLM(config).to(dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if t.is_floating_point() and storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, vocab, (micro, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    ab = precision_bytes(dtype_name).activation
    shape = ModelShape(vocab, hidden, inter, layers, heads, kv_heads, False)
    tokens = micro * seq
    predicted = layers * layer_activation_bytes(shape, micro, seq, ab) + rms_norm_bytes(tokens, hidden, ab) \
        + tokens * vocab * 4
    assert predicted == pytest.approx(sum(saved.values()), rel=0.01)


def test_checkpointing_lowers_activations_monotonically():
    cfg = cfg_of(*LONG_8B)
    acts = [estimate_memory(cfg, A100, Setup(2, ac_every=k)).activations for k in (0, 32, 8, 2, 1)]
    assert acts == sorted(acts, reverse=True) and acts[0] > acts[-1]


def test_long_sequence_candidates_on_8xa100():
    rows = {(r.setup.zero_stage, r.setup.offload, r.setup.ac_every): r
            for r in build_plan(cfg_of(*LONG_8B), A100).candidates}
    assert len(rows) == 12
    for stage in (1, 2, 3):
        for offload in ("none", "cpu"):
            assert rows[(stage, offload, 0)].fits is False  # activations > 79 GiB (see the hand calculation)
    assert rows[(2, "none", 1)].fits and rows[(3, "none", 1)].fits
    # Offload: host RAM per node = 8 ranks x (fp32 master 4 + Adam 8 + fp32 grad 4 + bf16 staging 2) x Psi/8
    # + 8 x the 2-byte staging buffer of the largest tensor (the embedding).
    host = rows[(2, "cpu", 1)].host_per_node
    assert host == pytest.approx(18 * PSI_8B + 8 * 2 * 525_336_576, rel=1e-6)
    assert rows[(2, "none", 1)].host_per_node == 0


def test_cpu_ranks_count_offload_in_rank_memory():
    cfg = cfg_of("model=tiny_llama", "zero=stage2", "offload=cpu")
    m = estimate_memory(cfg, CPU2, Setup(2, "cpu"))
    part = math.ceil(820_352 / 2)
    # On CPU ranks the "offloaded" fp32 master and Adam m/v stay in the rank's own (host) memory.
    assert m.optimizer == m.terms["host.fp32_master"] + m.terms["host.adam_moments"] == 12 * part
    on_gpu = estimate_memory(cfg, Topology(1, 2, "cuda"), Setup(2, "cpu"))
    assert on_gpu.optimizer == 0 and on_gpu.host_offload_per_rank >= 16 * part


# --- step time -----------------------------------------------------------------------------------

def test_step_time_compute_hand_calculation():
    cfg = cfg_of(*LONG_8B)
    shape = ModelShape.from_cfg(cfg.model)
    flops = flops_per_token(shape, count_params(shape), 8192)
    est = estimate_step(cfg, A100, Setup(2, ac_every=1), accum=1)
    # Full recompute repeats the forward: x 4/3 on 16384 tokens per GPU.
    assert est.compute_s == pytest.approx(16384 * flops * 4 / 3 / (312e12 * ACHIEVABLE_FRACTION))
    assert est.step_time_s > est.compute_s
    assert est.tokens_per_s == pytest.approx(8 * 16384 / est.step_time_s)
    assert 0 < est.mfu < ACHIEVABLE_FRACTION
    # Stage 3 moves 1.5x the bytes of stage 2; offload adds the host step.
    assert estimate_step(cfg, A100, Setup(3, ac_every=1), 1).comm_s > est.comm_s
    assert estimate_step(cfg, A100, Setup(2, "cpu", ac_every=1), 1).step_time_s > est.step_time_s


def test_local_cpu_has_no_speed_estimate():
    est = estimate_step(cfg_of(), CPU2, Setup(2), accum=1)
    assert (est.step_time_s, est.tokens_per_s, est.mfu) == (None, None, None)


# --- capacity, pre-flight, zero=auto --------------------------------------------------------------

def test_meminfo_and_cpu_capacity(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24684092 kB\nMemFree:  1 kB\n")
    assert read_meminfo_total(str(meminfo)) == HOST_24G
    assert read_meminfo_total(str(tmp_path / "missing")) is None
    cap = capacity(cfg_of(), CPU2, host_mem_bytes=HOST_24G)
    assert cap.device_per_rank == (HOST_24G - GIB) // 2


def test_preflight_refuses_llama3_8b_on_local_cpu():
    result = preflight(cfg_of("model=llama3_8b"), CPU2, host_mem_bytes=HOST_24G)
    assert not result.fits
    # fp32 weights alone: 4 B x 8.03e9 = 29.9 GiB per rank against ~11 GiB.
    assert result.needed_gib > 4 * PSI_8B / GIB > result.usable_gib
    assert "nothing fits" in result.message and result.suggestion == []
    with pytest.raises(ConfigError, match="no setup fits"):
        choose_auto(cfg_of("model=llama3_8b"), CPU2, host_mem_bytes=HOST_24G)


def test_preflight_accepts_tiny_llama_on_local_cpu():
    result = preflight(cfg_of(), CPU2, host_mem_bytes=HOST_24G)
    assert result.fits and result.message.startswith("plan: needs")


def test_preflight_names_the_cheapest_change():
    cfg = cfg_of("model=llama3_8b", "hardware=8xa100_40g", "precision=bf16", "train.seq_len=2048",
                 "train.micro_batch_size=1", "zero=stage2")
    result = preflight(cfg, A100)
    assert not result.fits and result.suggestion == ["zero=stage3"]
    assert "GiB usable on 8xa100_40g" in result.message and "zero=stage3 fits at" in result.message


def test_preflight_suggests_a_smaller_micro_batch_when_no_setup_fits():
    cfg = cfg_of("model=llama3_8b", "hardware=8xa100_40g", "precision=bf16", "train.seq_len=8192",
                 "train.micro_batch_size=4", "train.global_batch_size=64")
    result = preflight(cfg, A100)
    assert not result.fits
    # Nothing fits at micro batch 4 (the fp32 loss alone is 32768 x 128256 x 12 B = 47 GiB); at 1, ZeRO-3 with
    # full checkpointing fits without offload, which beats keeping micro 2 with CPU offload.
    assert result.suggestion == ["zero=stage3", "activation_checkpointing=full", "train.micro_batch_size=1"]


def test_choose_auto_prefers_no_checkpointing_and_lowest_stage():
    choice = choose_auto(cfg_of(), CPU2, host_mem_bytes=HOST_24G)
    assert (choice.zero_stage, choice.offload, choice.activation_checkpointing) == (1, "none", "none")


def test_choose_auto_checkpoints_only_when_needed():
    choice = choose_auto(cfg_of(*LONG_8B), A100)
    # No stage fits without checkpointing (nor with every 2nd layer: 16 x 3.2 GB of saved layers + the
    # 23.5 GiB loss peak); full checkpointing does at the lowest stage (ZeRO-1 = ZeRO-2 without accumulation).
    assert (choice.zero_stage, choice.offload, choice.activation_checkpointing) == (1, "none", "full")
    assert choice.every_n_layers == 1
    assert "activation_checkpointing=full" in choice.overrides and choice.reason


def test_choose_auto_checkpoints_every_kth_layer_when_enough():
    cfg = cfg_of("model=llama3_8b", "hardware=8xa100", "precision=bf16", "train.seq_len=4096",
                 "train.micro_batch_size=2")
    choice = choose_auto(cfg, A100)
    assert choice.offload == "none" and choice.activation_checkpointing == "full"
    assert 1 < choice.every_n_layers < 32
    chosen = Setup(choice.zero_stage, "none", ac_every=choice.every_n_layers)
    usable = capacity(cfg, A100).device_per_rank
    assert estimate_memory(cfg, A100, chosen).total <= usable
    # Every stage without checkpointing is over.
    assert all(estimate_memory(cfg, A100, Setup(s)).total > usable for s in (1, 2, 3))


def test_choose_auto_leaves_headroom():
    # The 8xh100 experiment (bf16, seq 8192, micro 2 x accum 32): ZeRO-1 keeps whole 2-byte gradients
    # across micro-steps (+2 x 8.03e9 B = 15 GiB) and lands within 10% of the usable memory.
    cfg = cfg_of("+experiment=llama3_8b_8xh100_zero3")
    usable = capacity(cfg, A100).device_per_rank
    zero1 = estimate_memory(cfg, A100, Setup(1, ac_every=1), accum=32).total
    assert 0.9 * usable < zero1 <= usable
    choice = choose_auto(cfg, A100)
    assert (choice.zero_stage, choice.activation_checkpointing) == (2, "full")
    assert "more than 90%" in choice.reason
    assert choose_auto(cfg, A100, headroom=1.0).zero_stage == 1


def test_choose_auto_keeps_what_is_not_auto():
    choice = choose_auto(cfg_of(*LONG_8B, "zero=stage3"), A100, auto_zero=False)
    assert choice.zero_stage == 3


# --- CLI --------------------------------------------------------------------------------------------

def test_cli_json_shape():
    proc = run_cli("model=llama3_8b", "hardware=8xa100", "format=json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert (data["model"], data["hardware"], data["world_size"]) == ("llama3_8b", "8xa100", 8)
    assert data["parameters"] == PSI_8B
    combos = {(c["zero_stage"], c["offload"], c["activation_checkpointing"]) for c in data["candidates"]}
    assert combos == {(s, o, a) for s in (1, 2, 3) for o in ("none", "cpu") for a in ("none", "full")}
    for c in data["candidates"]:
        assert isinstance(c["zero_stage"], int) and isinstance(c["fits"], bool)
        for key in ("model_states_gib", "params_gib", "grads_gib", "optimizer_gib", "activations_gib",
                    "buffers_gib", "total_gib", "usable_gib", "host_ram_gib_per_node", "step_time_s",
                    "tokens_per_s", "mfu"):
            assert isinstance(c[key], float), key
        parts = c["model_states_gib"] + c["activations_gib"] + c["buffers_gib"] + c["overhead_gib"]
        assert math.isclose(parts, c["total_gib"], abs_tol=0.05)
        assert c["fits"] == (c["total_gib"] <= c["usable_gib"])


def test_cli_table_and_local_nulls():
    proc = run_cli("model=llama3_8b")
    assert proc.returncode == 0, proc.stderr
    assert "zero" in proc.stdout and "nothing fits" in proc.stdout
    data = json.loads(run_cli("format=json").stdout)
    assert data["accelerator"] == "cpu"
    assert all(c["step_time_s"] is None and c["mfu"] is None for c in data["candidates"])


@pytest.mark.parametrize("args, key", [(["zero=stage9"], "zero"), (["format=xml"], "format"),
                                       (["train.seq_len=100000"], "train.seq_len")])
def test_cli_config_errors_exit_2(args, key):
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {key}") and proc.stderr.count("\n") == 1 and proc.stdout == ""


def test_cli_adopts_model_path_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }))
    data = json.loads(run_cli(f"model.path={tmp_path}", "format=json").stdout)
    # 2 x 1000 x 64 + 2 x (2 x 64^2 + 2 x 64 x 32 + 3 x 64 x 176 + 2 x 64) + 64
    assert data["parameters"] == 2 * 1000 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176 + 128) + 64


def test_cli_imports_no_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "launcher.plan", "model=llama3_8b",
                           "hardware=8xa100", "format=json"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line]
    assert not [m for m in imported if m.split(".")[0] in ("torch", "deepspeed", "transformers")]


def test_closing_memory_lines_cpu_and_gpu():
    from launcher.worker.memory_plan import lines

    gib = 1024**3
    cpu = {"accelerator": "cpu", "expect_gib": {"rss": 1.1}}
    got = lines(cpu, [{"mem_peak_gb": 1.0 * gib, "mem_train_peak_gb": 0.9 * gib}])
    assert got == ["memory: rank 0 planned 1.10 GiB, measured 1.00 GiB (+10.0%); training phase 0.90 GiB"]
    gpu = {"accelerator": "cuda", "expect_gib": {"reserved": 9.0, "device_used": 11.0}}
    got = lines(gpu, [{"mem_peak_gb": 10.0 * gib, "mem_train_peak_gb": 10.0 * gib, "mem_device_used_gb": 11.0 * gib}])
    assert got == ["memory: rank 0 planned 9.00 GiB, measured 10.00 GiB (-10.0%); training phase 10.00 GiB; "
                   "device used 11.00 GiB, planned 11.00 GiB (+0.0%)"]


def test_run_plan_is_the_preflight_total():
    from launcher.plan.record import run_plan

    cfg = cfg_of("zero=stage3", "precision=fp32")
    plan = run_plan(cfg, CPU2)
    assert plan["peak_gib"] == pytest.approx(sum(plan["columns_gib"].values()), abs=1e-3)
    assert plan["expect_gib"] == {"rss": plan["peak_gib"]}
    assert plan["peak_gib"] == pytest.approx(preflight(cfg, CPU2, host_mem_bytes=HOST_24G).needed_gib, abs=0.01)
    gpu = run_plan(cfg_of("zero=stage3", "precision=bf16", "hardware=8xa100"), A100)
    assert gpu["expect_gib"]["reserved"] < gpu["peak_gib"] < gpu["expect_gib"]["device_used"]
