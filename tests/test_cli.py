"""The real CLI as a user runs it: dry-run artifacts, one-line errors, no torch on the launcher side."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, run_cli

MUST_SHOW = ["zero=stage3", "model=llama3_8b", "hardware=8xh100", "precision=fp16", "offload=cpu",
             "activation_checkpointing=full", "dry_run=true"]


def test_must_show_dry_run(run_dir):
    res = run_cli([*MUST_SHOW, f"hydra.run.dir={run_dir}"])
    assert res.returncode == 0, res.stderr
    ds = json.loads((run_dir / "ds_config.json").read_text())
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0
    assert ds["activation_checkpointing"]["partition_activations"] is True
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 8
    assert "precision=bf16" in res.stderr  # fp16 on an H100 profile gets the recommendation


def test_dry_run_artifacts(run_dir):
    res = run_cli(["dry_run=true", f"hydra.run.dir={run_dir}", "cluster.master_port=29555"])
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "ds_config.json", "launch.sh", "run.json"]
    launch = (run_dir / "launch.sh").read_text()
    assert os.access(run_dir / "launch.sh", os.X_OK)
    command = launch.strip().splitlines()[-1]
    assert command.startswith("exec ") and "deepspeed --num_gpus 2 --num_nodes 1 --master_port 29555" in command
    assert command.endswith(f"--no_local_rank --module launcher.worker --run-dir {run_dir}")
    assert "export DS_ACCELERATOR=cpu" in launch and "export OMP_NUM_THREADS=" in launch
    # CPU ranks: glibc hands freed tensors back, so RSS follows the plan (launcher.render.command.CPU_RANK_MALLOC)
    assert "export MALLOC_MMAP_THRESHOLD_=65536\n" in launch and "export MALLOC_TRIM_THRESHOLD_=0\n" in launch
    info = json.loads((run_dir / "run.json").read_text())["launches"][-1]
    plan = info["plan"]  # what the worker's closing line compares with
    assert plan["accelerator"] == "cpu" and plan["expect_gib"]["rss"] == plan["peak_gib"] > 0
    assert sum(plan["terms_bytes"].values()) > 0 and set(plan["columns_gib"]) >= {"params", "activations"}
    assert set(info) >= {"git_sha", "versions", "host", "start", "argv", "command"}
    assert info["versions"]["deepspeed"] and info["command"][-1] == str(run_dir)
    assert command.split(" ", 1)[1] in res.stdout.replace("\n", " ") or info["command"][1] == "--num_gpus"
    # nothing was launched
    assert not (run_dir / "metrics.jsonl").exists()


def test_secrets_are_never_written(run_dir):
    res = run_cli(["dry_run=true", f"hydra.run.dir={run_dir}", "+notes.wandb_api_key=sk-SUPERSECRET"],
                  env={"WANDB_API_KEY": "sk-ENVSECRET"})
    assert res.returncode == 0, res.stderr
    for f in run_dir.iterdir():
        text = f.read_text()
        assert "SUPERSECRET" not in text and "ENVSECRET" not in text, f.name


@pytest.mark.parametrize("args,message", [
    (["zero=stage4"], "error: zero: no option 'stage4'; choose one of: auto, stage1, stage2, stage3"),
    (["train.lr=abc"], "error: train.lr: 'abc' is not a number"),
    (["hardware=8xa100"], "error: hardware: hardware=8xa100 needs 8 GPUs per node but this node has 0"),
    (["train.global_batch_size=5"], "error: train.global_batch_size: 5 != micro_batch_size x accumulation"),
])
def test_user_errors_are_one_line_exit_2(args, message, run_dir):
    res = run_cli([*args, f"hydra.run.dir={run_dir}"], env={"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), res.stderr
    assert "Traceback" not in res.stderr
    assert not run_dir.exists()


def test_dry_run_imports_neither_torch_nor_deepspeed(run_dir):
    res = run_cli(["-X", "importtime"][:0] + [*MUST_SHOW, f"hydra.run.dir={run_dir}"])
    assert res.returncode == 0
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "launcher", *MUST_SHOW,
                          f"hydra.run.dir={run_dir}"], capture_output=True, text=True, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in res.stderr.splitlines() if "|" in line}
    assert "launcher" in imported
    assert not imported & {"torch", "deepspeed", "transformers", "datasets"}


def test_help_lists_groups_and_keys():
    res = run_cli(["--help"])
    assert res.returncode == 0
    assert "zero=auto|stage1|*stage2|stage3" in res.stdout and "train.global_batch_size" in res.stdout


def test_readme_reference_is_current():
    from launcher.config.reference import override_reference

    readme = (REPO / "README.md").read_text()
    assert override_reference() in readme, "update README: python -m launcher.reference"
