"""The compiled extension (csrc/): CPU kernels always, CUDA kernels where it was built with CUDA.

Importing distill_ops never fails because the extension is missing; ``available`` reports why.
The operator is ``torch.ops.distill_ops_native.dense_forward`` (schema in csrc/ops.cpp); its fake
(meta) kernel is registered here so that torch.compile and FakeTensor tracing go through it.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import reference_sparse
from .base import MODE_TAIL
from .reference_sparse import merge_sampled

_LOAD_ERROR: Optional[str] = None
try:  # the extension registers its operators under torch.ops.distill_ops_native on import
    from distill_ops import _C  # type: ignore[attr-defined]  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the build
    _C = None
    _LOAD_ERROR = f"the compiled extension distill_ops._C is not importable ({exc})"


# The operators the functions below call, and the device types whose teacher_sample kernel also
# merges the draws (elsewhere teacher_sample_draws draws and merge_sampled merges). The test
# harness tests/cuda_emu swaps in the CUDA kernels compiled for a CPU emulator through these two.
OPS = torch.ops.distill_ops_native
SAMPLE_MERGED_IN_KERNEL: tuple[str, ...] = ("cpu",)

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
        return False, "the extension was built without CUDA" + _cuda_skipped_because()
    return True, ""


def _cuda_skipped_because() -> str:
    """': <reason>' from the build's record (setup.py writes distill_ops/_build_info.py), or ''."""
    try:
        from distill_ops import _build_info  # type: ignore[attr-defined]
    except ImportError:
        return ""
    why = getattr(_build_info, "CUDA_SKIPPED_BECAUSE", "")
    return f": {why}" if why else ""


def dense_forward(student, teacher, labels, *, divergence, mix, temperature, softcap, soft_coef,
                  hard_coef, ignore_index, grad, grad_scale):
    """backends/base.py contract, run by the compiled kernels."""
    # The kernels need unit stride on the last axis (row strides are free); copy a view that lacks
    # it rather than fail (the in-place gradient, grad is student, cannot be copied: the op raises).
    if teacher.dim() == 2 and teacher.shape[1] > 1 and teacher.stride(1) != 1:
        teacher = teacher.contiguous()
    if student.dim() == 2 and student.shape[1] > 1 and student.stride(1) != 1 and grad is not student:
        student = student.contiguous()
    return OPS.dense_forward(
        student, teacher, labels, grad, grad_scale, divergence, float(mix), float(temperature),
        float(softcap), float(soft_coef), float(hard_coef), int(ignore_index),
    )


# ----------------------------------------------------------------------------- sparse targets
# CPU: the loss and the teacher ops (csrc/cpu/sparse_cpu.cpp, teacher_cpu.cpp); CUDA: the loss, the
# top-k and the sampling draws (csrc/cuda/sparse_cuda.cu, teacher_cuda.cu, sample_cuda.cu).

if _C is not None:

    @torch.library.register_fake("distill_ops_native::sparse_forward")
    def _sparse_forward_fake(student, ids, logprobs, tail, labels, grad, grad_scale, divergence,
                             mix, mode, temperature, target_scale, soft_coef, hard_coef,
                             ignore_index, target_bits=None):
        dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
        return student.new_empty((student.shape[0],), dtype=dtype)

    @torch.library.register_fake("distill_ops_native::teacher_topk")
    def _teacher_topk_fake(teacher, k, temperature):
        n = teacher.shape[0]
        return (teacher.new_empty((n, k), dtype=torch.int32),
                teacher.new_empty((n, k), dtype=torch.float32),
                teacher.new_empty((n,), dtype=torch.float32))

    @torch.library.register_fake("distill_ops_native::teacher_sample")
    def _teacher_sample_fake(teacher, num_samples, inv_prop, delta, seed_key):
        n = teacher.shape[0]
        return (teacher.new_empty((n, num_samples), dtype=torch.int32),
                teacher.new_empty((n, num_samples), dtype=torch.float32),
                teacher.new_empty((n,), dtype=torch.float32))

    @torch.library.register_fake("distill_ops_native::teacher_sample_draws")
    def _teacher_sample_draws_fake(teacher, num_samples, inv_prop, seed_key):
        return teacher.new_empty((teacher.shape[0], num_samples), dtype=torch.int64)


def sparse_forward(student, ids, logprobs, tail_logmass, labels, *, divergence, mix, mode,
                   temperature, target_scale, soft_coef, hard_coef, ignore_index, grad, grad_scale):
    """reference_sparse.sparse_forward's contract, run by the compiled kernels. The weights (N x k,
    small) are handed over in float32, or float64 when the call computes in float64."""
    wide = torch.float64 if torch.float64 in (student.dtype, logprobs.dtype) else torch.float32
    lp = logprobs.to(wide).contiguous()
    tail = None if tail_logmass is None else tail_logmass.to(wide).contiguous()
    scale = None if grad_scale is None else grad_scale.to(wide)
    bits = reference_sparse.target_bits(ids, student.shape[1]) if mode == MODE_TAIL else None
    return OPS.sparse_forward(
        student, ids.to(torch.int32).contiguous(), lp, tail,
        None if labels is None else labels.contiguous(), grad, scale, int(divergence), float(mix),
        int(mode), float(temperature), float(target_scale), float(soft_coef), float(hard_coef),
        int(ignore_index), bits)


def topk_forward(teacher: torch.Tensor, k: int, *, temperature: float):
    """reference_sparse.topk_forward's contract, run by the compiled kernels."""
    return OPS.teacher_topk(teacher, int(k), float(temperature))


def sample_forward(teacher: torch.Tensor, num_samples: int, *, temperature: float,
                   proposal_temperature: float, seed: int):
    """reference_sparse.sample_forward's contract, run by the compiled kernels: inv_prop and delta
    are rounded to the compute dtype the way the reference rounds them, so the draws agree. On the
    CPU one kernel draws and merges; on CUDA the kernel draws and reference_sparse.merge_sampled
    merges the duplicates (a few small sorts of (N, num_samples))."""
    from ..targets import rng

    dtype = torch.float64 if teacher.dtype == torch.float64 else torch.float32
    inv_prop = torch.tensor(1.0 / (temperature * proposal_temperature), dtype=dtype)
    delta = torch.tensor(1.0 / temperature, dtype=dtype) - inv_prop
    key = rng.seed_key(seed)
    if teacher.device.type in SAMPLE_MERGED_IN_KERNEL:
        return OPS.teacher_sample(
            teacher, int(num_samples), float(inv_prop), float(delta), key)
    return merge_sampled(teacher, sample_draws(teacher, num_samples, inv_prop, key), delta)


def sample_draws(teacher: torch.Tensor, num_samples: int, inv_prop: torch.Tensor,
                 key: int) -> torch.Tensor:
    """The raw draws (int64 (N, num_samples)) of teacher_sample, duplicates not merged."""
    return OPS.teacher_sample_draws(teacher, int(num_samples),
                                                             float(inv_prop), key)


