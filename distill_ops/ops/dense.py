"""The dense distillation loss as a torch.library custom op, with its fake kernel and autograd.

The forward computes the loss and, when the student needs one, its gradient in the same streaming
passes (the backward then only scales it by the incoming gradient). The op is functional, so
torch.compile traces it without a graph break; the in-place-gradient variant, which writes the
gradient into the student-logits buffer, is an autograd.Function for eager mode.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import backends

# Reductions, as the op's integer argument.
REDUCTIONS = ("none", "sum", "mean", "batchmean")
NONE, SUM, MEAN, BATCHMEAN = range(4)


def grad_scale_for(reduction: int, labels: Optional[torch.Tensor], ignore_index: int, n: int,
                   device: torch.device, wide: bool = False) -> Optional[torch.Tensor]:
    """The factor each row's gradient carries: 1/count for mean, 1/N for batchmean (no host sync).
    float32, or float64 when ``wide`` (a float64 call: 1/3 rounded to float32 is 3e-8 off)."""
    dtype = torch.float64 if wide else torch.float32
    if reduction == MEAN:
        if labels is None:
            count = torch.tensor(float(max(n, 1)), dtype=torch.float64, device=device)
        else:
            count = (labels != ignore_index).sum().clamp_min(1).to(torch.float64)
        return count.reciprocal().to(dtype)
    if reduction == BATCHMEAN:
        return torch.tensor(1.0 / max(n, 1), dtype=dtype, device=device)
    return None


def reduce_rows(rows: torch.Tensor, reduction: int, scale: Optional[torch.Tensor]) -> torch.Tensor:
    if reduction == NONE:
        return rows
    total = rows.sum()
    return total if scale is None else total * scale.to(total.dtype)


def _run(student, teacher, labels, divergence, mix, temperature, softcap, soft_coef, hard_coef,
         ignore_index, reduction, grad, backend):
    scale = grad_scale_for(reduction, labels, ignore_index, student.shape[0], student.device,
                           wide=torch.float64 in (student.dtype, teacher.dtype))
    rows = backends.get(backend, "dense_forward")(
        student, teacher, labels, divergence=divergence, mix=mix, temperature=temperature,
        softcap=softcap, soft_coef=soft_coef, hard_coef=hard_coef, ignore_index=ignore_index,
        grad=grad, grad_scale=scale,
    )
    return reduce_rows(rows, reduction, scale)


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
    grad = torch.empty_like(student) if need_grad else student.new_empty(0)
    loss = _run(student, teacher, labels, divergence, mix, temperature, softcap, soft_coef,
                hard_coef, ignore_index, reduction, grad if need_grad else None, backend)
    return loss, grad


@dense_kd.register_fake
def _(student, teacher, labels, divergence, mix, temperature, softcap, soft_coef, hard_coef,
      ignore_index, reduction, need_grad, backend):
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    shape = (student.shape[0],) if reduction == NONE else ()
    loss = student.new_empty(shape, dtype=dtype)
    grad = torch.empty_like(student) if need_grad else student.new_empty(0)
    return loss, grad


def _setup_context(ctx, inputs, output):
    ctx.need_grad = inputs[11]
    ctx.save_for_backward(output[1])
    # The gradient output is a by-product, never differentiated: without this, autograd would
    # materialise an N x V zero tensor for it in every backward.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def scale_saved_grad(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """grad * grad_loss (scalar, or one value per row), skipping the pass when it is exactly 1."""
    if grad_loss.dim() == 0:
        if not torch.compiler.is_compiling() and bool(grad_loss == 1):
            return grad
        return grad * grad_loss.to(grad.dtype)
    return grad * grad_loss.to(grad.dtype).unsqueeze(-1)


def _backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 13
    if not ctx.need_grad:
        raise RuntimeError("distill_ops: backward through a loss computed without need_grad")
    return (scale_saved_grad(grad, grad_loss),) + (None,) * 12


dense_kd.register_autograd(_backward, setup_context=_setup_context)


class InplaceDenseKD(torch.autograd.Function):
    """Eager-mode variant that writes the gradient into the student-logits buffer.

    After the forward the student logits hold the gradient, not the logits. Their version counter is
    bumped, so autograd raises if anything else had saved them for its backward.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, divergence, mix, temperature, softcap, soft_coef,
                hard_coef, ignore_index, reduction, backend):
        loss = _run(student, teacher, labels, divergence, mix, temperature, softcap, soft_coef,
                    hard_coef, ignore_index, reduction, student, backend)
        torch.autograd.graph.increment_version(student)
        # Kept as an attribute, not saved: save_for_backward would reject the bumped version.
        ctx.grad = student
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, ctx.grad = ctx.grad, None
        return (scale_saved_grad(grad, grad_loss),) + (None,) * 11
