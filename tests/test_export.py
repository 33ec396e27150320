"""`python -m launcher.export` and train.export_at_end on real 2-rank runs of ZeRO 1, 2 and 3.

One short run per stage (4 steps, checkpoints at steps 2 and 4), shared by the tests of that stage. The
"trained model" each export is compared against comes from an independent path: DeepSpeed's own
zero_to_fp32.py script, which every checkpoint dir carries, run as a separate process into a torch state
dict, loaded strictly into the run's Llama. Each stage also covers other features: ZeRO-1 runs with tied
embeddings (and sharded output, a non-latest step), ZeRO-2 trains in bf16 (default export dtype bf16,
checked bitwise against the engine's own bf16 weights), ZeRO-3 uses train.export_at_end and is reloaded
through transformers' Auto classes in an offline process.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import pytest
from conftest import REPO, run_cli

pytestmark = pytest.mark.ranks

torch = pytest.importorskip("torch")

COMMON = ["train.max_steps=4", "train.save_every=2", "train.log_every=1"]
TEXT = "Hello, wörld! Ünïcode, tabs\tand\nnewlines, 你好 🙂"
_REFERENCE: Dict[Tuple[str, int], Dict[str, "torch.Tensor"]] = {}


def train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    res = run_cli([f"hydra.run.dir={run_dir}", *COMMON, *overrides])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def export(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    res = run_cli(list(args), module="launcher.export")
    assert res.returncode == expect, res.stdout[-3000:] + res.stderr[-3000:]
    if expect == 2:  # a user error: one `error:` line, last, and no traceback
        lines = res.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and sum(line.startswith("error: ") for line in lines) == 1, res.stderr
        assert "Traceback" not in res.stderr
    return res


def reference_state_dict(run_dir: Path, step: int) -> Dict[str, "torch.Tensor"]:
    """fp32 weights of the checkpoint via the zero_to_fp32.py script DeepSpeed copied next to it."""
    key = (str(run_dir), step)
    if key not in _REFERENCE:
        out = run_dir / f"ref_step{step}"
        shutil.rmtree(out, ignore_errors=True)
        env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
        res = subprocess.run([sys.executable, str(run_dir / "checkpoints" / "zero_to_fp32.py"),
                              str(run_dir / "checkpoints"), str(out), "--tag", f"step_{step:08d}"],
                             capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        _REFERENCE[key] = torch.load(out / "pytorch_model.bin", weights_only=True)
    return _REFERENCE[key]


def reference_model(run_dir: Path, step: int):
    from omegaconf import OmegaConf
    from transformers import LlamaForCausalLM

    from launcher.models.hf_config import llama_config

    model = LlamaForCausalLM(llama_config(OmegaConf.load(run_dir / "config.yaml").model))
    model.load_state_dict(reference_state_dict(run_dir, step), strict=True)
    return model.eval()


def input_ids() -> "torch.Tensor":
    return (torch.arange(2 * 48) * 37 % 256).reshape(2, 48)


def logits(model) -> "torch.Tensor":
    with torch.no_grad():
        return model(input_ids=input_ids()).logits.float()


def load_export(out: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()


def exported_tensors(out: Path) -> Dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    tensors: Dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("model*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def assert_weights_equal(out: Path, reference: Dict[str, "torch.Tensor"], dtype: "torch.dtype") -> None:
    """Bitwise: the export is the reference cast to the export dtype (a tied lm_head is stored once)."""
    ours = exported_tensors(out)
    assert set(ours) | {"lm_head.weight"} >= set(reference) and set(ours) <= set(reference)
    for name, t in ours.items():
        assert t.dtype == dtype, name
        assert torch.equal(t, reference[name].to(dtype)), name


def info(out: Path) -> dict:
    return json.loads((out / "export.json").read_text())


@pytest.fixture(scope="module")
def z1(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("z1") / "run"
    train(run_dir, "zero=stage1", "model.tie_word_embeddings=true")
    return run_dir


@pytest.fixture(scope="module")
def z2(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("z2") / "run"
    train(run_dir, "zero=stage2", "precision=bf16")
    return run_dir


@pytest.fixture(scope="module")
def z3(tmp_path_factory) -> Tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("z3") / "run"
    res = train(run_dir, "zero=stage3", "train.export_at_end=true")
    return run_dir, res.stdout


def test_zero1_tied_fp32_export_equals_trained_model(z1):
    res = export(f"run_dir={z1}")
    out = z1 / "hf"  # the default out
    assert "exported step 4" in res.stdout and str(out) in res.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "export.json"])
    assert info(out)["step"] == 4 and info(out)["zero_stage"] == 1 and info(out)["dtype"] == "fp32"
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["dtype"] == "float32"
    assert config["architectures"] == ["LlamaForCausalLM"] and config["use_cache"] is True
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 256 and generation["eos_token_id"] == 257

    reference = reference_state_dict(z1, 4)
    assert "lm_head.weight" not in exported_tensors(out)  # tied: stored once, like save_pretrained
    assert_weights_equal(out, reference, torch.float32)
    model = load_export(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(logits(model), logits(reference_model(z1, 4)), rtol=0, atol=1e-6)


def test_zero1_non_latest_step_sharded(z1, tmp_path):
    out = tmp_path / "step2"
    res = export(f"run_dir={z1}", "step=2", f"out={out}", "max_shard_size=1MB")
    assert "exported step 2" in res.stdout
    shards = sorted(p.name for p in out.glob("model*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert all(p.stat().st_size <= 1_000_000 + 100_000 for p in out.glob("model*.safetensors"))
    assert info(out)["step"] == 2

    step2, step4 = reference_state_dict(z1, 2), reference_state_dict(z1, 4)
    assert not torch.equal(step2["model.embed_tokens.weight"], step4["model.embed_tokens.weight"])
    assert_weights_equal(out, step2, torch.float32)
    torch.testing.assert_close(logits(load_export(out)), logits(reference_model(z1, 2)), rtol=0, atol=1e-6)


def test_zero2_bf16_export_is_the_engines_bf16_model(z2, tmp_path):
    export(f"run_dir={z2}")
    out = z2 / "hf"
    assert info(out)["dtype"] == "bf16"  # the run's precision
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reference = reference_state_dict(z2, 4)
    assert_weights_equal(out, reference, torch.bfloat16)
    # The bf16 weights the engine itself trained with (ZeRO-1/2 save them whole): bitwise the same.
    module = torch.load(z2 / "checkpoints/step_00000004/mp_rank_00_model_states.pt", weights_only=False)["module"]
    ours = exported_tensors(out)
    assert set(ours) == set(module) and all(torch.equal(ours[k], module[k]) for k in ours)

    model = load_export(out)
    assert model.dtype == torch.bfloat16
    ref_logits = logits(reference_model(z2, 4))
    bf16_logits = logits(model)
    torch.testing.assert_close(bf16_logits, ref_logits, rtol=2e-2, atol=3e-2)
    assert not torch.equal(bf16_logits, ref_logits)

    fp32 = tmp_path / "fp32"
    export(f"run_dir={z2}", f"out={fp32}", "dtype=fp32")
    assert_weights_equal(fp32, reference, torch.float32)
    torch.testing.assert_close(logits(load_export(fp32)), ref_logits, rtol=0, atol=1e-6)


def test_zero3_export_at_end_and_cli_export(z3, tmp_path):
    run_dir, stdout = z3
    hf = run_dir / "hf"
    assert "[launcher] export: exported step 4" in stdout
    assert info(hf)["step"] == 4 and info(hf)["zero_stage"] == 3
    assert not list(run_dir.glob(".hf.export-*")), "no temporary dirs left behind"
    reference = reference_state_dict(run_dir, 4)
    assert_weights_equal(hf, reference, torch.float32)
    torch.testing.assert_close(logits(load_export(hf)), logits(reference_model(run_dir, 4)), rtol=0, atol=1e-6)

    out = tmp_path / "step2"
    export(f"run_dir={run_dir}", "step=2", f"out={out}")
    assert_weights_equal(out, reference_state_dict(run_dir, 2), torch.float32)
    torch.testing.assert_close(logits(load_export(out)), logits(reference_model(run_dir, 2)), rtol=0, atol=1e-6)


def test_zero3_reloads_offline_with_auto_classes(z3, tmp_path):
    """The must-show: export, then a fresh offline process loads model + tokenizer and gets a finite loss."""
    run_dir, _ = z3
    out = tmp_path / "export"
    export(f"run_dir={run_dir}", f"out={out}", "dtype=bf16")
    script = (
        "import json, math, sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "out, text = sys.argv[1], sys.argv[2]\n"
        "tok = AutoTokenizer.from_pretrained(out)\n"
        "model = AutoModelForCausalLM.from_pretrained(out).eval()\n"
        "ids = tok(text, add_special_tokens=False, return_tensors='pt').input_ids\n"
        "with torch.no_grad():\n"
        "    loss = model(input_ids=ids, labels=ids).loss.item()\n"
        "    fixed = (torch.arange(96) * 37 % 256).reshape(2, 48)\n"
        "    logits = model(input_ids=fixed).logits.float()\n"
        "print(json.dumps({'loss': loss, 'decoded': tok.decode(ids[0]), 'n': ids.shape[1],\n"
        "                  'dtype': str(model.dtype), 'logits': logits.tolist(), 'bos': tok.bos_token_id}))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    res = subprocess.run([sys.executable, "-c", script, str(out), TEXT], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["decoded"] == TEXT and got["n"] == len(TEXT.encode())  # byte-level: one id per byte
    assert math.isfinite(got["loss"]) and 0 < got["loss"] < 10
    assert got["dtype"] == "torch.bfloat16" and got["bos"] == 256
    ref = logits(reference_model(run_dir, 4))
    torch.testing.assert_close(torch.tensor(got["logits"]), ref, rtol=2e-2, atol=3e-2)


def test_errors_are_one_line_and_leave_nothing_half_written(z1, tmp_path):
    missing = tmp_path / "nope"
    res = export(f"run_dir={missing}", expect=2)
    assert f"no checkpoint in {missing}" in res.stderr and "train first" in res.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(z1 / "config.yaml", empty / "config.yaml")
    res = export(f"run_dir={empty}", expect=2)
    assert res.stderr.strip() == f"error: no checkpoint in {empty}; train first"

    res = export(f"run_dir={z1}", "step=3", expect=2)
    assert "no checkpoint for step 3" in res.stderr and "available steps: 2, 4" in res.stderr
    for bad, words in ((["step=x"], "step=x"), (["dtype=int8"], "dtype=int8"), (["foo=1"], "unknown argument"),
                       (["max_shard_size=lots"], "max_shard_size=lots")):
        assert words in export(f"run_dir={z1}", *bad, expect=2).stderr
    assert "run_dir=DIR is required" in export("step=2", expect=2).stderr
    not_export = tmp_path / "mine"
    not_export.mkdir()
    (not_export / "notes.txt").write_text("keep me")
    assert "is not an export" in export(f"run_dir={z1}", f"out={not_export}", expect=2).stderr
    assert (not_export / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    res = export(f"run_dir={z1}", f"out={a_file / 'hf'}", expect=2)  # an output dir that cannot be written
    assert res.stderr.strip().splitlines()[-1].startswith("error: out: cannot write") and "Traceback" not in res.stderr

    # Damaged checkpoints, on a copy of the run.
    run = tmp_path / "run"
    shutil.copytree(z1, run, ignore=shutil.ignore_patterns("hf", "ref_step*"))
    (run / "checkpoints/step_00000004/DONE").unlink()  # a save that was interrupted
    res = export(f"run_dir={run}", "step=4", expect=2)
    assert "step_00000004 is incomplete: no DONE marker" in res.stderr and "complete steps: 2" in res.stderr
    out = tmp_path / "out"
    res = export(f"run_dir={run}", f"out={out}")  # default: the newest complete checkpoint
    assert "skipping incomplete checkpoint(s) at step 4" in res.stderr and info(out)["step"] == 2

    (run / "checkpoints/step_00000004/DONE").write_text("4\n")
    (run / "checkpoints/step_00000004/zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    res = export(f"run_dir={run}", f"out={out}", expect=2)
    assert "is incomplete: missing or empty zero_pp_rank_1_mp_rank_00_optim_states.pt" in res.stderr

    shard = run / "checkpoints/step_00000002/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated, e.g. disk full
    res = export(f"run_dir={run}", "step=2", f"out={out}", expect=2)
    assert "step_00000002 is incomplete or unreadable" in res.stderr
    assert info(out)["step"] == 2 and len(exported_tensors(out)) == 38  # the earlier export is untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp dirs


def test_shard_plan_and_sizes():
    from launcher.errors import ExportError
    from launcher.export.shards import parse_size, shard_plan

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(ExportError):
        parse_size("0")
    plan = shard_plan([("a", 4), ("b", 4), ("c", 10), ("d", 1), ("e", 1)], 8)
    assert plan == [["a", "b"], ["c"], ["d", "e"]]
