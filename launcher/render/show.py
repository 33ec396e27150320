"""`--cfg` and `--info`: print the composed config or where it came from, writing nothing (no run dir)."""

from __future__ import annotations

from typing import List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from launcher.config.compose import compose
from launcher.config.secrets import mask
from launcher.errors import ConfigError


def show_cfg(overrides: Sequence[str], which: str, resolve: bool = False, package: Optional[str] = None) -> str:
    """Hydra's `--cfg job|all|hydra`: the config as YAML (secret-looking values redacted, as in config.yaml)."""
    cfg, _ = compose(overrides, keep_hydra=which != "job")
    if which == "hydra":
        cfg = cfg.hydra
    if package:
        node = OmegaConf.select(cfg, package, default=None)
        if node is None:
            raise ConfigError("--package", f"no node '{package}' in the config; e.g. --package train")
        cfg = node
    if not isinstance(cfg, DictConfig):
        return f"{cfg}\n"
    # As Hydra: ${...} stays unless --resolve; secret-looking keys are redacted as in config.yaml.
    container = mask(OmegaConf.to_container(cfg, resolve=resolve))
    header = f"# @package {package}\n" if package else ""
    return header + OmegaConf.to_yaml(OmegaConf.create(container))


def show_info(overrides: Sequence[str], which: str = "all") -> str:
    """Hydra's `--info`: the defaults tree (group -> option) and the config sources."""
    cfg, run_dir = compose(overrides, keep_hydra=True)
    lines: List[str] = []
    if which in ("all", "config"):
        lines.append("Config search path:")
        for src in cfg.hydra.runtime.config_sources:
            lines.append(f"  {src.provider:<8} {src.schema}://{src.path}")
    if which in ("all", "defaults"):
        lines.append("Defaults tree (group: option; change with group=option):")
        lines.append("  config.yaml -> launcher_schema (launcher/config/schema.py)")
        for group, option in cfg.hydra.runtime.choices.items():
            if not str(group).startswith("hydra/"):
                lines.append(f"    {group}: {option}  (conf/{group}/{option}.yaml)")
    if which == "all":
        lines.append(f"Overrides: {' '.join(cfg.hydra.overrides.task) or '(none)'}")
        lines.append(f"Run dir: {run_dir}")
    return "\n".join(lines) + "\n"

