"""Rank side of bench/startup.py: the minimal hand-written DeepSpeed script a user would write instead.

    deepspeed --num_gpus 2 --master_port P bench/_bare_rank.py <ds_config.json> <llama_config.json> <seq_len> <out>

Builds the same Llama (a transformers LlamaConfig JSON written by the harness from the launcher's config),
hands it to deepspeed.initialize with the launcher's own DeepSpeed JSON, trains one optimizer step
(gradient_accumulation_steps micro batches of random tokens) and, on rank 0, writes time.time() after that
step to <out>. No data pipeline, no checkpoint, no metrics: the floor a launcher's startup is measured against.
"""

import json
import sys
import time

import deepspeed
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    ds_path, arch_path, seq, out = args[0], args[1], int(args[2]), args[3]
    ds = json.load(open(ds_path))
    deepspeed.init_distributed()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_json_file(arch_path))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_path)
    micro = ds["train_micro_batch_size_per_gpu"]
    for _ in range(ds["gradient_accumulation_steps"]):
        ids = torch.randint(0, model.config.vocab_size, (micro, seq))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            f.write(f"{time.time()!r} {loss.item()}\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
