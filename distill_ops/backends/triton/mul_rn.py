"""``mul_rn(a, b)``: a * b rounded on its own, never contracted into an FMA with a later add.

On a GPU, Triton fuses ``a * b - c`` into one FMA (its default ``enable_fp_fusion``). Then
``exp(x * inv_tau - max)`` takes the unrounded product: the row's top term is exp(its rounding
error), not the 1 that the max (formed from the rounded product), the target slots and the
reference imply, and reverse KL multiplies that shift of every log q by R (csrc/include/
distill_ops/primitives.h mul_rn is the CUDA and C++ side). libdevice's mul_rn is never fused. The
CPU interpreter evaluates with numpy, which never fuses, and has no libdevice: a plain product."""

from __future__ import annotations

import os

import triton
import triton.language as tl  # noqa: F401  (the interpreter wants it visible to a jit function)
from triton.language.extra import libdevice

if os.environ.get("TRITON_INTERPRET") == "1":

    @triton.jit
    def mul_rn(a, b):
        return a * b

else:

    @triton.jit
    def mul_rn(a, b):
        return libdevice.mul_rn(a, b.to(a.dtype))
