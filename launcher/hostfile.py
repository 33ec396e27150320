"""cluster=hostfile: ssh/pdsh clusters through `deepspeed --hostfile` ("host slots=N" lines).

The world shape comes from the file: cluster.nodes = its hosts, and every host needs as many slots as the
hardware profile runs ranks per node. DeepSpeed's pdsh runner ssh-es into each host; it carries PYTHON*
variables itself and reads `.deepspeed_env` from the run dir (its working directory) for the rest.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Tuple

from omegaconf import DictConfig

from launcher import rundir
from launcher.command import PACKAGE_ROOT, launch_script, worker_args
from launcher.errors import ConfigError
from launcher.topology import Topology

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


def hostfile_args(cfg: DictConfig, topo: Topology, run_dir: str, master_port: int) -> List[str]:
    """Runner arguments after `deepspeed` for a pdsh launch over the hostfile's hosts."""
    for host, slots in read_hostfile(cfg.cluster.hostfile):
        if slots < topo.ranks_per_node:
            raise ConfigError(
                "cluster.hostfile",
                f"{host} has slots={slots} but hardware={cfg.hardware.name} runs {topo.ranks_per_node} ranks per node",
            )
    return [
        "--hostfile", cfg.cluster.hostfile,
        "--num_nodes", str(topo.nodes),
        "--num_gpus", str(topo.ranks_per_node),
        "--master_port", str(master_port),
        *worker_args(run_dir),
    ]  # fmt: skip


def deepspeed_env_text(env: Mapping[str, str], bin_dir: str) -> str:
    """`.deepspeed_env` for the pdsh runner: KEY=VALUE lines it exports on every host (inside double quotes,
    so $PATH expands there)."""
    lines = {"PATH": f"{bin_dir}:$PATH", "PYTHONPATH": PACKAGE_ROOT, **env}
    for key, value in lines.items():
        if re.search(r'["`\\\n]', value) or ("$" in value and key != "PATH"):
            raise ConfigError(key, f"{value!r} cannot pass through .deepspeed_env (quotes, $, backslash, newline)")
    return "".join(f"{k}={v}\n" for k, v in lines.items())


def hostfile_files(
    cfg: DictConfig,
    topo: Topology,
    run_dir: Path,
    files: Mapping[str, str],
    deepspeed_bin: str,
    env: Mapping[str, str],
    master_port: int,
) -> Tuple[List[str], Dict[str, str]]:
    """The run dir for cluster=hostfile: launch.sh runs `deepspeed --hostfile`; returns (command, files)."""
    args = hostfile_args(cfg, topo, str(run_dir), master_port)
    command = [deepspeed_bin, *args]
    out = dict(files)
    out["launch.sh"] = launch_script(env, deepspeed_bin, args, str(run_dir))
    out[".deepspeed_env"] = deepspeed_env_text(env, str(Path(sys.executable).parent))
    out["run.json"] = rundir.to_json(rundir.run_info(sys.argv, command))
    return command, out
