"""`launcher -m ... cluster=slurm` on the real local SLURM cluster: one job per sweep point, each in its own
run dir, and `launcher sweep <dir>` printing their status table afterwards.

Run: pytest -m slurm tests/slurm/test_slurm_sweep.py   (needs root: see tests/slurm/conftest.py)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, Cluster

pytestmark = pytest.mark.slurm


def test_sweep_submits_one_job_per_point_and_reports_them(slurm_single: Cluster, tmp_path: Path) -> None:
    env = dict(slurm_single.env, PYTHONPATH=str(REPO))
    sweep_dir = tmp_path / "sweep"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)

    # The 2x2 sweep: ZeRO stage x learning rate, four jobs.
    res = cli("-m", "cluster=slurm", "zero=stage1,stage2", "train.lr=1e-4,3e-4", "train.max_steps=3",
              "train.log_every=1", "data.builtin_documents=300", f"hydra.sweep.dir={sweep_dir}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"status later: launcher sweep {sweep_dir}" in res.stdout
    points = json.loads((sweep_dir / "sweep.json").read_text())["points"]
    assert [Path(p["run_dir"]).name for p in points] == [
        "zero-stage1_train.lr-0.0001", "zero-stage1_train.lr-0.0003",
        "zero-stage2_train.lr-0.0001", "zero-stage2_train.lr-0.0003"]
    for p in points:
        job = slurm_single.wait(p["job_id"], Path(p["run_dir"]) / f"slurm-{p['job_id']}.out")
        assert job.state == "COMPLETED" and job.exit_code == 0, job.text()[-3000:]
    table = cli("sweep", str(sweep_dir)).stdout
    print(table)
    rows = [line for line in table.splitlines() if line[:1].isdigit()]
    assert len(rows) == 4, table
    for row, p in zip(rows, points):
        assert f"completed job {p['job_id']}" in row and " 3 " in row, table
