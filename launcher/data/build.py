"""The configured data -> packed row shards in the cache, streamed, in parallel, in bounded memory.

    records.iter_raw --chunks--> encode.encode_chunk (num_proc worker processes) --in order--> packer
    (stream.WrapPacker for text, FitPacker for chat) --rows--> store.ShardWriter --shards--> packed-<key>.tmp
    --rename--> packed-<key>/ (see cache.py)

The reader, packer and writer run in this process; tokenization in `num_proc` forked workers (data.num_proc,
null: every core this process may use). At most 2 x num_proc chunks (~1 MiB of text each) are in flight, the
packer holds under one row (wrap) or OPEN_ROWS rows (fit), and the writer one shard (SHARD_TOKENS tokens):
peak memory does not grow with the corpus. Counts (records, bad, truncated, dropped, tokens, targets, rows,
padding) land in meta.json "stats" and in the summary line.

prepare_cache(cfg, run_dir) is what the launcher calls on the submitting host; read_examples() parses every
record into memory (small data, tests and the benchmark's in-memory baseline only).
"""

from __future__ import annotations

import collections
import os
import shutil
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from launcher.data import cache, chat, formats, records, stream
from launcher.data.cache import cache_key, field_names, tokenizer_hash
from launcher.data.encode import Chunk, Encoded, WorkerState, encode_chunk, init
from launcher.data.records import BadRecords, DataError, RecordError
from launcher.data.store import ShardWriter
from launcher.data.text import builtin_documents, is_byte_identity

__all__ = ["build_packed", "cache_complete", "cache_key", "cache_path", "field_names", "prepare_cache",
           "read_examples", "tokenizer_hash"]
Example = Union[str, List[Dict[str, str]]]
CHUNK_CHARS = 1 << 20  # raw characters per chunk sent to a worker
CHUNK_RECORDS = 4096


def read_examples(cfg: Any) -> Tuple[List[Example], BadRecords]:
    """Every record converted for data.format, in memory; raises DataError when the bad ones exceed the policy."""
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


def cache_path(cfg: Any, run_dir: Optional[Any] = None) -> str:
    """The packed directory this config trains on (it may not exist yet)."""
    return cache.packed_dir(cfg, cache.cache_root(cfg, run_dir))


def cache_complete(cfg: Any, run_dir: Optional[Any] = None) -> bool:
    return cache.is_complete(cache_path(cfg, run_dir))


def prepare_cache(cfg: Any, run_dir: Optional[Any] = None, progress: bool = True) -> str:
    """Tokenize and pack the configured data unless its cache is complete; returns the packed directory.
    Loads the model's tokenizer (transformers), so the launcher calls it only for real launches."""
    path = cache_path(cfg, run_dir)
    if cache.is_complete(path):
        return path
    from launcher.models.tokenizer import load_tokenizer

    return build_packed(cfg, load_tokenizer(cfg.model.path), os.path.dirname(path), progress=progress)


def build_packed(cfg: Any, tokenizer: Any, cache_dir: str, num_proc: Optional[int] = None,
                 progress: bool = False) -> str:
    """Tokenize, pack and store once (under the cache lock); returns the packed directory."""
    out = cache.packed_dir(cfg, os.path.abspath(cache_dir))
    if cache.is_complete(out):
        return out
    with cache.locked(out):
        if cache.is_complete(out):  # another preparer finished while we waited
            return out
        tmp = cache.fresh_tmp(out)
        try:
            _build(cfg, tokenizer, tmp, num_proc, progress)
            cache.publish(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_num_proc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_state(cfg: Any, tokenizer: Any) -> WorkerState:
    fmt = cfg.data.format
    fields = field_names(cfg) if cfg.data.path is not None else {"text": "text"}
    state = WorkerState(tokenizer, fmt, fields, int(cfg.train.seq_len), str(cfg.data.overlong))
    if fmt == "text":
        state.bos, state.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        state.byte_identity = is_byte_identity(tokenizer)
    else:
        chat.check_fast(tokenizer)
        state.template = chat.resolve_template(tokenizer, cfg.data.chat_template)
    return state


def chunks(cfg: Any) -> Iterator[Chunk]:
    """The source's raw records in chunks of about CHUNK_CHARS characters (or CHUNK_RECORDS records)."""
    if cfg.data.path is None:
        source: Iterator[Tuple[str, Any]] = (
            (f"built-in[{i}]", {"text": doc}) for i, doc in enumerate(builtin_documents(cfg.data.builtin_documents)))
    else:
        source = records.iter_raw(cfg.data.path)
    chunk: Chunk = []
    chars = 0
    for item in source:
        chunk.append(item)
        chars += len(item[1]) if isinstance(item[1], str) else 256
        if chars >= CHUNK_CHARS or len(chunk) >= CHUNK_RECORDS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def encoded_chunks(cfg: Any, state: WorkerState, num_proc: int) -> Iterator[Encoded]:
    """encode_chunk over chunks(cfg), in order, with at most 2 x num_proc chunks in flight."""
    init(state)
    if num_proc <= 1:
        yield from map(encode_chunk, chunks(cfg))
        return
    import multiprocessing

    # fork: the workers inherit the tokenizer and state without pickling them.
    with multiprocessing.get_context("fork").Pool(num_proc, initializer=init, initargs=(state,)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks(cfg):
            pending.append(pool.apply_async(encode_chunk, (chunk,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class Progress:
    """A tqdm bar over the source's bytes, with records/s and tokens/s."""

    def __init__(self, cfg: Any, enabled: bool) -> None:
        self.start = time.perf_counter()
        self.records = self.tokens = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.by_bytes = cfg.data.path is not None  # files: a bar over their bytes; built-in: records
            total = sum(s for _, s, _ in records.fingerprint(cfg.data.path)) if self.by_bytes else None
            self.bar = tqdm(total=total, unit="B" if self.by_bytes else " records", unit_scale=True, desc="data",
                            file=sys.stderr, mininterval=1.0)

    def update(self, enc: Encoded) -> None:
        self.records += enc.records
        self.tokens += len(enc.ids)
        if self.bar is not None:
            dt = max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.records / dt:,.0f} records/s, {self.tokens / dt:,.0f} tokens/s",
                                     refresh=False)
            self.bar.update(enc.raw_chars if self.by_bytes else enc.records)

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
        return time.perf_counter() - self.start


def _build(cfg: Any, tokenizer: Any, tmp: str, num_proc: Optional[int], progress: bool) -> Dict[str, Any]:
    seq = int(cfg.train.seq_len)
    vocab = int(cfg.model.vocab_size)
    state = worker_state(cfg, tokenizer)
    if num_proc is None:
        num_proc = cfg.data.get("num_proc") or default_num_proc()
    writer = ShardWriter(tmp, seq, vocab)
    if cfg.data.format == "text":
        packer: Any = stream.WrapPacker(seq, writer.add)
    else:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        packer = stream.FitPacker(seq, int(pad), writer.add)
    bad = BadRecords()
    stats: Dict[str, Any] = {"records": 0, "bad": 0, "truncated": 0, "dropped": 0, "record_tokens": 0}
    bar = Progress(cfg, progress)
    try:
        for enc in encoded_chunks(cfg, state, int(num_proc)):
            bad.total += enc.records
            bad.bad += enc.bad
            bad.examples += enc.bad_examples[: records.SHOWN_BAD - len(bad.examples)]
            stats["truncated"] += enc.truncated
            stats["dropped"] += enc.dropped
            stats["record_tokens"] += len(enc.ids)
            packer.add(enc.ids, enc.lengths, enc.mask)
            bar.update(enc)
            if bad.bad and not cfg.data.max_bad_fraction:
                break  # any bad record refuses the data: say so now, not after the whole corpus
        packer.finish()
    except ValueError as exc:  # ShardWriter: a token id beyond the model's vocabulary
        raise DataError(f"model.vocab_size: {exc}; tokenizer/model mismatch") from None
    finally:
        seconds = bar.close()
    records.check_bad(bad, float(cfg.data.max_bad_fraction), cfg.data.path or "built-in")
    stats.update(records=bad.total, bad=bad.bad)
    if cfg.data.format != "text" and stats["record_tokens"] == 0:
        raise DataError(f"data.path: no record left to train on ({stats['dropped']} dropped: longer than "
                        f"train.seq_len={seq} or no reply left after truncation); raise train.seq_len or set "
                        "data.overlong=truncate")
    if writer.total_rows == 0:
        raise DataError(f"data.path: the data holds fewer than train.seq_len={seq} tokens")
    writer.close_shards()
    stats.update(rows=writer.rows, tokens=writer.rows * seq, targets=writer.targets, shards=len(writer.entries),
                 seconds=round(seconds, 2), num_proc=int(num_proc))
    stats["padding_fraction"] = (round(1 - stats["record_tokens"] / stats["tokens"], 4)
                                 if cfg.data.format != "text" else 0.0)
    writer.finish({"format": cfg.data.format, "stats": stats})
    if progress:
        print(summary(stats, seq), file=sys.stderr, flush=True)
    return stats


def summary(stats: Dict[str, Any], seq: int) -> str:
    dt = max(float(stats.get("seconds", 0)), 1e-9)
    return (f"data: {stats['records']:,} records ({stats['bad']} bad, {stats['truncated']} truncated, "
            f"{stats['dropped']} dropped), {stats['record_tokens']:,} tokens -> {stats['rows']:,} rows x {seq} in "
            f"{stats['shards']} shard(s), padding {100 * stats['padding_fraction']:.1f}%; {dt:.1f} s with "
            f"{stats['num_proc']} process(es) ({stats['records'] / dt:,.0f} records/s, "
            f"{stats['record_tokens'] / dt:,.0f} tokens/s)")
