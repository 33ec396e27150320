"""The run dir on disk: writing its files atomically, and refusing to reuse it for a different run.

A run dir explains itself: everything needed to understand or rerun a job sits next to its outputs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from launcher.config import secrets
from launcher.config.schema import LauncherConfig
from launcher.errors import ConfigError
from launcher.launch.settle import appended_run_json
from launcher.render.rundir import redact_config

# Keys a resumed run may change; anything else must match the run dir's config.yaml.
RESUMABLE_CHANGES = (
    "train.max_steps",
    "train.save_every",
    "train.log_every",
    "train.keep_last",
    "train.export_at_end",
    # The world may change between launches (a node lost, a bigger allocation): launcher.launch.resume keeps the
    # checkpoint's global batch, re-derives micro x accum and converts the ZeRO state.
    "hardware.cpu_ranks",
    "hardware.gpus_per_node",
    "cluster.nodes",
    "train.micro_batch_size",
    "train.global_batch_size",
    "dry_run",
    "force",
    "verbose",
    "cluster.master_port",
    "cluster.time",
    "cluster.partition",
    "cluster.account",
    "cluster.qos",
    "cluster.setup",
    "cluster.sbatch_extra",
    "cluster.max_requeues",
    "cluster.signal_seconds",
    "monitor",
    "notes",
)


def check_run_dir(run_dir: Path) -> None:
    """The run dir must be a directory we can write, or creatable below one."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("run dir", f"{run_dir} exists and is not a directory; choose hydra.run.dir or name=")
    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError("run dir", f"cannot create or write {run_dir} ({probe} is not writable); choose a "
                          "writable hydra.run.dir or name=")


def check_resumable(run_dir: Path, cfg: DictConfig) -> None:
    """Refuse to reuse a run dir whose saved config differs in something a resume cannot change."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    try:
        saved = _flatten(OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True))
    except Exception as exc:  # noqa: BLE001 - any parse/interpolation error: the file is not a config we wrote
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError("name", f"{saved_path} is not a readable config ({first}); restore it, or start a "
                          "new run with name=<new name>") from None
    new = _flatten(redact_config(cfg))
    # A key the saved config lacks was added to the schema after that run started (e.g. adapter.*): at its
    # default it changes nothing, so the old run dir still resumes.
    defaults = _flatten(OmegaConf.to_container(OmegaConf.structured(LauncherConfig)))
    changed = [
        k
        for k in sorted(set(saved) | set(new))
        if saved.get(k) != new.get(k) and not any(k == p or k.startswith(p + ".") for p in RESUMABLE_CHANGES)
        and secrets.REDACTED not in (saved.get(k), new.get(k))  # a secret is not compared (nor written)
        and not (k not in saved and k in defaults and new.get(k) == defaults[k])
    ]
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)} -> {new.get(k)}" for k in changed[:4])
        more = f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""
        raise ConfigError(
            "name",
            f"run dir {run_dir} holds a run with different settings ({diffs}{more}); keep them to resume, "
            f"or start a new run with name=<new name>",
        )


def _flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, dict):
        out: Dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def write_files(run_dir: Path, files: Mapping[str, str], executable: Sequence[str] = ()) -> None:
    """Write each file atomically (temp file + rename): a crash never leaves a half-written artifact.
    run.json is one launch's entry, appended to the launches already recorded there."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        if name == "run.json":
            text = appended_run_json(run_dir, json.loads(text))
        fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755 if name in executable else 0o644)
        os.replace(tmp, run_dir / name)


