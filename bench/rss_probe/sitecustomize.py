"""RSS per training phase on every rank, for checking the planner term by term (bench/rss_phases.py).

Loaded through PYTHONPATH=bench/rss_probe (Python imports `sitecustomize` at start-up) when RSS_PROBE names an
output dir; does nothing otherwise, and nothing in processes that are not ranks (no LOCAL_RANK). A thread reads
VmRSS every 2 ms; DeepSpeedEngine forward/backward/step and the ZeRO optimizers' internal functions (wrapped
below) set the phase label, so each (step, phase) gets the RSS at its start and its peak. Written to
$RSS_PROBE/rank<r>.json at exit (and on SIGUSR2).
"""

import os

if os.environ.get("RSS_PROBE") and os.environ.get("LOCAL_RANK") is not None:
    import atexit
    import json
    import signal
    import threading
    import time

    _state = {"phase": "init", "step": 0}
    _peaks: dict = {}
    _order: list = []

    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample() -> None:
        while True:
            key = f"{_state['step']}:{_state['phase']}"
            rss = _rss()
            if key not in _peaks:
                _order.append(key)
                _peaks[key] = [rss, rss]
            else:
                _peaks[key][1] = max(_peaks[key][1], rss)
            time.sleep(0.002)

    def _dump(*_args) -> None:
        out = os.environ["RSS_PROBE"]
        os.makedirs(out, exist_ok=True)
        with open(f"{out}/rank{os.environ['LOCAL_RANK']}.json", "w") as f:
            json.dump([[k, _peaks[k][0] / 2**30, _peaks[k][1] / 2**30] for k in list(_order)], f, indent=0)

    def _wrap(cls, name: str, label: str) -> None:
        orig = getattr(cls, name)

        def wrapped(self, *args, **kwargs):
            prev = _state["phase"]
            _state["phase"] = label
            try:
                return orig(self, *args, **kwargs)
            finally:
                if label in ("forward", "backward", "step"):
                    _state["phase"] = "after_" + label
                    _state["step"] += label == "step"
                else:
                    _state["phase"] = prev

        setattr(cls, name, wrapped)

    threading.Thread(target=_sample, daemon=True).start()
    atexit.register(_dump)
    signal.signal(signal.SIGUSR2, _dump)

    import deepspeed.runtime.engine as engine
    import deepspeed.runtime.zero.stage3 as stage3
    import deepspeed.runtime.zero.stage_1_and_2 as stage12

    for _name in ("forward", "backward", "step"):
        _wrap(engine.DeepSpeedEngine, _name, _name)
    for _fn in ("_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads", "partition_grads", "_optimizer_step",
                "_prepare_sub_group", "_release_sub_group", "unscale_and_clip_grads", "_post_step",
                "independent_gradient_partition_epilogue"):
        if hasattr(stage3.DeepSpeedZeroOptimizer_Stage3, _fn):
            _wrap(stage3.DeepSpeedZeroOptimizer_Stage3, _fn, "s3." + _fn[-24:])
    for _fn in ("reduce_ipg_grads", "independent_gradient_partition_epilogue", "average_tensor",
                "allreduce_and_copy", "allreduce_bucket", "copy_grads_in_partition", "allreduce_and_scatter", "step",
                "unscale_and_clip_grads"):
        if hasattr(stage12.DeepSpeedZeroOptimizer, _fn):
            _wrap(stage12.DeepSpeedZeroOptimizer, _fn, "s12." + _fn[-24:])
