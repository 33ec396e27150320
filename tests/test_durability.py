"""Checkpoints and exports survive a crash at any point: fsync before `latest` moves, torn tags never resumed
from and swept at the next save, an export directory replaced in one step."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launcher.export.swap import replace_dir
from launcher.worker import ckpt


class FakeEngine:
    """Writes a shard file like DeepSpeed's engine.save_checkpoint (this test is about what happens around it)."""

    module = torch.nn.Linear(2, 2)

    def zero_offload_optimizer(self):
        return None

    def zero_optimization_stage(self):
        return 1

    def train_batch_size(self):
        return 8

    def train_micro_batch_size_per_gpu(self):
        return 4

    def gradient_accumulation_steps(self):
        return 2

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters=False):
        Path(save_dir, tag).mkdir(parents=True, exist_ok=True)
        Path(save_dir, tag, "mp_rank_00_model_states.pt").write_bytes(b"x" * 1000)


@pytest.fixture
def world_of_one():
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_save_fsyncs_before_latest_and_sweeps_torn_tags(tmp_path, monkeypatch, world_of_one):
    ckpt_dir = tmp_path / "checkpoints"
    torn = ckpt_dir / "step_00000003"  # a save cut by a crash: shards, no DONE
    torn.mkdir(parents=True)
    (torn / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    (ckpt_dir / "latest").write_text("step_00000003")
    assert ckpt.latest_tag(ckpt_dir) is None, "a tag without DONE is never resumed from"

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    ckpt.save(FakeEngine(), ckpt_dir, 4, {"step": 4}, keep_last=2)

    tag = ckpt_dir / "step_00000004"
    move = events.index(("replace", str(ckpt_dir / "latest")))
    synced = {path for kind, path in events[:move] if kind == "fsync"}
    assert {str(tag / "mp_rank_00_model_states.pt"), str(tag / "rng_rank0.pt"), str(tag / "DONE"), str(tag),
            str(ckpt_dir)} <= synced
    assert ("fsync", str(ckpt_dir)) in events[move:], "the rename of `latest` is made durable too"
    assert ckpt.latest_tag(ckpt_dir) == "step_00000004" and not torn.exists()


def test_export_dir_is_swapped_whole(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model.safetensors").write_text("old")
    (out / "only_in_old.json").write_text("old")
    new = tmp_path / ".hf.tmp"
    new.mkdir()
    (new / "model.safetensors").write_text("new")
    replace_dir(new, out)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert (out / "model.safetensors").read_text() == "new" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"], "the old export is gone, nothing left beside"
