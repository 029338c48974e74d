"""The compiled extension (csrc/): CPU kernels always, CUDA kernels where it was built with CUDA.

Importing distill_ops never fails because the extension is missing; ``available`` reports why.
The operator is ``torch.ops.distill_ops_native.dense_forward`` (schema in csrc/ops.cpp); its fake
(meta) kernel is registered here so that torch.compile and FakeTensor tracing go through it.
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


if _C is not None:

    @torch.library.register_fake("distill_ops_native::dense_forward")
    def _dense_forward_fake(student, teacher, labels, grad, grad_scale, divergence, mix,
                            temperature, softcap, soft_coef, hard_coef, ignore_index):
        torch._check(student.dim() == 2, lambda: "student must be 2-D (N, V)")
        dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        return student.new_empty((student.shape[0],), dtype=dtype)


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
    # The kernels need unit stride on the last axis (row strides are free); copy a view that lacks
    # it rather than fail (the in-place gradient, grad is student, cannot be copied: the op raises).
    if teacher.dim() == 2 and teacher.shape[1] > 1 and teacher.stride(1) != 1:
        teacher = teacher.contiguous()
    if student.dim() == 2 and student.shape[1] > 1 and student.stride(1) != 1 and grad is not student:
        student = student.contiguous()
    return torch.ops.distill_ops_native.dense_forward(
        student, teacher, labels, grad, grad_scale, divergence, float(mix), float(temperature),
        float(softcap), float(soft_coef), float(hard_coef), int(ignore_index),
    )
