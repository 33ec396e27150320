"""The training worker on 2 real CPU ranks through the real `deepspeed` runner (DeepSpeed CPU accelerator,
gloo). Each launch costs ~10 s warm, so each test checks several things about its launches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from launcher.launch.shm import shm_files

pytestmark = pytest.mark.ranks

# fp32, no clipping and a constant LR isolate the engine's arithmetic from our schedule/clipping choices.
EXACT = ["train.grad_clip=0", "train.log_every=1", "train.save_every=1000"]


def metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(run_dir: Path, *overrides: str, expect: int = 0) -> subprocess.CompletedProcess:
    res = run_cli([f"hydra.run.dir={run_dir}", *overrides])
    assert res.returncode == expect, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def reference_losses(run_dir: Path) -> list:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    res = subprocess.run([sys.executable, str(REPO / "tests/ranks/reference.py"), str(run_dir)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_default_run_trains_then_resumes(tmp_path):
    """The must-show: train.max_steps=30 trains (loss falls, metrics, checkpoint); max_steps=40 resumes at 30."""
    run_dir = tmp_path / "run"
    res = train(run_dir, "train.max_steps=30")
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, "the built-in corpus is learnable: loss must fall clearly"
    for r in rows:
        assert r["tokens_per_sec"] > 0 and r["mem_peak_gb"] > 0.05 and r["mfu"] is None  # no CPU peak: no MFU
        assert r["tokens_per_sec_per_gpu"] == pytest.approx(r["tokens_per_sec"] / 2, abs=0.1)
        # CPU: peak RSS less file-backed pages; torch's mapped libraries alone are tens of MB of the RSS.
        assert r["mem_source"] == "rss_vmhwm_less_file"
        assert r["mem_peak_rss_gb"] > r["mem_peak_gb"] + 0.03
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000030"
    assert (run_dir / "loss.png").stat().st_size > 1000
    port = int((run_dir / "launch.sh").read_text().split("--master_port ")[1].split()[0])
    assert not shm_files(port), "DeepSpeed's shm allreduce files must not outlive the launch"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    assert "resume/extend" in res.stdout
    # The closing comparison, one line per rank: the plan recorded in run.json vs the lifetime peak RSS.
    closing = [line for line in res.stdout.splitlines() if line.startswith("memory: rank ")]
    assert [line.split(" planned")[0] for line in closing] == ["memory: rank 0", "memory: rank 1"], res.stdout
    planned = json.loads((run_dir / "run.json").read_text())["launches"][-1]["plan"]["expect_gib"]["rss"]
    assert f"planned {planned:.2f} GiB" in closing[0]
    assert all(r["mem_train_peak_gb"] <= r["mem_peak_gb"] for r in rows)

    res = train(run_dir, "train.max_steps=40")
    assert "resuming at step 30" in res.stdout
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30, 35, 40]  # appended, not restarted
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000040"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000030", "step_00000040"]


# ZeRO-3 without offload is checked against the same reference in test_zero3_resume_is_exact (one launch fewer).
@pytest.mark.parametrize("zero,offload", [("stage1", "none"), ("stage2", "none"), ("stage2", "cpu"), ("stage3", "cpu")])
def test_zero_stages_follow_plain_pytorch(zero, offload, tmp_path):
    """fp32, 2 ranks x micro 2 x accum 2: the loss trajectory matches single-process torch AdamW.

    Tolerance 2e-5 over 8 steps: the ranks reduce gradients in a different order than the reference sums
    them (measured differences are ~1e-6); CPU-offload uses DeepSpeed's AVX512 Adam kernel, not torch's.
    """
    run_dir = tmp_path / "run"
    train(run_dir, f"zero={zero}", f"offload={offload}", "train.max_steps=8", "train.micro_batch_size=2",
          "train.global_batch_size=8", "train.schedule=cosine", "train.warmup_steps=2", *EXACT)
    ours = [r["loss"] for r in metrics(run_dir)]
    ref = reference_losses(run_dir)
    assert len(ours) == len(ref) == 8
    assert ours[-1] < ours[0]
    worst = max(abs(a - b) for a, b in zip(ours, ref))
    assert worst < 2e-5, f"max |ours - reference| = {worst:.2e}\nours {ours}\nref  {ref}"


def test_activation_checkpointing_acts(tmp_path):
    """Checkpointing through deepspeed.checkpointing: bitwise-equal gradients, much lower activation memory."""
    out = tmp_path / "ac.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    deepspeed = Path(sys.executable).parent / "deepspeed"
    res = subprocess.run([str(deepspeed), "--num_gpus", "2", "--master_port", "29613",
                          str(REPO / "tests/ranks/ac_probe.py"), str(out), str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads(out.read_text())
    for stage, r in results.items():
        assert r["layers_recomputed"] == 4, stage
        assert r["loss_on"] == r["loss_off"], stage
        assert r["max_grad_diff"] == 0.0 and r["n_grads"] == 39, stage
        # Without checkpointing the forward keeps every layer's activations (~300 MB here); with it, only
        # the 4 layer inputs (8 x 512 x 256 x 4 B = 4 MB each) plus one layer's recompute working set.
        assert r["fwd_peak_mb_on"] < 0.5 * r["fwd_peak_mb_off"], (stage, r)
        assert r["fwd_bwd_peak_mb_on"] < 0.6 * r["fwd_bwd_peak_mb_off"], (stage, r)


def test_zero3_resume_is_exact(tmp_path):
    """Stop at step 6, resume to 12: the same losses and checkpoint contents as an uninterrupted run, which
    itself follows single-process torch AdamW (as test_zero_stages_follow_plain_pytorch for the other stages)."""
    common = ["zero=stage3", "train.schedule=constant", "train.warmup_steps=0", "train.global_batch_size=16", *EXACT]
    full, split = tmp_path / "full", tmp_path / "split"
    train(full, *common, "train.max_steps=12")
    ours, ref = [r["loss"] for r in metrics(full)], reference_losses(full)
    assert len(ours) == len(ref) == 12 and ours[-1] < ours[0]
    worst = max(abs(a - b) for a, b in zip(ours, ref))
    assert worst < 2e-5, f"max |ours - reference| = {worst:.2e}\nours {ours}\nref  {ref}"
    train(split, *common, "train.max_steps=6")
    assert (split / "checkpoints" / "latest").read_text() == "step_00000006"
    res = train(split, *common, "train.max_steps=12")
    assert "resuming at step 6" in res.stdout
    a, b = metrics(full), metrics(split)
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def launch_fp16(run_dir: Path, *overrides: str, expect: int = 0) -> subprocess.CompletedProcess:
    """Render with the real CLI (dry run), then start the real runner on the fp16-enabling worker wrapper."""
    res = run_cli([f"hydra.run.dir={run_dir}", "precision=fp16", *overrides, "dry_run=true"])
    assert res.returncode == 0, res.stderr
    res = run_cli([f"hydra.run.dir={run_dir}", "precision=fp16", *overrides], module="launcher.data")  # the data
    assert res.returncode == 0, res.stderr
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    deepspeed = Path(sys.executable).parent / "deepspeed"
    res = subprocess.run([str(deepspeed), "--num_gpus", "2", "--master_port", "29617",
                          str(REPO / "tests/ranks/fp16_on_cpu_worker.py"), "--run-dir", str(run_dir)],
                         capture_output=True, text=True, env=env, cwd=run_dir, timeout=600)
    assert res.returncode == expect, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_fp16_overflow_lowers_scale_skips_and_collapse_stops(tmp_path):
    """2^32 overflows fp16: each overflow skips the step and halves the scale (after the hysteresis).
    With the floor at 2^20, still overflowing, the scale sits at the minimum and the run stops loudly."""
    run_dir = tmp_path / "run"
    res = launch_fp16(run_dir, "precision.initial_scale_power=32", "precision.min_loss_scale=1048576",
                      "precision.max_steps_at_min_scale=3", "train.max_steps=40", *EXACT, expect=3)
    rows = metrics(run_dir)
    scales = [r["loss_scale"] for r in rows]
    skipped = [r["skipped_steps"] for r in rows]
    assert scales[0] == 2.0**32 and skipped[0] == 1  # first overflow only consumes the hysteresis
    assert scales[1] == 2.0**31 and skipped[1] == 2
    assert all(b <= a for a, b in zip(scales, scales[1:])) and min(scales) == 2.0**20
    assert skipped == list(range(1, len(rows) + 1))  # every step overflowed and was skipped
    # 2^32 (hysteresis), then halving 2^31 ... 2^20 at step 13, which holds for 3 steps: stop after step 15
    assert scales == [2.0**32] + [2.0**e for e in range(31, 19, -1)] + [2.0**20] * 2
    assert "fp16 loss scale has sat at min_loss_scale=1048576.0 for 3 steps" in res.stderr
    assert "precision=bf16" in res.stderr and "Traceback" not in res.stderr
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"


def test_fp16_trains_with_dynamic_scale(tmp_path):
    run_dir = tmp_path / "fp16"
    launch_fp16(run_dir, "train.max_steps=10", "train.log_every=1", "zero=stage3")
    rows = metrics(run_dir)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    assert [r["loss_scale"] for r in rows] == [2.0**16] * 10 and rows[-1]["skipped_steps"] == 0


def test_bf16_trains(tmp_path):
    run_dir = tmp_path / "bf16"
    train(run_dir, "precision=bf16", "train.max_steps=10", "train.log_every=1")
    rows = metrics(run_dir)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3 and "loss_scale" not in rows[0]


def _start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "launcher", f"hydra.run.dir={run_dir}", *overrides],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()):
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise AssertionError("training did not reach step %d" % step)


def _worker_pids(run_dir: Path) -> list:
    import psutil

    wanted = ["-m", "launcher.worker", "--run-dir", str(run_dir)]
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if cmd[-4:] == wanted and "deepspeed.launcher.launch" not in " ".join(cmd):
            pids.append(proc.info["pid"])
    return pids


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "train.max_steps=100000", "train.save_every=100000", "train.log_every=1")
    _wait_for_step(run_dir, proc, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and status["step"] >= 3
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{status['step']:08d}"
    assert "stopped by signal after checkpointing step" in out
    assert not _worker_pids(run_dir)


def test_dead_rank_fails_launch_fast_and_checkpoint_survives(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "zero=stage3", "train.max_steps=100000", "train.save_every=3", "train.log_every=1",
                  "train.keep_last=1")
    _wait_for_step(run_dir, proc, 5)
    pids = _worker_pids(run_dir)
    assert len(pids) == 2
    killed_at = time.time()
    os.kill(pids[1], signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.time() - killed_at < 45, "a dead rank must end the launch within seconds, not hang"
    assert not _worker_pids(run_dir)
    port = int((run_dir / "launch.sh").read_text().split("--master_port ")[1].split()[0])
    assert not shm_files(port), "the killed rank's shm file is swept by the launcher"
    tag = (run_dir / "checkpoints" / "latest").read_text()
    step = int(tag.split("_")[1])
    res = train(run_dir, "zero=stage3", f"train.max_steps={step + 2}", "train.save_every=3", "train.log_every=1",
                "train.keep_last=1")
    assert f"resuming at step {step}" in res.stdout


def _save_local_model(model_dir: Path) -> None:
    """A local HF model dir (weights + tokenizer) as a user would have after downloading one."""
    import torch
    from omegaconf import OmegaConf
    from transformers import LlamaForCausalLM

    from launcher.models.hf_config import llama_config
    from launcher.models.tokenizer import byte_tokenizer

    model_cfg = OmegaConf.load(REPO / "conf/model/tiny_llama.yaml")
    model_cfg.attn_implementation = "sdpa"
    torch.manual_seed(7)
    LlamaForCausalLM(llama_config(model_cfg)).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)


def test_local_model_and_data_under_zero3(tmp_path):
    """model.path + data.path (jsonl): ZeRO-3 loads the pretrained weights partitioned (HfDeepSpeedConfig
    before from_pretrained); the first step's loss equals the pretrained model's loss on that batch."""
    import torch
    from transformers import AutoModelForCausalLM

    from launcher.worker.data import Rows, SampleOrder

    model_dir, data = tmp_path / "model", tmp_path / "data.jsonl"
    _save_local_model(model_dir)
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    data.write_text("".join(json.dumps({"content": " ".join(words[(i + j) % 5] for j in range(30))}) + "\n"
                            for i in range(200)))
    run_dir = tmp_path / "run"
    res = train(run_dir, f"model.path={model_dir}", f"data.path={data}", "data.text_field=content", "zero=stage3",
                "train.max_steps=3", *EXACT)
    assert "starting: 820,352 params" in res.stdout
    first = metrics(run_dir)[0]["loss"]

    rows = Rows(str(next(p for p in (run_dir / "cache").glob("packed-*") if p.is_dir())))  # not the .lock
    order = SampleOrder(len(rows), 1234)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():  # the global batch (positions 0..7 on both ranks): token-loss sum / target tokens
        total, targets = 0.0, 0
        for i in range(8):
            ids, labels, pos = (torch.from_numpy(a)[None] for a in rows.row(order.row(i)))
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, labels[0, 1:], reduction="sum"))
            targets += int((labels[0, 1:] != -100).sum())
    assert abs(first - total / targets) < 1e-5, (first, total / targets)


def test_broken_data_file_fails_before_training(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    run_dir = tmp_path / "run"
    res = train(run_dir, f"data.path={bad}", "train.max_steps=3", expect=2)
    # Refused on the submitting host before any rank starts, with the bad line.
    assert "error: data.path: 1 of 2 records are bad (bad.jsonl:2: invalid JSON" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()
