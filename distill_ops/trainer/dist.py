"""torch.distributed helpers: everything degrades to a no-op with one process and no init."""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if active() else 0


def world_size() -> int:
    return tdist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active() and world_size() > 1:
        tdist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats across ranks (float64 on the wire; identity with one process)."""
    if not active() or world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return t.tolist()


def init_from_env(device_pref: str = "auto") -> bool:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1 in the
    environment) and none exists yet: NCCL on GPUs, gloo on the CPU. Returns True if it did."""
    if active() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def pick_device(pref: str = "auto") -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but no CUDA GPU is visible")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(pref)
