"""Data preparation at scale: records/s, tokens/s and peak RSS of the launcher's streaming, parallel
preparation (launcher.data.build.build_packed) beside a plain `datasets.map` pipeline doing the same work.

Corpus: generated jsonl ({"text": ...}, 50-1500 words a record drawn from a Zipf-like 60k-word vocabulary),
--gb gigabytes (cached in --workdir). Tokenizer: a byte-level BPE trained on the fly on the first 20 MB
(vocabulary --vocab, default 32k), saved as a Hugging Face tokenizer dir. Packing: data.format=text, seq 2048,
uint16 ids, shards written to disk, on every side.

ours      build_packed(num_proc=N): stream records -> N worker processes tokenize -> pack -> write shards
baseline  datasets.load_dataset("json") -> .map(tokenizer(batch), batched, num_proc=N) -> iterate the
          tokenized Arrow table -> the same stream.WrapPacker and store.ShardWriter (same packing and writing)
legacy    today's in-memory pipeline before this change (read every record, tokenize in one call, pack_wrap,
          store.write), on the --legacy-mb first megabytes only (it holds ~170 bytes of RAM per token)

Each measurement runs in a fresh process; peak RSS is sampled every 0.1 s as the sum over the process and its
children (worker processes included; shared pages count once per process, so this is an upper bound), and
ru_maxrss of the main process is printed beside it. TOKENIZERS_PARALLELISM=false on every side (the
processes are the parallelism). Both sides' caches are removed before each run.

    .venv/bin/python bench/data_prep.py [--gb 1.0] [--procs 1,2] [--workdir DIR] [--legacy-mb 50]

The last line is `ratio X`: ours tokens/s / baseline tokens/s at the largest process count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parent.parent
SEQ = 2048


def generate(path: Path, gb: float, seed: int = 0) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(letters[rng.integers(0, 26, rng.integers(2, 11))]) for _ in range(60_000)]
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.07
    p /= p.sum()
    target = int(gb * (1 << 30))
    tmp = path.with_suffix(".part")
    written = 0
    with open(tmp, "w") as f:
        while written < target:
            lengths = rng.integers(50, 1500, 2000)
            idx = rng.choice(len(words), size=int(lengths.sum()), p=p)
            at = 0
            lines = []
            for n in lengths:
                lines.append(json.dumps({"text": " ".join(words[i] for i in idx[at:at + n])}))
                at += n
            block = "\n".join(lines) + "\n"
            f.write(block)
            written += len(block)
    tmp.rename(path)


def train_tokenizer(corpus: Path, out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def sample():
        seen = 0
        with open(corpus) as f:
            for line in f:
                seen += len(line)
                yield json.loads(line)["text"]
                if seen > 20 << 20:
                    return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(str(out))


def config(corpus: Path, tok_dir: Path, cache: Path, vocab: int, num_proc: int) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "data": {"path": str(corpus), "format": "text", "text_field": "text", "fields": {}, "chat_template": "auto",
                 "overlong": "truncate", "max_bad_fraction": 0.0, "builtin_documents": 0, "cache_dir": str(cache),
                 "num_proc": num_proc},
        "train": {"seq_len": SEQ}, "model": {"vocab_size": vocab, "path": str(tok_dir)}})


# ---- one measurement (child process) ----

def run_ours(cfg: Any, tok: Any, num_proc: int) -> Dict[str, Any]:
    from launcher.data.build import build_packed
    from launcher.data.store import Rows

    rows = Rows(build_packed(cfg, tok, cfg.data.cache_dir, num_proc=num_proc))
    s = rows.meta["stats"]
    return {"records": s["records"], "tokens": s["record_tokens"], "rows": s["rows"]}


def run_baseline(cfg: Any, tok: Any, num_proc: int) -> Dict[str, Any]:
    import datasets
    import numpy as np

    from launcher.data.store import ShardWriter
    from launcher.data.stream import WrapPacker

    datasets.disable_progress_bars()
    hf_cache = os.path.join(cfg.data.cache_dir, "hf")
    ds = datasets.load_dataset("json", data_files=cfg.data.path, split="train", cache_dir=hf_cache)
    bos, eos = tok.bos_token_id, tok.eos_token_id

    def tokenize(batch):
        return {"input_ids": [[bos, *ids, eos] for ids in tok(batch["text"], add_special_tokens=False)["input_ids"]]}

    ds = ds.map(tokenize, batched=True, num_proc=num_proc if num_proc > 1 else None, remove_columns=["text"])
    out = os.path.join(cfg.data.cache_dir, "baseline-rows")
    os.makedirs(out)
    writer = ShardWriter(out, SEQ, int(cfg.model.vocab_size))
    packer = WrapPacker(SEQ, writer.add)
    records = 0
    for batch in ds.iter(batch_size=4096):
        lists = batch["input_ids"]
        lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
        packer.add(np.concatenate([np.asarray(x, dtype=np.uint32) for x in lists]), lengths)
        records += len(lists)
    packer.finish()
    writer.finish({"format": "text"})
    return {"records": records, "tokens": packer.tokens, "rows": writer.rows}


def run_legacy(cfg: Any, tok: Any, num_proc: int) -> Dict[str, Any]:
    from launcher.data import store
    from launcher.data.build import read_examples
    from launcher.data.chat import encode_text
    from launcher.data.pack import pack_wrap

    examples, counts = read_examples(cfg)
    encoded = encode_text(tok, examples, tok.bos_token_id, tok.eos_token_id)
    tokens = sum(len(ids) for ids, _ in encoded)
    packed = pack_wrap(encoded, SEQ)
    store.write(os.path.join(cfg.data.cache_dir, "legacy-rows"), [packed], int(cfg.model.vocab_size), {})
    return {"records": counts.total, "tokens": tokens, "rows": len(packed)}


def child(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tok_dir)
    cfg = config(Path(args.corpus), Path(args.tok_dir), Path(args.cache), len(tok), args.num_proc)
    t0 = time.perf_counter()
    result = {"ours": run_ours, "baseline": run_baseline, "legacy": run_legacy}[args.side](cfg, tok, args.num_proc)
    result["seconds"] = time.perf_counter() - t0
    result["main_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


# ---- orchestration ----

def tree_rss_mb(pid: int) -> float:
    """RSS of pid and all its descendants, from /proc."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total / 1024


def measure(side: str, corpus: Path, tok_dir: Path, cache: Path, num_proc: int) -> Dict[str, Any]:
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    load = os.getloadavg()[0]
    proc = subprocess.Popen([sys.executable, __file__, "--child", side, "--corpus", str(corpus), "--tok-dir",
                             str(tok_dir), "--cache", str(cache), "--num-proc", str(num_proc)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(proc.pid))
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"{side} num_proc={num_proc} failed:\n{err[-3000:]}")
    result = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
    result.update(side=side, num_proc=num_proc, peak_tree_rss_mb=peak[0], load=load,
                  gb=corpus.stat().st_size / (1 << 30))
    shutil.rmtree(cache, ignore_errors=True)
    return result


def row(r: Dict[str, Any]) -> str:
    dt = r["seconds"]
    return (f"| {r['side']} | {r['gb']:.2f} | {r['num_proc']} | {r['records']:,} | {r['tokens'] / 1e6:,.1f}M | "
            f"{dt:.1f} | {r['records'] / dt:,.0f} | {r['tokens'] / dt / 1e6:.2f}M | {r['peak_tree_rss_mb']:,.0f} | "
            f"{r['main_maxrss_mb']:,.0f} | {r['load']:.1f} |")


# ---- training on the prepared shards (--train) ----

TRAIN_MODEL = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 1}


def save_train_model(tok_dir: Path, model_dir: Path, vocab: int) -> None:
    """A tiny Llama over the bench's 32k tokenizer, saved as a local HF dir (model.path) with that tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (model_dir / "config.json").is_file():
        return
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=SEQ, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, **TRAIN_MODEL)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)


def launcher_cmd(module: str, overrides: List[str]) -> List[str]:
    return [sys.executable, "-m", module, *overrides]


def run_tree(cmd: List[str], log: Path) -> Dict[str, Any]:
    """Runs cmd (output to log) sampling the RSS of its process tree; seconds and peak tree RSS."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, tree_rss_mb(proc.pid))
            time.sleep(0.1)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return {"seconds": time.perf_counter() - t0, "peak_tree_rss_mb": peak}


def losses(run_dir: Path) -> Dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def train_on_shards(work: Path, corpus: Path, tok_dir: Path, vocab: int, num_proc: int, steps: int) -> None:
    """The user's path end to end: `python -m launcher.data` prepares the corpus into shards (RSS of the whole
    tree sampled), then 2 CPU ranks train on them three times: A uninterrupted to `steps`; B stopped at
    steps // 2 (mid-epoch: a few rows of a corpus-sized epoch) and resumed to `steps`. B's resumed steps must
    see the same batches as A's, which shows as bitwise-equal per-step losses."""
    model_dir = work / "train_model"
    save_train_model(tok_dir, model_dir, vocab)
    cache = work / "launch_cache"
    shutil.rmtree(cache, ignore_errors=True)
    base = [f"model.path={model_dir}", f"data.path={corpus}", "data.format=text", f"data.cache_dir={cache}",
            f"data.num_proc={num_proc}", f"train.seq_len={SEQ}", "train.micro_batch_size=1",
            "train.global_batch_size=2", "train.log_every=1", "zero=stage2",
            # A constant LR: the cosine schedule follows train.max_steps, which differs between B's two legs.
            "train.schedule=constant", "train.warmup_steps=0"]
    prep = run_tree(launcher_cmd("launcher.data", base), work / "prepare.log")
    summary = [ln for ln in (work / "prepare.log").read_text().splitlines() if "rows" in ln][-1:]
    print(f"python -m launcher.data: {prep['seconds']:.0f} s, peak RSS of the tree {prep['peak_tree_rss_mb']:,.0f} MB; "
          f"{' '.join(summary)}", flush=True)
    half = steps // 2
    runs = {"A": [(steps, work / "run_a")], "B": [(half, work / "run_b"), (steps, work / "run_b")]}
    for name, legs in runs.items():
        shutil.rmtree(legs[0][1], ignore_errors=True)
        for n, run_dir in legs:
            r = run_tree(launcher_cmd("launcher", base + [f"train.max_steps={n}", f"train.save_every={half}",
                                                           f"hydra.run.dir={run_dir}"]), work / f"train_{name}_{n}.log")
            reused = "data: reusing" in (work / f"train_{name}_{n}.log").read_text()
            print(f"run {name} to step {n}: {r['seconds']:.0f} s, peak RSS of the launch tree "
                  f"{r['peak_tree_rss_mb']:,.0f} MB (data reused, not re-tokenized: {reused})", flush=True)
            if not reused:
                raise SystemExit("the launch re-prepared the data instead of reusing launcher.data's cache")
    a, b = losses(work / "run_a"), losses(work / "run_b")
    from launcher.data.store import Rows

    rows = len(Rows(next(p.parent for p in cache.rglob("meta.json"))))
    diff = max(abs(a[s] - b[s]) for s in range(half + 1, steps + 1))
    print(f"resumed at step {half} of {steps} (sample {half * 2} of an epoch of {rows:,} rows): steps "
          f"{half + 1}-{steps} losses A {[round(a[s], 5) for s in range(half + 1, steps + 1)]}, "
          f"B {[round(b[s], 5) for s in range(half + 1, steps + 1)]}; max |A - B| {diff:.1e}", flush=True)
    if diff != 0.0:
        raise SystemExit("the resumed run did not see the same batches as the uninterrupted one")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--legacy-mb", type=float, default=50.0, help="0: skip today's in-memory pipeline")
    ap.add_argument("--sides", default="ours,baseline")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--train", type=int, default=0, metavar="STEPS",
                    help="then prepare with `python -m launcher.data` and train 2 CPU ranks on the shards for STEPS "
                         "steps, uninterrupted and resumed at STEPS // 2 (same batches check)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tok-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--num-proc", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.side = args.child
        return child(args)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="data_prep_"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus-{args.gb:g}gb.jsonl"
    if not corpus.exists():
        t0 = time.perf_counter()
        generate(corpus, args.gb)
        print(f"generated {corpus} ({corpus.stat().st_size / (1 << 30):.2f} GiB) in {time.perf_counter() - t0:.0f} s",
              flush=True)
    tok_dir = work / f"bpe{args.vocab}"
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer(corpus, tok_dir, args.vocab)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    header = ("| side | GiB | procs | records | tokens | s | records/s | tokens/s | peak RSS tree MB | main maxrss MB "
              "| load |\n|---|---|---|---|---|---|---|---|---|---|---|")
    print(header, flush=True)
    results: List[Dict[str, Any]] = []
    if args.legacy_mb > 0:
        small = work / f"corpus-{args.legacy_mb:g}mb.jsonl"
        if not small.exists():
            with open(corpus) as src, open(small, "w") as dst:
                n = 0
                for line in src:
                    dst.write(line)
                    n += len(line)
                    if n >= args.legacy_mb * (1 << 20):
                        break
        for side in ("legacy", "ours"):
            r = measure(side, small, tok_dir, work / "cache", 1)
            r["side"] = f"{side} (small)"
            print(row(r), flush=True)
    for n in [int(p) for p in args.procs.split(",")]:
        for side in args.sides.split(","):
            r = measure(side, corpus, tok_dir, work / "cache", n)
            results.append(r)
            print(row(r), flush=True)
    top = max(r["num_proc"] for r in results)
    rate = {r["side"]: r["tokens"] / r["seconds"] for r in results if r["num_proc"] == top}
    if args.train:
        train_on_shards(work, corpus, tok_dir, args.vocab, top, args.train)
    if "ours" in rate and "baseline" in rate:
        print(f"ratio {rate['ours'] / rate['baseline']:.2f}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
