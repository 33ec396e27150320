"""Where the packed rows of a config live, when they are complete, and how a preparer publishes them safely.

    <data.cache_dir or run_dir/cache>/packed-<key>/        complete: meta.json present (written last)
    <data.cache_dir or run_dir/cache>/packed-<key>.tmp<pid>/ being written by process <pid>
    <data.cache_dir or run_dir/cache>/packed-<key>.lock     flock held while preparing

The key hashes everything the rows depend on (cache_key). Two preparers of the same key serialise on the
lock: the second finds the cache complete and reuses it. A preparer killed half-way leaves only a .tmp
directory, which nothing reads and the next preparer (holding the lock) removes. Readers never lock: a
directory named packed-<key> is only ever a finished one, renamed into place whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
from typing import Any, Dict, Iterator, Optional

from launcher.data import formats, pack, records, store
from launcher.data.records import DataError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")
LOCAL_FILESYSTEMS = ("tmpfs", "ramfs", "devtmpfs")


def field_names(cfg: Any) -> Dict[str, str]:
    given = dict(cfg.data.fields or {})
    if cfg.data.format == "text" and "text" not in given:
        given["text"] = cfg.data.text_field
    try:
        return formats.fields_for(cfg.data.format, given)
    except KeyError as exc:
        raise DataError(exc.args[0]) from None


def tokenizer_hash(model_path: Any) -> str:
    """A hash of the tokenizer's files (not its name): a retrained tokenizer in the same dir is a new key."""
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
        "vocab_size": int(cfg.model.vocab_size),
        "packing": {"layout": "wrap" if d.format == "text" else "fit", "open_rows": pack.OPEN_ROWS},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_root(cfg: Any, run_dir: Optional[Any] = None) -> str:
    """data.cache_dir, or <run_dir>/cache when it is null."""
    if cfg.data.cache_dir:
        return os.path.abspath(str(cfg.data.cache_dir))
    if run_dir is None:
        raise DataError("data.cache_dir: null needs the run dir (<run_dir>/cache); set data.cache_dir")
    return os.path.join(os.path.abspath(str(run_dir)), "cache")


def packed_dir(cfg: Any, cache_dir: str) -> str:
    return os.path.join(cache_dir, f"packed-{cache_key(cfg)}")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "meta.json"))


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """An exclusive flock on <path>.lock (blocks while another preparer of the same key works)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def fresh_tmp(path: str) -> str:
    """A new temporary directory for `path`; call with the lock held (any other .tmp is a dead preparer's)."""
    for stale in glob.glob(f"{glob.escape(path)}.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(tmp)
    return tmp


def publish(tmp: str, path: str) -> None:
    """Rename the finished temporary directory into place (atomic on one filesystem)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def filesystem_type(path: str) -> str:
    """The type (ext4, nfs, lustre, tmpfs, ...) of the mount holding `path`, from /proc/mounts ('' if unknown)."""
    path = os.path.realpath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    best, kind = "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    mount = parts[1].replace("\\040", " ")
                    inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                    if inside and len(mount) >= len(best):
                        best, kind = mount, parts[2]
    except OSError:
        return ""
    return kind


def check_shared(cache_dir: str, nodes: int) -> None:
    """More than one node: the cache must be on a filesystem the compute nodes share, not host-local memory."""
    if nodes <= 1:
        return
    kind = filesystem_type(cache_dir)
    real = os.path.realpath(cache_dir)
    if kind in LOCAL_FILESYSTEMS or real.startswith("/dev/shm"):
        raise DataError(f"data.cache_dir: {cache_dir} is on {kind or 'shared memory'}, local to this host; the "
                        f"other {nodes - 1} node(s) cannot read it; set data.cache_dir to a shared filesystem path")
