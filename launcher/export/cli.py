"""`python -m launcher.export run_dir=DIR [step=N] [out=DIR] [dtype=bf16|fp16|fp32] [max_shard_size=5GB] [merge=...]`

Turns a run's ZeRO checkpoint (any stage; default: the newest complete one) into a Hugging Face model
directory that `AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)` load
offline (LoRA runs: the PEFT adapter directory, or with merge=true the merged model; launcher/export/adapter.py).
The work is in launcher/export/hf_dir.py; this module only parses arguments and reports. User errors
are one `error: ...` line on stderr and exit code 2, before torch is even imported.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

EXIT_USER_ERROR = 2
KEYS = ("run_dir", "step", "out", "dtype", "max_shard_size", "merge")
USAGE = ("usage: python -m launcher.export run_dir=DIR [step=N] [out=DIR] [dtype=bf16|fp16|fp32] "
         "[max_shard_size=5GB] [merge=false]\n"
         "  run_dir         a run dir written by `python -m launcher` (it holds checkpoints/ and config.yaml)\n"
         "  step            the checkpoint to export (default: the newest complete one)\n"
         "  out             output directory (default: <run_dir>/hf); an earlier export there is replaced\n"
         "  dtype           weights dtype (default: the run's precision: fp32, bf16 or fp16)\n"
         "  max_shard_size  split the weights into model-0000k-of-0000n.safetensors files above this size "
         "(default 5GB)\n"
         "  merge           LoRA runs: false (default) writes the PEFT adapter dir, true the merged full model")


class UsageError(Exception):
    pass


def parse(argv: Sequence[str]) -> Dict[str, str]:
    args: Dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if not sep or key not in KEYS:
            raise UsageError(f"unknown argument {arg!r}; expected key=value with key one of {', '.join(KEYS)}")
        if not value:
            raise UsageError(f"{key}= needs a value")
        args[key] = value
    if "run_dir" not in args:
        raise UsageError("run_dir=DIR is required (the run dir of a training run)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE)
        return 0
    from launcher.errors import ExportError
    from launcher.export.hf_dir import eprint, export, summary
    from launcher.export.shards import DEFAULT_MAX_SHARD_SIZE

    _quiet_cpu_accelerator()

    try:
        args = parse(argv)
        step: Optional[int] = None
        if "step" in args:
            try:
                step = int(args["step"])
            except ValueError:
                raise UsageError(f"step={args['step']}: must be an integer (a checkpoint's step)") from None
            if step < 0:
                raise UsageError(f"step={step}: must be >= 0")
        merge = args.get("merge", "false").lower()
        if merge not in ("true", "false"):
            raise UsageError(f"merge={args['merge']}: use merge=true or merge=false")
        result = export(
            Path(args["run_dir"]),
            step=step,
            out=Path(args["out"]) if "out" in args else None,
            dtype=args.get("dtype"),
            max_shard_size=args.get("max_shard_size", DEFAULT_MAX_SHARD_SIZE),
            log=eprint,
            merge=merge == "true",
        )
    except (UsageError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # a full disk, a read-only or vanished output dir: nothing half-written is left
        where = exc.filename or "the output directory"
        print(f"error: out: cannot write {where}: {exc.strerror or exc}; choose a writable out= (nothing was "
              "replaced)", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(summary(result))
    return 0


def _quiet_cpu_accelerator() -> None:
    """Without a GPU DeepSpeed falls back to its CPU accelerator anyway; saying so up front skips its warning."""
    import os

    if "DS_ACCELERATOR" not in os.environ and not Path("/dev/nvidiactl").exists() and \
            not any(k in os.environ for k in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")):
        os.environ["DS_ACCELERATOR"] = "cpu"


if __name__ == "__main__":
    sys.exit(main())
