"""ds_configs/ is what the code generates, and DeepSpeed's own parser accepts every generated JSON."""

from __future__ import annotations

import json

import pytest

from launcher.ds_configs import OUT_DIR, render_all

RENDERED = render_all()


def test_checked_in_ds_configs_match_generator():
    on_disk = {str(p.relative_to(OUT_DIR)): p.read_text() for p in OUT_DIR.rglob("*.json")}
    assert sorted(on_disk) == sorted(RENDERED), "regenerate with: python -m launcher.ds_configs"
    drifted = [name for name in RENDERED if on_disk[name] != RENDERED[name]]
    assert not drifted, f"{drifted} drifted; regenerate with: python -m launcher.ds_configs"


class _EightRanks:
    """Stands in for the data-parallel group of an 8-GPU node (no process group exists in this test)."""

    def get_data_parallel_world_size(self) -> int:
        return 8

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_deepspeed_parser_accepts(name, monkeypatch):
    from deepspeed.runtime import config as ds_config_module
    from deepspeed.runtime.config import DeepSpeedConfig

    monkeypatch.setattr(ds_config_module.dist, "get_rank", lambda *a, **k: 0)
    raw = json.loads(RENDERED[name])
    parsed = DeepSpeedConfig(raw, mpu=_EightRanks())
    assert parsed.train_batch_size == raw["train_batch_size"]
    assert parsed.zero_optimization_stage == raw["zero_optimization"]["stage"]
    assert parsed.gradient_clipping == raw["gradient_clipping"]
    assert parsed.float16_config.enabled == ("fp16" in raw)
    assert parsed.bfloat16_config.enabled == ("bf16" in raw)
    offload = parsed.zero_config.offload_optimizer
    assert (offload is not None and offload.device == "cpu") == ("offload_optimizer" in raw["zero_optimization"])
    if "fp16" in raw:
        fp16 = parsed.float16_config
        assert fp16.loss_scale == 0 and fp16.initial_scale_power == raw["fp16"]["initial_scale_power"]


def test_deepspeed_parser_accepts_activation_checkpointing_block(monkeypatch, tmp_path):
    from deepspeed.runtime import config as ds_config_module
    from deepspeed.runtime.config import DeepSpeedConfig

    from launcher.prepare import prepare

    monkeypatch.setattr(ds_config_module.dist, "get_rank", lambda *a, **k: 0)
    run = prepare(["activation_checkpointing=full", "activation_checkpointing.cpu_checkpointing=true",
                   "hardware=8xh100", "zero=stage3", "dry_run=true", f"hydra.run.dir={tmp_path}"], local_gpus=0)
    parsed = DeepSpeedConfig(json.loads(run.files["ds_config.json"]), mpu=_EightRanks())
    ac = parsed.activation_checkpointing_config
    assert ac.partition_activations and ac.cpu_checkpointing and ac.number_checkpoints == 4
