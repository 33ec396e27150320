"""Data pipeline for plain text: the built-in corpus, local files, wrap packing, the cache, the sample order."""

from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from launcher.data.build import read_examples
from launcher.data.pack import pack_wrap
from launcher.data.text import builtin_documents
from launcher.models.tokenizer import BYTE_VOCAB, byte_tokenizer
from launcher.worker.data import DataError, Rows, SampleOrder, build_packed, micro_batches


def cfg(tmp_path, path=None, field="text", seq=16, bad=0.0):
    return OmegaConf.create({"data": {"path": path, "text_field": field, "builtin_documents": 200,
                                      "cache_dir": None, "format": "text", "fields": {}, "chat_template": "auto",
                                      "overlong": "truncate", "max_bad_fraction": bad},
                             "train": {"seq_len": seq}, "model": {"vocab_size": 320, "path": None}})


def load_local_texts(path, field, _cache=None, bad=0.0):
    return read_examples(cfg(None, path=path, field=field, bad=bad))[0]


def test_builtin_corpus_is_deterministic_and_varied():
    a, b = builtin_documents(50), builtin_documents(50)
    assert a == b and len(set(a)) == 50
    assert any(" plus " in d for d in a) and any(" the " in d for d in a)


def test_byte_tokenizer_round_trips_any_text(tmp_path):
    tok = byte_tokenizer()
    text = "Grüße, 世界! tabs\tand\nnewlines 🙂"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8")) and len(tok) == BYTE_VOCAB
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
    assert again(text, add_special_tokens=False)["input_ids"] == ids and again.eos_token_id == 257


def test_wrap_packing_restarts_positions_and_masks_record_starts():
    packed = pack_wrap([([9, 1, 2, 3, 8], None), ([9, 4, 5, 8], None)], seq_len=4)
    # stream: 9 1 2 3 8 9 4 5 8 -> two full rows, the tail (8) dropped
    assert packed.input_ids.tolist() == [[9, 1, 2, 3], [8, 9, 4, 5]]
    # A record's first token is never a target (the previous record must not learn to predict it).
    assert packed.loss_mask.tolist() == [[0, 1, 1, 1], [1, 0, 1, 1]]
    # Positions restart at each record and at each row (a record continued from the previous row).
    assert packed.position_ids.tolist() == [[0, 1, 2, 3], [0, 0, 1, 2]]


def test_sample_order_is_a_permutation_per_epoch():
    order = SampleOrder(10, seed=3)
    epoch0 = [order.row(i) for i in range(10)]
    epoch1 = [order.row(i) for i in range(10, 20)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    assert [SampleOrder(10, seed=3).row(i) for i in range(10)] == epoch0


class FakeRows:
    def row(self, i):
        a = np.array([i, i])
        return a, a, a


def test_ranks_and_micro_batches_partition_the_global_batch():
    order = SampleOrder(64, seed=0)
    world, micro, accum = 2, 2, 2
    glob = world * micro * accum
    seen = []
    for rank in range(world):
        for batch in micro_batches(FakeRows(), order, step=3, global_batch=glob, micro=micro, accum=accum,
                                   rank=rank, world=world):
            assert set(batch) == {"input_ids", "labels", "position_ids"}
            seen += [int(r[0]) for r in batch["input_ids"]]
    # Step 3 covers global positions 24..31 exactly once, whatever the world size.
    assert sorted(seen) == sorted(order.row(p) for p in range(24, 32))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "txt", "parquet"])
def test_local_formats(fmt, tmp_path):
    texts = [f"document number {i} says hello" for i in range(20)]
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    elif fmt == "json":
        path.write_text(json.dumps([{"text": t} for t in texts]))
    elif fmt == "txt":
        path.write_text("\n".join(texts) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": texts}), path)
    assert load_local_texts(str(path), "text", str(tmp_path / "cache")) == texts


def test_folder_of_files(tmp_path):
    (tmp_path / "d").mkdir()
    for i in range(3):
        (tmp_path / "d" / f"part{i}.jsonl").write_text(json.dumps({"body": f"part {i}"}) + "\n")
    assert sorted(load_local_texts(str(tmp_path / "d"), "body", str(tmp_path / "c"))) == ["part 0", "part 1",
                                                                                        "part 2"]


@pytest.mark.parametrize("content,match", [
    ("", r"data\.path: .* is empty"),
    ('{"text": "ok"}\n{"text": broken\n', r"data\.path: 1 of 2 records are bad \(bad\.jsonl:2: invalid JSON"),
    ('{"body": "no text field"}\n', r"bad\.jsonl:1: missing text field 'text'\); fix them, or set "
                                     r"data\.max_bad_fraction=1"),
    ('{"text": ""}\n{"text": "   "}\n', r"2 of 2 records are bad \(bad\.jsonl:1: empty text field 'text'; bad"),
])
def test_bad_files_are_clear_errors(content, match, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_local_texts(str(path), "text", str(tmp_path / "cache"))


def test_folder_problems(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"has no \.jsonl/\.json/\.txt/\.parquet files"):
        load_local_texts(str(tmp_path / "empty"), "text", str(tmp_path / "c"))
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "mixed" / "b.txt").write_text("b\n")
    with pytest.raises(DataError, match=r"mixes \.txt with record files"):
        load_local_texts(str(tmp_path / "mixed"), "text", str(tmp_path / "c"))


def test_packed_cache_is_reused_and_keyed_by_source(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": "hello world " * 5}) + "\n" for _ in range(10)))
    c = cfg(tmp_path, path=str(path))
    first = build_packed(c, byte_tokenizer(), str(tmp_path / "cache"))
    assert build_packed(c, byte_tokenizer(), str(tmp_path / "cache")) == first
    rows = Rows(first)
    assert len(rows) == 38 and rows.seq_len == 16 and max(int(rows.row(i)[0].max()) for i in range(38)) < 320
    path.write_text("".join(json.dumps({"text": "changed " * 5}) + "\n" for _ in range(10)))
    import os
    os.utime(path, (1, 1))
    assert build_packed(c, byte_tokenizer(), str(tmp_path / "cache")) != first
    assert build_packed(cfg(tmp_path), byte_tokenizer(), str(tmp_path / "cache")) != first


def test_max_bad_fraction_skips_up_to_that_share(tmp_path):
    path = tmp_path / "some_bad.jsonl"
    path.write_text('{"text": "good one"}\n{"text": broken\n{"text": "good two"}\n{"text": "good three"}\n')
    with pytest.raises(DataError, match=r"1 of 4 records are bad \(some_bad\.jsonl:2: invalid JSON.*"
                                        r"data\.max_bad_fraction=0\.25 to skip them"):
        load_local_texts(str(path), "text")
    assert load_local_texts(str(path), "text", bad=0.25) == ["good one", "good two", "good three"]
