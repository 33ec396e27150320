"""One test per validation rule: the bad key is named with the fix, before anything is written or launched."""

from __future__ import annotations

import pytest

from launcher.errors import ConfigError
from launcher.prepare import prepare


def refuse(overrides, match, tmp_path, local_gpus=0):
    with pytest.raises(ConfigError, match=match):
        prepare([*overrides, f"hydra.run.dir={tmp_path / 'run'}"], local_gpus=local_gpus)
    assert not (tmp_path / "run").exists(), "nothing may be written for a refused config"


@pytest.mark.parametrize("key", ["train.micro_batch_size", "train.seq_len", "train.max_steps", "train.save_every",
                                 "train.log_every", "cluster.nodes", "model.hidden_size", "train.global_batch_size"])
@pytest.mark.parametrize("value", [0, -4])
def test_non_positive_sizes(key, value, tmp_path):
    refuse([f"{key}={value}"], rf"^{key}: must be a positive integer", tmp_path)


def test_lr_not_a_number(tmp_path):
    refuse(["train.lr=fast"], r"^train\.lr: 'fast' is not a number", tmp_path)


def test_lr_not_positive(tmp_path):
    refuse(["train.lr=0"], r"^train\.lr: must be a positive number", tmp_path)


def test_global_batch_not_divisible_shows_equation(tmp_path):
    refuse(["hardware=8xa100", "train.micro_batch_size=4", "train.global_batch_size=40", "dry_run=true"],
           r"train\.global_batch_size: 40 != micro_batch_size x accumulation x world_size: 4 x accum x 8 .*"
           r"multiple of 32; set train\.global_batch_size=32 or 64", tmp_path)


def test_param_offload_needs_stage3(tmp_path):
    refuse(["zero=stage2", "offload=cpu", "offload.params=true"], r"^offload\.params: .*set zero=stage3", tmp_path)


def test_cpu_checkpointing_needs_partition_activations(tmp_path):
    refuse(["activation_checkpointing=full", "activation_checkpointing.partition_activations=false",
            "activation_checkpointing.cpu_checkpointing=true"],
           r"^activation_checkpointing\.cpu_checkpointing: needs partition_activations", tmp_path)


def test_contiguous_needs_partition_activations(tmp_path):
    refuse(["activation_checkpointing=full", "activation_checkpointing.partition_activations=false",
            "activation_checkpointing.contiguous_memory_optimization=true"],
           r"contiguous_memory_optimization: needs partition_activations", tmp_path)


def test_checkpointing_options_without_checkpointing(tmp_path):
    refuse(["activation_checkpointing.partition_activations=true"], r"use activation_checkpointing=full", tmp_path)


def test_unknown_option_lists_choices(tmp_path):
    refuse(["zero=stage4"], r"^zero: no option 'stage4'; choose one of: auto, stage1, stage2, stage3", tmp_path)
    refuse(["hardware=8xv100"], r"^hardware: no option '8xv100'; choose one of: 1x3090, 1x4090, 1xa10, 8x4090, "
                                r"8xa100, 8xa100_40g, 8xh100, 8xl40s, local",
           tmp_path)


def test_unknown_key_lists_valid_keys(tmp_path):
    refuse(["train.lrr=1"], r"^train\.lrr: unknown key; valid keys here: micro_batch_size, ", tmp_path)


def test_wrong_type(tmp_path):
    refuse(["train.micro_batch_size=four"], r"^train\.micro_batch_size: 'four' is not an integer", tmp_path)
    refuse(["dry_run=perhaps"], r"^dry_run: 'perhaps' is not true or false", tmp_path)


def test_hardware_gpus_missing_on_this_node(tmp_path):
    refuse(["hardware=8xh100"], r"^hardware: hardware=8xh100 needs 8 GPUs per node but this node has 0", tmp_path)
    refuse(["hardware=8xh100"], r"this node has 4", tmp_path, local_gpus=4)


def test_hardware_gpus_missing_is_fine_for_dry_run(tmp_path):
    run = prepare(["hardware=8xh100", "dry_run=true", f"hydra.run.dir={tmp_path}"], local_gpus=0)
    assert run.topo.world_size == 8


def test_missing_data_path(tmp_path):
    refuse([f"data.path={tmp_path / 'nope.jsonl'}"], r"^data\.path: .*nope\.jsonl does not exist", tmp_path)


def test_missing_model_path(tmp_path):
    refuse([f"model.path={tmp_path / 'nomodel'}"], r"^model\.path: .* is not a directory", tmp_path)
    (tmp_path / "empty_model").mkdir()
    refuse([f"model.path={tmp_path / 'empty_model'}"], r"^model\.path: .* has no config\.json", tmp_path)


def test_seq_len_beyond_model_positions(tmp_path):
    refuse(["train.seq_len=1024"], r"^train\.seq_len: 1024 exceeds model\.max_position_embeddings=512", tmp_path)


def test_heads_must_divide(tmp_path):
    refuse(["model.num_attention_heads=3"], r"^model\.num_attention_heads: 3 does not divide hidden_size=128",
           tmp_path)
    refuse(["model.num_key_value_heads=3"], r"^model\.num_key_value_heads: 3 does not divide", tmp_path)


def test_every_n_layers_beyond_depth(tmp_path):
    refuse(["activation_checkpointing=full", "activation_checkpointing.every_n_layers=9"],
           r"every_n_layers: 9 > model\.num_hidden_layers=4", tmp_path)


def test_min_lr_above_lr(tmp_path):
    refuse(["train.lr=1e-4", "train.min_lr=1e-3"], r"^train\.min_lr: .*set it <= train\.lr", tmp_path)


def test_hostfile_mode_needs_hostfile(tmp_path):
    refuse(["cluster=hostfile"], r"^cluster\.hostfile: cluster=hostfile needs cluster\.hostfile", tmp_path)


def test_fp16_on_bf16_hardware_is_allowed_with_recommendation(tmp_path):
    run = prepare(["precision=fp16", "hardware=8xa100", "dry_run=true", f"hydra.run.dir={tmp_path}"], local_gpus=0)
    assert any("precision=bf16" in n for n in run.notes)


def test_resume_refuses_changed_settings(tmp_path):
    from launcher.launch import rundir

    run = prepare(["train.max_steps=10", f"hydra.run.dir={tmp_path / 'run'}"], local_gpus=0)
    rundir.write_files(run.run_dir, run.files)
    # max_steps may change on resume ...
    prepare(["train.max_steps=20", f"hydra.run.dir={tmp_path / 'run'}"], local_gpus=0)
    # ... the learning rate may not
    with pytest.raises(ConfigError, match=r"holds a run with different settings \(train\.lr: 0\.001 -> 0\.002\)"):
        prepare(["train.lr=2e-3", f"hydra.run.dir={tmp_path / 'run'}"], local_gpus=0)


def test_fp16_on_cpu_ranks_needs_native_fp16(tmp_path):
    from launcher.config.topology import resolve_topology
    from launcher.config.validate import check_cpu_precision

    run = prepare(["precision=fp16", "dry_run=true", f"hydra.run.dir={tmp_path}"], local_gpus=0)
    topo = resolve_topology(run.cfg, 0)
    with pytest.raises(ConfigError, match=r"^precision: precision=fp16 on CPU ranks needs a CPU with AVX512-FP16"):
        check_cpu_precision(run.cfg, topo, {"avx512f", "avx512_bf16"})
    check_cpu_precision(run.cfg, topo, {"avx512f", "amx_fp16"})
    gpu = prepare(["precision=fp16", "hardware=8xh100", "dry_run=true", f"hydra.run.dir={tmp_path}"], local_gpus=0)
    check_cpu_precision(gpu.cfg, gpu.topo, set())


def test_preflight_refuses_llama3_8b_on_local_cpu(tmp_path):
    refuse(["model=llama3_8b", "dry_run=true"],
           r"^plan: needs [\d.]+ GiB/rank, [\d.]+ GiB usable on local .*force=true",
           tmp_path)
    run = prepare(["model=llama3_8b", "dry_run=true", "force=true", f"hydra.run.dir={tmp_path / 'run'}"],
                  local_gpus=0)
    assert run.cfg.force


def test_preflight_names_cheapest_change_that_fits(tmp_path):
    refuse(["model=llama3_8b", "hardware=8xa100_40g", "zero=stage1", "precision=bf16", "train.seq_len=2048",
            "train.micro_batch_size=1", "dry_run=true"], r"^plan: needs .* GiB/GPU, 39\.0 GiB usable on 8xa100_40g.*"
           r"zero=stage\d.* fits at [\d.]+ GiB", tmp_path)


def test_monitor_needs_its_package(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    refuse(["monitor.wandb=true"], r"^monitor\.wandb: needs the wandb package: pip install wandb", tmp_path)
