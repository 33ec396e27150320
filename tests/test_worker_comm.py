"""Device discipline in the worker: launcher/worker/comm.py is the only module that calls torch.distributed,
and every tensor it hands to the default group is on the accelerator's current device.

No GPU exists where this suite runs, so the second half stubs what cannot exist here: the accelerator (its
current device is a `meta` marker standing in for cuda:LOCAL_RANK), torch.distributed's collectives
(recorders), and the host read-back of a reduced device tensor. Nothing else is mocked.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import List

import pytest

WORKER = Path(__file__).resolve().parent.parent / "launcher" / "worker"
ALLOWED = {"comm.py"}
DIST_MODULES = ("torch.distributed", "deepspeed.comm")


def direct_dist_uses(source: str) -> List[str]:
    """Lines that import or reach torch.distributed / deepspeed.comm directly (any alias, any depth)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.startswith(DIST_MODULES)]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            names = [f"{mod}.{a.name}" for a in node.names]
            if mod.startswith(DIST_MODULES) or any(n.startswith(DIST_MODULES) for n in names):
                found.append(f"{node.lineno}: from {mod} import ...")
        elif isinstance(node, ast.Attribute) and node.attr in ("distributed", "comm"):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("torch", "deepspeed"):
                found.append(f"{node.lineno}: {base.id}.{node.attr}")
    return found


def test_no_worker_module_calls_torch_distributed_directly():
    offenders = {}
    for path in sorted(WORKER.rglob("*.py")):
        if path.name in ALLOWED:
            continue
        uses = direct_dist_uses(path.read_text())
        if uses:
            offenders[str(path.relative_to(WORKER))] = uses
    assert not offenders, f"call torch.distributed only through launcher/worker/comm.py: {offenders}"


@pytest.mark.parametrize("line", [
    "import torch.distributed as dist\ndist.barrier()",
    "from torch import distributed\ndistributed.all_reduce(t)",
    "from torch.distributed import all_reduce",
    "import torch\ntorch.distributed.all_reduce(t)",
    "import deepspeed\ndeepspeed.comm.barrier()",
])
def test_the_check_catches_a_direct_call(line):
    assert direct_dist_uses(line), line


def test_the_check_leaves_comm_calls_alone():
    assert direct_dist_uses("from launcher.worker import comm\ncomm.barrier()\nx = comm.any_rank(True)") == []


# --- device stub -------------------------------------------------------------------------------------------

class Recorder:
    """Stands in for torch.distributed: records (call, tensors, group) and does nothing."""

    def __init__(self) -> None:
        self.calls: list = []

    def all_reduce(self, tensor, op=None, group=None):
        self.calls.append(("all_reduce", [tensor], group))

    def broadcast_object_list(self, objs, src=0, group=None, device=None):
        self.calls.append(("broadcast_object_list", [], group))

    def barrier(self, group=None):
        self.calls.append(("barrier", [], group))

    def new_group(self, backend=None, timeout=None):
        self.calls.append(("new_group", [backend], None))
        return f"{backend}-group"

    def destroy_process_group(self, group=None):
        self.calls.append(("destroy_process_group", [], group))

    def get_world_size(self):
        return 2

    def get_rank(self):
        return 0


class FakeAccelerator:
    """A GPU accelerator as DeepSpeed's would be on CUDA: set_device selects, current_device_name reports it."""

    def __init__(self, log: list) -> None:
        self.log = log

    def set_device(self, index):
        self.log.append(("set_device", index))

    def current_device_name(self):
        return "meta"  # the marker for cuda:LOCAL_RANK (no CUDA here)


@pytest.fixture
def stubbed(monkeypatch):
    import deepspeed
    import deepspeed.accelerator
    import torch

    from launcher.worker import comm

    rec = Recorder()
    log: list = []
    for name in ("all_reduce", "broadcast_object_list", "barrier", "new_group", "destroy_process_group",
                 "get_world_size", "get_rank"):
        monkeypatch.setattr(comm.dist, name, getattr(rec, name))
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: FakeAccelerator(log))
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: log.append(("init_distributed", None)))
    # Reading a reduced device tensor back is the one thing a meta tensor cannot do.
    monkeypatch.setattr(comm, "_values", lambda t: [0.0] * t.numel())
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(comm, "_control", None)
    yield comm, rec, log, torch


def test_start_selects_the_device_before_any_collective(stubbed):
    comm, rec, log, _ = stubbed
    comm.start(30)
    assert log == [("init_distributed", None), ("set_device", 1)]
    assert rec.calls == [("new_group", ["gloo"], None)]  # the control group, after set_device
    assert comm._control == "gloo-group"


def test_default_group_tensors_are_on_the_current_device(stubbed):
    comm, rec, _, torch = stubbed
    comm.start(30)
    rec.calls.clear()
    # Losses come out of the engine on the device; values come from the host.
    comm.global_loss([torch.ones((), device="meta"), torch.ones((), device="meta")])
    comm.max_over_ranks([1.0, 2.0, 3.0])
    comm.broadcast_object(("x", None))
    comm.any_rank(True)
    comm.barrier()
    with comm.others_wait(5):
        pass
    comm.finish()
    default = [(c, ts) for c, ts, g in rec.calls if g is None and c != "new_group"]
    tensors = [t for _, ts in default for t in ts]
    assert len(tensors) == 2, rec.calls  # global_loss and max_over_ranks
    assert all(t.device.type == "meta" for t in tensors), [t.device for t in tensors]
    # Control traffic: the gloo group, CPU tensors, never the default group.
    control = [(c, ts) for c, ts, g in rec.calls if g == "gloo-group"]
    assert [c for c, _ in control][:2] == ["broadcast_object_list", "all_reduce"]
    assert all(t.device.type == "cpu" for _, ts in control for t in ts)
