"""Fine-tuning throughput on chat data: our padding-free packing beside `transformers.Trainer` with the collators
people use for SFT, same records, same model, same DeepSpeed JSON, 2 CPU ranks.

Three sides, run interleaved A B C A B C ... (--runs each), one launch at a time:
  ours     `python -m launcher model.path=<dir> data.path=<train.jsonl> data.format=messages ...`: records packed
           whole into seq_len rows (first fit), position_ids restarting per record, no attention_mask.
  padded   Trainer + DataCollatorForSeq2Seq: each micro batch is its records padded to the longest one.
  flatten  Trainer + DataCollatorWithFlattening: each micro batch is its records concatenated into one row,
           position_ids restarting, no attention_mask, use_cache=False.
(bench/_sft_trainer_rank.py has the Trainer side.)

Equal on every side:
  - the model: a Llama built once here (--hidden/--layers/..., default 10.1M parameters, byte-level BPE
    vocabulary (907 tokens) trained on the words, ChatML template), loaded by launcher.worker.model.build_model on
    every side: bitwise the same initial weights;
  - the records of every optimizer step, on the same rank: the Trainer sides get, as micro batch m of step s on
    rank r, exactly the records our packed rows of that micro batch hold (cut back out of the rows). So the
    real (non-pad) tokens per step, the targets (assistant tokens only), the loss normalisation (sum over the
    step / its targets) and the LR at every step are the same; the per-step losses are compared as a check;
  - the DeepSpeed JSON (ZeRO-2, fp32, AdamW, WarmupCosineLR, clipping): rendered once by the launcher, used
    unchanged by the Trainer sides;
  - the runner and environment: `deepspeed --num_gpus 2` with launch.sh's exports, one private
    TORCH_EXTENSIONS_DIR (bench/_launch_util.py).

Data (generated here, seeded): chat records {"messages": [user, assistant]} whose length in tokens follows a
lognormal distribution, median LEN_MEDIAN = 150 tokens, sigma LEN_SIGMA = 1.0 (mean ~247, p90 ~540,
P(> 1024) ~ 2.7%, p99 ~ 1540), truncated by the launcher at seq_len 1024. Words are drawn from a 512-word
synthetic vocabulary by a Markov chain (4 successors per word), one BPE token per word; the user turn holds
the first ~10% of the words, the assistant continues the chain (its tokens are the targets).

Reported per side: real tokens/s (real tokens of the steady steps / their summed step times), step time
(median), peak RSS per rank (the larger rank), and the held-out loss (mean token loss on assistant tokens of
--heldout unseen records, evaluated here on each run's final weights) after the same number of real tokens.
The last line is `ratio X`, X = ours / padded Trainer real tokens/s (medians over runs); the line before
gives ours / flattening Trainer.

    PYTHONPATH=. .venv/bin/python bench/compare_sft.py [--runs 2] [--steps 10] [--warmup 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

from _launch_util import free_port, launch_env, launch_port, private_extensions_dir, remove_shm_buffers, render_run

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
LEN_MEDIAN = 150  # tokens per record, lognormal median
LEN_SIGMA = 1.0  # lognormal sigma of ln(tokens)
LEN_MIN = 16
TEMPLATE_TOKENS = 10  # ChatML: <|im_start|> role \n ... <|im_end|> \n, two turns
WORDS = 512
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SIDES = ("ours", "padded", "flatten")
NAMES = {"ours": "launcher (packing, `python -m launcher`)",
         "padded": "Trainer + DataCollatorForSeq2Seq (padding)",
         "flatten": "Trainer + DataCollatorWithFlattening"}


def vocabulary() -> List[str]:
    rng = random.Random(1234)
    syll = [c + v for c in "bdfgklmnpst" for v in "aeiou"]
    words: set = set()
    while len(words) < WORDS:
        words.add("".join(rng.choice(syll) for _ in range(2)))
    return sorted(words)


def chat_records(n: int, seed: int) -> List[dict]:
    words = vocabulary()
    chain = random.Random(99)
    successors = {w: chain.sample(words, 4) for w in words}
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = max(LEN_MIN, round(rng.lognormvariate(math.log(LEN_MEDIAN), LEN_SIGMA)))
        n_words = max(6, length - TEMPLATE_TOKENS)
        seq = [rng.choice(words)]
        for _ in range(n_words - 1):
            seq.append(rng.choice(successors[seq[-1]]))
        cut = max(3, n_words // 10)
        out.append({"messages": [{"role": "user", "content": " ".join(seq[:cut])},
                                 {"role": "assistant", "content": " " + " ".join(seq[cut:])}]})
    return out


def write_jsonl(path: Path, records: List[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_model_dir(path: Path, args: argparse.Namespace) -> int:
    """Byte-level BPE (one token per word) with ChatML, and a random Llama; returns its parameter count."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [" ".join(vocabulary())] * 4 + ["user", "assistant", "\n"]
    core.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=specials[1:2], model_max_length=1 << 20)
    tok.chat_template = CHATML
    config = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=2048,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return sum(p.numel() for p in model.parameters())


def real_tokens(ids, labels, pos, pad_id: int) -> int:
    """Tokens of a packed row that belong to records (the row's end padding excluded)."""
    import numpy as np

    starts = [int(i) for i in np.flatnonzero(pos == 0)] + [len(ids)]
    n = 0
    for a, b in zip(starts, starts[1:], strict=False):
        if not ((ids[a:b] == pad_id).all() and (labels[a:b] == -100).all()):
            n += b - a
    return n


def padded_tokens(rows, order, steps: int, glob: int, micro: int, pad_id: int) -> int:
    """Token positions the padded Trainer computes: each micro batch (the records of `micro` of our rows) is
    [records, longest record]."""
    import numpy as np

    total = 0
    for k in range(0, steps * glob, micro):
        lengths = []
        for i in range(k, k + micro):
            ids, labels, pos = rows.row(order.row(i))
            starts = [int(j) for j in np.flatnonzero(pos == 0)] + [len(ids)]
            lengths += [b - a for a, b in zip(starts, starts[1:], strict=False)
                        if not ((ids[a:b] == pad_id).all() and (labels[a:b] == -100).all())]
        total += len(lengths) * max(lengths)
    return total


def heldout_loss(model_dir: Path, rows) -> float:
    """Mean token loss over the held-out rows' targets (packed, position_ids restarting, no mask)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(rows)):
            ids, labels, pos = (torch.from_numpy(a)[None] for a in rows.row(i))
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((target != -100).sum())
    return total / count


def run(cmd: list, cwd: Path, env: dict, log: Path, timeout: float = 1800) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{log.read_text()[-3000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="launches per side, interleaved")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="steps dropped from the timing of every run")
    parser.add_argument("--records", type=int, default=1500, help="training records generated")
    parser.add_argument("--heldout", type=int, default=40, help="held-out records for the loss")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=1, help="packed rows per micro batch per rank (ours)")
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--workdir", default=None, help="scratch dir (default: a new temp dir, removed after)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_sft_"))
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))

    train_path = write_jsonl(work / "train.jsonl", chat_records(args.records, seed=1))
    heldout_path = write_jsonl(work / "heldout.jsonl", chat_records(args.heldout, seed=2))
    model_dir = work / "model"
    n_params = make_model_dir(model_dir, args)
    world = 2
    overrides = [
        f"model.path={model_dir}", f"data.path={train_path}", "data.format=messages",
        f"train.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro}",
        f"train.global_batch_size={args.micro * args.accum * world}", f"train.max_steps={args.steps}",
        "train.log_every=1", f"train.save_every={args.steps}", f"train.warmup_steps={max(1, args.steps // 4)}",
        "train.export_at_end=true", f"data.cache_dir={work / 'cache'}",
        "zero=stage2", "precision=fp32", "activation_checkpointing=none", f"hardware.cpu_ranks={world}",
    ]
    base = dict(os.environ, PYTHONPATH=str(REPO), TORCH_EXTENSIONS_DIR=str(private_extensions_dir()))
    render = work / "rendered"
    render_run(overrides, render, base)

    import numpy as np
    from omegaconf import OmegaConf

    from launcher.models.tokenizer import load_tokenizer
    from launcher.worker.data import Rows, SampleOrder, build_packed

    cfg = OmegaConf.load(render / "config.yaml")
    ds = json.loads((render / "ds_config.json").read_text())
    tokenizer = load_tokenizer(cfg.model.path)
    pad = tokenizer.pad_token_id
    rows = Rows(build_packed(cfg, tokenizer, cfg.data.cache_dir))  # shared by every side, untimed
    held_cfg = OmegaConf.merge(cfg, {"data": {"path": str(heldout_path)}})
    held_rows = Rows(build_packed(held_cfg, tokenizer, str(work / "cache_heldout")))
    order = SampleOrder(len(rows), cfg.seed)
    glob = ds["train_batch_size"]
    real_per_step = []
    for s in range(args.steps):
        real_per_step.append(sum(real_tokens(*rows.row(order.row(s * glob + i)), pad) for i in range(glob)))
    padded_positions = padded_tokens(rows, order, args.steps, glob, ds["train_micro_batch_size_per_gpu"], pad)
    # Tokens per record before truncation (the distribution drawn) and as packed (after truncation at seq_len).
    lengths = np.array([len(tokenizer(tokenizer.apply_chat_template(r["messages"], tokenize=False))["input_ids"])
                        for r in chat_records(args.records, seed=1)])
    stats = rows.meta.get("stats", {})
    env_b = launch_env(render, base)
    deepspeed = [str(Path(PY).parent / "deepspeed"), "--num_gpus", str(world)]

    results: Dict[str, list] = {s: [] for s in SIDES}
    loads: List[float] = []
    for i in range(args.runs):
        for side in SIDES:
            loads.append(os.getloadavg()[0])
            if side == "ours":
                run_dir = work / f"ours_{i}"
                shutil.rmtree(run_dir, ignore_errors=True)
                run([PY, "-m", "launcher", *overrides, f"hydra.run.dir={run_dir}"], REPO, base, work / f"ours_{i}.log")
                remove_shm_buffers(launch_port(run_dir))
                recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                assert [r["step"] for r in recs] == list(range(1, args.steps + 1)), "one metrics line per step"
                times = [r["step_time_s"] for r in recs]
                losses = [r["loss"] for r in recs]
                mem = recs[-1].get("mem_peak_rss_gb", recs[-1]["mem_peak_gb"])
                weights = run_dir / "hf"
            else:
                out, weights = work / f"{side}_{i}.json", work / f"{side}_{i}_hf"
                out.unlink(missing_ok=True)
                shutil.rmtree(weights, ignore_errors=True)
                port = free_port()
                run([*deepspeed, "--master_port", str(port), str(REPO / "bench/_sft_trainer_rank.py"), str(render),
                     side, str(out), str(weights)], work, env_b, work / f"{side}_{i}.log")
                remove_shm_buffers(port)
                res = json.loads(out.read_text())
                stamps = res["stamps"]
                assert len(stamps) == args.steps + 1, "expected a timestamp per step"
                times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
                losses, mem = res["losses"], max(res["peak_rss_per_rank"]) / 1e9
            steady = slice(args.warmup, args.steps)
            tps = sum(real_per_step[steady]) / sum(times[steady])
            held = heldout_loss(weights, held_rows)
            results[side].append({"tps": tps, "step": statistics.median(times[steady]), "mem": mem,
                                  "losses": losses, "held": held, "times": times})
            print(f"round {i + 1} {side}: {tps:.0f} real tokens/s, {statistics.median(times[steady]):.3f} s/step, "
                  f"peak RSS {mem:.2f} GB, final loss {losses[-1]:.4f}, held-out {held:.4f} "
                  f"(load before {loads[-1]:.2f})", flush=True)
    loads.append(os.getloadavg()[0])

    diffs = {s: max(max(abs(a - b) for a, b in zip(results["ours"][k]["losses"], results[s][k]["losses"],
                                                   strict=True)) for k in range(args.runs)) for s in SIDES[1:]}
    steady_tokens = sum(real_per_step[args.warmup:])
    print()
    print(f"{n_params / 1e6:.1f}M-parameter Llama (hidden {args.hidden}, {args.layers} layers, "
          f"vocab {len(tokenizer)}), "
          f"2 CPU ranks, ZeRO-{ds['zero_optimization']['stage']}, fp32, seq_len {args.seq_len}; ours "
          f"{ds['train_micro_batch_size_per_gpu']} row x {ds['gradient_accumulation_steps']} accum x {world} ranks; "
          f"{args.steps} steps, {sum(real_per_step)} real tokens in all (steps {args.warmup + 1}-{args.steps}: "
          f"{steady_tokens}, {steady_tokens / (args.steps - args.warmup):.0f} per step, the same records on every "
          f"side); {args.runs} interleaved runs each; 1-min load avg {min(loads):.2f}-{max(loads):.2f}")
    print(f"records: tokens per record median {np.median(lengths):.0f}, mean {lengths.mean():.0f}, "
          f"p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()}, > {args.seq_len}: "
          f"{(lengths > args.seq_len).mean():.1%} (truncated); packed: {stats.get('records')} records in "
          f"{len(rows)} rows, padding fraction {stats.get('padding_fraction')}")
    print(f"token positions computed per real token: ours {args.steps * glob * args.seq_len / sum(real_per_step):.3f} "
          f"(packed rows), flatten 1.000, padded {padded_positions / sum(real_per_step):.3f} ([records, longest])")
    print(f"max |per-step loss - ours|: padded {diffs['padded']:.1e}, flatten {diffs['flatten']:.1e}")
    print()
    print("| side | real tokens/s (median) | step time (s, median) | real tokens/s per run | peak RSS per rank (GB) "
          "| held-out loss (median) |")
    print("|---|---|---|---|---|---|")
    med = {}

    def per_run(rs: list) -> str:
        return ", ".join(f"{r['tps']:.0f}" for r in rs)

    for side in SIDES:
        rs = results[side]
        med[side] = statistics.median(r["tps"] for r in rs)
        print(f"| {NAMES[side]} | {med[side]:.0f} | {statistics.median(r['step'] for r in rs):.3f} | "
              f"{per_run(rs)} | {statistics.median(r['mem'] for r in rs):.2f} | "
              f"{statistics.median(r['held'] for r in rs):.4f} |")
    # Load-robust cross-check: every step trains the same records on every side, so take each step's fastest
    # time over the runs (the run that got the most CPU during it) and sum.
    best = {side: steady_tokens / sum(min(r["times"][k] for r in results[side]) for k in range(args.warmup, args.steps))
            for side in SIDES}
    print()
    print("by each step's fastest run (real tokens/s): " + ", ".join(f"{s} {best[s]:.0f}" for s in SIDES)
          + f"; ours / padded {best['ours'] / best['padded']:.3f}, "
          f"ours / flattening {best['ours'] / best['flatten']:.3f}")
    print()
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"ratio vs flattening Trainer {med['ours'] / med['flatten']:.3f}")
    print(f"ratio {med['ours'] / med['padded']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
