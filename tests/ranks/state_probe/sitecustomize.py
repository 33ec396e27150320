"""Test probe for tests/test_resume_world.py, loaded into each rank through PYTHONPATH (never in production).

With LAUNCHER_STATE_PROBE=<dir> set, it wraps the worker's checkpoint save/load to dump every parameter's
full fp32 value and Adam moments plus each rank's optimizer step counts (gathered with DeepSpeed's own
`safe_get_full_*` accessors, independent of the launcher's conversion code), and with
LAUNCHER_STOP_AT_STEP=<n> it raises the worker's stop flag once rank 0 has logged step n: the run
checkpoints and exits exactly as on a real SIGTERM, at a step that does not depend on timing.
"""

import os

if os.environ.get("LAUNCHER_STATE_PROBE") and os.environ.get("LOCAL_RANK") is not None:
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from launcher.worker import ckpt, metrics, signals

    _out = Path(os.environ["LAUNCHER_STATE_PROBE"])
    _stop_at = int(os.environ.get("LAUNCHER_STOP_AT_STEP", "0"))
    _stop = {"now": False}

    def _dump(engine, name):
        state = {}
        for pname, p in engine.module.named_parameters():  # collective under ZeRO-3: every rank calls
            state[pname] = {
                "fp32": safe_get_full_fp32_param(p).detach().cpu().clone(),
                "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").detach().cpu().clone(),
                "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").detach().cpu().clone(),
            }
        steps = sorted({int(torch.as_tensor(s["step"]).item()) for s in engine.optimizer.optimizer.state.values()
                        if "step" in s})
        all_steps = [None] * dist.get_world_size()
        dist.all_gather_object(all_steps, steps)
        if dist.get_rank() == 0:
            _out.mkdir(parents=True, exist_ok=True)
            torch.save({"params": state, "steps": all_steps, "global_steps": int(engine.global_steps)},
                       _out / f"{name}_w{dist.get_world_size()}.pt")

    _save, _load, _write, _received = ckpt.save, ckpt.load, metrics.MetricsLog.write, signals.received

    def save(engine, ckpt_dir, step, *args, **kwargs):
        _dump(engine, f"saved_{step}")
        return _save(engine, ckpt_dir, step, *args, **kwargs)

    def load(engine, ckpt_dir, *args, **kwargs):
        client = _load(engine, ckpt_dir, *args, **kwargs)
        if client is not None:
            _dump(engine, f"loaded_{client['step']}")
        return client

    def write(self, record):
        _write(self, record)
        if _stop_at and record["step"] >= _stop_at:
            _stop["now"] = True

    def received():
        return _received() or ("SIGTERM" if _stop["now"] else None)

    ckpt.save, ckpt.load, metrics.MetricsLog.write, signals.received = save, load, write, received
