"""`-m zero=stage2,stage3 train.lr=1e-4,3e-4`: Hydra's sweep syntax expanded into one override list per point.

Hydra's own override parser reads the values (`a,b`, `range(1,4)`, `choice(a,b)`, `glob(stage*)` for groups);
the points are the cartesian product, in the order given, as Hydra's basic sweeper runs them. Pure: no I/O
beyond listing conf/ for glob().
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from launcher.config.compose import group_options
from launcher.errors import ConfigError

SWEEP_DIR_KEY = "hydra.sweep.dir"
SWEEP_ROOT = "runs/sweeps"


@dataclass(frozen=True)
class Sweep:
    base: Tuple[str, ...]  # overrides every point gets
    swept: Tuple[str, ...]  # the sweep overrides as typed (name the sweep dir)
    points: Tuple[Tuple[str, ...], ...]  # per point: key=value overrides
    sweep_dir: str


def expand(overrides: Sequence[str]) -> Sweep:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob
    from hydra.errors import HydraException

    sweep_dir = None
    rest = []
    for o in overrides:
        if o.startswith(SWEEP_DIR_KEY + "="):
            sweep_dir = o.split("=", 1)[1]
        else:
            rest.append(o)
    try:
        parsed = OverridesParser.create().parse_overrides(rest)
    except HydraException as exc:
        raise ConfigError("-m", f"cannot parse the sweep: {str(exc).splitlines()[0]}") from None
    base: List[str] = []
    swept: List[str] = []
    axes: List[List[str]] = []
    for o in parsed:
        if not o.is_sweep_override():
            base.append(o.input_line)
            continue
        key = o.get_key_element()
        value = o.value()
        if isinstance(value, Glob):
            values = value.filter(group_options(o.key_or_group))
        else:
            try:
                values = list(o.sweep_string_iterator())
            except HydraException as exc:
                raise ConfigError(key, f"cannot expand the sweep: {exc}") from None
        if not values:
            raise ConfigError(key, "the sweep has no values")
        swept.append(o.input_line)
        axes.append([f"{key}={v}" for v in values])
    if not axes:
        raise ConfigError("-m", "no swept key; sweep with key=a,b (e.g. -m zero=stage2,stage3)")
    points = tuple(tuple(p) for p in itertools.product(*axes))
    return Sweep(tuple(base), tuple(swept), points, sweep_dir or f"{SWEEP_ROOT}/{slug(swept)}")


def slug(overrides: Sequence[str]) -> str:
    """A folder name from overrides: `zero=stage2,stage3 train.lr=1e-4` -> `zero-stage2+stage3_train.lr-1e-4`.
    Deterministic, so rerunning the same sweep finds (and resumes) the same run dirs."""
    parts = [o.lstrip("+~").replace("=", "-", 1).replace(",", "+") for o in overrides]
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", "_".join(parts))[:200]


def point_dir(sweep_dir: str, point: Sequence[str]) -> str:
    return f"{sweep_dir}/{slug(point)}"


def quoted(key: str, value: str) -> str:
    """key='value' for Hydra: a path may hold characters its override grammar reads as syntax."""
    return f"{key}='{value}'" if "'" not in value else f'{key}="{value}"'
