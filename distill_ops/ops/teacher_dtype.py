"""The teacher's logits in the student's dtype: the kernels read one dtype for both sides."""

from __future__ import annotations

import torch

# Casts that keep every value exactly.
_EXACT = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
          (torch.bfloat16, torch.float64), (torch.float16, torch.float64),
          (torch.float32, torch.float64)}


def teacher_as(teacher: torch.Tensor, dtype: torch.dtype, softcapped: bool) -> torch.Tensor:
    """``teacher`` (..., V) in ``dtype``. A narrowing cast (a float32 teacher for a bfloat16
    student) first subtracts each row's max: the softmax at any temperature, and so every
    divergence, is unchanged, and the logits that carry the probability mass land near 0, where
    the narrow dtype is finest. Cast as they are, logits near 30 round to multiples of 0.125 in
    bfloat16 (a loss 1e-3 off, its gradient 2e-2; with the shift 3e-5 and 2e-3, the gradient's
    own bfloat16 rounding) and logits near 1e4 to multiples of 8 in float16 (the loss 40% off).
    A softcap is not shift-invariant: softcapped logits are cast as they are. So are 16-bit
    teachers: the subtraction would run in their own dtype (bf16 -> fp16, exact as a cast, would
    round to bf16's mantissa, and fp16 could overflow)."""
    if teacher.dtype == dtype:
        return teacher
    if softcapped or (teacher.dtype, dtype) in _EXACT or teacher.element_size() <= 2:
        return teacher.to(dtype)
    peak = teacher.amax(-1, keepdim=True)
    # (a row of -inf keeps its -inf, a row with +inf or NaN its NaN loss: no shift there)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    if torch.compiler.is_compiling():
        return (teacher - peak).to(dtype)
    # one write, in the narrow dtype: no float32 N x V temporary
    return torch.sub(teacher, peak, out=torch.empty(teacher.shape, dtype=dtype,
                                                    device=teacher.device))
