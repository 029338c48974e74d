"""Sparse-target ops as torch.library custom ops, with fake kernels (torch.compile traces them) and,
for the loss, autograd: the forward computes the gradient in its streaming passes, the backward only
scales it (ops/fused_grad.py, shared with ops/dense.py); inplace_sparse_kd is the eager variant
that writes the gradient over the student logits.

Dispatch: the sparse kernels (loss, top-k, sampling) exist in the reference (pure torch), Triton,
and the compiled CPU and CUDA backends. ``auto`` picks Triton on a GPU (where triton imports), the
compiled CPU kernels on the CPU (where the extension loads), the reference otherwise; the CUDA
kernels run only when named (backend="cuda": they have not been run on a GPU yet).
"""

# (No `from __future__ import annotations`: torch 2.4's custom_op reads the annotations as
# objects, not strings.)

import importlib
import os
from typing import Optional

import torch

from .. import backends
from ..constants import sparse_mode
from . import scalar_args
from .fused_grad import (InplaceGradKD, deferred_scale, fake_loss_and_grad, grad_buffer,
                         grad_scale_for, kernel_grad_scale, reduce_rows,
                         register_saved_grad_autograd)

_SPARSE_MODULES = {
    "torch": "distill_ops.backends.reference_sparse",
    "triton_loss": "distill_ops.backends.triton.sparse",
    "triton_teacher": "distill_ops.backends.triton.topk",
    "cpu": "distill_ops.backends.native",
}


def resolve(name: str, device: torch.device) -> str:
    """The backend that runs a sparse op (the loss, top-k, sampling) on ``device``, or a clear
    error. The compiled CUDA extension has kernels for all three, and ``auto`` does not pick them
    yet (they have not been run on a GPU): they take backend='cuda' explicitly."""
    explicit = name != "auto" or os.environ.get(backends.ENV_VAR, "").strip() not in ("", "auto")
    chosen = backends.resolve(name, device)
    if chosen in ("torch", "triton", "cpu") or explicit:
        return chosen
    # auto picked the compiled CUDA backend (dense kernels): fall back within the sparse backends.
    if device.type == "cuda" and backends.triton_status()[0]:
        return "triton"
    return "torch"


def _impl(backend: str, kind: str):
    if backend in ("torch", "cpu", "cuda"):
        return importlib.import_module(_SPARSE_MODULES["cpu" if backend == "cuda" else backend])
    if backend == "triton":
        return importlib.import_module(_SPARSE_MODULES[f"triton_{kind}"])
    raise RuntimeError(f"no sparse kernels for backend {backend!r}")


# ----------------------------------------------------------------------------- the loss


@torch.library.custom_op("distill_ops::sparse_kd", mutates_args=())
def sparse_kd(
    student: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    tail_logmass: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    divergence: int,
    mix: float,
    mode: int,
    temperature: float,
    target_scale: float,
    soft_coef: float,
    hard_coef: float,
    ignore_index: int,
    reduction: int,
    need_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, grad): loss reduced as asked; grad = d loss / d student (empty if not needed)."""
    return _loss_and_grad(student, ids, logprobs, tail_logmass, labels, divergence, mix, mode,
                          temperature, target_scale, soft_coef, hard_coef, ignore_index,
                          reduction, need_grad, backend)


def _loss_and_grad(student, ids, logprobs, tail_logmass, labels, divergence, mix, mode,
                   temperature, target_scale, soft_coef, hard_coef, ignore_index, reduction,
                   need_grad, backend):
    grad = grad_buffer(student, need_grad)
    loss = _run(student, ids, logprobs, tail_logmass, labels, divergence, mix, mode, temperature,
                target_scale, soft_coef, hard_coef, ignore_index, reduction,
                grad if need_grad else None, backend)
    return loss, grad


def _run(student, ids, logprobs, tail_logmass, labels, divergence, mix, mode, temperature,
         target_scale, soft_coef, hard_coef, ignore_index, reduction, grad, backend):
    """The reduced loss; d loss / d student written into ``grad`` (which may be ``student``)."""
    scale = grad_scale_for(reduction, labels, ignore_index, student.shape[0], student.device,
                           wide=torch.float64 in (student.dtype, logprobs.dtype))
    rows = _impl(backend, "loss").sparse_forward(
        student, ids, logprobs, tail_logmass, labels, divergence=divergence, mix=mix, mode=mode,
        temperature=temperature, target_scale=target_scale, soft_coef=soft_coef,
        hard_coef=hard_coef, ignore_index=ignore_index, grad=grad,
        grad_scale=kernel_grad_scale(scale, grad),
    )
    return reduce_rows(rows, reduction, scale)


def _deferred_at(ignore_at: int):
    """fused_grad.deferred_scale of an op's inputs (student, ids, logprobs, tail_logmass,
    labels, ...) whose ignore_index is input ``ignore_at`` and reduction the next."""
    def deferred(inputs: tuple) -> Optional[torch.Tensor]:
        student, logprobs, labels = inputs[0], inputs[2], inputs[4]
        return deferred_scale(student, inputs[ignore_at + 1], labels, inputs[ignore_at],
                              wide=torch.float64 in (student.dtype, logprobs.dtype))
    return deferred


# sparse_kd's, and InplaceGradKD's (its inputs follow the same order)
_deferred = _deferred_at(12)


@sparse_kd.register_fake
def _(student, ids, logprobs, tail_logmass, labels, divergence, mix, mode, temperature,
      target_scale, soft_coef, hard_coef, ignore_index, reduction, need_grad, backend):
    return fake_loss_and_grad(student, torch.float64 in (student.dtype, logprobs.dtype), reduction,
                              need_grad)


register_saved_grad_autograd(sparse_kd, need_grad_at=14, what="a sparse loss",
                             deferred=_deferred)


def inplace_sparse_kd(student: torch.Tensor, *args) -> torch.Tensor:
    """sparse_kd's loss, eager only, with the gradient written over ``student`` (InplaceGradKD);
    ``args`` are sparse_kd's from ``ids`` to ``reduction``, then the backend."""
    return InplaceGradKD.apply(_run, _deferred, student, *args)


@torch.library.custom_op("distill_ops::sparse_kd_scalars", mutates_args=(),
                         **scalar_args.OP_TAGS)
def sparse_kd_scalars(
    student: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    tail_logmass: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    scalars: torch.Tensor,
    divergence: str,
    tail: str,
    target_scale: float,
    scale_temperature: bool,
    ignore_index: int,
    reduction: int,
    need_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sparse_kd with the temperature, beta, alpha and weights packed in ``scalars``
    (ops/scalar_args.py), read and checked when it runs: one compiled graph for all values."""
    code, mix, tau, soft_coef, hard_coef = scalar_args.read_constants(
        scalars, student, labels, divergence=divergence, scale_temperature=scale_temperature)
    return _loss_and_grad(student, ids, logprobs, tail_logmass, labels, code, mix,
                          sparse_mode(tail, code), tau, target_scale, soft_coef, hard_coef,
                          ignore_index, reduction, need_grad, backend)


@sparse_kd_scalars.register_fake
def _(student, ids, logprobs, tail_logmass, labels, scalars, divergence, tail, target_scale,
      scale_temperature, ignore_index, reduction, need_grad, backend):
    return fake_loss_and_grad(student, torch.float64 in (student.dtype, logprobs.dtype), reduction,
                              need_grad)


register_saved_grad_autograd(sparse_kd_scalars, need_grad_at=12, what="a sparse loss",
                             deferred=_deferred_at(10))


# ----------------------------------------------------------------------------- the teacher side


@torch.library.custom_op("distill_ops::teacher_topk", mutates_args=())
def teacher_topk_op(
    teacher: torch.Tensor, k: int, temperature: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(backend, "teacher").topk_forward(teacher, k, temperature=temperature)


@teacher_topk_op.register_fake
def _(teacher, k, temperature, backend):
    n = teacher.shape[0]
    return (teacher.new_empty((n, k), dtype=torch.int32),
            teacher.new_empty((n, k), dtype=torch.float32),
            teacher.new_empty((n,), dtype=torch.float32))


@torch.library.custom_op("distill_ops::teacher_sample", mutates_args=())
def teacher_sample_op(
    teacher: torch.Tensor, num_samples: int, temperature: float, proposal_temperature: float,
    seed: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(backend, "teacher").sample_forward(
        teacher, num_samples, temperature=temperature,
        proposal_temperature=proposal_temperature, seed=seed)


@teacher_sample_op.register_fake
def _(teacher, num_samples, temperature, proposal_temperature, seed, backend):
    n = teacher.shape[0]
    return (teacher.new_empty((n, num_samples), dtype=torch.int32),
            teacher.new_empty((n, num_samples), dtype=torch.float32),
            teacher.new_empty((n,), dtype=torch.float32))
