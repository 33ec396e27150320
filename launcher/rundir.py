"""The run directory: resolved config, DeepSpeed JSON, launch.sh and run.json, written atomically.

A run dir explains itself: everything needed to understand or rerun a job sits next to its outputs.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from launcher.errors import ConfigError

# Keys a resumed run may change; anything else must match the run dir's config.yaml.
RESUMABLE_CHANGES = (
    "train.max_steps",
    "train.save_every",
    "train.log_every",
    "train.keep_last",
    "train.export_at_end",
    "dry_run",
    "force",
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
SECRET_PATTERN = re.compile(r"(api_?key|token|secret|password|passwd)", re.IGNORECASE)
PACKAGES = ("launcher", "torch", "deepspeed", "transformers", "datasets", "hydra-core")


def redact(text: str) -> str:
    """Hide values of secret-looking overrides (`wandb.api_key=...` -> `wandb.api_key=<redacted>`)."""
    return re.sub(r"([\w.]*" + SECRET_PATTERN.pattern + r"[\w.]*=)(\S+)", r"\1<redacted>", text, flags=re.I)


def redact_config(cfg: DictConfig) -> Dict[str, Any]:
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: ("<redacted>" if SECRET_PATTERN.search(str(k)) else walk(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(OmegaConf.to_container(cfg, resolve=True))


def config_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(redact_config(cfg)))


def run_info(argv: Sequence[str], command: List[str]) -> Dict[str, Any]:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "git_sha": _git_sha(),
        "versions": versions,
        "python": sys.version.split()[0],
        "host": socket.gethostname(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": [redact(a) for a in argv],
        "command": [redact(a) for a in command],
    }


def _git_sha() -> str | None:
    src = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def check_resumable(run_dir: Path, cfg: DictConfig) -> None:
    """Refuse to reuse a run dir whose saved config differs in something a resume cannot change."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = _flatten(OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True))
    new = _flatten(redact_config(cfg))
    changed = [
        k
        for k in sorted(set(saved) | set(new))
        if saved.get(k) != new.get(k) and not any(k == p or k.startswith(p + ".") for p in RESUMABLE_CHANGES)
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
    """Write each file atomically (temp file + rename): a crash never leaves a half-written artifact."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755 if name in executable else 0o644)
        os.replace(tmp, run_dir / name)


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2) + "\n"
