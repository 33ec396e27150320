"""Regenerate the checked-in reference DeepSpeed configs: `python -m launcher.ds_configs`.

ds_configs/<hardware>/zero<stage>_<offload>_<precision>.json for the shipped combinations, composed through
the real entry point (launcher.prepare.prepare) with the default train shape. tests/test_ds_configs.py fails
when a file drifts from what the code generates.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Dict

from launcher.prepare import prepare

HARDWARE = ("8xa100", "8xh100")
STAGES = (1, 2, 3)
OFFLOAD = ("none", "cpu")
PRECISION = ("fp16", "bf16")
OUT_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


def render_all() -> Dict[str, str]:
    files = {}
    for hw, stage, offload, precision in itertools.product(HARDWARE, STAGES, OFFLOAD, PRECISION):
        overrides = [f"hardware={hw}", f"zero=stage{stage}", f"offload={offload}", f"precision={precision}",
                     "dry_run=true", "cluster.master_port=29500"]
        run = prepare(overrides, local_gpus=0, check_resume=False)
        name = f"{hw}/zero{stage}_{'offload' if offload == 'cpu' else 'nooffload'}_{precision}.json"
        files[name] = run.files["ds_config.json"]
    return files


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR
    for name, text in render_all().items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {len(render_all())} files under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
