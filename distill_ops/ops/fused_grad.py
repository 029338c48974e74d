"""What the fused (loss, gradient) custom ops share (ops/dense.py, ops/sparse.py).

Their forward computes the loss and d loss / d student in the same streaming passes; the backward
only scales that saved gradient by the incoming one. Here: the reduction and the factor each row's
gradient carries for it, the autograd of the functional ops, and the eager autograd.Function that
writes the gradient over the student logits instead.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

# Reductions, as the ops' integer argument.
REDUCTIONS = ("none", "sum", "mean", "batchmean")
NONE, SUM, MEAN, BATCHMEAN = range(4)


def grad_scale_for(reduction: int, labels: Optional[torch.Tensor], ignore_index: int, n: int,
                   device: torch.device, wide: bool = False) -> Optional[torch.Tensor]:
    """The factor each row's gradient carries: 1/count for mean, 1/N for batchmean (no host sync).
    float32, or float64 when ``wide`` (a float64 call: 1/3 rounded to float32 is 3e-8 off).
    Made with torch.full, a fill kernel, not torch.tensor, a copy from host memory, which a CUDA
    graph capture (torch.compile's reduce-overhead) does not allow."""
    dtype = torch.float64 if wide else torch.float32
    if reduction == MEAN:
        if labels is None:
            count = torch.full((), float(max(n, 1)), dtype=torch.float64, device=device)
        else:
            count = (labels != ignore_index).sum().clamp_min(1).to(torch.float64)
        return count.reciprocal().to(dtype)
    if reduction == BATCHMEAN:
        return torch.full((), 1.0 / max(n, 1), dtype=dtype, device=device)
    return None


def defers_mean(dtype: torch.dtype) -> bool:
    """Whether a gradient of ``dtype`` is written without the mean's 1/count, which the backward
    applies instead, with the incoming gradient (in float32): float16's. Folded in in the forward,
    its small entries fall below float16's range (6e-8) before GradScaler's factor reaches them
    (N = 4096, V = 8192: 69% of them flushed to 0, the gradient 12% off against eager's 2e-4).
    bfloat16 has float32's range: nothing to defer."""
    return dtype == torch.float16


def kernel_grad_scale(scale: Optional[torch.Tensor],
                      grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The factor the kernel folds into the gradient it writes: grad_scale_for's 1/count, or
    None where it waits for the backward (defers_mean; deferred_scale gives it there)."""
    return None if grad is not None and defers_mean(grad.dtype) else scale


def deferred_scale(student: torch.Tensor, reduction: int, labels: Optional[torch.Tensor],
                   ignore_index: int, wide: bool) -> Optional[torch.Tensor]:
    """The factor kernel_grad_scale left out of the student's gradient, for the backward to apply
    with the incoming gradient (in float32); None when nothing was left out."""
    if not defers_mean(student.dtype):
        return None
    return grad_scale_for(reduction, labels, ignore_index, student.shape[0], student.device,
                          wide=wide)


def reduce_rows(rows: torch.Tensor, reduction: int, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """The per-row losses reduced as asked; ``scale`` is grad_scale_for's factor."""
    if reduction == NONE:
        return rows
    total = rows.sum()
    return total if scale is None else total * scale.to(total.dtype)


def scale_saved_grad(grad: torch.Tensor, grad_loss: torch.Tensor,
                     inplace: bool = False) -> torch.Tensor:
    """grad * grad_loss (scalar, or one value per row), skipping the pass when it is exactly 1.
    ``inplace``: the saved gradient is dead after this backward, so it is scaled in its own memory
    (eager mode only): out of place, a backward of ``w * loss`` (gradient accumulation, a loss
    weight, GradScaler, the trainer's 1 / tokens) made a second N x V tensor.

    The test reads the value, so it runs in eager mode only: on a plain tensor outside the
    compiler. AOT autograd traces this backward with functional or fake tensors, and there
    torch.compiler.is_compiling() is False in some releases (torch 2.11: `make test-twin`)."""
    eager = type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling()
    if grad_loss.dim() == 0 and eager and bool(grad_loss == 1):
        return grad
    # in place, the saved gradient being dead after this backward: no second N x V
    return scale_by(grad, grad_loss, inplace=inplace and eager)


# Elements of a 16-bit CPU gradient that one multiply by a per-row factor covers: the CPU kernel
# converts them to float32 temporaries (16 MiB at this size), so a whole N x V one is never made.
CPU_FACTOR_CHUNK = 1 << 22


def scale_by(grad: torch.Tensor, factor: torch.Tensor, inplace: bool) -> torch.Tensor:
    """grad * factor (0-dim, or one value per row of a 2-D grad), in grad's dtype, the factor
    never rounded to a 16-bit grad's dtype first: in float16 a factor past 65504 is inf (GradScaler
    starts at 65536), and a bfloat16 1/3 is 0.2% off. The product is computed in float32 and
    rounded once, without a float32 N x V tensor: on the CPU a 0-dim factor is read as float32 by
    the multiply itself and a per-row one goes in row chunks (CPU_FACTOR_CHUNK); on a GPU a factor
    with a dimension makes the multiply's common dtype float32, which the kernel converts to in
    registers (a 0-dim one on a GPU would be converted to grad's dtype before the multiply)."""
    if factor.dim() == 1:
        factor = factor.unsqueeze(-1)
    if grad.dtype not in (torch.float16, torch.bfloat16):
        factor = factor.to(grad.dtype)
        return grad.mul_(factor) if inplace else grad * factor
    if factor.dtype not in (torch.float32, torch.float64):
        factor = factor.float()
    if type(grad) is not torch.Tensor or torch.compiler.is_compiling():
        # traced (AOT autograd's backward): no Python loop over a symbolic row count, which
        # would specialise it (one graph per N); the compiler fuses the product and the cast
        return (grad.to(factor.dtype) * factor).to(grad.dtype)
    out = grad if inplace else torch.empty_like(grad)
    if grad.device.type != "cpu":
        return torch.mul(grad, factor.reshape(1) if factor.dim() == 0 else factor, out=out)
    if factor.dim() == 0:
        return torch.mul(grad, factor.cpu(), out=out)
    rows = max(1, CPU_FACTOR_CHUNK // max(grad.shape[-1], 1))
    for lo in range(0, grad.shape[0], rows):
        torch.mul(grad[lo:lo + rows], factor[lo:lo + rows], out=out[lo:lo + rows])
    return out


def once_differentiable(g: torch.Tensor, what: str) -> torch.Tensor:
    """``g`` as a backward returns it; under ``create_graph=True`` (grad mode on in the backward),
    made to raise if a second backward goes through it. The gradient was made in the forward and
    is only scaled here, so to autograd it is a constant: differentiating it again (a gradient
    penalty, a Hessian-vector product) would silently drop every second-order term of ``what``.
    (torch.autograd.function.once_differentiable does not catch this: it raises only when the
    incoming gradient itself requires grad, and autograd.grad's ones do not.)"""
    error = getattr(torch._C._functions, "DelayedError", None)
    if g is None or error is None or not torch.is_grad_enabled() or \
            torch.compiler.is_compiling():
        return g
    x = g.detach().requires_grad_(True)
    return error(f"distill_ops: {what} is not twice differentiable (its gradient is made in the "
                 "forward): no second backward through it (create_graph=True)", 1)(x)


def grad_buffer(student: torch.Tensor, need_grad: bool) -> torch.Tensor:
    """The op's gradient output: student-shaped, or empty when no gradient is wanted."""
    return torch.empty_like(student) if need_grad else student.new_empty(0)


def fake_loss_and_grad(student: torch.Tensor, wide: bool, reduction: int,
                       need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The fake kernel's outputs: the loss (one per row for 'none', else a scalar; float64 for a
    ``wide`` call, float32 otherwise) and grad_buffer's gradient."""
    shape = (student.shape[0],) if reduction == NONE else ()
    loss = student.new_empty(shape, dtype=torch.float64 if wide else torch.float32)
    return loss, grad_buffer(student, need_grad)


def register_saved_grad_autograd(op, need_grad_at: int, what: str,
                                 deferred: Callable[[tuple], Optional[torch.Tensor]]) -> None:
    """Autograd for a custom op ``(student, ...) -> (loss, grad)`` whose input ``need_grad_at`` says
    whether ``grad`` was computed: the backward is ``grad * grad_loss`` for the student (times
    ``deferred(inputs)``, the factor the forward left out of the gradient, when not None),
    nothing for the other inputs. ``what`` names the loss in the error for a backward without a
    gradient."""
    def setup_context(ctx, inputs, output):
        ctx.n_inputs = len(inputs)
        ctx.need_grad = inputs[need_grad_at]
        ctx.save_for_backward(output[1], deferred(inputs))
        # The gradient output is a by-product, never differentiated: without this, autograd would
        # materialise an N x V zero tensor for it in every backward.
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, _grad_of_grad):
        if grad_loss is None:
            return (None,) * ctx.n_inputs
        if not ctx.need_grad:
            raise RuntimeError(f"distill_ops: backward through {what} computed without need_grad")
        grad, left_out = ctx.saved_tensors
        if left_out is not None:
            grad_loss = grad_loss * left_out
        # Scale in place unless the graph is kept for another backward (retain_graph=True), which
        # reads the saved gradient again. (A private query: a release without it gets the out of
        # place product, as before. Compiled autograd traces this backward, and dynamo cannot
        # trace the query (fullgraph raised, else 3 graph breaks): traced, the product is out of
        # place anyway.)
        query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
        keep = query() if query is not None and not torch.compiler.is_compiling() else None
        g = scale_saved_grad(grad, grad_loss, inplace=keep is False)
        if keep and g is grad:
            # The unit shortcut handed out the saved buffer itself: as .grad, a later in-place
            # edit (the next backward's accumulation, clip_grad_norm_) would change what the
            # retained graph reads again.
            g = grad.clone()
        return (once_differentiable(g, what),) + (None,) * (ctx.n_inputs - 1)

    op.register_autograd(backward, setup_context=setup_context)


class InplaceGradKD(torch.autograd.Function):
    """Eager-mode variant of the fused ops that writes the gradient into the student-logits buffer.

    ``apply(run, deferred, student, *args)`` calls ``run(student, *args[:-1], student, args[-1])``:
    the ops' ``_run`` takes the gradient buffer second to last, before the backend;
    ``deferred((student, *args))`` is the factor the forward left out of the gradient (the ops'
    custom-op autograd's), applied in the backward. After the forward the
    student logits hold the gradient, not the logits. Their version counter is bumped, so autograd
    raises if anything else had saved them for its backward.
    """

    @staticmethod
    def forward(ctx, run: Callable[..., torch.Tensor],
                deferred: Callable[[tuple], Optional[torch.Tensor]], student: torch.Tensor, *args):
        ctx.left_out = deferred((student,) + args)
        loss = run(student, *args[:-1], student, args[-1])
        torch.autograd.graph.increment_version(student)
        # Kept as an attribute, not saved: save_for_backward would reject the bumped version.
        ctx.grad = student
        ctx.n_args = len(args)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(
                "distill_ops: a second backward through a loss computed with inplace_grad=True "
                "(retain_graph=True): its gradient lived in the student logits' memory and went "
                "to the first backward; use inplace_grad=False to backpropagate it twice")
        if ctx.left_out is not None:
            grad_loss = grad_loss * ctx.left_out
        # In place: the buffer is the student logits' own memory and no second backward reads
        # it (the check above), so it ends holding d (grad_loss . loss) / d logits.
        g = once_differentiable(scale_saved_grad(grad, grad_loss, inplace=True), "the loss")
        return (None, None, g) + (None,) * ctx.n_args
