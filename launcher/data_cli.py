"""`launcher data [overrides]`: tokenize and pack the run's data into its cache now, before any rank starts.

The ranks then find the packed file (same fingerprint) and skip the work. The launcher side composes the
config; the tokenizing runs in a child process (launcher.worker.prepare_data) because it needs the
tokenizer libraries, which the launcher side does not import.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from launcher.errors import ConfigError

USAGE = """usage: launcher data [overrides]
Tokenize and pack data.path (or the built-in corpus) for model=... and train.seq_len into data.cache_dir
(default <run dir>/cache), so the run starts training at once. Same overrides as `launcher train`."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    from launcher.prepare import compose_resolved
    from launcher.render.rundir import config_yaml

    try:
        cfg, run_dir, _, _ = compose_resolved(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cache_dir = cfg.data.cache_dir or str(Path(run_dir).resolve() / "cache")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(config_yaml(cfg))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                            os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        return subprocess.call([sys.executable, "-m", "launcher.worker.prepare_data", str(path), cache_dir], env=env)
