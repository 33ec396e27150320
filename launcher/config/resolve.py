"""Facts the composed config adopts before validation: absolute paths, and the architecture in a model dir's
config.json (so planning and checks see the real model). Reads only the files the config names."""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from launcher.errors import ConfigError


def absolutize_paths(cfg: DictConfig) -> None:
    # launch.sh runs the ranks inside the run dir, so relative paths must be made absolute here.
    for node, key in ((cfg.model, "path"), (cfg.data, "path"), (cfg.data, "cache_dir"), (cfg.cluster, "hostfile")):
        if node[key] is not None:
            node[key] = os.path.abspath(os.path.expanduser(str(node[key])))


def adopt_hf_architecture(cfg: DictConfig) -> None:
    """With model.path, the architecture comes from its config.json (so planning and checks see it)."""
    from launcher.config.arch import adopt

    adopt(cfg)


def check_interpolations(cfg: DictConfig) -> None:
    """An unresolvable ${...} is one line naming its key, not an OmegaConf traceback later."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(str(key), f"cannot resolve its value ({first}); fix the ${{...}} reference or quote it"
                          ) from None
