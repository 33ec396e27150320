"""Module paths of the flat layout before the stage folders (config/, render/, launch/, models/, export/).

Nothing rendered into a run dir imports them (launch.sh, .sbatch and hostfile commands run `launcher.worker`
and `launcher.slurm_job`, which stay), but a user's script might: importing an old path fails with an
ImportError that names where its contents went, instead of a bare "No module named ...".
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Optional, Sequence

MOVED = {
    "launcher.schema": "launcher.config.schema",
    "launcher.compose": "launcher.config.compose",
    "launcher.validate": "launcher.config.validate",
    "launcher.topology": "launcher.config.topology",
    "launcher.ds_config": "launcher.render.ds_config",
    "launcher.command": "launcher.render.command",
    "launcher.slurm": "launcher.render.sbatch (rendering) and launcher.launch.slurm (submission, allocation)",
    "launcher.hostfile": "launcher.config.hostfile (parsing) and launcher.render.hostfile (launch files)",
    "launcher.rundir": "launcher.render.rundir (file texts) and launcher.launch.rundir (writing, resume check)",
    "launcher.shm": "launcher.launch.shm",
    "launcher.jit_locks": "launcher.launch.jit_locks",
    "launcher.consolidate": (
        "launcher.export: locate (finding the checkpoint), zero_state (reading ZeRO state), shards (writing "
        "shards and the index), hf_dir (export())"
    ),
    "launcher.worker.tokenizer": "launcher.models.tokenizer",
}


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """First on sys.meta_path, so that no other finder (an editable install's, a stale copy) resolves an old name."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None, target: object = None) -> None:
        if fullname in MOVED:
            raise ImportError(f"{fullname} has moved to {MOVED[fullname]}", name=fullname)
        return None


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
