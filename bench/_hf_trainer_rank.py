"""Rank side of bench/compare_hf_trainer.py: the same run trained by `transformers.Trainer` + DeepSpeed.

Started by the real deepspeed runner on CPU ranks, in the same environment as the launcher's own ranks
(DS_ACCELERATOR=cpu, OMP_NUM_THREADS=1):
    deepspeed --num_gpus 2 --master_port P bench/_hf_trainer_rank.py <run_dir> <out.json>
<run_dir> is a run dir rendered by `python -m launcher ... dry_run=true`; this script uses its config.yaml and
its ds_config.json unchanged (TrainingArguments(deepspeed=<ds_config.json>)). The TrainingArguments below are
derived from that JSON, and transformers itself checks them against it (a mismatch raises ValueError).

Same model (launcher.worker.model.build_model: same architecture, bitwise the same initial weights), same
packed rows (launcher.worker.data.build_packed) in the same order: sample k of the run is packed row
SampleOrder.row(k), read sequentially, and accelerate hands micro batch j to rank j % world, which is
exactly the launcher's split (launcher.worker.data.micro_batches). So both see identical batches and the
per-step losses agree to float rounding (written out for the harness to compare).

Rank 0 writes <out.json>: per-step timestamps (TrainerCallback.on_step_end, after the optimizer step),
per-step losses, and each rank's peak RSS (VmHWM, the launcher's mem_peak_rss_gb definition).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def trainer_arguments(cfg, ds: dict, ds_path: Path, output_dir: Path, checkpointing: bool = False):
    """TrainingArguments read from the rendered DeepSpeed JSON (transformers checks they agree with it), after
    setting up accelerate's distributed state for DeepSpeed on CPU ranks (see below). Also used by
    bench/_sft_trainer_rank.py."""
    from accelerate import PartialState
    from transformers import TrainingArguments

    opt, sched = ds["optimizer"]["params"], ds["scheduler"]["params"]
    # accelerate 1.15 only sets up DeepSpeed's distributed state when it finds a GPU-type backend: on CPU ranks
    # TrainingArguments sees a world of 1 (transformers then rejects the JSON's train_batch_size as a
    # mismatch), and use_cpu=True turns DeepSpeed off altogether. Hand it the state explicitly: DeepSpeed's
    # init_distributed on gloo, the backend DS_ACCELERATOR=cpu gives the launcher's ranks too.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    return TrainingArguments(
        accelerator_config={"use_configured_state": True},
        output_dir=str(output_dir),
        deepspeed=str(ds_path),
        per_device_train_batch_size=ds["train_micro_batch_size_per_gpu"],
        gradient_accumulation_steps=ds["gradient_accumulation_steps"],
        learning_rate=opt["lr"],
        weight_decay=opt["weight_decay"],
        adam_beta1=opt["betas"][0],
        adam_beta2=opt["betas"][1],
        adam_epsilon=opt["eps"],
        max_grad_norm=ds["gradient_clipping"],
        warmup_steps=sched["warmup_num_steps"],
        max_steps=int(cfg.train.max_steps),
        bf16="bf16" in ds and ds["bf16"]["enabled"],
        fp16="fp16" in ds and ds["fp16"]["enabled"],
        seed=int(cfg.seed),
        train_sampling_strategy="sequential",
        report_to="none",
        save_strategy="no",
        # Loss logged every step, like the launcher's side (train.log_every=1, which the per-step timing needs).
        logging_strategy="steps",
        logging_steps=1,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # Activation checkpointing the way a Trainer user turns it on (transformers' own, non-reentrant).
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
    )


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    run_dir, out = Path(args[0]), Path(args[1])

    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainerCallback

    from launcher.models.tokenizer import load_tokenizer
    from launcher.worker.data import Rows, SampleOrder, build_packed
    from launcher.worker.model import build_model

    cfg = OmegaConf.load(run_dir / "config.yaml")
    ds_path = run_dir / "ds_config.json"
    ds = json.loads(ds_path.read_text())
    max_steps = int(cfg.train.max_steps)

    lora = str(cfg.get("adapter", {}).get("name", "none")) == "lora"
    targs = trainer_arguments(cfg, ds, ds_path, run_dir / "hf_trainer",
                              checkpointing=lora and bool(cfg.activation_checkpointing.enabled))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.model.path)
    rows = Rows(build_packed(cfg, tokenizer, cfg.data.cache_dir))
    order = SampleOrder(len(rows), cfg.seed)
    glob = ds["train_batch_size"]

    class PackedRows(Dataset):
        """Sample k of the run = packed row order.row(k): the launcher's global sample order."""

        def __len__(self) -> int:
            return max_steps * glob

        def __getitem__(self, k: int) -> dict:
            ids, labels, pos = (torch.from_numpy(a) for a in rows.row(order.row(k)))
            return {"input_ids": ids, "labels": labels, "position_ids": pos}

    model, keep_alive = build_model(cfg, ds, rank)
    model.train()
    # What a Trainer user runs: transformers' sdpa (block-diagonal mask over the whole row), not the record-by-record
    # SDPA the launcher's CPU ranks load for model.attn_implementation=sdpa (launcher/worker/attention.py).
    model.set_attn_implementation("sdpa")
    if lora:
        # bench/compare_lora.py: PEFT's get_peft_model with the launcher's LoraConfig (launcher.models.lora), the
        # adapters initialised from the same seed as the launcher's (launcher.worker.adapters.lora.apply).
        from peft import get_peft_model

        from launcher.models.lora import lora_config

        torch.manual_seed(int(cfg.seed))
        model = get_peft_model(model, lora_config(cfg), autocast_adapter_dtype=False)

    stamps: list = []
    losses: list = []

    class Stamp(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    class LossOut(Trainer):
        # Records each micro batch's loss as Trainer returns it (no extra sync: kept as tensors).
        def training_step(self, *a, **kw):
            loss = super().training_step(*a, **kw)
            losses.append(loss)
            return loss

    trainer = LossOut(model=model, args=targs, train_dataset=PackedRows(), callbacks=[Stamp()])
    trainer.train()

    accum = ds["gradient_accumulation_steps"]
    # Trainer normalises each micro loss by the tokens of the whole step (all micro batches, all ranks) times
    # world: summed over the micro batches and averaged over ranks it is the step's mean token loss.
    per_step = torch.stack(losses).float().reshape(-1, accum).sum(1)
    dist.all_reduce(per_step)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, peak_rss_bytes())
    if rank == 0:
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
