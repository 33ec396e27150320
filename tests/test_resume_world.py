"""Resume on another world size (issue 18) with real ranks: 1 rank -> 2 ranks at step 10, 2 -> 1 at step 20.

Each chain is compared with an uninterrupted 2-rank run of the same 30 steps (same train.max_steps, so the
same LR schedule; gradient clipping off). tests/ranks/state_probe (a sitecustomize on the ranks' PYTHONPATH)
dumps every parameter's fp32 value and Adam moments, gathered with DeepSpeed's own accessors, when a
checkpoint is saved and after one is loaded, and stops a run at an exact step as a SIGTERM would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli

pytestmark = pytest.mark.ranks

PROBE = REPO / "tests" / "ranks" / "state_probe"
COMMON = ["train.max_steps=30", "train.global_batch_size=8", "train.micro_batch_size=4", "train.grad_clip=0",
          "train.log_every=1", "train.save_every=1000"]
# 1 rank (micro 4 x accum 2) and 2 ranks (4 x 1) reduce the same per-sample gradients in another order:
# fp32 round-off only. Observed ~1e-6 relative; the bound leaves room without hiding a wrong state.
LOSS_RTOL = 1e-4
# bf16: forward and backward run in bf16 (8-bit mantissa) on fp32 master weights; other reduction orders
# could move losses by bf16 round-off (observed: none, the losses were equal).
BF16_LOSS_RTOL = 1e-2


def launch(run_dir: Path, probe: Path, ranks: int, *extra: str, stop_at: int = 0, expect: int = 0):
    env = {"PYTHONPATH": f"{PROBE}{os.pathsep}{REPO}", "LAUNCHER_STATE_PROBE": str(probe),
           "LAUNCHER_STOP_AT_STEP": str(stop_at)}
    res = run_cli([f"hydra.run.dir={run_dir}", f"hardware.cpu_ranks={ranks}", *COMMON, *extra], env=env)
    assert res.returncode == expect, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def losses(run_dir: Path) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def assert_state_equal(saved: Path, loaded: Path, step: int) -> None:
    a, b = torch.load(saved, weights_only=False), torch.load(loaded, weights_only=False)
    assert a["params"].keys() == b["params"].keys()
    for name, tensors in a["params"].items():
        for key, value in tensors.items():
            assert torch.equal(value, b["params"][name][key]), (name, key)
    # Adam's step count: every rank, every parameter group, equals the optimizer steps taken.
    assert {s for rank in a["steps"] for s in rank} == {step}, a["steps"]
    assert {s for rank in b["steps"] for s in rank} == {step}, b["steps"]
    assert b["global_steps"] == a["global_steps"] == step


# ZeRO-1 and ZeRO-2 share DeepSpeed's optimizer (stage_1_and_2.py) and its universal conversion
# (ds_to_universal --inject_missing_state); ZeRO-2 with CPU offload covers that path and more. A plain ZeRO-1
# case was dropped to keep the suite under its 30-minute budget (it passed in every run while it was here).
@pytest.mark.parametrize("zero,extra", [
    ("stage2", ["offload=cpu"]),
    ("stage3", ["precision=bf16"]),
], ids=["zero2-offload", "zero3-bf16"])
def test_resume_on_another_world_size(zero, extra, tmp_path):
    opts = [f"zero={zero}", *extra]
    ref, split, probe = tmp_path / "ref", tmp_path / "split", tmp_path / "probe"
    launch(ref, tmp_path / "probe_ref", 2, *opts)
    launch(split, probe, 1, *opts, stop_at=10)
    up = launch(split, probe, 2, *opts, stop_at=20)
    assert "saved on 1 rank(s), this launch has 2" in up.stderr and "keeping the global batch of 8" in up.stderr
    assert "resuming at step 10" in up.stdout and "4 micro x 1 accum x 2" in up.stdout
    # A conversion that crashed half-way (no CONVERTED marker) is redone, not loaded.
    torn = split / "checkpoints" / "step_00000020_universal"
    torn.mkdir()
    (torn / "zero").write_text("half")
    down = launch(split, probe, 1, *opts)
    assert "saved on 2 rank(s), this launch has 1" in down.stderr
    assert "resuming at step 20" in down.stdout and "4 micro x 2 accum x 1" in down.stdout

    assert_state_equal(probe / "saved_10_w1.pt", probe / "loaded_10_w2.pt", 10)
    assert_state_equal(probe / "saved_20_w2.pt", probe / "loaded_20_w1.pt", 20)
    want, got = losses(ref), losses(split)
    assert sorted(got) == list(range(1, 31))
    rtol = BF16_LOSS_RTOL if "precision=bf16" in extra else LOSS_RTOL
    diffs = {step: abs(got[step] - want[step]) / abs(want[step]) for step in range(11, 31)}
    print(f"[{zero} {extra}] max relative loss difference after the world changes: {max(diffs.values()):.2e}")
    for step in range(11, 31):  # the 20 steps after the two world changes
        assert got[step] == pytest.approx(want[step], rel=rtol), step
    # The last save is a normal checkpoint at 1 rank; the universal copies are gone.
    ckpts = split / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000030"
    assert json.loads((ckpts / "step_00000030" / "launcher.json").read_text())["world_size"] == 1
    assert not list(ckpts.glob("*_universal")) and not (ckpts / "latest_universal").exists()
    # Finished: relaunching at another size converts nothing and starts no rank.
    again = launch(split, probe, 2, *opts)
    assert "already at step 30 >= train.max_steps=30; nothing to do" in again.stdout
    assert "resuming" not in again.stdout and not list(ckpts.glob("*_universal"))


def fake_checkpoint(run_dir: Path, step: int, world: int, glob: int, **info) -> Path:
    """A checkpoint tag as the worker leaves it (launcher.json + DONE + latest), for the launcher-side rules."""
    tag = run_dir / "checkpoints" / f"step_{step:08d}"
    tag.mkdir(parents=True)
    (tag / "launcher.json").write_text(json.dumps({"step": step, "world_size": world, "zero_stage": 2,
                                                   "global_batch": glob, **info}))
    (tag / "DONE").write_text(f"{step}\n")
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 4096)
    (run_dir / "checkpoints" / "latest").write_text(tag.name)
    return tag


def dry(run_dir: Path, *overrides: str):
    return run_cli([f"hydra.run.dir={run_dir}", "train.max_steps=30", "dry_run=true", *overrides])


def test_world_change_rules_before_any_rank(tmp_path):
    """Launcher-side rules on a fabricated checkpoint (no rank starts): batch re-derivation, refusals."""
    run = tmp_path / "run"
    fake_checkpoint(run, 10, world=2, glob=6)
    # 6 sequences over 4 ranks: refused with the world sizes that divide the global batch.
    res = dry(run, "hardware.cpu_ranks=4")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "error: hardware: the global batch of 6 sequences" in res.stderr and "one of 1, 2, 3, 6 ranks" in res.stderr
    # 3 ranks: micro 4 does not divide 6/3 = 2, so the largest micro that does (2) x accum 1.
    res = dry(run, "hardware.cpu_ranks=3")
    assert res.returncode == 0, res.stderr
    assert "saved on 2 rank(s), this launch has 3" in res.stderr and "(2 micro x 1 accum x 3 ranks)" in res.stderr
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 6 and ds["checkpoint"] == {"load_universal": True}
    # Same world: no conversion, the recorded global batch is kept (global_batch_size unset means micro x world
    # *at the first launch*).
    res = dry(run, "hardware.cpu_ranks=2", "train.micro_batch_size=3")
    assert res.returncode == 0 and "universal" not in res.stderr, res.stderr
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 6 and "checkpoint" not in ds
    # Asking for another global batch on a resume is refused: the data position would no longer be exact.
    res = dry(run, "train.global_batch_size=8")
    assert res.returncode == 2 and "error: train.global_batch_size: 8 differs from the 6" in res.stderr

    adapters = tmp_path / "lora"
    fake_checkpoint(adapters, 10, world=2, glob=8, frozen_params=True)
    res = dry(adapters, "hardware.cpu_ranks=1")
    assert res.returncode == 2 and "holds frozen parameters" in res.stderr and "resume on 2 rank(s)" in res.stderr


def test_conversion_refused_when_disk_is_short(tmp_path, monkeypatch):
    """The free-disk check (a full disk cannot be made here: disk_usage is faked, the rest is real)."""
    import shutil
    from collections import namedtuple

    from launcher.errors import ConfigError
    from launcher.launch.resume import WorldChange, convert_checkpoint

    tag = fake_checkpoint(tmp_path / "run", 10, world=2, glob=8)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1024, 1024))
    with pytest.raises(ConfigError, match=r"needs ~0.0 GiB free .* resume on 2 rank\(s\)"):
        convert_checkpoint(WorldChange(tag, 10, 2, 1, 2, 8, 4))
    assert not (tag.parent / "step_00000010_universal").exists()
