"""The run-dir lock's liveness rules, without launching: a local holder is checked by pid/session on its own
host only, another host's by the heartbeat, a SLURM job by the scheduler; dead holders are taken over."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from launcher.errors import ConfigError
from launcher.launch import lock


def _write(run_dir: Path, holder: dict, age_s: float = 0) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / lock.LOCK).write_text(json.dumps(holder))
    then = time.time() - age_s
    os.utime(run_dir / lock.LOCK, (then, then))


def test_live_local_holder_is_named_dead_one_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    live = lock.local_holder(os.getpid())
    _write(run_dir, live)
    with pytest.raises(ConfigError, match=rf"in use by the run of pid {os.getpid()} on {socket.gethostname()} "
                                          r"\(since .*\); wait for it, stop it \(kill -TERM"):
        lock.acquire(run_dir, lock.local_holder(os.getpid() + 1))
    gone = subprocess.Popen(["true"])
    gone.wait()
    _write(run_dir, lock.local_holder(gone.pid) | {"pid_start": 1.0})
    me = lock.local_holder(os.getpid())
    lock.acquire(run_dir, me)
    assert lock.read(run_dir)["pid"] == os.getpid()
    lock.release(run_dir, me)
    assert not (run_dir / lock.LOCK).exists()


def test_another_hosts_holder_lives_by_its_heartbeat(tmp_path):
    run_dir = tmp_path / "run"
    foreign = {"host": "other-node", "pid": 1, "session": 1, "since": "2026-01-01T00:00:00+00:00"}
    _write(run_dir, foreign)  # pid 1 lives here, but says nothing about other-node: the heartbeat is fresh
    with pytest.raises(ConfigError, match="session 1 on other-node"):
        lock.acquire(run_dir, lock.local_holder(os.getpid()))
    _write(run_dir, foreign, age_s=lock.STALE_S + 60)
    lock.acquire(run_dir, lock.local_holder(os.getpid()))


def test_slurm_holder_lives_by_the_scheduler(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    run_dir = tmp_path / "run"

    def scheduler_says(script: str) -> None:
        squeue.write_text("#!/bin/bash\n" + script)
        squeue.chmod(squeue.stat().st_mode | stat.S_IXUSR)

    _write(run_dir, lock.slurm_holder("77"), age_s=10 * lock.STALE_S)  # an old heartbeat does not matter
    scheduler_says("echo RUNNING\n")
    with pytest.raises(ConfigError, match=r"SLURM job 77 \(since .*\).*scancel --signal=USR1 77"):
        lock.acquire(run_dir, lock.slurm_holder("78"))
    lock.acquire(run_dir, lock.slurm_holder("77"))  # a requeued attempt of job 77 takes its lock back
    scheduler_says("echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1\n")
    lock.acquire(run_dir, lock.slurm_holder("78"))  # job 77 is over: taken over
    assert lock.read(run_dir)["slurm_job"] == "78"
