"""`python -m launcher.data <launcher overrides> [row=N]`: prepare (or reuse) the packed rows a run with these
overrides trains on, in the same cache the run uses (progress bar and summary on stderr), and print row N
(default 0) with its labels. `python -m launcher` runs the same preparation before it starts ranks.
`python -m launcher.data --run-dir DIR`: prepare the cache of a written run dir (the cluster.prepare_job job)."""

from __future__ import annotations

import sys
from typing import List


def main(argv: List[str]) -> int:
    from launcher.config.compose import compose
    from launcher.config.resolve import absolutize_paths, adopt_hf_architecture
    from launcher.data.build import build_packed
    from launcher.data.cache import cache_root
    from launcher.data.records import DataError
    from launcher.data.show import describe_row
    from launcher.data.store import Rows
    from launcher.errors import ConfigError

    if argv[:1] == ["--run-dir"] and len(argv) == 2:
        return prepare_for_run_dir(argv[1])
    row = 0
    overrides = []
    for arg in argv:
        if arg.startswith("row="):
            row = int(arg.split("=", 1)[1])
        else:
            overrides.append(arg)
    try:
        cfg, run_dir = compose(overrides)
        absolutize_paths(cfg)
        adopt_hf_architecture(cfg)
        from launcher.models.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.model.path)
        rows = Rows(build_packed(cfg, tokenizer, cache_root(cfg, run_dir), progress=True))
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not 0 <= row < len(rows):
        print(f"error: row: {row} is out of range; the data packs into {len(rows)} rows", file=sys.stderr)
        return 2
    print(describe_row(rows, row, tokenizer))
    return 0


def prepare_for_run_dir(run_dir: str) -> int:
    """`python -m launcher.data --run-dir DIR` (the cluster.prepare_job SLURM job): prepare the cache of the
    run dir's config.yaml, the resolved config its ranks read, so the training job finds the same key."""
    from omegaconf import OmegaConf

    from launcher.data import prepare_cache
    from launcher.data.records import DataError
    from launcher.models.tokenizer import TokenizerError

    try:
        cfg = OmegaConf.load(f"{run_dir}/config.yaml")
    except OSError as exc:
        print(f"launcher: error: run dir: cannot read {run_dir}/config.yaml ({exc.strerror}); submit with "
              "`python -m launcher cluster=slurm ...`, which writes it", file=sys.stderr)
        return 2
    try:
        print(f"launcher: data: prepared {prepare_cache(cfg, run_dir)}", file=sys.stderr)
    except (DataError, TokenizerError) as exc:
        print(f"launcher: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
