"""train.export_at_end=true: at the end of a run, rank 0 exports the final checkpoint to <run_dir>/hf.

It uses the same code as `python -m launcher.export` and reads the checkpoint the run just saved (complete:
every rank has passed the barrier after writing it), so the result is identical to exporting by hand. The
other ranks wait for rank 0 on a separate gloo group with a long timeout: consolidating a large model can take
longer than the run's collective timeout. A failed export leaves no <run_dir>/hf and the checkpoint intact;
the run then exits with code 2 and says how to retry.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

EXPORT_DIR = "hf"


def export_at_end(ctx: Any, engine: Any) -> None:
    import torch.distributed as dist

    from launcher.worker.status import EXIT_USER_ERROR, StopRun

    dist.barrier()  # every rank is done with training and the final checkpoint
    minutes = int(os.environ.get("LAUNCHER_EXPORT_TIMEOUT_MIN", "720"))
    waiters = dist.new_group(backend="gloo", timeout=timedelta(minutes=minutes)) if ctx.world > 1 else None
    failure = None
    if ctx.rank == 0:
        # A model.path run under ZeRO-3 registered HfDeepSpeedConfig for loading; while it is set, the export's
        # verification load (from_pretrained) would build a partitioned model and wait in collectives for
        # ranks that are waiting for us. Training is over: unregister it.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        failure = _export(ctx)
    if waiters is not None:
        dist.barrier(group=waiters)
        dist.destroy_process_group(waiters)
    if failure is not None:
        raise StopRun(failure, EXIT_USER_ERROR, state="export_failed")


def _export(ctx: Any) -> Any:
    """Rank 0: export, print the outcome; returns an error message, or None on success."""
    from launcher.errors import ExportError
    from launcher.export.hf_dir import export, summary

    def log(line: str) -> None:
        print(f"[launcher] export: {line.strip()}", flush=True)

    out = ctx.run_dir / EXPORT_DIR
    retry = f"python -m launcher.export run_dir={ctx.run_dir}"
    try:
        result = export(ctx.run_dir, out=out, log=log)
    except ExportError as exc:
        return f"train.export_at_end: {exc}; training finished and its checkpoints are intact: retry with {retry}"
    except Exception as exc:  # noqa: BLE001 - training succeeded: report, don't lose the run's exit status
        import traceback

        traceback.print_exc()
        return (f"train.export_at_end: export failed ({type(exc).__name__}: {exc}); training finished and its "
                f"checkpoints are intact: retry with {retry}")
    for line in summary(result).splitlines():
        log(line)
    return None
