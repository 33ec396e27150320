"""Compose the Hydra config tree from command-line overrides, turning Hydra/OmegaConf errors into one line.

The config tree lives in the top-level `conf/` of the checkout; wheels ship it as the `launcher.conf`
package (pyproject maps one onto the other), so both layouts are searched.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from launcher.errors import ConfigError

# The `launcher` package directory (this file is launcher/config/compose.py).
PACKAGE_DIR = Path(__file__).resolve().parent.parent


def config_dir() -> Path:
    """Where conf/ is: inside the installed package (wheel) or beside the package (checkout)."""
    for candidate in (PACKAGE_DIR / "conf", PACKAGE_DIR.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise ConfigError("config", f"cannot find conf/config.yaml near {PACKAGE_DIR}; reinstall the package")


def group_options(group: str) -> List[str]:
    """The option names of a config group, e.g. group_options("zero") -> ["stage1", "stage2", "stage3"]."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def compose(overrides: Sequence[str], keep_hydra: bool = False) -> Tuple[DictConfig, str]:
    """Compose config + overrides. Returns (config without the hydra node unless keep_hydra, resolved
    hydra.run.dir)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    from launcher.config.schema import register_schemas

    register_schemas()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="launcher"):
            cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
            run_dir = str(cfg.hydra.run.dir)
    except HydraException as exc:
        raise ConfigError(*_explain_hydra_error(exc)) from None
    except Exception as exc:  # OmegaConf validation errors (wrong type, missing key) arrive here
        raise ConfigError(*_explain_omegaconf_error(exc)) from None
    if not keep_hydra:
        with _open_struct(cfg):
            del cfg["hydra"]
    return cfg, run_dir


class _open_struct:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def __enter__(self) -> None:
        OmegaConf.set_struct(self.cfg, False)

    def __exit__(self, *exc: object) -> None:
        OmegaConf.set_struct(self.cfg, True)


def _explain_hydra_error(exc: Exception) -> Tuple[str, str]:
    text = str(exc)
    options = getattr(exc, "options", None)
    missing = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if missing:
        group, choice = missing.group(1), missing.group(2)
        choices = options or group_options(group)
        return group, f"no option '{choice}'; choose one of: {', '.join(choices)} (e.g. {group}={choices[0]})"
    not_in_struct = re.search(r"Could not override '([^']+)'", text)
    if not_in_struct:
        key = not_in_struct.group(1)
        return key, _unknown_key_message(key)
    append = re.search(r"Could not append to config. An item is already at '([^']+)'", text)
    if append:
        return append.group(1), "already set; drop the leading '+'"
    parse = re.search(r"Error parsing override '([^']+)'", text)
    if parse:
        return parse.group(1), "cannot parse this override; use key=value (quote values with spaces)"
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        key, message = _explain_omegaconf_error(cause)
        if key != "config":
            return key, message
    return "config", _first_line(text)


def _explain_omegaconf_error(exc: BaseException) -> Tuple[str, str]:
    key = getattr(exc, "full_key", None) or "config"
    msg = getattr(exc, "msg", None) or str(exc)
    msg = _first_line(msg)
    value = re.search(r"Value '([^']*)'", msg)
    typ = re.search(r"could not be converted to (\w+)", msg)
    if value and typ:
        kinds = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false"}
        kind = kinds.get(typ.group(1), typ.group(1))
        return key, f"'{value.group(1)}' is not {kind}; set {key}=<{kind}>"
    bad_bool = re.search(r"Value '([^']*)' is not a valid bool", msg)
    if bad_bool:
        return key, f"'{bad_bool.group(1)}' is not true or false; set {key}=true or {key}=false"
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        return key, "unknown key; run `python -m launcher --help` for the valid keys"
    return key, msg


def _unknown_key_message(key: str) -> str:
    import dataclasses

    from launcher.config.schema import LauncherConfig

    node: object = LauncherConfig
    for part in key.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            break
        node = fields[part].default_factory()  # type: ignore[misc]
    if dataclasses.is_dataclass(node):
        valid = ", ".join(f.name for f in dataclasses.fields(node))
        return f"unknown key; valid keys here: {valid} (full list: python -m launcher --help)"
    return "unknown key; run `python -m launcher --help` for the valid keys"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text
