"""Runs on 2 real ranks (deepspeed runner): the worker's LoRA path (build_model -> act_ckpt.enable ->
adapters.lora.apply -> deepspeed.initialize over the trainable parameters) under ZeRO 1, 2 and 3 with
activation checkpointing (DeepSpeed's reentrant checkpoint). Two steps on a fixed batch; at the second
backward (lora_B is no longer zero, so lora_A gets gradient too) records, per decoder layer, the smallest
adapter-gradient norm; checks the frozen base is bitwise unchanged after the steps (in the dtype the engine
holds it: gathered under ZeRO-3). Then the pitfall: checkpointing wired with no input-grad hook at all.
Rank 0 writes JSON. Usage: deepspeed --num_gpus 2 tests/ranks/lora_probe.py <out.json> <scratch> <model dir>"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from launcher.prepare import prepare
from launcher.worker import act_ckpt
from launcher.worker.adapters import lora
from launcher.worker.model import build_model


def frozen_snapshot(model: torch.nn.Module) -> dict:
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in frozen], enabled=hasattr(frozen[0][1], "ds_id")):
        return {n: p.detach().clone() for n, p in frozen}


def probe(stage: int, scratch: Path, model_dir: str, rank: int, input_grads: bool, *extra: str) -> dict:
    run = prepare([f"zero=stage{stage}", "activation_checkpointing=full", "adapter=lora", "adapter.dropout=0",
                   f"model.path={model_dir}", "train.grad_clip=0", "train.schedule=constant", "train.warmup_steps=0",
                   "dry_run=true", f"hydra.run.dir={scratch / f'z{stage}'}", *extra], local_gpus=0, check_resume=False)
    ds_path = scratch / f"ds_z{stage}_rank{rank}.json"
    ds_path.write_text(run.files["ds_config.json"])
    ds = json.loads(run.files["ds_config.json"])
    model, keep = build_model(run.cfg, ds, rank)
    if input_grads:  # the worker's order
        layers = act_ckpt.enable(model, run.cfg, str(ds_path))
        model = lora.apply(model, run.cfg, checkpointing=True)
    else:  # checkpointing wired after PEFT (which then adds no input-grad hook of its own), no hook of ours
        model = lora.apply(model, run.cfg, checkpointing=False)
        layers = act_ckpt.enable(model, run.cfg, str(ds_path))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds)
    before = frozen_snapshot(engine.module)
    ids = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(7 + rank))
    norms: dict = {}
    for step in range(2):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        if step == 1:
            for name, p in engine.module.named_parameters():
                if p.requires_grad:
                    layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
                    norm = float(safe_get_full_grad(p).float().norm())
                    norms[layer] = min(norms.get(layer, norm), norm)
        engine.step()
    after = frozen_snapshot(engine.module)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    result = {"layers_recomputed": layers, "min_adapter_grad_norm_per_layer": norms, "n_trainable": len(trainable),
              "n_frozen": len(before), "frozen_changed": changed,
              "frozen_dtype": str(next(iter(after.values())).dtype)}
    if stage == 3:
        engine.destroy()
    del keep
    deepspeed.checkpointing.reset()
    return result


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, scratch, model_dir = Path(args[0]), Path(args[1]), args[2]
    deepspeed.init_distributed()
    rank = dist.get_rank()
    torch.set_num_threads(1)
    results = {f"zero{s}": probe(s, scratch, model_dir, rank, input_grads=True) for s in (1, 2, 3)}
    try:
        # Without partition_activations (which fails loudly instead), the gradients are silently zero.
        pitfall = probe(2, scratch, model_dir, rank, False, "activation_checkpointing.partition_activations=false")
        pitfall = pitfall["min_adapter_grad_norm_per_layer"]
    except (RuntimeError, AssertionError) as exc:  # nothing in the loss requires grad: backward refuses
        pitfall = str(exc).splitlines()[0]
        deepspeed.checkpointing.reset()
    results["without_input_grads"] = pitfall
    if rank == 0:
        out.write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
