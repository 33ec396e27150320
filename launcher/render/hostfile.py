"""cluster=hostfile: ssh/pdsh clusters through `deepspeed --hostfile` ("host slots=N" lines).

The world shape comes from the file: cluster.nodes = its hosts, and every host needs as many slots as the
hardware profile runs ranks per node. DeepSpeed's pdsh runner ssh-es into each host; it carries PYTHON*
variables itself and reads `.deepspeed_env` from the run dir (its working directory) for the rest.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

from omegaconf import DictConfig

from launcher.config import secrets
from launcher.config.hostfile import read_hostfile
from launcher.config.topology import Topology
from launcher.errors import ConfigError
from launcher.render import rundir
from launcher.render.command import PACKAGE_ROOT, launch_script, worker_args

_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def hostfile_text(hosts: Sequence[str], slots: int) -> str:
    """DeepSpeed hostfile: one "host slots=N" line per node, in node-rank order."""
    if slots < 1:
        raise ConfigError("hostfile", f"slots must be >= 1, got {slots}")
    for host in hosts:
        if not _HOST.match(host):
            raise ConfigError("hostfile", f"'{host}' is not a host name")
    if len(set(hosts)) != len(hosts):
        raise ConfigError("hostfile", f"duplicate host in {', '.join(hosts)}")
    return "".join(f"{host} slots={slots}\n" for host in hosts)


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
    public, secret = secrets.split_env(env)
    for key in secret:
        raise ConfigError(f"hardware.nccl_env.{key}", "is a secret, which would be written to .deepspeed_env to reach "
                          "the other hosts; set it in each host's shell profile and drop it here")
    lines = {"PATH": f"{bin_dir}:$PATH", "PYTHONPATH": PACKAGE_ROOT, **public}
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
    out["run.json"] = rundir.with_command(files["run.json"], rundir.run_info(sys.argv, command))
    return command, out
