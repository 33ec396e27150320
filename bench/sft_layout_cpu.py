"""Load-robust check for bench/compare_sft.py: CPU seconds of one forward + backward per layout, same records.

On a shared machine wall-clock ratios follow the share of the cores each launch got. This measures
time.process_time() (CPU time this process received) of forward + backward of the same records in the three
layouts, in one process, 1 thread, model as in compare_sft.py (no DeepSpeed, no optimizer step):
  ours     one packed row [1, seq_len], position_ids restarting, no attention_mask;
  padded   its records through DataCollatorForSeq2Seq: [records, longest] with an attention_mask;
  flatten  its records through DataCollatorWithFlattening: [1, sum of lengths], no attention_mask.

    PYTHONPATH=. .venv/bin/python bench/sft_layout_cpu.py <compare_sft workdir> [rows=6]

<compare_sft workdir> is a `compare_sft.py --workdir DIR` kept after a run (its rendered run dir and data
cache). The first row is a warm-up. Last line: `ratio X` = padded CPU s / ours CPU s (ours' speed-up).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    import torch
    from _sft_trainer_rank import records_of_row
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, DataCollatorWithFlattening

    from launcher.models.tokenizer import load_tokenizer
    from launcher.worker.data import Rows, SampleOrder, build_packed

    work, n = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 6
    torch.set_num_threads(1)
    cfg = OmegaConf.load(work / "rendered" / "config.yaml")
    tok = load_tokenizer(cfg.model.path)
    rows = Rows(build_packed(cfg, tok, cfg.data.cache_dir))
    order = SampleOrder(len(rows), cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    collators = {"padded": DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100, return_tensors="pt"),
                 "flatten": DataCollatorWithFlattening(return_tensors="pt")}
    cpu = {"ours": 0.0, "padded": 0.0, "flatten": 0.0}
    for k in range(n):
        ids, labels, pos = rows.row(order.row(k))
        recs = records_of_row(ids, labels, pos, tok.pad_token_id)
        for side in cpu:
            start = time.process_time()
            if side == "ours":
                batch = {key: torch.from_numpy(a)[None] for key, a in
                         (("input_ids", ids), ("labels", labels), ("position_ids", pos))}
            else:
                batch = collators[side](recs)
            model(**batch, use_cache=False).loss.backward()
            model.zero_grad()
            if k:
                cpu[side] += time.process_time() - start
    print(f"CPU seconds, forward + backward of rows 2-{n}: " + ", ".join(f"{s} {v:.2f}" for s, v in cpu.items()))
    print(f"ratio vs flattening {cpu['flatten'] / cpu['ours']:.3f}")
    print(f"ratio {cpu['padded'] / cpu['ours']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
