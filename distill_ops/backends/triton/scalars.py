"""Float scalar arguments of the Triton kernels: float64 at the launch, the accumulation dtype
inside.

Triton passes a Python float as a float32 argument unless the kernel's parameter is annotated:
then float64 inputs would see 1/tau, the mixture weights and the loss coefficients rounded to
float32 (~1e-8 relative, where the other backends are 1e-15). So the entry kernels annotate each
float parameter ``tl.float64`` and call ``acc_scalar`` on it once: a no-op for float64 inputs, one
round-to-nearest to float32 for the others, the rounding the launcher used to do on the host (so
the float32 kernels compute what they did, and no float64 arithmetic leaks into them). The CPU
interpreter ignores the annotation and passes the Python float, which ``tl.full`` rounds the same
way."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def acc_scalar(s, ACC: tl.constexpr):
    """The scalar argument ``s`` in the accumulation dtype ACC."""
    return tl.full([], s, ACC)
