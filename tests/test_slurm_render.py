"""SLURM and hostfile renders against golden files, and the rendered script run under bash with fake
srun/scontrol/deepspeed: values that look like shell code stay text. No SLURM needed.

Regenerate the golden files after an intended change: UPDATE_GOLDEN=1 pytest tests/test_slurm_render.py
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
from pathlib import Path
from typing import List, Optional

import pytest
from conftest import run_cli

from launcher.config.compose import compose
from launcher.config.hostfile import parse_hostfile
from launcher.config.topology import resolve_topology
from launcher.config.validate import validate
from launcher.errors import ConfigError
from launcher.launch.slurm import Allocation, allocation_from_env, check_allocation, job_overrides
from launcher.prepare import compose_resolved
from launcher.render import sbatch as slurm
from launcher.render.command import rank_environment
from launcher.render.hostfile import deepspeed_env_text, hostfile_text
from launcher.render.prepare_sbatch import prepare_script
from launcher.render.sbatch import sbatch_name

GOLDEN = Path(__file__).resolve().parent / "golden"
NASTY = 'x $(touch PWNED) `touch PWNED2` "dq" it\'s ; &'


def _paths(run_dir: str) -> slurm.JobPaths:
    return slurm.JobPaths(
        run_dir=run_dir,
        script=f"{run_dir}/job.sbatch",
        deepspeed="/opt/venv/bin/deepspeed",
        python="/opt/venv/bin/python",
        pythonpath="/opt/launcher",
        bin_dir="/opt/venv/bin",
    )


def _render(overrides: List[str], paths: Optional[slurm.JobPaths] = None, name: Optional[str] = None) -> str:
    # compose_resolved: precision=auto (the default) resolved for the profile, as every entry point does.
    cfg, _, topo, _ = compose_resolved(["cluster=slurm", *overrides], 0)
    if name is not None:
        cfg.name = name  # set directly: Hydra's override quoting is not the shell's
    validate(cfg, topo)
    env = rank_environment(cfg, topo, slurm.cpus_per_task(topo))  # as slurm_files on a login node
    return slurm.sbatch_script(cfg, topo, env, paths or _paths("/shared/runs/job"))


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"missing {path}; create it with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} changed; if intended, regenerate with UPDATE_GOLDEN=1"


def test_sbatch_4_nodes_x_8_h100_golden() -> None:
    text = _render(["cluster.nodes=4", "hardware=8xh100", "zero=stage3", "model=llama3_8b", "name=llama3_8b-zero3"])
    _check_golden("sbatch_4x8xh100_zero3_llama3_8b.sbatch", text)
    assert "#SBATCH --nodes=4\n" in text and "#SBATCH --gpus-per-node=8\n" in text
    assert '--num_nodes 4 --node_rank "$SLURM_NODEID"' in text and "--num_gpus 8" in text
    assert "export NCCL_SOCKET_IFNAME='^lo,docker'" in text
    assert "cpus-per-task=" not in text.split("set -uo")[0]  # GPU nodes are taken whole


def test_sbatch_cpu_site_settings_golden() -> None:
    text = _render(
        [
            "name=cpu-site",
            "cluster.partition=debug",
            "cluster.account=proj-42",
            "cluster.qos=high",
            "cluster.time=00:30:00",
            "cluster.signal_seconds=120",
            "cluster.max_requeues=1",
            "cluster.setup=['module load gcc/12','source /opt/venv/bin/activate']",
            "cluster.sbatch_extra=['--constraint=cpu','--mem=16G']",
        ]
    )
    _check_golden("sbatch_cpu_site.sbatch", text)
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert header[-2:] == ["#SBATCH --constraint=cpu", "#SBATCH --mem=16G"]  # extras last: they win
    for opt in (
        "--partition=debug",
        "--account=proj-42",
        "--qos=high",
        "--time=00:30:00",
        "--cpus-per-task=2",
        "--signal=B:USR1@120",
        "--requeue",
        "--open-mode=append",
        "--output=/shared/runs/job/slurm-%j.out",
    ):
        assert f"#SBATCH {opt}" in header
    assert "gpus-per-node" not in text and "export DS_ACCELERATOR=cpu" in text
    assert "module load gcc/12\nsource /opt/venv/bin/activate\n" in text
    assert "MAX_REQUEUES=1\n" in text


def test_prepare_data_job_golden() -> None:
    """cluster.prepare_job=true: the CPU-only data job (no GPU, no requeue, its own cores/time/partition)."""
    cfg, _, topo, _ = compose_resolved(["cluster=slurm", "hardware=8xh100", "model=llama3_8b", "name=llama3_8b-sft",
                                        "cluster.prepare_job=true", "cluster.prepare_cpus=32",
                                        "cluster.prepare_time=04:00:00", "cluster.partition=gpu",
                                        "cluster.prepare_partition=cpu", "cluster.account=proj-42",
                                        "cluster.setup=['module load python/3.11']"], 0)
    validate(cfg, topo)
    text = prepare_script(cfg, "/shared/runs/job", "/shared/runs/job/job.sbatch", "/opt/venv/bin/python",
                          "/opt/launcher")
    _check_golden("prepare_data_llama3_8b.sbatch", text)
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --partition=cpu" in header and "#SBATCH --cpus-per-task=32" in header
    assert not any("gpus" in h or "requeue" in h or "exclusive" in h for h in header)
    assert text.rstrip().endswith("-m launcher.data --run-dir /shared/runs/job")
    with pytest.raises(ConfigError, match="cluster.prepare_time"):
        cfg.cluster.prepare_time = "2h"
        prepare_script(cfg, "/r", "/r/job.sbatch", "/py", "/pp")


def test_hostfile_and_nossh_argv() -> None:
    text = hostfile_text(["n1", "n2", "gpu-003.cluster"], 8)
    _check_golden("hostfile_3x8.txt", text)
    assert parse_hostfile(text) == [("n1", 8), ("n2", 8), ("gpu-003.cluster", 8)]
    argv = slurm.nossh_runner_args(4, 8, "/shared/runs/job", "/shared/runs/job/hostfile.7", "n1", "20007", "2")
    assert argv == [
        "--hostfile", "/shared/runs/job/hostfile.7", "--num_nodes", "4", "--node_rank", "2",
        "--master_addr", "n1", "--master_port", "20007", "--no_ssh", "--num_gpus", "8",
        "--no_local_rank", "--module", "launcher.worker", "--run-dir", "/shared/runs/job",
    ]  # fmt: skip
    rendered = slurm.shell_join(slurm.nossh_runner_args(2, 1, "/r"))
    assert '--node_rank "$SLURM_NODEID" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"' in rendered
    with pytest.raises(ConfigError, match="not a host name"):
        hostfile_text(["n1 slots=2"], 1)
    with pytest.raises(ConfigError, match="listed twice"):
        parse_hostfile("a slots=1\na slots=2\n")
    with pytest.raises(ConfigError, match="not 'host slots=N'"):
        parse_hostfile("a slots=x\n")


def test_hostfile_mode_dry_run(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two CPU nodes\nnode-a slots=2\nnode-b slots=4\n")
    run_dir = tmp_path / "run"
    r = run_cli(["cluster=hostfile", f"cluster.hostfile={hostfile}", "dry_run=true", f"hydra.run.dir={run_dir}"])
    assert r.returncode == 0, r.stderr
    assert "2 node(s) x 2 cpu rank(s)" in r.stdout
    launch = (run_dir / "launch.sh").read_text()
    assert f"--hostfile {hostfile} --num_nodes 2 --num_gpus 2 --master_port" in launch
    env = (run_dir / ".deepspeed_env").read_text()
    assert "DS_ACCELERATOR=cpu\n" in env and "PATH=" in env and "PYTHONPATH=" in env
    bad = run_cli(
        [
            "cluster=hostfile",
            f"cluster.hostfile={hostfile}",
            "hardware=8xh100",
            "dry_run=true",
            f"hydra.run.dir={tmp_path / 'bad'}",
        ]
    )
    assert bad.returncode == 2 and "node-a has slots=2 but hardware=8xh100 runs 8 ranks per node" in bad.stderr
    with pytest.raises(ConfigError, match="cannot pass through"):
        deepspeed_env_text({"NCCL_X": 'a"b'}, "/bin")


def test_cli_dry_run_writes_sbatch_next_to_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    r = run_cli(
        [
            "cluster=slurm",
            "cluster.nodes=4",
            "hardware=8xh100",
            "zero=stage3",
            "model=llama3_8b",
            "dry_run=true",
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in run_dir.iterdir())
    assert "config.yaml" in files and "ds_config.json" in files and "launch.sh" not in files
    script = [f for f in files if f.endswith(".sbatch")]
    assert len(script) == 1
    text = (run_dir / script[0]).read_text()
    assert text in r.stdout and "#SBATCH --nodes=4" in text and "#SBATCH --gpus-per-node=8" in text
    launch = json.loads((run_dir / "run.json").read_text())["launches"][-1]
    assert launch["command"] == ["sbatch", str(run_dir / script[0])]


@pytest.mark.parametrize(
    "override, match",
    [
        ("cluster.time=1h", "is not a SLURM time"),
        ("cluster.signal_seconds=4000", "is not below cluster.time"),
        ("cluster.partition='a\nb'", "control character"),
        ("cluster.sbatch_extra=[exclusive]", "is not an sbatch option"),
        ("cluster.max_requeues=-1", "must be >= 0"),
        ("cluster.prepare_cpus=0", "cluster.prepare_cpus: must be >= 1"),
    ],
)
def test_bad_slurm_settings(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _render([override])


def test_time_seconds() -> None:
    assert slurm.time_seconds("90") == 5400
    assert slurm.time_seconds("05:30") == 330
    assert slurm.time_seconds("01:00:00") == 3600
    assert slurm.time_seconds("2-00") == 172800
    assert slurm.time_seconds("1-02:03:04") == 93784
    assert slurm.time_seconds("UNLIMITED") is None


def test_sbatch_name() -> None:
    assert sbatch_name("llama3_8b-8xh100-zero3") == "llama3_8b-8xh100-zero3.sbatch"
    assert sbatch_name(NASTY) == "x_touch_PWNED_touch_PWNED2_dq_it_s.sbatch"
    assert sbatch_name("../..") == "run.sbatch"


def test_allocation_and_overrides() -> None:
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_PER_NODE": "h100:8", "SLURM_CPUS_ON_NODE": "96"}
    assert allocation_from_env(env) == Allocation("7", 2, 8, 96)
    assert allocation_from_env({"SLURM_JOB_ID": "7", "SLURM_NNODES": "1"}) == Allocation("7", 1, 0, 1)
    with pytest.raises(ConfigError, match="not inside a SLURM job"):
        allocation_from_env({})
    alloc = Allocation("7", 2, 0, 2)
    assert job_overrides(["zero=stage3"], alloc) == ["cluster=slurm", "zero=stage3", "cluster.nodes=2"]
    with pytest.raises(ConfigError, match="allocation has 2 node"):
        job_overrides(["cluster.nodes=4"], alloc)
    with pytest.raises(ConfigError, match="runs cluster=slurm"):
        job_overrides(["cluster=local"], alloc)
    cfg, _ = compose(job_overrides(["hardware=8xh100"], alloc))
    with pytest.raises(ConfigError, match="allocation has 0 GPU"):
        check_allocation(cfg, resolve_topology(cfg, 0), alloc)


def _fake_bin(path: Path, name: str, body: str) -> None:
    f = path / name
    f.write_text("#!/bin/bash\n" + body)
    f.chmod(f.stat().st_mode | stat.S_IXUSR)


def test_rendered_script_runs_with_nasty_values(tmp_path: Path) -> None:
    """The script under bash with fake srun/scontrol/deepspeed: arguments arrive intact, nothing executes."""
    run_dir = tmp_path / f"runs/{NASTY}"
    run_dir.mkdir(parents=True)
    fake = tmp_path / "bin"
    fake.mkdir()
    _fake_bin(
        fake, "scontrol", 'case "$1 $2" in "show hostnames") echo vm ;; *) echo "scontrol $*" >> "$LOG" ;; esac\n'
    )
    # srun: drop its options, run the task command once as node 0 (what one-node srun does)
    _fake_bin(fake, "srun", 'while [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"\n')
    _fake_bin(fake, "getent", "exit 0\n")
    _fake_bin(
        fake,
        "deepspeed",
        'python3 -c \'import json, sys; print(json.dumps(sys.argv[1:]))\' "$@" > "$LOG.argv"\n'
        'run_dir="${@: -1}"\n'
        'printf \'{"state": "completed", "step": 3}\' > "$run_dir/status.json"\n',
    )
    paths = slurm.JobPaths(
        run_dir=str(run_dir),
        script=str(run_dir / "job.sbatch"),
        deepspeed=str(fake / "deepspeed"),
        python="python3",
        pythonpath=str(tmp_path / "py path $(touch PWNED3)"),
        bin_dir=str(fake),
    )
    text = _render(["cluster.setup=['echo setup-ran']"], paths=paths, name=NASTY)
    assert f"#SBATCH --job-name={shlex.quote(NASTY)}" in text
    script = run_dir / "job.sbatch"
    script.write_text(text)
    env = {
        "PATH": f"{fake}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "vm",
        "SLURM_CPUS_ON_NODE": "2",
        "LOG": str(tmp_path / "log"),
        "HOME": str(tmp_path),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),  # the job's lock and settle steps
    }
    r = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "setup-ran" in r.stdout and "finished: state=completed step=3" in r.stdout
    argv = json.loads((tmp_path / "log.argv").read_text())
    assert argv == slurm.nossh_runner_args(1, 2, str(run_dir), str(run_dir / "hostfile.42"), "vm", "20042", "0")
    assert (run_dir / "hostfile.42").read_text() == "vm slots=2\n"
    assert not list(tmp_path.rglob("PWNED*")), "a value was executed as shell code"
