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


def _deferred(inputs: tuple) -> Optional[torch.Tensor]:
    """fused_grad.deferred_scale of dense_kd's inputs (student, teacher, labels, ...,
    ignore_index, reduction, ...), or of InplaceGradKD's, which follow the same order."""
    student, teacher, labels = inputs[:3]
    return deferred_scale(student, inputs[10], labels, inputs[9],
                          wide=torch.float64 in (student.dtype, teacher.dtype))


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
