"""Hydra's flags (--cfg, --info, -m, -sc), subcommands, precision=auto, the console and the monitors, through
the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from launcher.config.precision import choose_precision
from launcher.config.sweep import expand
from launcher.config.topology import Topology
from launcher.prepare import prepare

FAST = ["train.max_steps=2", "train.log_every=1", "train.save_every=100", "data.builtin_documents=200"]


def test_cfg_job_prints_the_config_and_writes_nothing(tmp_path):
    res = run_cli(["--cfg", "job", "zero=stage3", "train.lr=3e-4"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    assert cfg["zero"]["stage"] == 3 and cfg["train"]["lr"] == 3e-4 and "hydra" not in cfg
    assert cfg["name"] == "${model.name}-${hardware.name}-zero${zero.stage}-${precision.name}"  # as Hydra: unresolved
    assert list(tmp_path.iterdir()) == []  # no runs/, no .hydra/, no outputs/
    res = run_cli(["--cfg", "job", "--resolve", "--package", "train", "train.lr=3e-4"], cwd=tmp_path)
    assert yaml.safe_load(res.stdout.split("\n", 1)[1])["lr"] == 3e-4, res.stdout
    res = run_cli(["--cfg", "all", "hardware=8xh100"], cwd=tmp_path)
    assert yaml.safe_load(res.stdout)["hydra"]["run"]["dir"] == "runs/${name}"
    res = run_cli(["--info", "zero=stage1"], cwd=tmp_path)
    assert "zero: stage1  (conf/zero/stage1.yaml)" in res.stdout and "file://" in res.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,message", [
    (["--bogus"], "error: --bogus: unknown flag; supported: --cfg job|all|hydra, --resolve"),
    (["--cfg", "everything"], "error: --cfg: needs job|all|hydra"),
    (["--resolve"], "error: --resolve: only applies with --cfg"),
    (["-m", "zero=stage9,stage2", "dry_run=true"], None),
])
def test_flag_errors_are_one_line(args, message, tmp_path):
    res = run_cli(args, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    if message:
        assert res.stderr.strip().splitlines() == [res.stderr.strip()] and res.stderr.startswith(message)
    else:  # a bad sweep point is recorded and reported; the sweep goes on
        assert "error: zero: no option 'stage9'" in res.stderr and "completed" not in res.stdout


def test_shell_completion_knows_groups_options_and_keys():
    res = run_cli(["-sc", "install=bash"])
    assert "complete -o nospace" in res.stdout and "-sc query=bash" in res.stdout
    assert "bashcompinit" in run_cli(["-sc", "install=zsh"]).stdout

    def query(line: str) -> list:
        return run_cli(["-sc", "query=bash"], env={"COMP_LINE": line}).stdout.split()

    assert {"zero=", "zero.stage="} <= set(query("launcher ze"))
    assert query("launcher zero=st") == ["zero=stage1", "zero=stage2", "zero=stage3"]
    assert "train.lr=" in query("launcher train.l") and "+experiment=" in query("launcher exp")
    assert query("launcher dry_run=") == ["dry_run=true", "dry_run=false"]
    assert "--cfg" in query("launcher --c")


def test_sweep_syntax_expands_as_hydra():
    sweep = expand(["zero=stage2,stage3", "train.lr=range(1,3)", "precision=glob(fp*)", "seed=1"])
    assert sweep.base == ("seed=1",) and len(sweep.points) == 2 * 2 * 2
    assert sweep.points[0] == ("zero=stage2", "train.lr=1", "precision=fp16")
    assert sweep.points[-1] == ("zero=stage3", "train.lr=2", "precision=fp32")
    assert sweep.sweep_dir == "runs/sweeps/zero-stage2+stage3_train.lr-range_1+3__precision-glob_fp_"
    assert expand(["zero=stage1,stage2", "hydra.sweep.dir=/x"]).sweep_dir == "/x"


def test_subcommands_and_python_m_forms(tmp_path):
    assert "zero  offload" in run_cli(["plan", "hardware=8xh100"]).stdout
    assert run_cli(["hardware=8xh100"], module="launcher.plan").returncode == 0
    res = run_cli(["export", "--help"])
    assert res.returncode == 0 and res.stdout == run_cli(["--help"], module="launcher.export").stdout
    res = run_cli(["train", "dry_run=true", f"hydra.run.dir={tmp_path / 'r'}"])
    assert res.returncode == 0 and (tmp_path / "r" / "launch.sh").is_file(), res.stderr
    res = run_cli(["sweep", str(tmp_path)])
    assert res.returncode == 2 and res.stderr.startswith("error: sweep: no sweep.json")
    res = run_cli(["data", f"hydra.run.dir={tmp_path / 'd'}", "data.builtin_documents=100"])
    assert res.returncode == 0 and "row 0 of 100 (128 tokens" in res.stdout, res.stderr


def test_precision_auto_follows_the_hardware(tmp_path):
    def chosen(*overrides: str) -> tuple:
        run = prepare([*overrides, "dry_run=true", f"hydra.run.dir={tmp_path}"], local_gpus=0, check_resume=False)
        return run.cfg.precision.name, json.loads(run.files["ds_config.json"]), run.cfg

    name, ds, cfg = chosen()
    assert name == "fp32" and "bf16" not in ds and "fp16" not in ds and cfg.notes.precision.chosen == "fp32"
    assert chosen("hardware=8xa100")[0] == "bf16" and chosen("hardware=8xh100")[0] == "bf16"
    name, ds, cfg = chosen("hardware=8xa100", "hardware.bf16=false")
    assert name == "fp16" and ds["fp16"]["loss_scale"] == 0 and "no bf16" in cfg.notes.precision.reason
    assert chosen("hardware=8xa100", "precision=fp32")[0] == "fp32"  # an explicit choice stays
    gpu = Topology(1, 1, "cuda")
    assert choose_precision(_local(cfg), gpu, local_bf16=True)[0] == "bf16"
    assert choose_precision(_local(cfg), gpu, local_bf16=False)[0] == "fp16"
    # the default run name carries the resolved precision, as before
    assert prepare(["dry_run=true"], local_gpus=0).run_dir.name == "tiny_llama-local-zero2-fp32"


def _local(cfg):
    from omegaconf import OmegaConf

    out = OmegaConf.to_container(cfg)
    out["hardware"]["gpus_per_node"] = None
    return OmegaConf.create(out)


@pytest.mark.ranks
def test_sweep_runs_each_point_in_its_run_dir_then_resumes(tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", "zero=stage1,stage2", *FAST, f"hydra.sweep.dir={sweep_dir}"]
    res = run_cli(args, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    record = json.loads((sweep_dir / "sweep.json").read_text())
    dirs = [Path(p["run_dir"]) for p in record["points"]]
    assert [d.name for d in dirs] == ["zero-stage1", "zero-stage2"]
    for d, stage in zip(dirs, (1, 2)):
        assert json.loads((d / "ds_config.json").read_text())["zero_optimization"]["stage"] == stage
        assert json.loads((d / "status.json").read_text())["state"] == "completed"
    table = res.stdout[res.stdout.index(f"sweep {sweep_dir}"):]
    rows = [line for line in table.splitlines() if line[:1].isdigit()]
    assert len(rows) == 2 and all("completed" in r and " 2 " in r for r in rows), table
    assert run_cli(["sweep", str(sweep_dir)]).stdout == table  # the same table later
    again = run_cli(args, cwd=tmp_path)  # rerun: every point is done, nothing starts
    assert again.returncode == 0 and again.stdout.count("completed before, skipped") == 2, again.stdout


@pytest.mark.ranks
def test_console_is_readable_and_monitors_write(tmp_path):
    """A run with every monitor on: the terminal shows the summary and rank 0's lines, no DeepSpeed INFO and
    no per-rank warnings (those are in logs/rank<N>.log); TensorBoard's reader loads the event file; W&B
    offline writes its run folder with no secret in it; CSV files appear."""
    run_dir = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": "sk-ENVSECRET0123456789012345678901234567890"}
    res = run_cli([*FAST, "train.max_steps=3", "monitor.tensorboard=true", "monitor.wandb=true", "monitor.csv=true",
                   f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    for noise in ("[INFO]", "FutureWarning", "Attempting to get learning rate", "built successfully", "[WARNING]"):
        assert noise not in out, f"{noise!r} on the console:\n{out}"
    for line in ("world:      1 node(s) x 2 cpu rank(s)", "batch:      4 micro x 1 accum x 2 ranks", "memory:",
                 "precision:  fp32", f"run dir:    {run_dir}", "logs:", "step 3 | loss", "[launcher] finished"):
        assert line in out, line
    logs = run_dir / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["rank0.log", "rank1.log"]
    assert "FutureWarning" in (logs / "rank1.log").read_text()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, list(run_dir.iterdir())
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("Train/loss")] == [1, 2, 3]
    assert list((run_dir / "csv").rglob("*.csv"))
    assert list((run_dir / "wandb").glob("offline-run-*")), "no W&B offline run folder"
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert b"sk-ENVSECRET" not in f.read_bytes(), f"secret in {f}"
    assert (run_dir / "loss.png").is_file()
