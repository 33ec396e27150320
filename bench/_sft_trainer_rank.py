"""Rank side of bench/compare_sft.py: the same chat records trained by `transformers.Trainer` + DeepSpeed.

    deepspeed --num_gpus 2 --master_port P bench/_sft_trainer_rank.py <run_dir> <padded|flatten> <out.json> <hf_out>

<run_dir> is the run dir `python -m launcher ... dry_run=true` rendered for our side: its config.yaml (model.path,
data) and its ds_config.json unchanged (TrainingArguments(deepspeed=<ds_config.json>), the arguments read from
it by bench/_hf_trainer_rank.trainer_arguments).

Same records per step as ours, on the same rank: micro batch m of step s on rank r is the set of chat records
that our packed rows of that micro batch hold (launcher.worker.data.micro_batches), each cut back out of its
row at the position_ids restarts (the row's end padding dropped): the same tokens, the same assistant-only
labels (-100 elsewhere), the same number of real tokens per optimizer step and the same LR per step. Only the
layout differs:
  padded   DataCollatorForSeq2Seq(label_pad_token_id=-100): [records, longest record] with an attention_mask
           (right padding), the collator SFT scripts use with Trainer.
  flatten  DataCollatorWithFlattening: the records concatenated into [1, sum of lengths] with position_ids
           restarting per record, no attention_mask, and model.config.use_cache=False (with a cache, or with an
           all-ones mask, transformers would let records attend to each other: docs/finetune.md).
The micro batches are collated inside the training loop (a DataLoader with collate_fn), as Trainer does.
per_device_train_batch_size stays the JSON's micro batch (in rows) so transformers accepts the JSON; the
DataLoader below yields the record batches instead (DeepSpeed uses the batch numbers only for bookkeeping).

Rank 0 writes <out.json> (per-step timestamps from TrainerCallback.on_step_end, per-step losses, each rank's
peak RSS) and saves the trained weights to <hf_out> for the held-out evaluation.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _hf_trainer_rank import peak_rss_bytes, trainer_arguments  # noqa: E402


def records_of_row(ids: np.ndarray, labels: np.ndarray, pos: np.ndarray, pad_id: int) -> List[Dict[str, list]]:
    """Cut a packed row back into its records: a record starts where position_ids restart at 0; the end-of-row
    padding (pad ids, no targets) is dropped."""
    starts = [int(i) for i in np.flatnonzero(pos == 0)] + [len(ids)]
    out = []
    for a, b in zip(starts, starts[1:], strict=False):
        if (ids[a:b] == pad_id).all() and (labels[a:b] == -100).all():
            continue
        out.append({"input_ids": ids[a:b].tolist(), "labels": labels[a:b].tolist()})
    return out


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    run_dir, mode, out, hf_out = Path(args[0]), args[1], Path(args[2]), Path(args[3])

    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, TrainerCallback

    from launcher.models.tokenizer import load_tokenizer
    from launcher.worker.data import Rows, SampleOrder, build_packed, micro_batches
    from launcher.worker.model import build_model

    cfg = OmegaConf.load(run_dir / "config.yaml")
    ds_path = run_dir / "ds_config.json"
    ds = json.loads(ds_path.read_text())
    targs = trainer_arguments(cfg, ds, ds_path, run_dir / f"hf_{mode}")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.model.path)
    rows = Rows(build_packed(cfg, tokenizer, cfg.data.cache_dir))
    order = SampleOrder(len(rows), cfg.seed)
    micro, accum, glob = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
                          ds["train_batch_size"])
    batches: List[List[Dict[str, list]]] = []  # this rank's micro batches, in training order
    for step in range(int(cfg.train.max_steps)):
        for mb in micro_batches(rows, order, step, glob, micro, accum, rank, world):
            recs: List[Dict[str, list]] = []
            for r in range(mb["input_ids"].shape[0]):
                recs += records_of_row(mb["input_ids"][r], mb["labels"][r], mb["position_ids"][r],
                                       tokenizer.pad_token_id)
            batches.append(recs)

    if mode == "padded":
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    elif mode == "flatten":
        collator = DataCollatorWithFlattening(return_tensors="pt")
    else:
        raise SystemExit(f"mode must be padded or flatten, not {mode}")

    model, keep_alive = build_model(cfg, ds, rank)  # use_cache=False already (launcher.worker.model)
    # What a Trainer user runs: transformers' sdpa (block-diagonal mask over the whole row), not the record-by-record
    # SDPA the launcher's CPU ranks load for model.attn_implementation=sdpa (launcher/worker/attention.py).
    model.set_attn_implementation("sdpa")
    assert model.config.use_cache is False
    model.train()

    stamps: list = []
    losses: list = []

    class Stamp(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    class RecordBatches(Trainer):
        def get_train_dataloader(self) -> DataLoader:
            # batch_size=None: each item is already one micro batch (a list of records), collated in the loop.
            return DataLoader(batches, batch_size=None, shuffle=False, collate_fn=collator, num_workers=0)

        def training_step(self, *a, **kw):
            loss = super().training_step(*a, **kw)
            losses.append(loss)
            return loss

    trainer = RecordBatches(model=model, args=targs, callbacks=[Stamp()])
    trainer.train()

    per_step = torch.stack(losses).float().reshape(-1, accum).sum(1)
    dist.all_reduce(per_step)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, peak_rss_bytes())
    if rank == 0:
        model.save_pretrained(str(hf_out))  # ZeRO-2: every rank's module holds the full updated weights
        out.write_text(json.dumps({
            "stamps": stamps,
            "losses": [float(x) / world for x in per_step],
            "peak_rss_per_rank": gathered,
        }))
    del keep_alive
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
