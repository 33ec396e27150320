"""Every torch.distributed call the worker makes itself, and the rule that keeps them correct on GPUs.

No other worker module calls torch.distributed (tests/test_worker_comm.py reads the worker's source and fails
on a direct call). The rules, all here:

- The rank's device is selected (DeepSpeed's accelerator: torch.cuda.set_device(LOCAL_RANK) on CUDA, nothing
  on CPU) right after the process group starts and before any collective. Without it every rank would use
  GPU 0 while DeepSpeed binds the NCCL communicator to cuda:LOCAL_RANK.
- Data-plane tensors (the loss, the peak memory) live on the accelerator's current device: on CUDA the
  default group is NCCL-only and a collective on a CPU tensor raises "No backend type associated with device
  type cpu".
- Control messages (the per-step stop flag, the staged-data broadcast) go over a separate gloo group of CPU
  tensors: the stop flag is checked every step, and a device tensor would add a host<->device sync (.item())
  to every step; a gloo all-reduce of one int over the existing TCP store costs ~0.1 ms and never touches
  the GPU. On CPU ranks the default group is gloo too, and the control group is still a separate one, so
  the code path the GPU runs is the one the CPU tests exercise.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

_control: Optional[Any] = None


def start(timeout_min: int) -> None:
    """Start the process group (DeepSpeed), select this rank's device, open the gloo control group."""
    import deepspeed

    deepspeed.init_distributed(timeout=timedelta(minutes=timeout_min))
    select_device()
    global _control
    _control = dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_min))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def select_device() -> None:
    from deepspeed.accelerator import get_accelerator

    get_accelerator().set_device(local_rank())


def device() -> torch.device:
    """The accelerator's current device: where every tensor of the default group lives."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def rank() -> int:
    return dist.get_rank()


def world_size() -> int:
    return dist.get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (pickled, over the gloo control group: no device memory)."""
    box: List[Any] = [obj]
    dist.broadcast_object_list(box, src=src, group=_control)
    return box[0]


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's `obj`, in rank order, on every rank (control group: no device memory)."""
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_control)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (control group, CPU tensor: no device sync)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return bool(t.item())


def global_loss(losses: Sequence[torch.Tensor]) -> float:
    """The global batch's loss: each micro-batch loss is its token-loss sum / (global targets / world)
    (worker/train.py), so summing over micro batches and ranks and dividing by world gives sum / targets."""
    t = torch.stack([loss.detach().float() for loss in losses]).sum().reshape(1).to(device())
    dist.all_reduce(t)
    return _values(t)[0] / dist.get_world_size()


def max_over_ranks(values: Sequence[float]) -> List[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return _values(t)


def _values(t: torch.Tensor) -> List[float]:
    """A reduced device tensor read back on the host (the one device sync of a log step)."""
    return [float(v) for v in t.tolist()]


def barrier() -> None:
    """All ranks, default group (NCCL on GPUs: uses the selected device)."""
    dist.barrier()


@contextmanager
def others_wait(minutes: int) -> Iterator[None]:
    """The other ranks wait, on a gloo group with its own long timeout, while this block runs (rank 0's slow
    work, e.g. consolidating a large model, may outlast the collective timeout)."""
    waiters = None
    if dist.get_world_size() > 1:
        waiters = dist.new_group(backend="gloo", timeout=timedelta(minutes=minutes))
    yield
    if waiters is not None:
        dist.barrier(group=waiters)
        dist.destroy_process_group(waiters)


def finish() -> None:
    """Without a barrier + destroy, rank exit aborts (SIGABRT) in about a third of runs."""
    global _control
    dist.barrier()
    if _control is not None:
        dist.destroy_process_group(_control)
        _control = None
    dist.destroy_process_group()
