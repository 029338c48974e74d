"""Triton kernels (GPU, or the CPU interpreter under TRITON_INTERPRET=1)."""

from .dense import dense_forward

__all__ = ["dense_forward"]
