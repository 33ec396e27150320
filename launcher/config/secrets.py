"""Secrets never reach a file the launcher writes nor its console output.

A secret is a value under a secret-looking key (`WANDB_API_KEY`, `hf_token`, `password`, ...) or a value that
looks like a token by itself (`hf_...`, `sk-...`, `ghp_...`, AWS key ids, JWTs), wherever it appears: a
mapping such as `hardware.nccl_env`, a list entry, a free-form `notes.*` key. Files show `<redacted>`;
variables the ranks need are passed by name from the launcher's environment instead of by value.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Tuple

REDACTED = "<redacted>"
SECRET_KEY = re.compile(r"(api_?key|token|secret|passw(or)?d|passwd|credential|private_?key)", re.IGNORECASE)
SECRET_VALUE = re.compile(
    r"(?<![A-Za-z0-9])("
    r"hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}|glpat-[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}"
    r"|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+"
    r")"
)
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# KEY=VALUE in a shell line or an override, the key possibly dotted (overrides) or prefixed (`export `).
_ASSIGN = re.compile(r"([+~]?[\w.]+)=(\"[^\"]*\"|'[^']*'|\S+)")


def is_secret_key(key: object) -> bool:
    return bool(SECRET_KEY.search(str(key)))


def is_secret_value(value: object) -> bool:
    return isinstance(value, str) and bool(SECRET_VALUE.search(value))


def mask(node: Any) -> Any:
    """A plain container with every secret replaced by <redacted>."""
    if isinstance(node, dict):
        return {k: (REDACTED if is_secret_key(k) and v not in (None, "") else mask(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [mask(v) for v in node]
    if isinstance(node, str):
        return mask_text(node)
    return node


def mask_text(text: str) -> str:
    """`wandb.api_key=xyz` -> `wandb.api_key=<redacted>`; token-looking values anywhere -> <redacted>."""

    def assignment(m: "re.Match[str]") -> str:
        key, value = m.group(1), m.group(2)
        if is_secret_key(key.split(".")[-1]) and not value.startswith(("$", '"$')):
            return f"{key}={REDACTED}"
        return m.group(0)

    return SECRET_VALUE.sub(REDACTED, _ASSIGN.sub(assignment, text))


def carries_secret(text: str) -> bool:
    return mask_text(text) != text


def split_override(arg: str) -> Tuple[str, str]:
    key, _, value = arg.partition("=")
    return key.lstrip("+~"), value


def public_argv(argv: List[str]) -> Tuple[List[str], List[str]]:
    """The overrides without those that carry a secret, and the keys left out (for the resume hint)."""
    kept, left_out = [], []
    for arg in argv:
        if carries_secret(arg):
            left_out.append(split_override(arg)[0])
        else:
            kept.append(arg)
    return kept, left_out


def split_env(env: Mapping[str, str]) -> Tuple[Dict[str, str], Dict[str, str]]:
    """(public, secret) variables: secrets are exported by name from the environment, never written."""
    public, secret = {}, {}
    for key, value in env.items():
        (secret if is_secret_key(key) or is_secret_value(value) else public)[key] = value
    return public, secret
