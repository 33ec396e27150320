"""Entry point of each rank: `python -m launcher.worker --run-dir DIR` (started by the deepspeed runner)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(prog="launcher.worker")
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args()
    run_dir = Path(args.run_dir)

    from launcher.worker import signals, streams

    signals.install()
    streams.install()  # before deepspeed binds its log handler to sys.stdout
    import deepspeed
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from launcher.models.tokenizer import TokenizerError
    from launcher.worker.status import EXIT_USER_ERROR, StopRun, one_line, progress, write_status
    from launcher.worker.train import Context, train

    cfg = OmegaConf.load(run_dir / "config.yaml")
    ds_path = run_dir / "ds_config.json"
    ds = json.loads(ds_path.read_text())
    # A hung rendezvous or collective fails loudly after this long instead of hanging forever.
    deepspeed.init_distributed(timeout=timedelta(minutes=int(os.environ.get("LAUNCHER_DIST_TIMEOUT_MIN", "30"))))
    ctx = Context(run_dir, cfg, ds_path, ds, dist.get_rank(), dist.get_world_size())
    if ctx.rank == 0:
        from launcher.worker.heartbeat import start_heartbeat

        start_heartbeat(run_dir)
    try:
        code = train(ctx)
    except StopRun as stop:
        if ctx.rank == 0:
            print(f"error: {stop}", file=sys.stderr, flush=True)
            write_status(run_dir, stop.state, progress.step, str(stop))
        code = stop.code
    except TokenizerError as exc:
        # Every rank loads the tokenizer and fails alike: one line from rank 0, exit code 2.
        if ctx.rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            write_status(run_dir, "failed", progress.step, str(exc))
        _remove_own_shm_file()
        os._exit(EXIT_USER_ERROR)
    except BaseException as exc:  # noqa: BLE001 - OOM, NCCL errors, a dead peer, a bug: status says so first
        # status.json names the rank, the step and the exception in one line; the traceback goes to the log.
        write_status(run_dir, "failed", progress.step, f"rank {ctx.rank}: {one_line(exc)}", rank=ctx.rank)
        traceback.print_exc()
        sys.stderr.flush()
        _remove_own_shm_file()
        # Peers may be blocked in a collective; the deepspeed launcher kills them when this rank exits.
        os._exit(1)
    # Without a barrier + destroy, rank exit aborts (SIGABRT) in about a third of runs.
    dist.barrier()
    dist.destroy_process_group()
    _remove_own_shm_file()
    return code


def _remove_own_shm_file() -> None:
    """Every peer has mapped it long ago; unlinking the name only stops the 66 MiB from outliving us."""
    from launcher.launch.shm import remove_shm_files

    port, addr, rank = os.environ.get("MASTER_PORT"), os.environ.get("MASTER_ADDR"), os.environ.get("RANK")
    if port and addr and rank:
        remove_shm_files(int(port), addr, int(rank))


if __name__ == "__main__":
    sys.exit(main())
