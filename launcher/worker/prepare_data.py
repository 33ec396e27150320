"""`python -m launcher.worker.prepare_data CONFIG_YAML CACHE_DIR`: the tokenizing half of `launcher data`."""

from __future__ import annotations

import sys

import numpy as np
from omegaconf import OmegaConf

from launcher.models.tokenizer import load_tokenizer
from launcher.worker.data import DataError, build_packed


def main() -> int:
    cfg = OmegaConf.load(sys.argv[1])
    try:
        out = build_packed(cfg, load_tokenizer(cfg.model.path), sys.argv[2])
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = np.load(out, mmap_mode="r")
    print(f"data: {len(rows):,} sequences x {rows.shape[1]} tokens packed in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
