"""The configured data -> packed rows in the cache (data.* keys), reused while nothing it depends on changed.

read_examples() parses and checks every record without a tokenizer (the launcher runs it before any rank
starts, so bad data is refused early); build_packed() tokenizes, truncates or drops long records, packs and
stores. Counts (records, bad, truncated, dropped, tokens, targets, rows, padding) land in meta.json "stats".
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List, Tuple, Union

from launcher.data import chat, formats, records, store
from launcher.data.pack import Packed, pack_fit, pack_wrap
from launcher.data.records import BadRecords, DataError, RecordError
from launcher.data.text import builtin_documents

Example = Union[str, List[Dict[str, str]]]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")


def field_names(cfg: Any) -> Dict[str, str]:
    given = dict(cfg.data.fields or {})
    if cfg.data.format == "text" and "text" not in given:
        given["text"] = cfg.data.text_field
    try:
        return formats.fields_for(cfg.data.format, given)
    except KeyError as exc:
        raise DataError(exc.args[0]) from None


def read_examples(cfg: Any) -> Tuple[List[Example], BadRecords]:
    """Every record converted for data.format; raises DataError when the bad ones exceed the policy."""
    if cfg.data.path is None:
        docs = builtin_documents(cfg.data.builtin_documents)
        return list(docs), BadRecords(total=len(docs))
    fields = field_names(cfg)
    counts = BadRecords()
    examples: List[Example] = []
    for where, rec in records.iter_records(cfg.data.path):
        counts.total += 1
        try:
            if isinstance(rec, RecordError):
                raise rec
            examples.append(formats.convert(cfg.data.format, rec, fields))
        except RecordError as exc:
            counts.add(where, str(exc))
    records.check_bad(counts, float(cfg.data.max_bad_fraction), cfg.data.path)
    return examples, counts


def tokenizer_hash(model_path: Any) -> str:
    if model_path is None:
        return "byte-tokenizer-v1"
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = os.path.join(model_path, name)
        if os.path.isfile(path):
            digest.update(name.encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]


def cache_key(cfg: Any) -> str:
    d = cfg.data
    key = {
        "version": store.VERSION,
        "source": records.fingerprint(d.path) if d.path is not None else {"builtin": d.builtin_documents},
        "format": d.format, "fields": field_names(cfg), "chat_template": d.chat_template,
        "overlong": d.overlong, "max_bad_fraction": float(d.max_bad_fraction),
        "tokenizer": tokenizer_hash(cfg.model.path), "seq_len": int(cfg.train.seq_len),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def build_packed(cfg: Any, tokenizer: Any, cache_dir: str) -> str:
    """Tokenize, pack and store once; returns the packed directory (see launcher.data.store)."""
    out = os.path.join(cache_dir, f"packed-{cache_key(cfg)}")
    if os.path.isfile(os.path.join(out, "meta.json")):
        return out
    examples, counts = read_examples(cfg)
    seq = int(cfg.train.seq_len)
    stats: Dict[str, Any] = {"records": counts.total, "bad": counts.bad, "truncated": 0, "dropped": 0}
    if cfg.data.format == "text":
        packed = pack_wrap(chat.encode_text(tokenizer, examples, tokenizer.bos_token_id, tokenizer.eos_token_id),
                           seq)
    else:
        packed = _pack_chat(cfg, tokenizer, examples, seq, stats)
    if len(packed) == 0:
        raise DataError(f"data.path: the data holds fewer than train.seq_len={seq} tokens")
    vocab = int(cfg.model.vocab_size)
    if int(packed.input_ids.max()) >= vocab:
        raise DataError(f"model.vocab_size: token id {int(packed.input_ids.max())} >= vocab_size={vocab}; "
                        "tokenizer/model mismatch")
    stats.update(rows=len(packed), tokens=int(packed.input_ids.size), targets=int(packed.loss_mask.sum()))
    if cfg.data.format != "text":
        stats["padding_fraction"] = round(1 - stats["record_tokens"] / packed.input_ids.size, 4)
    os.makedirs(cache_dir, exist_ok=True)
    return store.write(out, [packed], vocab, {"format": cfg.data.format, "stats": stats})


def _pack_chat(cfg: Any, tokenizer: Any, examples: List[Example], seq: int, stats: Dict[str, Any]) -> Packed:
    chat.check_fast(tokenizer)
    template = chat.resolve_template(tokenizer, cfg.data.chat_template)
    encoded = []
    bad = BadRecords(total=len(examples))
    for i, turns in enumerate(examples):
        try:
            ids, mask = chat.encode_chat(tokenizer, turns, template)
        except RecordError as exc:
            bad.add(f"record {i + 1}", str(exc))
            continue
        if len(ids) > seq:
            if cfg.data.overlong == "drop":
                stats["dropped"] += 1
                continue
            ids, mask = ids[:seq], mask[:seq]
            stats["truncated"] += 1
        if sum(mask[1:]) == 0:  # truncation cut every reply: nothing left to learn
            stats["dropped"] += 1
            continue
        encoded.append((ids, mask))
    records.check_bad(bad, float(cfg.data.max_bad_fraction), cfg.data.path or "built-in")
    if not encoded:
        raise DataError(f"data.path: no record left to train on ({stats['dropped']} dropped: longer than "
                        f"train.seq_len={seq} or no reply left after truncation); raise train.seq_len or set "
                        "data.overlong=truncate")
    stats["bad"] += bad.bad
    stats["record_tokens"] = sum(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return pack_fit(encoded, seq, int(pad))
