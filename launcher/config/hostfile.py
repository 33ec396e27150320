"""cluster=hostfile: an existing DeepSpeed hostfile ("host slots=N" lines) decides cluster.nodes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Tuple

from omegaconf import DictConfig

from launcher.errors import ConfigError

_LINE = re.compile(r"^(\S+)\s+slots=(\d+)$")


def parse_hostfile(text: str) -> List[Tuple[str, int]]:
    """Pure: [(host, slots)] in file order; comments (#) and blank lines are skipped."""
    hosts: List[Tuple[str, int]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m or int(m.group(2)) < 1:
            raise ConfigError("cluster.hostfile", f"line {number} '{raw.strip()}' is not 'host slots=N'")
        if m.group(1) in (h for h, _ in hosts):
            raise ConfigError("cluster.hostfile", f"line {number}: host {m.group(1)} is listed twice")
        hosts.append((m.group(1), int(m.group(2))))
    if not hosts:
        raise ConfigError("cluster.hostfile", "lists no hosts; write one 'host slots=N' line per node")
    return hosts


def read_hostfile(path: str) -> List[Tuple[str, int]]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("cluster.hostfile", f"cannot read {path}: {exc.strerror}") from None
    return parse_hostfile(text)


def adopt_hostfile(cfg: DictConfig) -> None:
    """cluster.nodes = the hostfile's hosts (before the topology is resolved)."""
    if not cfg.cluster.hostfile:
        raise ConfigError("cluster.hostfile", "cluster=hostfile needs cluster.hostfile=<path to a hostfile>")
    cfg.cluster.nodes = len(read_hostfile(cfg.cluster.hostfile))
