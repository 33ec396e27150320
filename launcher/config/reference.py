"""The override reference, generated from the schemas (`python -m launcher --help`; README section)."""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Dict, List

from launcher.config import schema
from launcher.config.compose import group_options

GROUPS = ("zero", "offload", "activation_checkpointing", "precision", "model", "adapter", "hardware", "cluster")


def _field_comments(cls: type) -> Dict[str, str]:
    """Comment lines directly above each field in the dataclass source."""
    comments: Dict[str, str] = {}
    pending: List[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# "))
            continue
        match = re.match(r"(\w+):", stripped)
        if match and pending:
            comments[match.group(1)] = " ".join(pending)
        pending = []
    return comments


def _type_name(f: dataclasses.Field) -> str:
    return str(f.type).replace("Optional[", "").replace("]", "?").replace("typing.", "")


def override_reference() -> str:
    out = [
        "Usage: launcher [train] [flags] [group=option ...] [key=value ...]   (or: python -m launcher ...)",
        "       launcher plan|export|data ... | launcher sweep <sweep dir>",
        "",
        "Groups (pick one option each; default first is marked *):",
    ]
    defaults = {"zero": "stage2", "offload": "none", "activation_checkpointing": "none", "precision": "auto",
                "model": "tiny_llama", "adapter": "none", "hardware": "local", "cluster": "local"}
    for group in GROUPS:
        opts = [("*" + o if o == defaults[group] else o) for o in group_options(group)]
        out.append(f"  {group}={'|'.join(opts)}")
    out.append(f"  +experiment={'|'.join(group_options('experiment'))}")
    out += ["", "Keys (key: type = default  # meaning):"]
    for top in dataclasses.fields(schema.LauncherConfig):
        factory = top.default_factory  # type: ignore[misc]
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            comments = _field_comments(factory)
            for f in dataclasses.fields(factory):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                note = f"  # {comments[f.name]}" if f.name in comments else ""
                out.append(f"  {top.name}.{f.name}: {_type_name(f)} = {default!r}{note}")
    top_comments = _field_comments(schema.LauncherConfig)
    for top in dataclasses.fields(schema.LauncherConfig):
        if top.default is not dataclasses.MISSING:
            note = f"  # {top_comments[top.name]}" if top.name in top_comments else ""
            out.append(f"  {top.name}: {_type_name(top)} = {top.default!r}{note}")
    out += ["", "Run dir: hydra.run.dir=<dir> (default runs/<name>; rerunning the same run dir resumes).", ""]
    out += [
        "Flags (Hydra's):",
        "  --cfg job|all|hydra [--resolve] [--package KEY]   print the composed config and exit (writes nothing)",
        "  --info [defaults|config]                         the defaults tree and the config search path",
        "  -m/--multirun key=a,b key2=range(1,3) ...         sweep: one run dir per point under runs/sweeps/<...>",
        "                                                   (hydra.sweep.dir=<dir>); rerunning resumes each point",
        "  -sc install=bash|zsh                              shell completion: eval \"$(launcher -sc install=bash)\"",
        "  -h/--help                                         this reference",
        "",
        "Subcommands: train (the default), plan (memory/speed table), export (HF dir from a checkpoint),",
        "  data (tokenize + pack now), sweep <dir> (status table of a sweep).",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    print(override_reference())
