"""The real worker, on a CPU that lacks native fp16 (no AVX512-FP16/AMX-FP16): DeepSpeed's CPU accelerator
then refuses fp16 outright, although torch computes fp16 on any CPU (slowly). This wrapper only flips that
capability flag -- the one thing this machine cannot provide -- so the fp16 loss-scaling path (ZeRO
optimizer, overflow detection, skipped steps, scale halving) runs for real on CPU ranks.
Usage (through the deepspeed runner): deepspeed ... tests/ranks/fp16_on_cpu_worker.py --run-dir DIR"""

import sys

from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

CPU_Accelerator.is_fp16_supported = lambda self: True

from launcher.worker.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    sys.exit(main())
