"""The #SBATCH options of a rendered job script, checked: time limit, warning signal, requeues, site lines.

Pure: config in, option strings out. sbatch reads #SBATCH lines itself (not the shell), so values are quoted
and may carry no newline or backslash.
"""

from __future__ import annotations

import re
import shlex
from typing import List, Optional, Sequence

from omegaconf import DictConfig

from launcher.config import secrets
from launcher.config.topology import Topology
from launcher.errors import ConfigError

# Slurm's --signal takes at most 65535 seconds.
MAX_SIGNAL_SECONDS = 65535
# [days-]hours:minutes:seconds and the shorter forms sbatch accepts; UNLIMITED/INFINITE.
_TIME = re.compile(r"^(\d+-\d+(:\d+(:\d+)?)?|\d+(:\d+(:\d+)?)?|UNLIMITED|INFINITE)$", re.IGNORECASE)


def time_seconds(text: str, key: str = "cluster.time") -> Optional[int]:
    """Slurm time limit in seconds (None for UNLIMITED); ConfigError naming `key` for a malformed value."""
    text = str(text).strip()
    if not _TIME.match(text):
        raise ConfigError(
            key, f"'{text}' is not a SLURM time; use HH:MM:SS, D-HH:MM:SS, minutes or UNLIMITED"
        )
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        return int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    if len(parts) == 1:  # minutes
        return parts[0] * 60
    if len(parts) == 2:  # MM:SS
        return parts[0] * 60 + parts[1]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def cpus_per_task(topo: Topology) -> Optional[int]:
    """CPU ranks get one core each; GPU nodes are taken whole (--exclusive): their cores feed the GPUs."""
    return topo.ranks_per_node if topo.accelerator == "cpu" else None


def sbatch_options(cfg: DictConfig, topo: Topology, run_dir: str) -> List[str]:
    """The #SBATCH options, in order; later options (cluster.sbatch_extra) override earlier ones."""
    c = cfg.cluster
    limit = time_seconds(c.time)
    if not 0 < c.signal_seconds <= MAX_SIGNAL_SECONDS:
        raise ConfigError("cluster.signal_seconds", f"must be in 1..{MAX_SIGNAL_SECONDS}, got {c.signal_seconds}")
    if limit is not None and c.signal_seconds >= limit:
        raise ConfigError(
            "cluster.signal_seconds",
            f"{c.signal_seconds} s is not below cluster.time={c.time} ({limit} s): the warning would come "
            f"before training starts; lower it or raise cluster.time",
        )
    if c.max_requeues < 0:
        raise ConfigError("cluster.max_requeues", f"must be >= 0, got {c.max_requeues}")
    opts = [
        option("name", "--job-name", cfg.name),
        f"--nodes={topo.nodes}",
        "--ntasks-per-node=1",  # one deepspeed runner per node; it starts the node's ranks
    ]
    if topo.accelerator == "cuda":
        opts += [f"--gpus-per-node={topo.ranks_per_node}", "--exclusive"]
    else:
        opts.append(f"--cpus-per-task={cpus_per_task(topo)}")
    opts.append(option("cluster.time", "--time", c.time))
    for key in ("partition", "account", "qos"):
        if c[key]:
            opts.append(option(f"cluster.{key}", f"--{key}", c[key]))
    # %j is the job id; a literal % in the run dir must be doubled for Slurm's filename patterns.
    opts += [
        f"--signal=B:USR1@{c.signal_seconds}",  # B: only the batch shell, which forwards it to the ranks
        "--requeue",
        "--open-mode=append",  # a requeued attempt appends to the same log
        option("run dir", "--output", run_dir.replace("%", "%%") + "/slurm-%j.out"),
    ]
    for i, line in enumerate(c.sbatch_extra):
        line = str(line).strip()
        _check_line(f"cluster.sbatch_extra[{i}]", line)
        if not line.startswith("-"):
            raise ConfigError(f"cluster.sbatch_extra[{i}]", f"'{line}' is not an sbatch option (e.g. --exclusive)")
        opts.append(line)
    return opts


# After cluster.setup (which may load a module or activate a venv) the job runs the python it finds on PATH;
# both job scripts (training and data preparation) follow this line with their own error exit.
FIND_PYTHON_AFTER_SETUP = "PYTHON=$(command -v python3 || command -v python) || "


def check_setup(setup: Sequence[str]) -> None:
    """cluster.setup lines are written into the job scripts: a secret there would be on disk."""
    for i, line in enumerate(setup):
        if secrets.carries_secret(line):
            raise ConfigError(
                f"cluster.setup[{i}]",
                "carries a secret, which would be written to the .sbatch; export it in the submitting shell "
                "instead (sbatch passes that environment on to the job) and drop it from cluster.setup",
            )


def _check_line(key: str, value: str) -> None:
    # sbatch reads #SBATCH lines itself (not the shell): a newline would end the comment and start a shell
    # line, and sbatch drops backslashes even inside quotes.
    if any(ord(ch) < 32 or ch == "\x7f" for ch in value) or "\\" in value:
        raise ConfigError(key, f"{value!r} has a control character or backslash, which #SBATCH lines cannot carry")


def option(key: str, flag: str, value: object) -> str:
    text = str(value)
    _check_line(key, text)
    return f"{flag}={shlex.quote(text)}"
