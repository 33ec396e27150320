"""A user error is one line naming the key and the fix, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from conftest import run_cli

from launcher.launch import jit_locks


def refused(args, message, run_dir, written=False):
    res = run_cli([*args, f"hydra.run.dir={run_dir}"])
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert run_dir.exists() == written
    return lines[0]


@pytest.mark.parametrize("args,message", [
    (["cluster.nodes=2"], "cluster.nodes: 2 with cluster=local, which runs on this node only"),
    (["cluster.master_port=70000"], "cluster.master_port: 70000 is not a port in 1024..65535"),
    (["+notes.x=${oops}"], "notes.x: cannot resolve its value"),
])
def test_config_errors(args, message, run_dir):
    refused(["dry_run=true", *args], message, run_dir)


def test_run_dir_problems(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    refused(["dry_run=true"], "exists and is not a directory", a_file, written=True)
    run_dir = tmp_path / "run"
    assert run_cli(["dry_run=true", f"hydra.run.dir={run_dir}"]).returncode == 0
    (run_dir / "config.yaml").write_text("train: [unclosed\n")
    line = refused(["dry_run=true"], "config.yaml is not a readable config", run_dir, written=True)
    assert "name=<new name>" in line


def test_model_dir_without_weights(tmp_path, run_dir):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, '
                                       '"num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 259}')
    # Refused before any rank starts (a dry run or a plan needs only config.json).
    refused([f"model.path={model}"], "has no weights", run_dir)


def test_jit_lock_of_a_running_build_is_kept(tmp_path, monkeypatch):
    build = tmp_path / "py311_cpu" / "deepspeed_shm_comm"
    build.mkdir(parents=True)
    lock = build / "lock"
    lock.write_text("")
    old = time.time() - 2 * jit_locks.STALE_AFTER_S
    os.utime(lock, (old, old))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "py311_cpu"))
    builder = subprocess.Popen(["sleep", "60"], cwd=build)  # stands in for ninja/c++ working in the build dir
    try:
        notes = jit_locks.check_jit_locks()
        assert lock.exists() and "exists" in notes[0]
    finally:
        builder.kill()
        builder.wait()
    notes = jit_locks.check_jit_locks()
    assert not lock.exists() and "removed stale" in notes[0]
