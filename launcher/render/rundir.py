"""The run directory's files as text: the resolved config (secrets redacted), run.json, JSON dumps.

A run dir explains itself: everything needed to understand or rerun a job sits next to its outputs.
Writing them (atomically) and the resume check live in launcher.launch.rundir.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from launcher.config import secrets

PACKAGES = ("launcher", "torch", "deepspeed", "transformers", "datasets", "hydra-core")


def redact(text: str) -> str:
    """Hide secrets in a command-line word (`wandb.api_key=...` -> `wandb.api_key=<redacted>`)."""
    return secrets.mask_text(text)


def redact_config(cfg: DictConfig) -> Dict[str, Any]:
    return secrets.mask(OmegaConf.to_container(cfg, resolve=True))


def resume_command(argv: Sequence[str]) -> Tuple[str, List[str]]:
    """`python -m launcher <overrides>` to resume, without train.max_steps and without any override that
    carries a secret (no placeholder to paste back in); returns (command, the keys left out)."""
    kept, left_out = secrets.public_argv([a for a in argv if not a.startswith("train.max_steps=")])
    return " ".join(["python -m launcher", *(shlex.quote(a) for a in kept)]), left_out


def config_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(redact_config(cfg)))


def with_command(run_json: str, info: Dict[str, Any]) -> str:
    """A run.json entry rewritten for another command (sbatch, hostfile runner), keeping what else it holds
    (the memory plan)."""
    return to_json({**json.loads(run_json), **info})


def run_info(argv: Sequence[str], command: List[str]) -> Dict[str, Any]:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "start": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": _git_sha(),
        "versions": versions,
        "python": sys.version.split()[0],
        "host": socket.gethostname(),
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
