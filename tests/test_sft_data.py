"""Instruction/chat data: assistant-only labels decoded span by span, Chinese text truncated at seq_len,
the same conversations in alpaca, sharegpt and messages files, bad records with line numbers, templates,
and the debug command. In-process except the two CLI checks (no ranks)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli
from omegaconf import OmegaConf
from sft_fixtures import chat_tokenizer, tiny_model_dir, write_messages

from launcher.config.schema import LauncherConfig
from launcher.data.build import build_packed
from launcher.data.chat import encode_chat, resolve_template
from launcher.data.records import DataError
from launcher.data.store import Rows

TWO_TURNS = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."},
             {"role": "user", "content": "And 4 plus 4?"}, {"role": "assistant", "content": "4 plus 4 is 8."}]
CHINESE = [{"role": "user", "content": "请用中文介绍一下长城。"},
           {"role": "assistant", "content": "长城是中国古代的军事防御工程，全长两万多公里。"},
           {"role": "user", "content": "它是什么时候开始修建的？"},
           {"role": "assistant", "content": "长城始建于春秋战国时期，秦朝统一后连接成万里长城。"}]


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


def spans(tok, ids, mask):
    """Consecutive runs of equal mask, decoded: [(trained, text), ...]."""
    out, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or mask[t] != mask[start]:
            out.append((bool(mask[start]), tok.decode(ids[start:t])))
            start = t
    return out


def test_two_turn_labels_are_the_replies_with_their_end_of_turn(tok):
    ids, mask = encode_chat(tok, TWO_TURNS, resolve_template(tok, "auto"))
    assert tok.decode(ids) == tok.apply_chat_template(TWO_TURNS, tokenize=False)  # one tokenization, lossless
    assert spans(tok, ids, mask) == [
        (False, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
                "<|im_start|>assistant\n"),
        (True, "2 plus 3 is 5.<|im_end|>\n"),
        (False, "<|im_start|>user\nAnd 4 plus 4?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "4 plus 4 is 8.<|im_end|>\n"),
    ]
    # Token by token: every trained token id is one of the reply's, the end-of-turn token included.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained.count(im_end) == 2 and [i for i, m in zip(ids, mask) if not m].count(im_end) == 3


def cfg_for(path, model_dir, fmt="messages", seq=64, **data):
    cfg = OmegaConf.structured(LauncherConfig)
    cfg.model.path, cfg.model.vocab_size = str(model_dir), 384
    cfg.data.path, cfg.data.format, cfg.train.seq_len = str(path), fmt, seq
    for k, v in data.items():
        cfg.data[k] = v
    return cfg


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("m") / "qwen2")


def test_chinese_multi_turn_truncated_at_seq_len(tok, model_dir, tmp_path):
    path = tmp_path / "zh.jsonl"
    path.write_text(json.dumps({"messages": CHINESE}, ensure_ascii=False) + "\n", encoding="utf-8")
    full_ids, full_mask = encode_chat(tok, CHINESE, resolve_template(tok, "auto"))
    assert tok.decode(full_ids).count("长城") == 4  # Chinese round-trips through the byte-level BPE
    seq = len(full_ids) - 10  # cuts into the second reply
    rows = Rows(build_packed(cfg_for(path, model_dir, seq=seq), tok, str(tmp_path / "c")))
    ids, labels, pos = rows.row(0)
    assert rows.meta["stats"]["truncated"] == 1 and len(rows) == 1
    assert ids.tolist() == full_ids[:seq] and pos.tolist() == list(range(seq))
    expected = [i if m and t > 0 else -100 for t, (i, m) in enumerate(zip(full_ids[:seq], full_mask[:seq]))]
    assert labels.tolist() == expected
    trained = spans(tok, ids.tolist(), (labels != -100).tolist())
    assert trained[1] == (True, "长城是中国古代的军事防御工程，全长两万多公里。<|im_end|>\n")
    assert trained[3][0] and "长城始建于" in trained[3][1] and "<|im_end|>" not in trained[3][1]  # cut reply
    with pytest.raises(DataError, match=r"no record left to train on \(1 dropped: longer than train\.seq_len"):
        build_packed(cfg_for(path, model_dir, seq=seq, overlong="drop"), tok, str(tmp_path / "d"))


EXCHANGES = [("Name a colour.", "", "Blue."), ("Translate to Chinese:", "good morning", "早上好。"),
             ("What is 7 plus 8?", "", "7 plus 8 is 15.")]


def write_formats(tmp_path):
    alpaca = [{"instruction": i, "input": x, "output": o} for i, x, o in EXCHANGES]
    user = [i if not x else f"{i}\n\n{x}" for i, x, _ in EXCHANGES]
    sharegpt = [{"conversations": [{"from": "human", "value": u}, {"from": "gpt", "value": o}]}
                for u, (_, _, o) in zip(user, EXCHANGES)]
    messages = [{"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": o}]}
                for u, (_, _, o) in zip(user, EXCHANGES)]
    paths = {}
    for name, recs in (("alpaca", alpaca), ("sharegpt", sharegpt), ("messages", messages)):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return paths


def test_alpaca_sharegpt_and_messages_pack_identically(tok, model_dir, tmp_path):
    rows = {}
    for fmt, path in write_formats(tmp_path).items():
        r = Rows(build_packed(cfg_for(path, model_dir, fmt=fmt, seq=128), tok, str(tmp_path / "c")))
        assert r.meta["stats"]["records"] == 3 and len(r) == 1
        rows[fmt] = r.row(0)
    for a, b in zip(rows["alpaca"], rows["sharegpt"]):
        assert np.array_equal(a, b)
    for a, b in zip(rows["alpaca"], rows["messages"]):
        assert np.array_equal(a, b)
    ids, labels, pos = rows["alpaca"]
    replies = "Blue.<|im_end|>\n早上好。<|im_end|>\n7 plus 8 is 15.<|im_end|>\n"
    assert tok.decode([i for i in labels if i >= 0]) == replies
    assert (pos == 0).sum() == 4  # three records and the padding each start at position 0


def test_renamed_fields(tok, model_dir, tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "Hi?", "answer": "Hello."}) + "\n")
    cfg = cfg_for(path, model_dir, fmt="alpaca", fields={"instruction": "question", "output": "answer"})
    ids, labels, _ = Rows(build_packed(cfg, tok, str(tmp_path / "c"))).row(0)
    assert tok.decode([i for i in labels if i >= 0]) == "Hello.<|im_end|>\n"
    with pytest.raises(DataError, match=r"data\.fields\.question is not a field of data\.format=messages"):
        build_packed(cfg_for(path, model_dir, fields={"question": "q"}), tok, str(tmp_path / "c"))


BAD = [
    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}',
    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "   "}]}',
    '{"messages": [{"role": "user", "content": "hi"}]',
    '{"messages": [{"role": "user", "content": "only a question"}]}',
    '{"msgs": []}',
]


def test_bad_records_are_counted_with_line_numbers(tok, model_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(BAD * 2) + "\n")
    with pytest.raises(DataError, match=r"^data\.path: 8 of 10 records are bad \(bad\.jsonl:2: turn 1 \(assistant\): "
                                        r"empty content; bad\.jsonl:3: invalid JSON .*; bad\.jsonl:4: no assistant "
                                        r"turn .*; bad\.jsonl:5: missing list field 'messages'; "
                                        r"bad\.jsonl:7: .*\.\.\.\); "
                                        r"fix them, or set data\.max_bad_fraction=0\.8 to skip them$"):
        build_packed(cfg_for(path, model_dir), tok, str(tmp_path / "c"))
    rows = Rows(build_packed(cfg_for(path, model_dir, max_bad_fraction=0.8), tok, str(tmp_path / "c")))
    assert rows.meta["stats"]["bad"] == 8 and rows.meta["stats"]["records"] == 10


def test_missing_chat_template_names_the_fallback(model_dir, tmp_path):
    tok = chat_tokenizer()
    tok.chat_template = None
    path = write_messages(tmp_path / "m.jsonl", 5)
    with pytest.raises(DataError, match=r"^data\.chat_template: the tokenizer of model\.path has no chat template; "
                                        r"set data\.chat_template=chatml"):
        build_packed(cfg_for(path, model_dir), tok, str(tmp_path / "c"))
    rows = Rows(build_packed(cfg_for(path, model_dir, chat_template="chatml"), tok, str(tmp_path / "c")))
    assert rows.meta["stats"]["targets"] > 0


def test_debug_command_and_launch_refusal(model_dir, tmp_path):
    path = write_messages(tmp_path / "chat.jsonl", 20)
    res = run_cli([f"model.path={model_dir}", f"data.path={path}", "data.format=messages", "train.seq_len=128",
                   f"hydra.run.dir={tmp_path / 'run'}", "row=0"], module="launcher.data", timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("row 0 of ") and str(tmp_path / "run" / "cache") in lines[0]
    trained = [ln.split("| ", 1)[1] for ln in lines if ln.startswith("  train | ")]
    masked = [ln.split("| ", 1)[1] for ln in lines if ln.startswith("      - | ")]
    assert trained and all(t.endswith("<|im_end|>\\n") and "<|im_start|>" not in t for t in trained)
    assert masked and all("<|im_start|>assistant\\n" in m or "<|endoftext|>" in m for m in masked)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(BAD) + "\n")
    res = run_cli([f"model.path={model_dir}", f"data.path={bad}", "data.format=messages",
                   f"hydra.run.dir={tmp_path / 'run2'}"], timeout=120)
    assert res.returncode == 2 and not (tmp_path / "run2" / "launch.sh").exists()
    assert res.stderr.strip().splitlines()[-1].startswith("error: data.path: 4 of 5 records are bad (bad.jsonl:2:")
