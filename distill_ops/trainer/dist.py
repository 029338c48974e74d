"""torch.distributed helpers: everything degrades to a no-op with one process and no init."""

from __future__ import annotations

import os
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as tdist

T = TypeVar("T")


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if active() else 0


def world_size() -> int:
    return tdist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; 0 without a process group)."""
    return _env_local_rank() if active() else 0


def _env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if active() and world_size() > 1:
        tdist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats across ranks (float64 on the wire; identity with one process)."""
    return _all_reduce(values, device, "SUM")


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    """The largest of each float across ranks (identity with one process)."""
    return _all_reduce(values, device, "MAX")


def agreed(step: Callable[[], T], device: Optional[torch.device] = None) -> T:
    """Run ``step`` (this rank's part of something every rank must finish: rank 0's checkpoint
    writes, each rank's own files) and return what it returns, once the ranks agree on the
    outcome: where it raised on any rank, every rank raises (that rank its own error). A rank
    that raised alone would leave the others in the next collective until the process group's
    timeout (30 min on gloo) if its process lived on (a notebook, a sweep driver). ``device``
    carries the vote (the CPU by default: gloo; NCCL needs the rank's GPU)."""
    error, result = None, None
    try:
        result = step()
    except Exception as exc:   # (re-raised below, after the others have heard of it)
        error = exc
    (failed,) = all_reduce_max([1.0 if error is not None else 0.0],
                               device if device is not None else torch.device("cpu"))
    if error is not None:
        raise error
    if failed:
        raise RuntimeError("another rank failed (its own error says why); this one stops with it")
    return result


def _all_reduce(values: list[float], device: torch.device, op: str) -> list[float]:
    if not active() or world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(t, op=getattr(tdist.ReduceOp, op))
    return t.tolist()


def init_from_env(device_pref: str = "auto") -> bool:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1 in the
    environment) and none exists yet: NCCL on GPUs, gloo on the CPU. Returns True if it did."""
    if active() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(_env_local_rank())
    tdist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def pick_device(pref: str = "auto") -> torch.device:
    """The run's device: ``auto`` is the GPU of this process (LOCAL_RANK) when CUDA is there, else
    the CPU. A device that is not there is ConfigError naming ``device`` (bad input: the CLI
    prints one line and exits 2, where a RuntimeError would give a traceback)."""
    from .config import ConfigError

    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(pref)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device={pref!r} is not a torch device (auto, cpu, cuda, cuda:<index>, "
                          "...)") from None
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"device={pref!r} but no CUDA GPU is visible (use device='cpu' or "
                          "'auto')")
    index = device.index if device.index is not None else _env_local_rank()
    if index >= count:
        raise ConfigError(f"device={pref!r} asks for CUDA GPU {index} but {count} "
                          f"{'is' if count == 1 else 'are'} visible")
    return torch.device("cuda", index)
