"""Entry point of each rank: `python -m launcher.worker --run-dir DIR` (started by the deepspeed runner)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(prog="launcher.worker")
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    rank = int(os.environ.get("RANK", "0"))

    from launcher.worker import devices

    devices.apply(os.environ)  # before torch: CUDA reads CUDA_VISIBLE_DEVICES once, at initialisation
    from omegaconf import OmegaConf

    from launcher.worker import console, signals, streams

    cfg = OmegaConf.load(run_dir / "config.yaml")
    # Before torch/deepspeed print anything: their output goes to logs/rank<N>.log, ours to the terminal.
    console.setup(run_dir, rank, bool(cfg.get("verbose", False)))
    signals.install()
    streams.install()  # a closed terminal (SIGHUP) must not turn a stop checkpoint into a crash

    from launcher.models.tokenizer import TokenizerError
    from launcher.worker import comm
    from launcher.worker.status import EXIT_USER_ERROR, StopRun, progress, write_status
    from launcher.worker.train import Context, train

    ds_path = run_dir / "ds_config.json"
    ds = json.loads(ds_path.read_text())
    # A hung rendezvous or collective fails loudly after this long instead of hanging forever.
    comm.start(int(os.environ.get("LAUNCHER_DIST_TIMEOUT_MIN", "30")))
    ctx = Context(run_dir, cfg, ds_path, ds, comm.rank(), comm.world_size())
    if ctx.rank == 0:
        from launcher.worker.heartbeat import start_heartbeat

        start_heartbeat(run_dir)  # the run dir's lock stays fresh for launches from other hosts
    try:
        code = train(ctx)
    except StopRun as stop:
        if ctx.rank == 0:
            console.error(f"error: {stop}")
            write_status(run_dir, stop.state, progress.step, str(stop))
        code = stop.code
    except TokenizerError as exc:
        # Every rank loads the tokenizer and fails alike: one line from rank 0, exit code 2, no traceback.
        if ctx.rank == 0:
            console.error(f"error: {exc}")
            write_status(run_dir, "failed", progress.step, str(exc))
        _remove_own_shm_file()
        os._exit(EXIT_USER_ERROR)
    except BaseException as exc:  # noqa: BLE001 - OOM, NCCL errors, a dead peer, a bug: status says so first
        traceback.print_exc()
        sys.stderr.flush()
        # The traceback is in this rank's log; the terminal and status.json get the error and where to look.
        message = f"rank {ctx.rank} failed: {type(exc).__name__}: {exc}".splitlines()[0]
        console.error(f"error: {message} (traceback: {console.log_path()})")
        write_status(run_dir, "failed", progress.step, f"{message}; traceback in {console.log_path()}",
                     rank=ctx.rank)
        _remove_own_shm_file()
        # Peers may be blocked in a collective; the deepspeed launcher kills them when this rank exits.
        os._exit(1)
    comm.finish()
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
