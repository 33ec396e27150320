"""Hydra's own command-line flags, with Hydra's meaning, parsed before the overrides.

`@hydra.main` would give these flags but also a `.hydra/` dir (the unredacted config), a chdir and job
logging; the launcher keeps the compose API and implements the flags here instead:

  --cfg job|all|hydra   print the composed config (job: without the hydra node) and exit; nothing is written
  --resolve             with --cfg: resolve ${...} interpolations
  -p/--package PKG      with --cfg: print only this node (e.g. --package train)
  --info [defaults|config|all]  the defaults tree (group -> option chosen) and where configs come from
  -m/--multirun         sweep: `zero=stage2,stage3 train.lr=1e-4,3e-4` runs every combination
  -sc/--shell-completion install=bash|zsh | query=bash   shell completion
  -h/--help             the override reference
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from launcher.errors import ConfigError

SUPPORTED = "--cfg job|all|hydra, --resolve, --package, --info, -m/--multirun, -sc install=bash|zsh, --help"
CFG_CHOICES = ("job", "all", "hydra")
INFO_CHOICES = ("all", "defaults", "config")


@dataclass
class Flags:
    cfg: Optional[str] = None
    resolve: bool = False
    package: Optional[str] = None
    info: Optional[str] = None
    multirun: bool = False
    shell_completion: Optional[str] = None
    help: bool = False
    overrides: List[str] = field(default_factory=list)


def parse_flags(argv: Sequence[str]) -> Flags:
    """Split argv into Hydra flags and overrides; an unknown flag is a one-line ConfigError."""
    flags = Flags()
    args = list(argv)
    i = 0

    def value(name: str, choices: Sequence[str] = (), optional: bool = False) -> Optional[str]:
        """The word after the flag: one of `choices` (when given), otherwise any word not a flag."""
        nonlocal i
        nxt = args[i + 1] if i + 1 < len(args) else None
        if nxt is not None and (nxt in choices if choices else not nxt.startswith("-")):
            i += 1
            return nxt
        if optional:
            return None
        want = "|".join(choices) if choices else "a value"
        raise ConfigError(name, f"needs {want}, e.g. {name} {choices[0] if choices else '...'}")

    while i < len(args):
        arg = args[i]
        if arg.startswith("--cfg="):
            args[i : i + 1] = ["--cfg", arg.split("=", 1)[1]]
            continue
        if arg in ("--cfg", "-c"):
            flags.cfg = value("--cfg", CFG_CHOICES)
        elif arg == "--resolve":
            flags.resolve = True
        elif arg in ("--package", "-p"):
            flags.package = value("--package")
        elif arg in ("--info", "-i"):
            flags.info = value("--info", INFO_CHOICES, optional=True) or "all"
        elif arg in ("-m", "--multirun"):
            flags.multirun = True
        elif arg in ("-sc", "--shell-completion"):
            flags.shell_completion = value("-sc", ())
        elif arg in ("-h", "--help"):
            flags.help = True
        elif arg.startswith("-") and "=" not in arg:
            raise ConfigError(arg, f"unknown flag; supported: {SUPPORTED} (and key=value overrides)")
        else:
            flags.overrides.append(arg)
        i += 1
    if (flags.resolve or flags.package) and not flags.cfg:
        raise ConfigError("--resolve" if flags.resolve else "--package", "only applies with --cfg job|all")
    if flags.multirun and flags.cfg:
        raise ConfigError("--cfg", "prints one config; drop -m, or print one point of the sweep")
    return flags
