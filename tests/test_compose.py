"""Every shipped combination composes through the real entry point and yields a consistent DeepSpeed JSON."""

from __future__ import annotations

import itertools
import json

import pytest

from launcher.config.compose import group_options
from launcher.prepare import prepare

STAGES = [o for o in group_options("zero") if o != "auto"]
OFFLOADS = group_options("offload")
ACS = [o for o in group_options("activation_checkpointing") if o != "auto"]
PRECISIONS = group_options("precision")
HARDWARE = group_options("hardware")
MODELS = group_options("model")


def _ds(run) -> dict:
    return json.loads(run.files["ds_config.json"])


@pytest.mark.parametrize("hardware", HARDWARE)
def test_every_group_combination_composes(hardware, tmp_path):
    for zero, offload, ac, precision in itertools.product(STAGES, OFFLOADS, ACS, PRECISIONS):
        overrides = [f"zero={zero}", f"offload={offload}", f"activation_checkpointing={ac}",
                     f"precision={precision}", f"hardware={hardware}", "dry_run=true",
                     f"hydra.run.dir={tmp_path / 'r'}"]
        run = prepare(overrides, local_gpus=0)
        ds = _ds(run)
        stage = int(zero[-1])
        assert ds["zero_optimization"]["stage"] == stage
        assert ("offload_optimizer" in ds["zero_optimization"]) == (offload == "cpu")
        assert ("fp16" in ds) == (precision == "fp16") and ("bf16" in ds) == (precision == "bf16")
        assert ("activation_checkpointing" in ds) == (ac == "full")
        world = run.topo.world_size
        assert world == (2 if hardware == "local" else 1 if hardware.startswith("1x") else 8)
        assert ds["train_batch_size"] == (
            ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
        )
        assert ds["gradient_clipping"] == 1.0


@pytest.mark.parametrize("model,hardware", list(itertools.product(MODELS, HARDWARE)))
def test_every_model_on_every_hardware(model, hardware, tmp_path):
    # force=true: Llama 3 on the local CPU profile is (rightly) refused by the pre-flight plan otherwise.
    run = prepare([f"model={model}", f"hardware={hardware}", "dry_run=true", "force=true",
                   f"hydra.run.dir={tmp_path}"], local_gpus=0)
    assert run.cfg.model.name == model
    assert "--num_gpus" in run.command


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_experiments_compose(experiment, tmp_path):
    run = prepare([f"+experiment={experiment}", "dry_run=true", f"hydra.run.dir={tmp_path}"], local_gpus=0)
    ds = _ds(run)
    assert ds["zero_optimization"]["stage"] in (2, 3)  # full_ft_1x24gb: ZeRO-2 + CPU optimizer on one GPU
    assert ds["bf16"] == {"enabled": True}
    assert ds["train_batch_size"] == run.cfg.train.global_batch_size
    assert run.cfg.name == experiment


def test_fp16_block_is_dynamic_loss_scaling(tmp_path):
    run = prepare(["precision=fp16", "precision.initial_scale_power=12", "dry_run=true",
                   f"hydra.run.dir={tmp_path}"], local_gpus=0)
    assert _ds(run)["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 12,
                                "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1.0}


def test_accumulation_derived_from_global_batch(tmp_path):
    run = prepare(["train.micro_batch_size=2", "train.global_batch_size=48", "hardware=8xa100", "cluster.nodes=3",
                   "dry_run=true", f"hydra.run.dir={tmp_path}"], local_gpus=0)
    ds = _ds(run)
    # 48 = 2 micro x 1 accum x 24 ranks (3 nodes x 8)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (2, 1)
    run = prepare(["train.micro_batch_size=2", "train.global_batch_size=96", "hardware=8xa100", "cluster.nodes=3",
                   "dry_run=true", f"hydra.run.dir={tmp_path}"], local_gpus=0)
    assert _ds(run)["gradient_accumulation_steps"] == 2


def test_every_n_layers_sets_number_of_checkpoints(tmp_path):
    run = prepare(["activation_checkpointing=full", "activation_checkpointing.every_n_layers=3", "model=llama3_8b",
                   "hardware=8xh100", "dry_run=true", f"hydra.run.dir={tmp_path}"], local_gpus=0)
    # layers 0, 3, ..., 30 of 32
    assert _ds(run)["activation_checkpointing"]["number_checkpoints"] == 11


def test_model_path_architecture_comes_from_its_config(tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "vocab_size": 1000, "hidden_size": 96, "intermediate_size": 200, "num_hidden_layers": 3,
        "num_attention_heads": 6, "num_key_value_heads": 3, "max_position_embeddings": 256,
        "rope_parameters": {"rope_theta": 5000.0, "rope_type": "default"}}))
    run = prepare([f"model.path={model_dir}", "dry_run=true", f"hydra.run.dir={tmp_path / 'r'}"], local_gpus=0)
    m = run.cfg.model
    assert (m.vocab_size, m.hidden_size, m.num_hidden_layers, m.num_key_value_heads, m.rope_theta) == (
        1000, 96, 3, 3, 5000.0)


def test_zero_auto_records_choice(tmp_path):
    run = prepare(["zero=auto", "activation_checkpointing=auto", "model=llama3_8b", "hardware=8xa100",
                   "precision=bf16", "train.seq_len=8192", "train.micro_batch_size=2", "dry_run=true",
                   f"hydra.run.dir={tmp_path}"], local_gpus=0)
    auto = run.cfg.notes["auto"]
    # At seq 8192 x micro 2 the activations of 32 layers alone exceed 80 GB: checkpointing is required.
    assert "activation_checkpointing=full" in auto["chosen"] and auto["reason"]
    ds = _ds(run)
    assert ds["zero_optimization"]["stage"] == run.cfg.zero.stage and "activation_checkpointing" in ds
    assert f"zero=stage{run.cfg.zero.stage}" in auto["chosen"]
    assert "notes:" in run.files["config.yaml"] and "auto:" in run.files["config.yaml"]


def test_zero_auto_keeps_small_model_simple(tmp_path):
    run = prepare(["zero=auto", "activation_checkpointing=auto", "dry_run=true", f"hydra.run.dir={tmp_path}"],
                  local_gpus=0)
    assert run.cfg.zero.stage == 1 and run.cfg.offload.optimizer == "none"
    assert not run.cfg.activation_checkpointing.enabled
