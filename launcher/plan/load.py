"""Host RAM per node while the ranks load the model, before DeepSpeed moves it to the GPUs.

Each rank builds its own copy on the host:
- model.path under ZeRO-1/2: the whole model in the training dtype (launcher/worker/model.py loads with
  torch_dtype = the precision's dtype, straight from the checkpoint's tensors): ranks per node x params x
  2 bytes in bf16/fp16 (4 in fp32). Llama-3-8B in bf16 on 8 ranks: 8 x 8.03e9 x 2 B = 120 GiB per node.
- a model built from the config under ZeRO-1/2: constructed in fp32 (4 bytes per parameter), DeepSpeed casts.
- ZeRO-3: built partitioned (deepspeed.zero.Init, or HfDeepSpeedConfig before from_pretrained): each rank
  holds its partition plus the largest tensor being loaded or initialised at a time.
Offloaded optimizer state comes later (after the host copies are freed), so the two are compared with the
host RAM separately, not added. CPU ranks are not counted here: their whole footprint is already host RAM.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig

from launcher.config.topology import Topology
from launcher.plan.model_states import precision_bytes
from launcher.plan.params import ModelShape, count_params


def load_bytes_per_rank(cfg: DictConfig, topo: Topology, zero_stage: int) -> int:
    counts = count_params(ModelShape.from_cfg(cfg.model))
    loaded = cfg.model.path is not None
    per_param = precision_bytes(str(cfg.precision.name)).param if loaded else 4
    if zero_stage == 3:
        return per_param * (math.ceil(counts.total / topo.world_size) + counts.largest_tensor)
    return per_param * counts.total


def load_bytes_per_node(cfg: DictConfig, topo: Topology, zero_stage: int) -> int:
    """Host bytes per node at model load (0 for CPU ranks: counted with the rest of their memory)."""
    if topo.accelerator == "cpu":
        return 0
    return topo.ranks_per_node * load_bytes_per_rank(cfg, topo, zero_stage)
