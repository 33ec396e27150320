"""Data preparation at scale (launcher.data.build): streaming packers equal the in-memory ones, N worker
processes and many shards give the same rows as one process, the cache is keyed, atomic and safe under
concurrent preparers, the sample order over shards is exact on resume and for any world size, and the launch
side prepares (or refuses) before any rank starts."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from launcher.data import build, cache, store
from launcher.data.chat import encode_chat, encode_text
from launcher.data.pack import pack_fit, pack_wrap
from launcher.data.stream import FitPacker, WrapPacker
from launcher.models.tokenizer import byte_tokenizer
from launcher.worker.data import Rows, SampleOrder, micro_batches
from tests.sft_fixtures import chat_tokenizer, conversations, write_messages

SEQ = 32


def cfg(path=None, fmt="text", seq=SEQ, vocab=320, model=None, cache_dir=None, **data):
    return OmegaConf.create({"data": {"path": None if path is None else str(path), "format": fmt, "text_field": "text",
                                      "fields": {}, "chat_template": "auto", "overlong": "truncate",
                                      "max_bad_fraction": 0.0, "builtin_documents": 300, "cache_dir": cache_dir,
                                      "num_proc": None, **data},
                             "train": {"seq_len": seq}, "model": {"vocab_size": vocab, "path": model}})


def write_texts(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "长城", "épée", "x"]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))},
                                       ensure_ascii=False) + "\n" for _ in range(n)), encoding="utf-8")
    return path


def all_rows(path: str) -> tuple:
    rows = Rows(path)
    return tuple(np.stack([rows.row(i)[j] for i in range(len(rows))]) for j in range(3))


def collect(blocks):
    def sink(ids, mask, pos):
        blocks.append((ids.copy(), mask.copy(), pos.copy()))
    return sink


def test_streaming_packers_equal_in_memory_packing():
    rng = np.random.default_rng(0)
    recs = [(rng.integers(0, 300, rng.integers(1, 80)).tolist(), rng.integers(0, 2, 0).tolist()) for _ in range(300)]
    text = [(ids, None) for ids, _ in recs]
    chat = [(ids[:SEQ], rng.integers(0, 2, len(ids[:SEQ])).tolist()) for ids, _ in recs]
    for packer_cls, records, reference in ((WrapPacker, text, pack_wrap(text, SEQ)),
                                           (FitPacker, chat, pack_fit(chat, SEQ, pad_id=7))):
        blocks: list = []
        packer = packer_cls(SEQ, collect(blocks)) if packer_cls is WrapPacker else packer_cls(SEQ, 7, collect(blocks))
        at = 0
        while at < len(records):  # uneven chunks, as worker results arrive
            part = records[at:at + int(rng.integers(1, 40))]
            at += len(part)
            ids = np.concatenate([np.asarray(i, dtype=np.uint32) for i, _ in part])
            lengths = np.array([len(i) for i, _ in part])
            mask = None if part[0][1] is None else np.concatenate([np.asarray(m, np.uint8) for _, m in part])
            packer.add(ids, lengths, mask)
        packer.finish()
        got = [np.concatenate([b[j] for b in blocks]) for j in range(3)]
        assert len(got[0]) > 20
        for a, b in zip(got, (reference.input_ids, reference.loss_mask, reference.position_ids)):
            np.testing.assert_array_equal(a, b)


def test_text_in_parallel_and_many_shards_equals_one_in_memory_pass(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "SHARD_TOKENS", 10 * SEQ)  # 10 rows a shard
    data = write_texts(tmp_path / "d.jsonl", 400)
    tok = byte_tokenizer()
    examples, _ = build.read_examples(cfg(data))
    ref = pack_wrap(encode_text(tok, examples, tok.bos_token_id, tok.eos_token_id), SEQ)
    paths = [build.build_packed(cfg(data), tok, str(tmp_path / f"c{n}"), num_proc=n) for n in (1, 2)]
    for path in paths:
        meta = json.loads(Path(path, "meta.json").read_text())
        assert len(meta["shards"]) > 20 and meta["dtype"] == "uint16" and meta["stats"]["num_proc"] in (1, 2)
        assert np.load(Path(path, "shard-00000", "input_ids.npy")).dtype == np.uint16
        ids, labels, pos = all_rows(path)
        np.testing.assert_array_equal(ids, ref.input_ids)
        np.testing.assert_array_equal(labels, np.where(ref.loss_mask == 1, ref.input_ids, -100))
        np.testing.assert_array_equal(pos, ref.position_ids)
    assert meta["stats"]["records"] == 400 and meta["stats"]["rows"] == len(ref)


def test_chat_in_parallel_equals_one_in_memory_pass(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "SHARD_TOKENS", 4 * 128)
    tok = chat_tokenizer()
    data = write_messages(tmp_path / "m.jsonl", 60)
    encoded = [encode_chat(tok, turns, tok.chat_template) for turns in conversations(60)]
    ref = pack_fit(encoded, 128, tok.pad_token_id)
    c = cfg(data, fmt="messages", seq=128, vocab=384)
    path = build.build_packed(c, tok, str(tmp_path / "c"), num_proc=2)
    ids, labels, pos = all_rows(path)
    np.testing.assert_array_equal(ids, ref.input_ids)
    np.testing.assert_array_equal(labels, np.where(ref.loss_mask == 1, ref.input_ids, -100))
    np.testing.assert_array_equal(pos, ref.position_ids)
    stats = Rows(path).meta["stats"]
    assert stats["records"] == 60 and 0 < stats["padding_fraction"] < 0.5 and stats["shards"] > 1


def test_cache_key_follows_what_the_rows_depend_on(tmp_path):
    data = write_texts(tmp_path / "d.jsonl", 5)
    model = tmp_path / "tok"
    byte_tokenizer().save_pretrained(str(model))
    base = cache.cache_key(cfg(data, model=str(model)))
    assert base == cache.cache_key(cfg(data, model=str(model)))
    assert base != cache.cache_key(cfg(data, model=str(model), seq=64))
    assert base != cache.cache_key(cfg(data, model=str(model), vocab=70000))
    assert base != cache.cache_key(cfg(data, model=str(model), text_field="body"))
    tj = model / "tokenizer.json"
    tj.write_text(tj.read_text().replace('"<pad>"', '"<PAD>"'))  # same name, new tokenizer: a new key
    assert base != cache.cache_key(cfg(data, model=str(model)))
    before, st = cache.cache_key(cfg(data, model=str(model))), os.stat(data)
    data.write_text(data.read_text(encoding="utf-8").replace("alpha", "ALPHA"), encoding="utf-8")
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: a small file is hashed
    assert cache.cache_key(cfg(data, model=str(model))) != before


def test_half_written_cache_is_never_read_and_is_cleaned(tmp_path):
    c = cfg(cache_dir=str(tmp_path / "shared"))
    path = build.cache_path(c)
    os.makedirs(f"{path}.tmp99999/shard-00000")  # a preparer killed half-way
    assert not build.cache_complete(c)
    assert build.prepare_cache(c, progress=False) == path and build.cache_complete(c)
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == [Path(path).name, Path(path).name + ".lock"]


def _prepare_and_count(c, counter: str) -> None:
    original = build._build

    def counted(*args, **kwargs):
        with open(counter, "a") as f:
            f.write("built\n")
        time.sleep(1.0)  # the other preparer is surely waiting now
        return original(*args, **kwargs)

    build._build = counted
    build.build_packed(c, byte_tokenizer(), c.data.cache_dir, num_proc=1)


def test_two_preparers_at_once_build_once(tmp_path):
    data = write_texts(tmp_path / "d.jsonl", 3000)
    c = cfg(data, cache_dir=str(tmp_path / "shared"))
    counter = str(tmp_path / "count")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_prepare_and_count, args=(c, counter)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert Path(counter).read_text() == "built\n"  # the second waited on the lock, then reused
    assert len(Rows(build.cache_path(c))) > 0
    assert not list((tmp_path / "shared").glob("*.tmp*"))


def test_sample_order_over_shards_is_exact_on_resume_and_any_world_size(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "SHARD_TOKENS", 7 * SEQ)
    rows = Rows(build.build_packed(cfg(), byte_tokenizer(), str(tmp_path / "c"), num_proc=1))
    assert len(rows.meta["shards"]) > 10
    glob, steps = 8, 2 * len(rows) // 8 + 3  # crosses two epoch boundaries

    def global_batch(order, step, micro, world):
        accum = glob // (micro * world)
        parts = [b["input_ids"] for r in range(world)
                 for b in micro_batches(rows, order, step, glob, micro, accum, r, world)]
        by_rank = [np.concatenate(parts[r * accum:(r + 1) * accum]) for r in range(world)]
        # global position of rank r, accumulation m, item i: (m * world + r) * micro + i
        out = np.zeros((glob, rows.seq_len), dtype=np.int64)
        for r in range(world):
            for m in range(accum):
                out[(m * world + r) * micro:(m * world + r + 1) * micro] = by_rank[r][m * micro:(m + 1) * micro]
        return out

    order = SampleOrder(len(rows), 1234)
    straight = [global_batch(order, s, 4, 1) for s in range(steps)]
    for resume in (1, len(rows) // glob, steps - 2):  # mid-epoch, at an epoch boundary, late
        fresh = SampleOrder(len(rows), 1234)  # a restarted run: nothing but the seed and the step
        for s in range(resume, steps):
            np.testing.assert_array_equal(global_batch(fresh, s, 2, 2), straight[s])
    np.testing.assert_array_equal(global_batch(SampleOrder(len(rows), 1234), 5, 1, 4), straight[5])


def test_prepare_data_on_the_launch_side(tmp_path):
    from launcher.errors import ConfigError
    from launcher.prepare import compose_resolved, prepare_data

    c, run_dir, topo, _ = compose_resolved([f"hydra.run.dir={tmp_path / 'run'}", "data.builtin_documents=300",
                                            "train.seq_len=32"], local_gpus=0)
    with pytest.raises(ConfigError, match=r"data\.cache_dir: the packed data .* is not prepared and a GPU job does "
                                          r"not tokenize; submit with `python -m launcher`"):
        prepare_data(c, topo, Path(run_dir), may_tokenize=False)
    assert prepare_data(c, topo, Path(run_dir))[0].startswith(f"data: prepared {tmp_path / 'run' / 'cache'}")
    assert prepare_data(c, topo, Path(run_dir), may_tokenize=False)[0].startswith("data: reusing")
    with pytest.raises(cache.DataError, match=r"data\.cache_dir: /dev/shm/x is on .*local to this host; the other "
                                              r"1 node\(s\) cannot read it"):
        cache.check_shared("/dev/shm/x", nodes=2)
    cache.check_shared("/dev/shm/x", nodes=1)
    cache.check_shared(str(tmp_path), nodes=2)  # the test machine's disk: shared with its "nodes"


@pytest.mark.ranks
def test_two_cpu_ranks_train_from_shards_and_resume_mid_epoch(tmp_path):
    """The must-show on real ranks: a rank refuses an unprepared cache; `python -m launcher` prepares a
    2-shard cache shared by three runs; stopping at step 3 and resuming to 6 trains on the same batches as an
    uninterrupted run (bitwise-equal losses, fp32, constant LR), mid-epoch (an epoch is ~5,000 steps here)."""
    import subprocess

    from tests.conftest import run_cli

    data = write_texts(tmp_path / "d.jsonl", 36_000)  # ~5 MB of bytes: 2 shards of 4M tokens
    common = [f"data.path={data}", f"data.cache_dir={tmp_path / 'cache'}", "train.schedule=constant",
              "train.warmup_steps=0", "train.grad_clip=0", "train.log_every=1", "train.save_every=1000"]

    refused = tmp_path / "refused"
    assert run_cli([f"hydra.run.dir={refused}", *common, "dry_run=true"]).returncode == 0
    assert not (tmp_path / "cache").exists()  # a dry run never prepares
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    res = subprocess.run(["bash", str(refused / "launch.sh")], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode != 0 and "is missing or incomplete on" in res.stdout + res.stderr, res.stderr[-2000:]

    def train(run_dir: Path, steps: int) -> subprocess.CompletedProcess:
        res = run_cli([f"hydra.run.dir={run_dir}", *common, f"train.max_steps={steps}"])
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res

    first = train(tmp_path / "full", 6)
    assert "data: prepared" in first.stderr
    meta = json.loads(next((tmp_path / "cache").glob("packed-*/meta.json")).read_text())
    assert len(meta["shards"]) == 2 and meta["rows"] > 6 * 8 * 100
    assert "data: reusing" in train(tmp_path / "split", 3).stderr
    assert "resuming at step 3" in train(tmp_path / "split", 6).stdout

    def losses(run_dir: Path) -> list:
        return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert len(losses(tmp_path / "full")) == 6 and losses(tmp_path / "split") == losses(tmp_path / "full")
