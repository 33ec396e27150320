"""Plain single-process PyTorch reference for the training worker: same initial weights, same global
batches, torch.optim.AdamW, DeepSpeed's LR schedule class applied to the torch optimizer. Prints one JSON
list of per-step losses. Usage: python tests/ranks/reference.py <run_dir of a launcher run>."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from launcher.models.tokenizer import load_tokenizer
from launcher.worker.data import SampleOrder, build_packed
from launcher.worker.model import build_model


def main() -> None:
    run_dir = Path(sys.argv[1])
    cfg = OmegaConf.load(run_dir / "config.yaml")
    ds = json.loads((run_dir / "ds_config.json").read_text())
    torch.set_num_threads(1)
    model, _ = build_model(OmegaConf.merge(cfg, {"zero": {"stage": 2}}), ds, rank=0)
    model.train()
    rows = np.load(build_packed(cfg, load_tokenizer(None), str(run_dir / "cache")), mmap_mode="r")
    order = SampleOrder(len(rows), cfg.seed)
    p = ds["optimizer"]["params"]
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"],
                            weight_decay=p["weight_decay"])
    from deepspeed.runtime import lr_schedules

    sched = getattr(lr_schedules, ds["scheduler"]["type"])(opt, **ds["scheduler"]["params"])
    glob, micro = ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]
    n_micro = glob // micro
    losses = []
    for step in range(cfg.train.max_steps):
        opt.zero_grad(set_to_none=True)
        step_losses = []
        # The same micro batches the ranks see, in global-position order: rank r, accumulation m.
        for k in range(n_micro):
            start = step * glob + k * micro
            ids = torch.from_numpy(np.stack([rows[order.row(start + i)] for i in range(micro)]).astype(np.int64))
            loss = model(input_ids=ids, labels=ids).loss
            (loss / n_micro).backward()
            step_losses.append(loss.detach())
        if ds["gradient_clipping"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), ds["gradient_clipping"])
        opt.step()
        sched.step()
        losses.append(float(torch.stack(step_losses).mean()))
    print(json.dumps(losses))


if __name__ == "__main__":
    main()
