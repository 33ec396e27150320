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

    from launcher.worker import devices, signals

    devices.apply(os.environ)  # before torch: CUDA reads CUDA_VISIBLE_DEVICES once, at initialisation
    signals.install()
    from omegaconf import OmegaConf

    from launcher.worker import comm
    from launcher.worker.status import StopRun, write_status
    from launcher.worker.train import Context, train

    cfg = OmegaConf.load(run_dir / "config.yaml")
    ds_path = run_dir / "ds_config.json"
    ds = json.loads(ds_path.read_text())
    # A hung rendezvous or collective fails loudly after this long instead of hanging forever.
    comm.start(int(os.environ.get("LAUNCHER_DIST_TIMEOUT_MIN", "30")))
    ctx = Context(run_dir, cfg, ds_path, ds, comm.rank(), comm.world_size())
    try:
        code = train(ctx)
    except StopRun as stop:
        if ctx.rank == 0:
            print(f"error: {stop}", file=sys.stderr, flush=True)
            write_status(run_dir, stop.state, -1, str(stop))
        code = stop.code
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
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
