"""The first screen of a run: what runs where, the batch arithmetic, the memory plan, the run dir, the logs."""

from __future__ import annotations

from typing import List, Sequence

from omegaconf import DictConfig

from launcher.config.topology import Topology, batch_shape


def run_summary(cfg: DictConfig, topo: Topology, run_dir: str, notes: Sequence[str]) -> str:
    shape = batch_shape(cfg, topo)
    seq = int(cfg.train.seq_len)
    tokens = shape.global_batch_size * seq
    plan = next((n for n in notes if n.startswith("plan")), None)
    precision = str(cfg.precision.name)
    why = (cfg.notes.get("precision") or {}).get("reason")
    ac = cfg.activation_checkpointing
    ac_text = f"every {ac.every_n_layers} layer(s)" if ac.enabled else "off"
    log_dir = f"{run_dir}/logs"
    lines: List[str] = [
        f"run:        {cfg.name}  ({cfg.model.name} on hardware={cfg.hardware.name}, cluster={cfg.cluster.name})",
        f"world:      {topo.nodes} node(s) x {topo.ranks_per_node} {topo.accelerator} rank(s) = {topo.world_size}",
        f"batch:      {shape.micro_batch_size} micro x {shape.gradient_accumulation_steps} accum x "
        f"{shape.world_size} ranks = {shape.global_batch_size} sequences x {seq} tokens = {tokens:,} tokens/step",
        f"zero:       stage {cfg.zero.stage}, offload {cfg.offload.name}, activation checkpointing {ac_text}",
        f"precision:  {precision}" + (f"  (auto: {why})" if why else ""),
    ]
    if plan:
        lines.append(f"memory:     {plan.removeprefix('plan: ')}")
    lines += [
        f"checkpoint: every {cfg.train.save_every} steps, last {cfg.train.keep_last} kept, in "
        f"{run_dir}/checkpoints (rerun the same command to resume)",
        f"run dir:    {run_dir}",
        f"logs:       {log_dir}/rank<N>.log" + ("" if cfg.get("verbose") else " (DeepSpeed/torch output; "
                                                  "verbose=true shows it here)") + f", {run_dir}/metrics.jsonl",
    ]
    return "\n".join(lines)
