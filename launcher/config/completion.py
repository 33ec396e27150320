"""Shell completion (`launcher -sc install=bash|zsh`): groups, their options and config keys from conf/.

The installed shell function calls back `launcher -sc query=bash` with the command line in COMP_LINE
(Hydra's protocol); the answer is one candidate per line.
"""

from __future__ import annotations

import dataclasses
from typing import List

from launcher.config.compose import config_dir, group_options
from launcher.errors import ConfigError

FLAGS = ("--cfg", "--resolve", "--package", "--info", "--multirun", "--help", "--shell-completion")
SUBCOMMANDS = ("train", "plan", "export", "data", "sweep")
# `+experiment=...` appends: the group is not in the defaults list.
APPEND_GROUPS = ("experiment",)

BASH = """# launcher shell completion; install with: eval "$({prog} -sc install=bash)"
_launcher_complete() {{
    COMP_WORDBREAKS=${{COMP_WORDBREAKS//=}}
    local IFS=$'\\n'
    COMPREPLY=($(COMP_LINE="$COMP_LINE" COMP_POINT="$COMP_POINT" {prog} -sc query=bash 2>/dev/null))
}}
complete -o nospace -o default -F _launcher_complete launcher
"""
ZSH = 'autoload -Uz bashcompinit && bashcompinit\n' + BASH.replace("install=bash", "install=zsh")


def groups() -> List[str]:
    return sorted(p.name for p in config_dir().iterdir() if p.is_dir() and any(p.glob("*.yaml")))


def keys() -> List[str]:
    """Every dotted key of the schema (train.lr, zero.stage, ...)."""
    from launcher.config.schema import LauncherConfig

    out: List[str] = []

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
            else:
                out.append(f"{prefix}{f.name}")

    walk(LauncherConfig, "")
    return out


def complete(line: str) -> List[str]:
    """Candidates for the last word of `line` (a command line as the shell sees it)."""
    words = line.split(" ")
    word = words[-1]
    if word.startswith("-"):
        return [f for f in FLAGS if f.startswith(word)]
    key, eq, value = word.partition("=")
    plus = "+" if key.startswith("+") else ""
    name = key.lstrip("+~")
    if eq:
        if name in groups():
            return [f"{key}={o}" for o in group_options(name) if o.startswith(value)]
        if name in keys() and value == "":
            return [f"{key}=true", f"{key}=false"] if _is_bool(name) else []
        return []
    cands = [f"+{g}=" if g in APPEND_GROUPS else f"{plus}{g}=" for g in groups()]
    cands += [f"{plus}{k}=" for k in keys()]
    if len(words) == 2 and not plus:
        cands += [f"{s} " for s in SUBCOMMANDS]
    return sorted(c for c in set(cands) if c.lstrip("+").startswith(name))


def _is_bool(key: str) -> bool:
    from omegaconf import OmegaConf

    from launcher.config.schema import LauncherConfig

    value = OmegaConf.select(OmegaConf.structured(LauncherConfig), key)
    return isinstance(value, bool)


def shell_completion(spec: str, line: str, prog: str = "launcher") -> str:
    action, _, shell = spec.partition("=")
    if shell not in ("bash", "zsh"):
        raise ConfigError("-sc", f"'{spec}': use -sc install=bash or -sc install=zsh")
    if action == "install":
        return (BASH if shell == "bash" else ZSH).format(prog=prog)
    if action == "uninstall":
        return "complete -r launcher\n"
    if action == "query":
        return "".join(c + "\n" for c in complete(line))
    raise ConfigError("-sc", f"'{spec}': use install=bash|zsh, uninstall=bash|zsh or query=bash")
