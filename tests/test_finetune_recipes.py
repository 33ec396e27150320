"""The fine-tuning recipes plan and dry-run here (no weights, no GPU), and a real launch asks for what
fine-tuning needs (weights for non-Llama presets and chat formats, data for chat formats)."""

from __future__ import annotations

import json

import pytest

from launcher.errors import ConfigError
from launcher.prepare import prepare


@pytest.mark.parametrize("recipe,world,micro,accum,gpus,fits_under", [
    ("llama3_8b_instruct_chat_8xa100", 8, 2, 4, 8, 79.0),
    ("full_ft_1x24gb", 1, 1, 16, 1, 22.6),
])
def test_recipes_plan_and_dry_run(recipe, world, micro, accum, gpus, fits_under, tmp_path):
    run = prepare([f"+experiment={recipe}", "dry_run=true", f"hydra.run.dir={tmp_path / 'r'}"], local_gpus=0)
    ds = json.loads(run.files["ds_config.json"])
    assert run.topo.world_size == world and ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] in (2, 3)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (micro, accum)
    assert f"--num_gpus {gpus}" in run.files["launch.sh"]
    plan = next(n for n in run.notes if n.startswith("plan: needs"))
    assert float(plan.split("needs ")[1].split(" GiB")[0]) < fits_under
    assert run.cfg.data.format == "messages" and run.cfg.train.export_at_end


@pytest.mark.parametrize("overrides,match", [
    (["model=qwen2_5_7b"], r"^model\.path: model=qwen2_5_7b \(qwen2\) describes an architecture for plans and "
                           r"dry runs; set model\.path="),
    (["data.format=messages"], r"^data\.path: data\.format=messages needs your data"),
    (["data.format=alpaca", "data.path=README.md"], r"^model\.path: data\.format=alpaca needs a model whose "
                                                    r"tokenizer has a chat template"),
])
def test_real_launch_needs_weights_and_data(overrides, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        prepare([*overrides, f"hydra.run.dir={tmp_path / 'r'}"], local_gpus=0)
    prepare([*overrides, "hardware=8xa100", "dry_run=true", f"hydra.run.dir={tmp_path / 'd'}"],
            local_gpus=0)  # plans and dry runs need neither
