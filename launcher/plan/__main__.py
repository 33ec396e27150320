"""`python -m launcher.plan [the launcher's overrides] [format=table|json]`: the memory and speed plan.

Composes the config exactly as `python -m launcher` does (same overrides, same validation), resolves the
world from the profile (no GPU needs to be present), and prints one row per candidate setup. Config
errors are one line on stderr and exit code 2. No torch, no deepspeed: it answers in about a second.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from launcher.errors import ConfigError

EXIT_USER_ERROR = 2
FORMATS = ("table", "json")
USAGE = """usage: python -m launcher.plan [overrides ...] [format=table|json]

Plans per-rank memory (model states, activations, buffers) and step time for ZeRO stage 1/2/3 x
offload none/cpu x activation checkpointing none/full, for the model, hardware and train shape the
overrides select, e.g.
  python -m launcher.plan model=llama3_8b hardware=8xa100 precision=bf16 train.seq_len=8192 \\
      train.micro_batch_size=2 format=json
The overrides are the launcher's (python -m launcher --help lists them)."""


def split_format(argv: Sequence[str]) -> tuple[list[str], str]:
    """Take `format=...` out of the overrides (it is not a config key)."""
    fmt, rest = "table", []
    for arg in argv:
        if arg.startswith("format="):
            fmt = arg.split("=", 1)[1]
            if fmt not in FORMATS:
                raise ConfigError("format", f"'{fmt}' is not one of {', '.join(FORMATS)}")
        else:
            rest.append(arg)
    return rest, fmt


def load(overrides: Sequence[str]):
    """Compose, adopt a model.path's architecture, resolve the topology and validate, as the launcher does."""
    from launcher.config.compose import compose
    from launcher.config.precision import resolve_auto_precision
    from launcher.config.resolve import absolutize_paths, adopt_hf_architecture
    from launcher.config.topology import detect_local_gpus, resolve_topology
    from launcher.config.validate import validate

    cfg, _ = compose(overrides)
    absolutize_paths(cfg)
    adopt_hf_architecture(cfg)
    topo = resolve_topology(cfg, detect_local_gpus())
    if cfg.precision.name == "auto":
        cfg, _ = compose(resolve_auto_precision(cfg, topo, overrides)[0])
        absolutize_paths(cfg)
        adopt_hf_architecture(cfg)
    validate(cfg, topo)
    return cfg, topo


def plan_json(cfg, topo) -> dict[str, Any]:
    from launcher.plan import build_plan, choose_auto, preflight

    out = build_plan(cfg, topo).to_json()
    pre = preflight(cfg, topo)
    out["preflight"] = {"fits": pre.fits, "message": pre.message, "suggestion": pre.suggestion}
    try:
        choice = choose_auto(cfg, topo)
        out["auto"] = {
            "zero_stage": choice.zero_stage,
            "offload": choice.offload,
            "activation_checkpointing": choice.activation_checkpointing,
            "every_n_layers": choice.every_n_layers,
            "overrides": choice.overrides,
            "reason": choice.reason,
        }
    except ConfigError as exc:
        out["auto"] = {"error": exc.message}
    return out


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render_table(data: dict[str, Any]) -> str:
    unit = "GPU" if data["accelerator"] == "cuda" else "rank"
    lines = [
        (f"{data['model']} ({data['parameters']:,} parameters) on {data['hardware']}: {data['nodes']} node(s) x "
         f"{data['ranks_per_node']} {data['accelerator']} ranks, {data['precision']}, seq {data['seq_len']}, "
         f"micro {data['micro_batch_size']} x accum {data['gradient_accumulation_steps']}"),
        (f"usable per {unit}: {_num(data['usable_gib'], '.1f')} GiB ({data['usable_source']}); memory in GiB per "
         f"{unit}, host RAM in GiB per node"),
        "",
    ]
    head = ["zero", "offload", "ac", "params", "grads", "optim", "activ", "buffers", "ovh", "total", "usable",
            "fits", "host/node", "step s", f"tok/s/{unit}", "MFU"]
    rows = [head]
    for c in data["candidates"]:
        rows.append([
            str(c["zero_stage"]), c["offload"], c["activation_checkpointing"], _num(c["params_gib"], ".1f"),
            _num(c["grads_gib"], ".1f"), _num(c["optimizer_gib"], ".1f"), _num(c["activations_gib"], ".1f"),
            _num(c["buffers_gib"], ".1f"), _num(c["overhead_gib"], ".1f"), _num(c["total_gib"], ".1f"),
            _num(c["usable_gib"], ".1f"), {True: "yes", False: "NO", None: "?"}[c["fits"]],
            _num(c["host_ram_gib_per_node"], ".0f"), _num(c["step_time_s"], ".2f"),
            _num(c["tokens_per_s_per_gpu"], ",.0f"), _num(c["mfu"], ".2f"),
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    left = {0, 1, 2, 11}
    for r in rows:
        lines.append("  ".join(cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(r, widths))).rstrip())
    lines.append("")
    lines.append(f"configured: {data['preflight']['message']}")
    auto = data["auto"]
    lines.append(f"zero=auto: {auto.get('error') or ' '.join(auto['overrides']) + ' (' + auto['reason'] + ')'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    try:
        overrides, fmt = split_format(argv)
        cfg, topo = load(overrides)
        data = plan_json(cfg, topo)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    if fmt == "json":
        print(json.dumps(data, indent=2))
    else:
        print(render_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
