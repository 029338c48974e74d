"""The compiled extension (csrc/): CPU kernels always, CUDA kernels where it was built with CUDA.

Importing distill_ops never fails because the extension is missing; ``available`` reports why.
"""

from __future__ import annotations

from typing import Optional

import torch

_LOAD_ERROR: Optional[str] = None
try:  # the extension registers its operators under torch.ops.distill_ops_native on import
    from distill_ops import _C  # type: ignore[attr-defined]  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the build
    _C = None
    _LOAD_ERROR = f"the compiled extension distill_ops._C is not importable ({exc})"


def available(device_type: str) -> tuple[bool, str]:
    """Whether the extension serves ``device_type`` ('cpu' or 'cuda'), and why not."""
    if _C is None:
        return False, _LOAD_ERROR or "extension missing"
    if device_type == "cuda" and not getattr(_C, "WITH_CUDA", False):
        return False, "the extension was built without CUDA"
    return True, ""


def dense_forward(student, teacher, labels, *, divergence, mix, temperature, softcap, soft_coef,
                  hard_coef, ignore_index, grad, grad_scale):
    """backends/base.py contract, run by the compiled kernels."""
    return torch.ops.distill_ops_native.dense_forward(
        student, teacher, labels, grad, grad_scale, divergence, mix, temperature, softcap,
        soft_coef, hard_coef, ignore_index,
    )
