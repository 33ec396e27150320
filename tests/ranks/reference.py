"""Plain single-process PyTorch reference for the training worker: same initial weights, same global
batches (loss = mean over the global batch's target tokens), torch.optim.AdamW, DeepSpeed's LR schedule class
applied to the torch optimizer. Prints one JSON list of per-step losses.
Usage: python tests/ranks/reference.py <run_dir of a launcher run>."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from launcher.models.tokenizer import load_tokenizer
from launcher.worker.data import Rows, SampleOrder, build_packed
from launcher.worker.model import build_model


def main() -> None:
    run_dir = Path(sys.argv[1])
    cfg = OmegaConf.load(run_dir / "config.yaml")
    ds = json.loads((run_dir / "ds_config.json").read_text())
    torch.set_num_threads(1)
    model, _ = build_model(OmegaConf.merge(cfg, {"zero": {"stage": 2}}), ds, rank=0)
    model.train()
    rows = Rows(build_packed(cfg, load_tokenizer(None), str(run_dir / "cache")))
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
        # Mean over every target token of the global batch (HF shifts labels: position 0 never counts).
        batch = [rows.row(order.row(step * glob + i)) for i in range(glob)]
        targets = sum(int((labels[1:] != -100).sum()) for _, labels, _ in batch)
        # The same micro batches the ranks see, in global-position order: rank r, accumulation m.
        for k in range(n_micro):
            part = batch[k * micro:(k + 1) * micro]
            ids, labels, pos = (torch.from_numpy(np.stack([p[j] for p in part])) for j in range(3))
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
            (loss / targets).backward()
            step_losses.append(loss.detach() / targets)
        if ds["gradient_clipping"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), ds["gradient_clipping"])
        opt.step()
        sched.step()
        losses.append(float(torch.stack(step_losses).sum()))
    print(json.dumps(losses))


if __name__ == "__main__":
    main()
