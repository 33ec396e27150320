"""A real local SLURM cluster for the `slurm` tests: session fixtures bring it up with tests/slurm/cluster.sh
(munged, slurmctld and slurmd under $SLURM_LOCAL_ROOT) and stop afterwards exactly what they started.

`slurm_single` is one node (this machine); `slurm_netns` is two nodes n1/n2, each slurmd in its own network
namespace behind a veth pair. Jobs are awaited with a 1-s `scontrol show job` poll (`sbatch --wait` polls at
2/8/32 s).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = Path(__file__).resolve().parent / "cluster.sh"
TRAIN_SBATCH = REPO / "slurm" / "train.sbatch"
ROOT = Path(os.environ.get("SLURM_LOCAL_ROOT") or Path(tempfile.gettempdir()) / "launcher-slurm")
# cluster.sh exits with this when the machine cannot create network namespaces (no CAP_NET_ADMIN/SYS_ADMIN).
EXIT_NO_NETNS = 3
# A DeepSpeed job takes ~30 s on an idle 2-core machine; other work on the machine can make it 4x slower.
JOB_TIMEOUT = 600
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
          "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "PREEMPTED"}  # fmt: skip


@dataclass
class Job:
    job_id: str
    state: str
    exit_code: int
    restarts: int
    seconds: float
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""


@dataclass
class Cluster:
    name: str
    conf: Path

    @property
    def env(self) -> Dict[str, str]:
        """For sbatch and the jobs: this cluster, and the launcher's Python (jobs inherit the environment)."""
        env = dict(os.environ)
        env.update(
            SLURM_CONF=str(self.conf),
            LAUNCHER_PYTHON=sys.executable,
            LAUNCHER_ROOT=str(REPO),
            PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        )
        return env

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def submit(self, args: Sequence[str], workdir: Path) -> str:
        """sbatch [args]; the job's working dir and log (slurm-<id>.out) are `workdir`."""
        workdir.mkdir(parents=True, exist_ok=True)
        cmd = ["sbatch", "--parsable", f"--chdir={workdir}", f"--output={workdir}/slurm-%j.out", *args]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, cwd=REPO, timeout=60)
        assert out.returncode == 0, f"sbatch failed: {out.stderr}"
        return out.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> Dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, log: Path, timeout: float = JOB_TIMEOUT) -> Job:
        """Poll `scontrol show job` every second until the job leaves the active states."""
        start = time.monotonic()
        while True:
            info = self.job_info(job_id)
            state = info.get("JobState", "")
            if not state:
                raise AssertionError(f"job {job_id} vanished from slurmctld (MinJobAge passed?)")
            if state not in ACTIVE:
                return Job(job_id, state, int(info.get("ExitCode", "1:0").split(":")[0]),
                           int(info.get("Restarts", "0")), time.monotonic() - start, log)  # fmt: skip
            if time.monotonic() - start > timeout:
                self.run("scancel", job_id, check=False)
                tail = log.read_text(errors="replace")[-3000:] if log.is_file() else "(no log)"
                raise AssertionError(f"job {job_id} still {state} after {timeout:.0f} s; cancelled. log:\n{tail}")
            time.sleep(1)

    def sbatch_wait(self, args: Sequence[str], workdir: Path, timeout: float = JOB_TIMEOUT) -> Job:
        """Submit and wait; the Job carries state, exit code, requeue count, seconds and the log path."""
        job_id = self.submit(args, workdir)
        return self.wait(job_id, workdir / f"slurm-{job_id}.out", timeout)


def _bring_up(variant: str, *args: str) -> Iterator[Cluster]:
    env = dict(os.environ, SLURM_LOCAL_ROOT=str(ROOT))
    was_up = subprocess.run(["bash", str(CLUSTER_SH), "status", variant], env=env).returncode == 0
    up = subprocess.run(["bash", str(CLUSTER_SH), variant, *args], env=env, capture_output=True, text=True,
                        timeout=600)  # fmt: skip
    if up.returncode == EXIT_NO_NETNS:
        pytest.skip(f"two-node SLURM cluster unavailable here: {up.stderr.strip().splitlines()[-1]}")
    assert up.returncode == 0, f"cluster.sh {variant} failed:\n{up.stderr}"
    try:
        yield Cluster(variant, ROOT / variant / "etc" / "slurm.conf")
    finally:
        if not was_up:  # a cluster a developer started by hand stays up
            subprocess.run(["bash", str(CLUSTER_SH), "down", variant], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def slurm_single() -> Iterator[Cluster]:
    yield from _bring_up("single")


@pytest.fixture(scope="session")
def slurm_netns() -> Iterator[Cluster]:
    yield from _bring_up("netns", "2")


def train_args(sbatch_opts: List[str], overrides: List[str], script: Optional[Path] = None) -> List[str]:
    return [*sbatch_opts, str(script or TRAIN_SBATCH), *overrides]
