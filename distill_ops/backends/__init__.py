"""Backend registry and the dispatch rule.

``auto`` picks, in order: the compiled CUDA kernels (tensor on an NVIDIA GPU and the extension built
with CUDA), Triton (tensor on a GPU, triton importable), the compiled CPU kernels (tensor on the CPU),
the pure-torch reference. ``DISTILL_OPS_BACKEND=cuda|triton|cpu|torch`` overrides ``auto``. Asking for
a backend that cannot run on the given tensor raises a clear error; there is no silent switch.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

BACKENDS = ("auto", "torch", "triton", "cpu", "cuda")
ENV_VAR = "DISTILL_OPS_BACKEND"


def triton_interpreted() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_status() -> tuple[bool, str]:
    """Whether Triton can be imported, and why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return False, f"triton cannot be imported ({exc})"
    return True, ""


def native_status(device_type: str) -> tuple[bool, str]:
    """Whether the compiled extension serves ``device_type`` ('cpu' or 'cuda'), and why not."""
    from . import native

    return native.available(device_type)


def _can_run(name: str, device: torch.device) -> tuple[bool, str]:
    if name == "torch":
        return True, ""
    if name == "triton":
        ok, why = triton_status()
        if not ok:
            return ok, why
        if device.type == "cuda" or triton_interpreted():
            return True, ""
        return False, "Triton needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
    if name in ("cpu", "cuda"):
        if device.type != name:
            return False, f"the {name} kernels need {name} tensors, got tensors on {device}"
        return native_status(name)
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def resolve(name: str, device: torch.device) -> str:
    """Turn a requested backend into the one that will run, or raise naming the reason."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    source = "backend"
    if name == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {env!r}")
            name, source = env, ENV_VAR
    if name == "auto":
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        for candidate in order:
            if _can_run(candidate, device)[0]:
                return candidate
        return "torch"
    ok, why = _can_run(name, device)
    if not ok:
        raise RuntimeError(f"{source}={name!r} cannot run here: {why}")
    return name


_MODULES = {
    "torch": "distill_ops.backends.reference",
    "triton": "distill_ops.backends.triton",
    "cpu": "distill_ops.backends.native",
    "cuda": "distill_ops.backends.native",
}


def get(name: str, op: str) -> Callable:
    """The function ``op`` (e.g. 'dense_forward') of the resolved backend ``name``."""
    module = importlib.import_module(_MODULES[name])
    return getattr(module, op)
