"""The distillation loss fused with both models' output projections (lm_heads).

``kd_loss`` needs the student and teacher logits, two N x V tensors: at V = 128256 they are most of
a training step's memory. ``fused_linear_kd_loss`` takes the last hidden states and the lm_head
weights instead, and walks the tokens in chunks: per chunk it projects both sides to logits, runs
the fused kernel, which writes d loss / d student-logits into the student chunk's own buffer, and
turns that gradient into the gradients of the student hidden states, weight and bias with two
GEMMs. Only one chunk of logits per side exists at a time; the gradients are computed in the
forward and only scaled in the backward (as Liger-Kernel's and TRL's fused-linear losses do).

Numerics: the logits are computed in the autocast dtype when autocast is on (as ``F.linear`` would),
else in the inputs' dtype; the kernels accumulate in float32; the weight gradient is accumulated
over the chunks in float32 when the weight is not in the compute dtype, else in its own dtype.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

from . import _validate as check
from . import backends
from ._dtensor import gathered, is_dtensor
from .constants import needs_labels
from .functional import Scalar, loss_constants
from .ops import scalar_args
from .ops.fused_grad import (REDUCTIONS, defers_mean, grad_scale_for, once_differentiable,
                              scale_saved_grad)
from .ops.fused_linear_chunks import run_chunks, run_chunks_traced
from .sparse import SparseTargets, prepare_sparse_call

FUSED_REDUCTIONS = ("sum", "mean", "batchmean")


def _compute_dtype(h: torch.Tensor, w: torch.Tensor, h_name: str, w_name: str) -> torch.dtype:
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if h.dtype != w.dtype:
        raise ValueError(f"{h_name} is {h.dtype} but {w_name} is {w.dtype}: outside autocast "
                         "they must have one dtype (as for F.linear)")
    return h.dtype


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, b_s, kind, targets, labels, consts, reduction, chunk, backend,
                needs, wide, entropy=None, held=None):
        n = h_s.shape[0]
        red = REDUCTIONS.index(reduction)
        scale = grad_scale_for(red, labels, consts[-1], n, h_s.device, wide=wide)
        # float16: the mean's 1/N waits for the backward, as in the logits ops (fused_grad.
        # defers_mean); the gradients are then sums over the tokens (weight and bias in float32)
        defer = defers_mean(h_s.dtype) and scale is not None
        # Compiled, the loop is one custom op: traced, it would pin N (a graph per token count)
        # (``held``, tensor hyperparameters, comes only compiled: ops/scalar_args.py)
        loop = run_chunks_traced if torch.compiler.is_compiling() else run_chunks
        total, grad_h, grad_w, grad_b, ent = loop(
            kind, h_s, w_s, b_s, targets, labels, consts, scale, chunk, backend, needs, defer,
            wide, entropy is not None, **({} if held is None else {"held": held}))
        if entropy is not None:   # a list: the student's entropy sum
            entropy.append(ent)
        loss = total if scale is None else total * scale.to(total.dtype)
        # Saved, not kept as attributes: autograd frees them after the backward (the loss tensor
        # may outlive it, and these are N x H and V x H), or keeps them for another backward
        # with retain_graph=True.
        ctx.dtypes = (w_s.dtype, None if b_s is None else b_s.dtype)
        ctx.save_for_backward(grad_h, grad_w, grad_b, scale if defer else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        *saved, left_out = ctx.saved_tensors
        if left_out is not None:   # the float16 forward's deferred 1/N
            grad_loss = grad_loss * left_out
        out = []
        for g, dtype in zip(saved, (None,) + ctx.dtypes):
            if g is not None:
                g = scale_saved_grad(g, grad_loss)
                g = g if dtype is None else g.to(dtype)
            out.append(once_differentiable(g, "fused_linear_kd_loss"))
        return tuple(out) + (None,) * 11


def _hidden_and_head(side: str, hidden, weight) -> tuple:
    """One side's hidden states (..., H) and lm_head weight (V, H), checked (errors name
    ``<side>_hidden`` / ``<side>_weight``)."""
    h_name, w_name = f"{side}_hidden", f"{side}_weight"
    h = check.float_tensor(h_name, hidden)
    if is_dtensor(h):
        raise ValueError(f"{h_name} is a DTensor: pass this rank's hidden states as a plain tensor "
                         "(an FSDP2 lm_head weight and bias may be DTensors, gathered here)")
    if h.dim() < 1 or h.shape[-1] < 1:
        raise ValueError(f"{h_name} must have shape (..., H) with H >= 1, got {tuple(h.shape)}")
    # FSDP2 (_dtensor.py): gathered in the hidden states' dtype, as under its mixed precision
    w = gathered(check.float_tensor(w_name, weight), _gather_dtype(h))
    check.same_device(w_name, w, h_name, h)
    if w.dim() != 2 or w.shape[1] != h.shape[-1]:
        raise ValueError(f"{w_name} must have shape (V, {h.shape[-1]}) to project the hidden "
                         f"states, got {tuple(w.shape)}")
    if w.shape[0] < 1:
        raise ValueError(f"{w_name} has an empty vocabulary (shape {tuple(w.shape)}): V must be "
                         ">= 1")
    return h, w


def _gather_dtype(h: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype a DTensor lm_head is gathered in: the hidden states' (FSDP2's param_dtype),
    except under autocast, which picks the compute dtype itself."""
    return None if torch.is_autocast_enabled(h.device.type) else h.dtype


def _student_side(student_hidden, student_weight, student_bias, chunk_size):
    """Checks of the student's hidden states, lm_head and chunk size shared by both fused-linear
    losses: (hidden, weight, bias, vocabulary size)."""
    hs, ws = _hidden_and_head("student", student_hidden, student_weight)
    bs = _check_bias("student_bias", student_bias, hs, ws, "student_weight")
    check_chunk_size(chunk_size)
    return hs, ws, bs, ws.shape[0]


def check_chunk_size(chunk_size: object) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _check_bias(name, b, hs, w, w_name):
    """A (V,) bias on hs's device (gathered if an FSDP2 DTensor; returned); outside autocast in
    its weight's dtype, as F.linear requires (the projection would otherwise round a float64 bias
    to float32 without a word)."""
    if b is not None:
        b = gathered(check.float_tensor(name, b), _gather_dtype(hs))
        check.same_device(name, b, "student_hidden", hs)
        if tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{name} must have shape ({w.shape[0]},), got {tuple(b.shape)}")
        if b.dtype != w.dtype and not torch.is_autocast_enabled(hs.device.type):
            raise ValueError(f"{name} is {b.dtype} but {w_name} is {w.dtype}: outside autocast "
                             "they must have one dtype (as for F.linear)")
    return b


def _apply(hs, ws, student_bias, kind, targets, labels, consts, reduction, chunk_size, name,
           entropy=None, held=None):
    """Flatten, pick the compute dtype, and run the autograd Function (``entropy``: a list that
    gets the student's entropy sum; dense only; ``held``: run_chunks_traced's). The loop picks
    the default chunk size itself (chunk 0): computed here from N, it would pin N under
    torch.compile."""
    dt_s = _compute_dtype(hs, ws, "student_hidden", "student_weight")
    # The loss is float64 when the kernels see float64: the student's chunk of logits (the dense
    # teacher's is cast to it) or the sparse log-weights. The fake kernel declares this dtype, so
    # it must be the one the kernels return (a float64 teacher is not).
    wide = dt_s == torch.float64 or (kind == "sparse" and targets[1].dtype == torch.float64)
    h_s2 = hs.reshape(-1, hs.shape[-1])
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hs.requires_grad, grad_on and ws.requires_grad,
             grad_on and student_bias is not None and student_bias.requires_grad)
    # The projections run in the compute dtype chosen above, with autocast off inside.
    with torch.autocast(hs.device.type, enabled=False) if torch.is_autocast_enabled(
            hs.device.type) else contextlib.nullcontext():
        return _FusedLinear.apply(h_s2.to(dt_s), ws, student_bias, kind, targets, labels, consts,
                                  reduction, chunk_size or 0, name, needs, wide, entropy, held)


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    divergence: str = "forward_kl",
    temperature: Scalar = 1.0,
    beta: Scalar = 0.5,
    alpha: Scalar = 0.1,
    hard_weight: Scalar = 0.0,
    soft_weight: Scalar = 1.0,
    scale_temperature: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``kd_loss(student_hidden @ student_weight.T + student_bias, teacher_hidden @
    teacher_weight.T + teacher_bias, ...)`` without either N x V logits tensor.

    Args:
        student_hidden: (..., H_s) the student's last hidden states (after its final norm); the
            gradient flows into it, into ``student_weight`` and into ``student_bias``.
        student_weight: (V, H_s) the student's lm_head weight.
        teacher_hidden: (..., H_t) the teacher's, same leading shape; never differentiated.
        teacher_weight: (V, H_t) the teacher's lm_head weight (same V; H may differ).
        student_bias, teacher_bias: optional (V,) lm_head biases.
        labels: optional integer (...) hard labels, as for ``kd_loss``.
        reduction: ``sum``, ``mean`` (over non-ignored tokens; 0 if all are ignored) or
            ``batchmean`` (sum over the number of tokens). (No ``none``: the gradients are made in
            the forward for a scalar loss.)
        chunk_size: tokens per chunk; default: the most whose logits take at most 256 MiB per side.
        The other keywords are ``kd_loss``'s, less ``vocab`` and ``inplace_grad``.

    Returns:
        The scalar loss (float32; float64 for float64 inputs).
    """
    return _dense_call(student_hidden, student_weight, teacher_hidden, teacher_weight,
                       student_bias=student_bias, teacher_bias=teacher_bias, labels=labels,
                       divergence=divergence, temperature=temperature, beta=beta, alpha=alpha,
                       hard_weight=hard_weight, soft_weight=soft_weight,
                       scale_temperature=scale_temperature, ignore_index=ignore_index,
                       reduction=reduction, softcap=softcap, chunk_size=chunk_size,
                       backend=backend)


def _dense_call(student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias,
                teacher_bias, labels, divergence, temperature, beta, alpha, hard_weight,
                soft_weight, scale_temperature, ignore_index, reduction, softcap, chunk_size,
                backend, entropy: Optional[list] = None) -> torch.Tensor:
    """fused_linear_kd_loss; ``entropy``, a list, also collects the student's entropy sums."""
    hs, ws, student_bias, vocab_size = _student_side(student_hidden, student_weight, student_bias,
                                                     chunk_size)
    ht, wt = _hidden_and_head("teacher", teacher_hidden, teacher_weight)
    check.leading_shape("teacher_hidden", ht, "student_hidden", hs)
    check.same_device("teacher_hidden", ht, "student_hidden", hs)
    if vocab_size != wt.shape[0]:
        raise ValueError(f"teacher_weight has vocabulary {wt.shape[0]} but student_weight has "
                         f"{vocab_size}; slice both weights to the common vocabulary")
    teacher_bias = _check_bias("teacher_bias", teacher_bias, hs, wt, "teacher_weight")
    hyper, held = scalar_args.resolve(dict(temperature=temperature, beta=beta, alpha=alpha,
                                           soft_weight=soft_weight, hard_weight=hard_weight))
    code, mix, tau, cap, soft_coef, hard_weight = loss_constants(
        divergence=divergence, **scalar_args.stand_ins(hyper),
        scale_temperature=scale_temperature, ignore_index=ignore_index, softcap=softcap,
        reduction=reduction, backend=backend, reductions=FUSED_REDUCTIONS)
    label_rows = check.labels(labels, hs, vocab_size, ignore_index)   # shape: hs's leading shape
    needs_labels(hard_weight, label_rows)
    dt_t = _compute_dtype(ht, wt, "teacher_hidden", "teacher_weight")
    name = backends.resolve(backend, hs.device)
    targets = (ht.reshape(-1, ht.shape[-1]).detach().to(dt_t), wt.detach(),
               None if teacher_bias is None else teacher_bias.detach())
    consts = (code, mix, tau, cap, soft_coef, hard_weight, ignore_index)
    return _apply(hs, ws, student_bias, "dense", targets, label_rows, consts, reduction,
                  chunk_size, name, entropy=entropy,
                  held=_held(hyper, held, divergence, "renorm", scale_temperature))


def _held(hyper: dict, held: bool, divergence: str, tail: str, scale_temperature: bool):
    """run_chunks_traced's ``held`` for tensor hyperparameters (compiled), else None."""
    return (scalar_args.pack(hyper), divergence, tail, scale_temperature) if held else None


def fused_linear_sparse_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    target_ids: Union[torch.Tensor, SparseTargets],
    target_logprobs: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    divergence: str = "forward_kl",
    temperature: Scalar = 1.0,
    tail: str = "renorm",
    tail_logmass: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    hard_weight: Scalar = 0.0,
    soft_weight: Scalar = 1.0,
    scale_temperature: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    target_temperature: Optional[float] = None,
    beta: Scalar = 0.5,
    alpha: Scalar = 0.1,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``sparse_kd_loss(student_hidden @ student_weight.T + student_bias, target_ids,
    target_logprobs, ...)`` without the N x V student logits: the sparse teacher targets (top-k,
    sampled, or from the offline cache) against the student's lm_head, chunk by chunk.

    Args:
        student_hidden: (..., H) the student's last hidden states; the gradient flows into it,
            into ``student_weight`` (V, H) and into ``student_bias`` (V,).
        target_ids, target_logprobs, tail_logmass: as for ``sparse_kd_loss`` (or a SparseTargets
            as ``target_ids``), with the hidden states' leading shape.
        reduction: ``sum``, ``mean`` or ``batchmean`` (no ``none``).
        chunk_size: tokens per chunk (default: the most whose logits take at most 256 MiB).
        The other keywords are ``sparse_kd_loss``'s.
    """
    hs, ws, student_bias, vocab_size = _student_side(student_hidden, student_weight, student_bias,
                                                     chunk_size)
    # The sparse checks need only the logits' shape, dtype and device: a zero-stride stand-in.
    shape_ref = hs.new_empty(()).expand(*hs.shape[:-1], vocab_size)
    hyper, held = scalar_args.resolve(dict(temperature=temperature, beta=beta, alpha=alpha,
                                           soft_weight=soft_weight, hard_weight=hard_weight))
    call = prepare_sparse_call(
        shape_ref, target_ids, target_logprobs, divergence=divergence,
        **scalar_args.stand_ins(hyper), tail=tail, tail_logmass=tail_logmass, labels=labels,
        scale_temperature=scale_temperature, ignore_index=ignore_index, reduction=reduction,
        target_temperature=target_temperature, backend=backend, reductions=FUSED_REDUCTIONS)
    return _apply(hs, ws, student_bias, "sparse", (call.ids, call.logprobs, call.tail),
                  call.labels, call.consts, reduction, chunk_size, call.backend,
                  held=_held(hyper, held, divergence, tail, scale_temperature))
