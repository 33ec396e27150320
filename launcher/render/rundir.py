"""The run directory's files as text: the resolved config (secrets redacted), run.json, JSON dumps.

A run dir explains itself: everything needed to understand or rerun a job sits next to its outputs.
Writing them (atomically) and the resume check live in launcher.launch.rundir.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

from omegaconf import DictConfig, OmegaConf

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
    src = Path(__file__).resolve().parents[2]  # the checkout (this file is launcher/render/rundir.py)
    try:
        out = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2) + "\n"
