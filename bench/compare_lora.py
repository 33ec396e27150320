"""LoRA throughput: the launcher's LoRA beside `transformers.Trainer` + PEFT, same run, 2 CPU ranks, for ZeRO-2 and
ZeRO-3 with activation checkpointing on.

Per ZeRO stage, the run is rendered once by the launcher (`python -m launcher adapter=lora zero=stageN
activation_checkpointing=full ... dry_run=true`) and both sides train it (bench/compare_hf_trainer.py's
`measure`, launches alternating A B A B, one at a time):
  A  `python -m launcher <overrides>`: the launcher's LoRA (PEFT get_peft_model on the frozen base, DeepSpeed's
     activation checkpointing with partitioned activations, only the adapters in the optimizer).
  B  `deepspeed bench/_hf_trainer_rank.py`: Trainer + PEFT, get_peft_model with the same LoraConfig
     (launcher.models.lora.lora_config) seeded like ours, the same DeepSpeed JSON unchanged, transformers' own
     gradient checkpointing (non-reentrant), transformers' sdpa attention (what a Trainer user gets).
Equal on both: the base model and its weights (launcher.worker.model.build_model), the adapters (r, alpha,
targets: all linear layers of the decoder, initialised from the same seed), adapter dropout 0 (so the two
compute the same function and their per-step losses can be compared), the same packed rows of the built-in
corpus in the same order on the same rank (this compares the training step, not packing), the same JSON.
What differs is what each side does per step: ours runs SDPA record by record on CPU ranks
(launcher/worker/attention.py) and DeepSpeed's checkpointing; Trainer runs the block-diagonal-mask sdpa and
torch's checkpoint. Tokens are all positions of the packed rows (padding-free text: every position is real).

    .venv/bin/python bench/compare_lora.py [--runs 2] [--steps 12] [--warmup 3] [--stages 2,3] [--workdir DIR]
                                           [launcher overrides replacing the default model/batch ...]

Prints one table per stage; the last line is `ratio X`, X = our tokens/s / Trainer tokens/s, the geometric
mean over the stages (each stage's ratio printed before it).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from pathlib import Path

from compare_hf_trainer import REPO, measure, table

# A 10.6M-parameter Llama (hidden 384, 6 layers, 6 heads, 2 KV heads, intermediate 1024, the built-in byte
# vocabulary), saved once as a local HF dir (LoRA adapts pretrained weights: model.path is required); seq 512,
# 2 micro x 1 accum x 2 ranks = 2,048 tokens per step; LoRA r 16 on all linear layers of the decoder.
MODEL = {"attn_implementation": "sdpa", "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6,
         "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 512}
DEFAULT_OVERRIDES = ["train.seq_len=512", "train.micro_batch_size=2", "train.global_batch_size=4"]
LORA = ["adapter=lora", "adapter.dropout=0.0", "activation_checkpointing=full"]


def save_base_model(model_dir: Path) -> None:
    """The base model as a user has it after downloading one: weights + tokenizer in a local dir."""
    if (model_dir / "config.json").is_file():
        return
    sys.path.insert(0, str(REPO))
    import torch
    from omegaconf import OmegaConf
    from transformers import LlamaForCausalLM

    from launcher.models.hf_config import llama_config
    from launcher.models.tokenizer import byte_tokenizer

    model_cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf/model/tiny_llama.yaml"), MODEL)
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(model_cfg)).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="steps dropped at the start of every run")
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--workdir", default=None, help="scratch dir (default: a new temp dir, removed after)")
    parser.add_argument("overrides", nargs="*", help="launcher overrides replacing the default model/batch")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_lora_"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "base_model"
    save_base_model(model_dir)
    ratios = []
    for stage in args.stages.split(","):
        stage_dir = work / f"zero{stage}"
        stage_dir.mkdir(parents=True, exist_ok=True)
        overrides = [f"model.path={model_dir}"] + (args.overrides or DEFAULT_OVERRIDES) + LORA + [f"zero=stage{stage}"]
        m = measure(overrides, stage_dir, args.runs, args.steps, args.warmup, label=f"ZeRO-{stage} ")
        ratio, fastest = table(m, (f"launcher LoRA, ZeRO-{stage} + activation checkpointing",
                                   f"Trainer + PEFT, ZeRO-{stage} + gradient checkpointing"),
                               args.runs, args.steps, args.warmup)
        print(f"ZeRO-{stage}: ratio {ratio:.3f} (at each side's fastest step {fastest:.3f})")
        ratios.append(ratio)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"ratio {math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
