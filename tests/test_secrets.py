"""No secret reaches any file the launcher writes, nor its console output: secret-looking keys and values
(nccl_env, list entries, free-form notes) are masked in files and passed to the ranks by name."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

from launcher.config import secrets
from launcher.render.rundir import resume_command

TOKEN = "hf_" + "A1b2C3d4E5f6G7h8I9j0K1l2"  # looks like a Hugging Face token by itself, under any key
SECRET_ARGS = ["+hardware.nccl_env.WANDB_API_KEY=secret", f"+hardware.nccl_env.NCCL_PLUGIN_OPTS={TOKEN}",
               f"+notes.tokens=[plain,{TOKEN}]", "+notes.my_password=secret"]


def _all_text(run_dir: Path) -> str:
    return "".join(p.read_text() for p in run_dir.rglob("*") if p.is_file())


@pytest.mark.parametrize("cluster", [[], ["cluster=slurm", "cluster.nodes=2"]])
def test_run_dir_and_console_stay_clean(cluster, run_dir):
    res = run_cli(["dry_run=true", "hardware=8xa100", *cluster, f"hydra.run.dir={run_dir}", *SECRET_ARGS])
    assert res.returncode == 0, res.stderr
    written = _all_text(run_dir) + res.stdout + res.stderr
    assert "secret" not in written and TOKEN not in written
    script = (run_dir / "launch.sh") if not cluster else next(run_dir.glob("*.sbatch"))
    text = script.read_text()
    # passed by name: the script requires the variable from the environment and exports it
    assert ': "${WANDB_API_KEY:?' in text and "export WANDB_API_KEY" in text and "export NCCL_PLUGIN_OPTS" in text
    assert "export NCCL_IB_DISABLE=0" in text  # public variables keep their values
    # a resume with the same overrides is accepted (secrets are not compared)
    again = run_cli(["dry_run=true", "hardware=8xa100", *cluster, f"hydra.run.dir={run_dir}", *SECRET_ARGS])
    assert again.returncode == 0, again.stderr


def test_setup_line_with_a_token_is_refused(run_dir):
    res = run_cli(["cluster=slurm", "dry_run=true", f"hydra.run.dir={run_dir}",
                   f"cluster.setup=['module load cuda','export HF_TOKEN={TOKEN}']"])
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cluster.setup[1]: carries a secret"), res.stderr
    assert "export it in the submitting shell" in lines[0] and TOKEN not in res.stderr
    assert not run_dir.exists()
    ok = run_cli(["cluster=slurm", "dry_run=true", f"hydra.run.dir={run_dir}",
                  "cluster.setup=['export HF_TOKEN=$HF_TOKEN']"])  # a reference by name is fine
    assert ok.returncode == 0, ok.stderr


def test_environment_variable_names_are_validated(run_dir):
    res = run_cli(["dry_run=true", "hardware=8xa100", f"hydra.run.dir={run_dir}", "+hardware.nccl_env.BAD-NAME=x"])
    assert res.returncode == 2 and "hardware.nccl_env.BAD-NAME: is not an environment variable name" in res.stderr


def test_resume_command_has_no_placeholder():
    argv = ["train.max_steps=5", "+notes.wandb_api_key=abc", f"+notes.x={TOKEN}", "zero=stage3"]
    cmd, left_out = resume_command(argv)
    assert cmd == "python -m launcher zero=stage3" and left_out == ["notes.wandb_api_key", "notes.x"]
    assert "<redacted>" not in cmd


def test_mask_finds_secrets_by_key_and_by_value():
    masked = secrets.mask({"nccl_env": {"WANDB_API_KEY": "x", "NCCL_DEBUG": "INFO"}, "l": ["a", TOKEN],
                           "free": f"Bearer {TOKEN}", "git_sha": "0123456789abcdef0123456789abcdef01234567"})
    assert masked["nccl_env"] == {"WANDB_API_KEY": "<redacted>", "NCCL_DEBUG": "INFO"}
    assert masked["l"] == ["a", "<redacted>"] and TOKEN not in masked["free"]
    assert masked["git_sha"].startswith("0123")
    assert secrets.carries_secret(f"export HF_TOKEN={TOKEN}") and secrets.carries_secret("export HF_TOKEN=abc")
    assert not secrets.carries_secret("export HF_TOKEN=$HF_TOKEN") and not secrets.carries_secret("module load x")
