"""The dense distillation loss as a torch.library custom op, with its fake kernel and autograd.

The forward computes the loss and, when the student needs one, its gradient in the same streaming
passes (the backward then only scales it by the incoming gradient). The op is functional, so
torch.compile traces it without a graph break; the in-place-gradient variant, which writes the
gradient into the student-logits buffer, is an autograd.Function for eager mode.
"""

# (No `from __future__ import annotations`: torch 2.4's custom_op reads the annotations as
# objects, not strings.)

from typing import Optional

import torch

from .. import backends
from . import scalar_args
from .fused_grad import (InplaceGradKD, deferred_scale, fake_loss_and_grad, grad_buffer,
                         grad_scale_for, kernel_grad_scale, reduce_rows,
                         register_saved_grad_autograd)


def _run(student, teacher, labels, divergence, mix, temperature, softcap, soft_coef, hard_coef,
         ignore_index, reduction, grad, backend):
    scale = grad_scale_for(reduction, labels, ignore_index, student.shape[0], student.device,
                           wide=torch.float64 in (student.dtype, teacher.dtype))
    rows = backends.get(backend, "dense_forward")(
        student, teacher, labels, divergence=divergence, mix=mix, temperature=temperature,
        softcap=softcap, soft_coef=soft_coef, hard_coef=hard_coef, ignore_index=ignore_index,
        grad=grad, grad_scale=kernel_grad_scale(scale, grad),
    )
    return reduce_rows(rows, reduction, scale)


def _deferred_at(ignore_at: int):
    """fused_grad.deferred_scale of an op's inputs (student, teacher, labels, ...) whose
    ignore_index is input ``ignore_at`` and reduction the next."""
    def deferred(inputs: tuple) -> Optional[torch.Tensor]:
        student, teacher, labels = inputs[:3]
        return deferred_scale(student, inputs[ignore_at + 1], labels, inputs[ignore_at],
                              wide=torch.float64 in (student.dtype, teacher.dtype))
    return deferred


# dense_kd's, and InplaceGradKD's (its inputs follow the same order)
_deferred = _deferred_at(9)


@torch.library.custom_op("distill_ops::dense_kd", mutates_args=())
def dense_kd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    divergence: int,
    mix: float,
    temperature: float,
    softcap: float,
    soft_coef: float,
    hard_coef: float,
    ignore_index: int,
    reduction: int,
    need_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, grad): loss reduced as asked; grad = d loss / d student (empty if not needed)."""
    return _loss_and_grad(student, teacher, labels, divergence, mix, temperature, softcap,
                          soft_coef, hard_coef, ignore_index, reduction, need_grad, backend)


def _loss_and_grad(student, teacher, labels, divergence, mix, temperature, softcap, soft_coef,
                   hard_coef, ignore_index, reduction, need_grad, backend):
    grad = grad_buffer(student, need_grad)
    loss = _run(student, teacher, labels, divergence, mix, temperature, softcap, soft_coef,
                hard_coef, ignore_index, reduction, grad if need_grad else None, backend)
    return loss, grad


@dense_kd.register_fake
def _(student, teacher, labels, divergence, mix, temperature, softcap, soft_coef, hard_coef,
      ignore_index, reduction, need_grad, backend):
    return fake_loss_and_grad(student, torch.float64 in (student.dtype, teacher.dtype), reduction,
                              need_grad)


register_saved_grad_autograd(dense_kd, need_grad_at=11, what="a loss", deferred=_deferred)


def inplace_dense_kd(student: torch.Tensor, *args) -> torch.Tensor:
    """dense_kd's loss, eager only, with the gradient written over ``student`` (InplaceGradKD);
    ``args`` are dense_kd's from ``teacher`` to ``reduction``, then the backend."""
    return InplaceGradKD.apply(_run, _deferred, student, *args)


@torch.library.custom_op("distill_ops::dense_kd_scalars", mutates_args=(),
                         **scalar_args.OP_TAGS)
def dense_kd_scalars(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    scalars: torch.Tensor,
    divergence: str,
    scale_temperature: bool,
    softcap: float,
    ignore_index: int,
    reduction: int,
    need_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dense_kd with the temperature, beta, alpha and weights packed in ``scalars``
    (ops/scalar_args.py), read and checked when it runs: one compiled graph for all values."""
    code, mix, tau, soft_coef, hard_coef = scalar_args.read_constants(
        scalars, student, labels, divergence=divergence, scale_temperature=scale_temperature)
    return _loss_and_grad(student, teacher, labels, code, mix, tau, softcap, soft_coef, hard_coef,
                          ignore_index, reduction, need_grad, backend)


@dense_kd_scalars.register_fake
def _(student, teacher, labels, scalars, divergence, scale_temperature, softcap, ignore_index,
      reduction, need_grad, backend):
    return fake_loss_and_grad(student, torch.float64 in (student.dtype, teacher.dtype), reduction,
                              need_grad)


register_saved_grad_autograd(dense_kd_scalars, need_grad_at=9, what="a loss",
                             deferred=_deferred_at(7))
