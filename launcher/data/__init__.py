"""How a record becomes a training row: read records (records.py), turn each format into text or chat turns
(formats/), render and label chat turns with the tokenizer's template (chat.py), tokenize chunks of records in
worker processes (encode.py), pack them into rows with restarting position_ids as they stream by (pack.py,
stream.py), and write the rows into memory-mapped shards of a cache keyed by everything they depend on
(store.py, cache.py), all driven by build.py.

Nothing here imports torch: the rows are numpy arrays, and the tokenizer is passed in (or, in prepare_cache,
loaded from model.path). The launcher calls `prepare_cache(cfg, run_dir)` on the submitting host before it
starts ranks; the ranks only memory-map finished shards (`cache_complete` / `cache_path`).
`python -m launcher.data <overrides> [row=N]` prepares the same cache and prints a packed row with its labels.
"""

from __future__ import annotations

from typing import Any, Optional


def prepare_cache(cfg: Any, run_dir: Optional[Any] = None, progress: bool = True) -> str:
    """Tokenize and pack the configured data unless its cache is complete; returns the packed directory."""
    from launcher.data.build import prepare_cache as prepare

    return prepare(cfg, run_dir, progress)


def cache_complete(cfg: Any, run_dir: Optional[Any] = None) -> bool:
    from launcher.data.build import cache_complete as complete

    return complete(cfg, run_dir)


def cache_path(cfg: Any, run_dir: Optional[Any] = None) -> str:
    from launcher.data.build import cache_path as path

    return path(cfg, run_dir)
