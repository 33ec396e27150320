"""End to end on a real local SLURM cluster: sbatch -> train.sbatch / rendered script -> srun -> deepspeed
--no_ssh -> ranks. Tiny settings (30 steps, 2 CPU ranks); every DeepSpeed job takes about 30 s here.

Run: pytest -m slurm tests/slurm   (needs root: the fixtures start munged/slurmctld/slurmd; see cluster.sh)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from .conftest import JOB_TIMEOUT, REPO, TRAIN_SBATCH, Cluster, Job

pytestmark = pytest.mark.slurm

# 30 steps of 8 sequences; checkpoints at 10, 20, 30 (and wherever a signal lands).
TINY = ["train.max_steps=30", "train.save_every=10", "train.log_every=1"]


def _metrics(run_dir: Path) -> List[Dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _status(run_dir: Path) -> Dict:
    return json.loads((run_dir / "status.json").read_text())


def _assert_ok(job: Job) -> None:
    assert job.state == "COMPLETED" and job.exit_code == 0, f"job {job.job_id} {job.state}:\n{job.text()[-4000:]}"


def _report(what: str, job: Job) -> None:
    print(f"\n[timing] {what}: job {job.job_id} {job.state} in {job.seconds:.1f} s (restarts {job.restarts})")


@pytest.fixture(scope="module")
def reference(slurm_single: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Tuple[Job, Path]:
    """An uninterrupted single-node run: `sbatch -c 2 slurm/train.sbatch` with 2 CPU ranks."""
    work = tmp_path_factory.mktemp("reference")
    job = slurm_single.sbatch_wait(["--cpus-per-task=2", str(TRAIN_SBATCH), *TINY, "name=reference"], work)
    _report("single node, 2 CPU ranks", job)
    return job, work / "runs" / "reference"


def test_single_node_train_sbatch(reference: Tuple[Job, Path]) -> None:
    job, run_dir = reference
    _assert_ok(job)
    log = job.text()
    assert f"job {job.job_id} attempt 1: 1 node(s) x 2 ranks" in log
    assert "1 node(s), 0 GPU(s) and 2 CPU(s) per node -> 1 x 2 cpu ranks" in log
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0, "the loss did not fall"
    assert _status(run_dir)["state"] == "completed" and _status(run_dir)["step"] == 30
    assert (run_dir / "reference.sbatch").is_file() and (run_dir / "config.yaml").is_file()
    assert (run_dir / f"hostfile.{job.job_id}").read_text().endswith(" slots=2\n")


@pytest.mark.parametrize(
    "override, message",
    [
        ("model=no_such_model", "launcher: error: model: no option 'no_such_model'"),
        ("hardware=8xh100", ("launcher: error: hardware: hardware=8xh100 runs 8 GPU ranks per node but the "
                            "allocation has 0 GPU(s) per node")),
        ("train.global_batch_size=12", "launcher: error: train.global_batch_size: 12 "),
    ],
)  # fmt: skip
def test_bad_override_fails_fast(slurm_single: Cluster, tmp_path: Path, override: str, message: str) -> None:
    job = slurm_single.sbatch_wait(["--cpus-per-task=2", str(TRAIN_SBATCH), *TINY, override], tmp_path, timeout=90)
    _report(f"bad override {override}", job)
    log = job.text()
    assert job.state == "FAILED" and job.exit_code == 2, log
    assert message in log, log
    assert [line for line in log.splitlines() if "error" in line.lower()] == [
        line for line in log.splitlines() if line.startswith(message)
    ]
    assert "deepspeed" not in log and not (tmp_path / "runs").exists(), "something started before the check"
    assert job.seconds < 30


def _submitted(stdout: str) -> List[str]:
    return [line.split("submitted job ")[1].split(":")[0] for line in stdout.splitlines()
            if line.startswith("submitted job ")]


def test_cli_submit_quotes_every_value_and_prepares_data_in_a_cpu_job(slurm_single: Cluster, tmp_path: Path) -> None:
    """`python -m launcher cluster=slurm` renders and submits; a run name full of shell syntax (it is also the
    run dir) stays text in every line of both scripts. cluster.prepare_job=true: the data is tokenized by a
    CPU job submitted first, not on the submitting host, and training starts after it ended."""
    name = 'it\'s $(touch PWNED) `touch PWNED2` "q"'
    escaped = name.replace('"', '\\"')
    env = dict(slurm_single.env, PYTHONPATH=str(REPO))
    cli = subprocess.run(
        [sys.executable, "-m", "launcher", "cluster=slurm", f'name="{escaped}"', "train.max_steps=3",
         "train.log_every=1", "cluster.prepare_job=true", "cluster.prepare_cpus=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert "is prepared by a CPU job the training job waits for" in cli.stderr and "data: prepared" not in cli.stderr
    prep_id, job_id = _submitted(cli.stdout)
    run_dir = tmp_path / "runs" / name
    prep = slurm_single.wait(prep_id, run_dir / f"slurm-{prep_id}.out")
    prep_info = slurm_single.job_info(prep_id)  # now: slurmctld forgets finished jobs after MinJobAge
    _assert_ok(prep)
    assert "launcher: data: prepared " in prep.text() and "tokens" in prep.text(), prep.text()
    job = slurm_single.wait(job_id, run_dir / f"slurm-{job_id}.out")
    info = slurm_single.job_info(job_id)
    _report("cli submit", job)
    _assert_ok(job)
    assert info.get("JobName") == "it's" and prep_info.get("JobName") == "it's", "--job-name lost its quoting"
    assert info["StartTime"] >= prep_info["EndTime"], (info, prep_info)  # ISO times compare as text
    assert [m["step"] for m in _metrics(run_dir)] == [1, 2, 3]
    assert not list(tmp_path.rglob("PWNED*")) and not list(REPO.glob("PWNED*")), "a value ran as shell code"


def test_failed_data_job_cancels_training(slurm_single: Cluster, tmp_path: Path) -> None:
    """A data job that fails (a record that is not JSON) ends with one error line, and Slurm cancels the
    training job that depended on it (--kill-on-invalid-dep) instead of leaving it pending; no rank started."""
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{not json\n')
    run_dir = tmp_path / "run"
    cli = subprocess.run(
        [sys.executable, "-m", "launcher", "cluster=slurm", f"hydra.run.dir={run_dir}", f"data.path={data}",
         "train.max_steps=3", "cluster.prepare_job=true", "cluster.prepare_cpus=1"],
        cwd=tmp_path, env=dict(slurm_single.env, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    prep_id, job_id = _submitted(cli.stdout)
    prep = slurm_single.wait(prep_id, run_dir / f"slurm-{prep_id}.out")
    assert prep.state == "FAILED" and prep.exit_code == 2, prep.text()
    errors = [line for line in prep.text().splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("launcher: error: data.") and "Traceback" not in prep.text()
    job = slurm_single.wait(job_id, run_dir / f"slurm-{job_id}.out")
    assert job.state == "CANCELLED" and not (run_dir / "metrics.jsonl").exists(), job.state


def test_preemption_checkpoints_requeues_and_resumes(
    slurm_single: Cluster, reference: Tuple[Job, Path], tmp_path: Path
) -> None:
    """USR1 to the batch shell (what --signal=B:USR1@N sends) mid-run -> the ranks checkpoint -> the job
    requeues itself -> the requeued job resumes and ends with the uninterrupted run's loss."""
    ref_job, ref_dir = reference
    _assert_ok(ref_job)
    job_id = slurm_single.submit(["--cpus-per-task=2", str(TRAIN_SBATCH), *TINY, "name=preempted"], tmp_path)
    run_dir = tmp_path / "runs" / "preempted"
    start = time.monotonic()
    while not ((run_dir / "metrics.jsonl").is_file() and len(_metrics(run_dir)) >= 3):
        assert time.monotonic() - start < JOB_TIMEOUT, "training did not start"
        assert slurm_single.job_info(job_id).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.2)
    # One live run per run dir: a second launch into it is refused, naming the job (the scheduler says it lives).
    second = subprocess.run([sys.executable, "-m", "launcher", "cluster=slurm", *TINY, "name=preempted",
                             f"hydra.run.dir={run_dir}", "dry_run=true"], env=slurm_single.env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and f"is in use by the run of SLURM job {job_id}" in second.stderr, second.stderr
    slurm_single.run("scancel", "--signal=USR1", "--batch", job_id)
    job = slurm_single.wait(job_id, tmp_path / f"slurm-{job_id}.out")
    job.seconds = time.monotonic() - start  # from the first metrics poll, through the requeue
    _report("preemption -> requeue -> resume", job)
    _assert_ok(job)
    log = job.text()
    assert job.restarts == 1, log
    assert "got USR1" in log and "attempt 2: 1 node(s) x 2 ranks" in log, log
    stopped = _status_step_from_log(log)
    assert 3 <= stopped < 30, log
    assert f"resuming at step {stopped}" in log
    metrics, ref = _metrics(run_dir), _metrics(ref_dir)
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert metrics[-1]["loss"] == pytest.approx(ref[-1]["loss"], rel=1e-6, abs=0)
    print(f"[preemption] stopped at step {stopped}; final loss {metrics[-1]['loss']!r} vs {ref[-1]['loss']!r}")
    assert (_status(run_dir)["state"], _status(run_dir)["step"]) == ("completed", 30)
    launches = json.loads((run_dir / "run.json").read_text())["launches"]
    assert [entry.get("state") for entry in launches] == ["preempted", "completed"], launches
    assert not (run_dir / ".lock").exists()


def test_scancel_usr1_stops_with_a_checkpoint_without_requeue(slurm_single: Cluster, tmp_path: Path) -> None:
    """`scancel --signal=USR1 <job>` (no --batch) reaches the ranks only: they checkpoint and exit 0, the batch
    shell saw no warning and does not requeue. The job's own warning timer is armed from the real limit."""
    args = ["--cpus-per-task=2", "--time=10", str(TRAIN_SBATCH), "train.max_steps=100000", "train.save_every=1000",
            "train.log_every=1", "name=stopped"]
    job_id = slurm_single.submit(args, tmp_path)
    run_dir = tmp_path / "runs" / "stopped"
    start = time.monotonic()
    while not ((run_dir / "metrics.jsonl").is_file() and len(_metrics(run_dir)) >= 3):
        assert time.monotonic() - start < JOB_TIMEOUT, "training did not start"
        time.sleep(0.2)
    slurm_single.run("scancel", "--signal=USR1", job_id)
    job = slurm_single.wait(job_id, tmp_path / f"slurm-{job_id}.out")
    _assert_ok(job)
    log = job.text()
    assert job.restarts == 0 and "got USR1" not in log, log
    left = int(log.split("time left ")[1].split()[0])
    assert 300 < left <= 600 and f"warning the ranks in {left - 300} s" in log, log  # 10 min limit - 300 s
    status = _status(run_dir)
    assert status["state"] == "preempted" and f"stopped by a signal, checkpointed at step {status['step']}" in log
    assert (run_dir / "checkpoints" / f"step_{status['step']:08d}" / "DONE").is_file()
    launches = json.loads((run_dir / "run.json").read_text())["launches"]
    assert len(launches) == 1 and launches[0]["state"] == "preempted" and not (run_dir / ".lock").exists()


def _status_step_from_log(log: str) -> int:
    line = next(x for x in log.splitlines() if "requeueing (restart 1 of" in x)
    return int(line.split("checkpointed at step ")[1].split(";")[0])


def _veth_bytes(iface: str) -> Tuple[int, int]:
    stats = Path("/sys/class/net") / iface / "statistics"
    return int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text())


def test_two_nodes_no_ssh_over_veth(slurm_netns: Cluster, reference: Tuple[Job, Path], tmp_path: Path) -> None:
    """Two SLURM nodes (network namespaces), one CPU rank each, one `deepspeed --no_ssh` runner per node;
    the gloo traffic between the ranks crosses n2's veth."""
    before = _veth_bytes("lslveth2")
    job = slurm_netns.sbatch_wait(
        ["--nodes=2", "--cpus-per-task=1", str(TRAIN_SBATCH), *TINY, "hardware.cpu_ranks=1", "name=two-nodes"],
        tmp_path,
    )
    after = _veth_bytes("lslveth2")
    _report("two nodes x 1 CPU rank (netns)", job)
    _assert_ok(job)
    log = job.text()
    assert "attempt 1: 2 node(s) x 1 ranks, master n1:" in log
    assert "global_rank_mapping=defaultdict(<class 'list'>, {'n1': [0], 'n2': [1]})" in log
    assert "--node_rank=0" in log and "--node_rank=1" in log  # one runner per node, no ssh
    received, sent = after[0] - before[0], after[1] - before[1]
    print(f"[two nodes] lslveth2: {received / 1e6:.1f} MB in, {sent / 1e6:.1f} MB out")
    assert received > 1e6 and sent > 1e6, "the ranks did not talk across the nodes"
    run_dir = tmp_path / "runs" / "two-nodes"
    assert (run_dir / f"hostfile.{job.job_id}").read_text() == "n1 slots=1\nn2 slots=1\n"
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 31))
    # Same 8-sequence global batch over 2 ranks as the single-node run: the same training.
    ref_job, ref_dir = reference
    if ref_job.state == "COMPLETED":
        assert metrics[-1]["loss"] == pytest.approx(_metrics(ref_dir)[-1]["loss"], rel=1e-6, abs=0)


def test_cluster_sh_is_idempotent(slurm_single: Cluster) -> None:
    env = dict(os.environ, SLURM_LOCAL_ROOT=str(slurm_single.conf.parents[2]))
    pids = (slurm_single.conf.parents[1] / "run" / "slurmctld.pid").read_text()
    again = subprocess.run(["bash", str(REPO / "tests/slurm/cluster.sh"), "single"], env=env, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert (slurm_single.conf.parents[1] / "run" / "slurmctld.pid").read_text() == pids
    assert slurm_single.run("srun", "-N1", "-n2", "hostname").stdout.count("\n") == 2


def test_rank_death_fails_the_job_fast(slurm_netns: Cluster, tmp_path: Path) -> None:
    """SIGKILL the rank on n2 mid-run: the job fails within seconds with a clear last line (no hang until the
    30-minute collective timeout): gloo errors on n1, srun --kill-on-bad-exit stops the other node."""
    job_id = slurm_netns.submit(
        ["--nodes=2", "--cpus-per-task=1", str(TRAIN_SBATCH), "train.max_steps=500", "train.log_every=1",
         "hardware.cpu_ranks=1", "name=rank-dies"],
        tmp_path,
    )  # fmt: skip
    run_dir = tmp_path / "runs" / "rank-dies"
    start = time.monotonic()
    while not ((run_dir / "metrics.jsonl").is_file() and len(_metrics(run_dir)) >= 3):
        assert time.monotonic() - start < JOB_TIMEOUT, "training did not start"
        time.sleep(0.2)
    pids = subprocess.run(["ip", "netns", "pids", "lslnode2"], capture_output=True, text=True).stdout.split()
    ranks = [p for p in pids if b"launcher.worker" in _cmdline(p) and b"deepspeed" not in _cmdline(p)]
    assert len(ranks) == 1, f"expected one rank on n2, found {ranks}"
    os.kill(int(ranks[0]), 9)
    job = slurm_netns.wait(job_id, tmp_path / f"slurm-{job_id}.out", timeout=120)
    _report("rank killed on n2 -> job fails", job)
    log = job.text()
    assert job.state == "FAILED" and job.exit_code != 0, log
    assert job.seconds < 60, f"took {job.seconds:.0f} s to fail"
    assert "error: a node exited with" in log.splitlines()[-1], log[-2000:]


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_resubmit_on_fewer_nodes_converts_the_checkpoint(slurm_netns: Cluster, tmp_path: Path) -> None:
    """A run saved on 2 nodes x 1 rank, resubmitted with --nodes=1: the job entry converts the checkpoint to
    the universal format on its allocation before srun starts a rank, and the run continues on 1 rank."""
    first = slurm_netns.sbatch_wait(
        ["--nodes=2", "--cpus-per-task=1", str(TRAIN_SBATCH), "train.max_steps=10", "train.save_every=10",
         "hardware.cpu_ranks=1", "name=world-change"], tmp_path)
    _assert_ok(first)
    second = slurm_netns.sbatch_wait(
        ["--nodes=1", "--cpus-per-task=1", str(TRAIN_SBATCH), "train.max_steps=20", "train.save_every=10",
         "hardware.cpu_ranks=1", "name=world-change"], tmp_path)
    _report("resubmitted on 1 of 2 nodes", second)
    _assert_ok(second)
    log = second.text()
    assert "checkpoint step_00000010 was saved on 2 rank(s), this launch has 1" in log, log[-3000:]
    assert "converted step_00000010 (2 ranks) to step_00000010_universal for 1 ranks" in log
    assert "resuming at step 10" in log and "4 micro x 2 accum x 1" in log
    run_dir = tmp_path / "runs" / "world-change"
    assert [m["step"] for m in _metrics(run_dir)] == [5, 10, 15, 20]  # train.log_every=5
    assert not list((run_dir / "checkpoints").glob("*_universal"))
