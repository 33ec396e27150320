"""Build DeepSpeed's CPU JIT ops once (`python -m launcher.worker.ops`), so runs and tests don't pay it."""

from __future__ import annotations

import os
import sys
import time

from launcher.launch.jit_locks import check_jit_locks

OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")


def main() -> int:
    for note in check_jit_locks():
        print(note, file=sys.stderr)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        print("GPU accelerator: ops are built by DeepSpeed on first use", file=sys.stderr)
        return 0
    for name in OPS:
        t0 = time.time()
        get_accelerator().create_op_builder(name).load(verbose=False)
        print(f"op {name} ready ({time.time() - t0:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
