"""Plain single-process PEFT + torch.optim.AdamW reference for LoRA runs. It shares none of the worker's model,
adapter or training code: the base comes from model.path through AutoModelForCausalLM, the adapters from
peft.get_peft_model with a LoraConfig spelled out here (torch seeded with cfg.seed just before, as the ranks
do), the same global batches (the data pipeline is shared: it is not what is under test), loss = sum over the
global batch's target tokens / their count, gradient clipping over the trainable parameters, DeepSpeed's LR
schedule class on the torch optimizer.
Writes <out.pt>: {"adapter": name -> tensor, "base": name -> tensor (frozen, after training),
"losses": [...], "logits": logits of the trained model on FIXED_INPUT}.
Usage: python tests/ranks/lora_reference.py <run_dir of a launcher LoRA run> <steps> <out.pt>"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from launcher.models.tokenizer import load_tokenizer
from launcher.worker.data import Rows, SampleOrder, build_packed

FIXED_INPUT = torch.arange(5, 69).reshape(2, 32)


def main() -> None:
    run_dir, steps, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    cfg = OmegaConf.load(run_dir / "config.yaml")
    ds = json.loads((run_dir / "ds_config.json").read_text())
    torch.set_num_threads(1)
    base = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    base.config.use_cache = False
    a = cfg.adapter
    torch.manual_seed(cfg.seed)
    model = get_peft_model(base, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    rows = Rows(build_packed(cfg, load_tokenizer(cfg.model.path), str(run_dir / "cache")))
    order = SampleOrder(len(rows), cfg.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    p = ds["optimizer"]["params"]
    opt = torch.optim.AdamW(trainable, lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"],
                            weight_decay=p["weight_decay"])
    from deepspeed.runtime import lr_schedules

    sched = getattr(lr_schedules, ds["scheduler"]["type"])(opt, **ds["scheduler"]["params"])
    glob, micro = ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]
    losses = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        batch = [rows.row(order.row(step * glob + i)) for i in range(glob)]
        targets = sum(int((labels[1:] != -100).sum()) for _, labels, _ in batch)
        total = 0.0
        for k in range(glob // micro):
            part = batch[k * micro:(k + 1) * micro]
            ids, labels, pos = (torch.from_numpy(np.stack([r[j] for r in part])) for j in range(3))
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
            (loss / targets).backward()
            total += float(loss) / targets
        if ds["gradient_clipping"] > 0:
            torch.nn.utils.clip_grad_norm_(trainable, ds["gradient_clipping"])
        opt.step()
        sched.step()
        losses.append(total)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=FIXED_INPUT, use_cache=False).logits
    named = dict(model.named_parameters())
    torch.save({"adapter": {n: t.detach().clone() for n, t in named.items() if t.requires_grad},
                "base": {n: t.detach().clone() for n, t in named.items() if not t.requires_grad},
                "losses": losses, "logits": logits}, out)


if __name__ == "__main__":
    main()
