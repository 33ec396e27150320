"""The GPU launch path, checked without a GPU: which GPUs a launch uses, what it refuses, the threads and the
device mapping each rank gets. GPU counts are injected (prepare(..., local_gpus=N)) and CUDA_VISIBLE_DEVICES
is set per test; tests/conftest.py hides this host's GPUs from everything else. What only a real GPU can
show is listed in docs/gpu.md and run by scripts/gpu_check.sh.
"""

from __future__ import annotations

import pytest

from launcher.config.topology import visible_gpu_ids
from launcher.errors import ConfigError
from launcher.prepare import prepare
from launcher.worker.devices import rank_visible_devices


def _prepare(tmp_path, *overrides, local_gpus=None):
    return prepare([*overrides, "cluster.master_port=29555", f"hydra.run.dir={tmp_path / 'run'}"],
                   local_gpus=local_gpus)


def _command_line(run) -> str:
    return run.files["launch.sh"].splitlines()[-1]


def test_visible_devices_give_the_ranks_and_the_include(tmp_path, monkeypatch):
    """CUDA_VISIBLE_DEVICES=2,3 with hardware=local: 2 GPU ranks on GPUs 2 and 3, not 0 and 1."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    run = _prepare(tmp_path)  # the GPU count comes from CUDA_VISIBLE_DEVICES (detect_local_gpus)
    assert (run.topo.ranks_per_node, run.topo.accelerator) == (2, "cuda")
    line = _command_line(run)
    assert line.split(" ", 2)[2] == (
        f"--include localhost:2,3 --master_port 29555 --log_level error --no_local_rank --module launcher.worker "
        f"--run-dir {run.run_dir}"
    )
    assert "--num_gpus" not in line and "--num_nodes" not in line  # the runner refuses them with --include


def test_no_visible_devices_variable_keeps_num_gpus(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    run = _prepare(tmp_path, "hardware=8xh100", local_gpus=8)
    assert " --num_gpus 8 --num_nodes 1 --master_port 29555 " in _command_line(run)


def test_profile_wanting_more_gpus_than_visible_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(ConfigError, match=r'^hardware: needs 8 GPUs per node but CUDA_VISIBLE_DEVICES="2,3" '
                                          r"makes 2 visible; use hardware=local"):
        _prepare(tmp_path, "hardware=8xh100")
    assert not (tmp_path / "run").exists()
    # A dry run only renders (for another machine): not refused.
    assert _prepare(tmp_path, "hardware=8xh100", "dry_run=true").topo.world_size == 8


def test_gpu_uuids_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1a2b,GPU-3c4d")
    with pytest.raises(ConfigError, match=r"^CUDA_VISIBLE_DEVICES: .* is not a list of GPU indices"):
        _prepare(tmp_path)


@pytest.mark.parametrize("value,ids", [("", []), ("2,3", ["2", "3"]), (" 4 , 5 ", ["4", "5"]), ("0,-1,2", ["0"])])
def test_visible_gpu_ids(value, ids):
    assert visible_gpu_ids({"CUDA_VISIBLE_DEVICES": value}) == ids
    assert visible_gpu_ids({}) is None


def test_omp_threads_per_gpu_rank(tmp_path, monkeypatch):
    """OMP_NUM_THREADS = usable cores / ranks per node, unless the user set it."""
    import launcher.prepare as prep

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(prep, "usable_cpus", lambda: 48)
    assert "export OMP_NUM_THREADS=12\n" in _prepare(tmp_path).files["launch.sh"]  # 48 cores / 4 ranks
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert "OMP_NUM_THREADS" not in _prepare(tmp_path).files["launch.sh"]  # the user's value is inherited


def test_omp_threads_in_the_slurm_job_come_from_the_allocation(tmp_path, monkeypatch):
    from launcher.launch.host import deepspeed_executable
    from launcher.render.sbatch import sbatch_name, slurm_files

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    run = _prepare(tmp_path, "cluster=slurm", "hardware=8xh100", local_gpus=0)
    script = run.files[sbatch_name(run.cfg.name)]
    assert "OMP_NUM_THREADS" not in script  # rendered on a login node: the job's cores are unknown here
    assert 'export LAUNCHER_JOB_GPUS="${CUDA_VISIBLE_DEVICES-${SLURM_JOB_GPUS-}}"' in script
    _, files = slurm_files(run.cfg, run.topo, run.run_dir, run.files, deepspeed_executable(), cpus_per_node=96)
    assert "export OMP_NUM_THREADS=12\n" in files[sbatch_name(run.cfg.name)]  # 96 allocated cores / 8 ranks


@pytest.mark.parametrize("env,expected", [
    # The runner renumbered the node's 4 GPUs 0..3; SLURM gave the step GPUs 4-7 (no device cgroup).
    ({"LAUNCHER_JOB_GPUS": "4,5,6,7", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "4,5,6,7"),
    # With a device cgroup SLURM's own list is already 0..n-1: unchanged.
    ({"LAUNCHER_JOB_GPUS": "0,1", "CUDA_VISIBLE_DEVICES": "0,1"}, "0,1"),
    # The runner selected slots 1 and 3 of the node (an --include filter).
    ({"LAUNCHER_JOB_GPUS": "4,5,6,7", "CUDA_VISIBLE_DEVICES": "1,3"}, "5,7"),
    ({"LAUNCHER_JOB_GPUS": "2,3"}, "2,3"),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, None),  # not under SLURM: keep what the runner set
    ({"LAUNCHER_JOB_GPUS": "4,5", "CUDA_VISIBLE_DEVICES": "GPU-x"}, None),
    ({"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "0,1"}, ""),  # CPU ranks see no GPU
])
def test_slurm_gpu_slots_map_to_the_local_rank(env, expected):
    assert rank_visible_devices(env) == expected


# --- load-time host RAM -------------------------------------------------------------------------------------

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
             "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "max_position_embeddings": 8192, "rope_theta": 500000.0,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def _llama3_8b_dir(tmp_path):
    import json

    model_dir = tmp_path / "llama3_8b"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(LLAMA3_8B))  # the architecture is all the planner reads
    return model_dir


def test_zero2_8b_model_path_refused_for_host_ram_then_accepted(tmp_path):
    """8 ranks each load the 8.03B model in bf16 under ZeRO-2: 8 x 16.06 GB = 119.7 GiB on the node."""
    args = [f"model.path={_llama3_8b_dir(tmp_path)}", "hardware=8xh100", "zero=stage2", "precision=bf16",
            "dry_run=true"]
    with pytest.raises(ConfigError, match=r"^plan: loading model\.path needs 120 GiB host RAM per node \(8 ranks "
                                          r"x 15\.0 GiB, each rank a full copy under ZeRO-2\), 95 GiB usable on "
                                          r"8xh100 \(hardware\.host_ram_gib\); zero=stage3 fits at .*force=true"):
        _prepare(tmp_path, *args, "hardware.host_ram_gib=96")
    run = _prepare(tmp_path, *args, "hardware.host_ram_gib=2048")
    assert run.cfg.zero.stage == 2 and run.cfg.model.num_hidden_layers == 32


def test_load_bytes_by_stage_and_source(tmp_path):
    from launcher.config.compose import compose
    from launcher.config.resolve import adopt_hf_architecture
    from launcher.config.topology import Topology
    from launcher.plan.load import load_bytes_per_node

    topo = Topology(1, 8, "cuda")
    cfg, _ = compose(["model=llama3_8b", "hardware=8xh100", "precision=bf16"])
    n = 8_030_261_248
    assert load_bytes_per_node(cfg, topo, 2) == 8 * n * 4  # built from the config: fp32, DeepSpeed casts
    cfg.model.path = str(_llama3_8b_dir(tmp_path))
    adopt_hf_architecture(cfg)
    assert load_bytes_per_node(cfg, topo, 2) == 8 * n * 2  # loaded in the training dtype
    # ZeRO-3: a partition and the largest tensor (the 128256 x 4096 embedding) per rank.
    assert load_bytes_per_node(cfg, topo, 3) == 8 * 2 * (-(-n // 8) + 128256 * 4096)
    assert load_bytes_per_node(cfg, Topology(1, 2, "cpu"), 2) == 0


# --- the GPU the node has vs the profile ------------------------------------------------------------------

def _fake_nvidia_smi(tmp_path, monkeypatch, line: str, count: int = 8) -> None:
    """A stub `nvidia-smi` first on PATH: it stands in for the hardware, printing `count` copies of `line`
    for the --query-gpu call the launcher makes (launcher.launch.gpus.QUERY)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + "".join(f"echo '{line}'\n" for _ in range(count)))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


A100_40 = "NVIDIA A100-SXM4-40GB, 40960 MiB, 8.0"
H100 = "NVIDIA H100 80GB HBM3, 81559 MiB, 9.0"


def test_parse_nvidia_smi_query():
    from launcher.launch.gpus import parse_query

    gpus = parse_query(f"{H100}\n{A100_40}\ngarbage\n")
    assert [(g.name, round(g.memory_gib, 1), g.compute_cap) for g in gpus] == [
        ("NVIDIA H100 80GB HBM3", 79.6, "9.0"), ("NVIDIA A100-SXM4-40GB", 40.0, "8.0")]


def test_h100_profile_on_a100_40g_nodes_is_refused(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch, A100_40)
    with pytest.raises(ConfigError, match=r"^hardware: hardware=8xh100 expects H100.* GPUs with 80 GiB but this "
                                          r"node has NVIDIA A100-SXM4-40GB with 40\.0 GiB; use "
                                          r"hardware=8xa100_40g, or force=true to launch anyway$"):
        _prepare(tmp_path, "hardware=8xh100", local_gpus=8)


def test_force_launches_anyway_and_the_plan_uses_the_measured_memory(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch, A100_40)
    run = _prepare(tmp_path, "hardware=8xh100", "force=true", local_gpus=8)
    assert any("expects H100" in n and "force=true" in n for n in run.notes)
    assert any("39.0 GiB usable on 8xh100" in n for n in run.notes), run.notes  # 40 GiB - 1 GiB context


def test_matching_gpus_pass_and_unknown_gpus_point_to_local(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch, H100)  # 79.6 GiB is an "80 GiB" H100
    assert _prepare(tmp_path, "hardware=8xh100", local_gpus=8).topo.world_size == 8
    _fake_nvidia_smi(tmp_path, monkeypatch, "Tesla V100-SXM2-32GB, 32768 MiB, 7.0")
    with pytest.raises(ConfigError, match=r"use hardware=local \(no profile describes this GPU\)"):
        _prepare(tmp_path, "hardware=8xa100", local_gpus=8)


def test_no_nvidia_smi_means_no_check(tmp_path, monkeypatch):
    from launcher.launch.gpus import query_gpus

    monkeypatch.setenv("PATH", str(tmp_path))
    assert query_gpus() is None


# --- MFU: one function for the planner and the worker --------------------------------------------------------

def test_mfu_against_a_hand_computed_reference():
    """tiny_llama with tied embeddings: the shared matrix is still the lm_head matmul, so nothing is subtracted."""
    from launcher.config.compose import compose
    from launcher.plan.params import ModelShape, count_params, flops_per_token, mfu

    cfg, _ = compose(["model.tie_word_embeddings=true"])
    shape = ModelShape.from_cfg(cfg.model)  # V=320, h=128, I=352, L=4, heads=4, kv=2 (head_dim 32)
    # per layer: q,o 128x128 each, k,v 128x64 each, MLP 3 x 128 x 352, norms 2 x 128
    per_layer = 2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 352 + 2 * 128
    params = 320 * 128 + 4 * per_layer + 128  # embedding (= lm_head) + layers + final norm
    seq = 128
    flops = 6 * params + 12 * 4 * 4 * 32 * seq
    assert count_params(shape).total == params
    assert flops_per_token(shape, count_params(shape), seq) == flops
    # 8 GPUs at 989 TFLOP/s, 1e6 tokens/s in all.
    assert mfu(1e6, flops, 8, 989) == pytest.approx(1e6 * flops / (8 * 989e12))
    assert mfu(1e6, flops, 8, None) is None  # CPU ranks: no peak, no MFU
    untied, _ = compose([])
    s2 = ModelShape.from_cfg(untied.model)
    # Untied: the input embedding is a lookup (excluded), the separate lm_head is counted.
    assert flops_per_token(s2, count_params(s2), seq) == flops


@pytest.mark.parametrize("precision,dtype", [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")])
def test_model_path_loads_in_the_training_dtype(tmp_path, precision, dtype):
    """ZeRO-1/2 path of launcher.worker.model.build_model (no process group needed): weights arrive in the
    dtype DeepSpeed trains in, equal to the checkpoint's values cast once."""
    import torch
    from transformers import LlamaForCausalLM

    from launcher.config.compose import compose
    from launcher.models.hf_config import llama_config
    from launcher.worker.model import build_model

    cfg, _ = compose([f"precision={precision}", "zero=stage2"])
    torch.manual_seed(7)
    saved = LlamaForCausalLM(llama_config(cfg.model))
    saved.save_pretrained(tmp_path / "m")
    cfg.model.path = str(tmp_path / "m")
    model, keep_alive = build_model(cfg, {}, 0)
    assert keep_alive is None
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    w = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w, saved.model.layers[0].mlp.up_proj.weight.to(w.dtype))


def test_the_slurm_job_entry_checks_the_gpus_it_got(tmp_path, monkeypatch, capsys):
    """Inside the allocation (launcher.slurm_job) the node's GPUs are compared with the profile before any
    rank starts; the refusal is one line in the job log and exit code 2."""
    from launcher import slurm_job

    _fake_nvidia_smi(tmp_path, monkeypatch, A100_40)
    for key, value in {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_ON_NODE": "8",
                       "SLURM_CPUS_ON_NODE": "64"}.items():
        monkeypatch.setenv(key, value)
    code = slurm_job.main(["hardware=8xh100", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "run").exists()
    assert err.startswith("launcher: error: hardware: hardware=8xh100 expects") and "hardware=8xa100_40g" in err
    assert len(err.strip().splitlines()) == 1
