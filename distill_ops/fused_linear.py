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
from typing import Optional

import torch

from . import _validate as check
from . import backends
from .functional import loss_constants
from .ops.dense import REDUCTIONS, SUM, dense_kd, grad_scale_for, scale_saved_grad

FUSED_REDUCTIONS = ("sum", "mean", "batchmean")
# A chunk's logits, per side, at most this many bytes when chunk_size is not given.
CHUNK_BYTES = 256 * 1024 * 1024


def default_chunk_size(n: int, v: int, itemsize: int) -> int:
    """The largest power of two of rows whose logits fit in CHUNK_BYTES (at least 1, at most n)."""
    rows = max(1, CHUNK_BYTES // max(v * itemsize, 1))
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(n, rows))


def _compute_dtype(h: torch.Tensor, w: torch.Tensor, h_name: str, w_name: str) -> torch.dtype:
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if h.dtype != w.dtype:
        raise ValueError(f"{h_name} is {h.dtype} but {w_name} is {w.dtype}: outside autocast "
                         "they must have one dtype (as for F.linear)")
    return h.dtype


def _project(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.mm(h, w.t()) if b is None else torch.addmm(b, h, w.t())


class _FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, consts, reduction, chunk, backend,
                needs):
        code, mix, tau, cap, soft_coef, hard_coef, ignore_index = consts
        need_h, need_w, need_b = needs
        need = need_h or need_w or need_b
        n = h_s.shape[0]
        # Eager: the backend writes the gradient over the chunk's logits (no second buffer).
        # Compiled: the functional custom op, which torch.compile traces as one node.
        compiling = torch.compiler.is_compiling()
        dense_forward = None if compiling else backends.get(backend, "dense_forward")
        red = REDUCTIONS.index(reduction)
        wide = torch.float64 in (h_s.dtype, h_t.dtype)
        scale = grad_scale_for(red, labels, ignore_index, n, h_s.device, wide=wide)
        grad_h = torch.empty_like(h_s) if need_h else None
        w_acc = None
        if need_w:
            # Accumulated in place in the weight's dtype when the GEMMs produce it; else in
            # float32 (or better), so a bf16 chunk product is not rounded again per chunk.
            acc = (w_s.dtype if w_s.dtype == h_s.dtype
                   else torch.promote_types(w_s.dtype, torch.float32))
            w_acc = torch.zeros(w_s.shape, dtype=acc, device=w_s.device)
        b_acc = (torch.zeros(b_s.shape, dtype=torch.promote_types(b_s.dtype, torch.float32),
                             device=b_s.device) if need_b else None)
        # A cast weight (autocast) is made once, not per chunk.
        ws, wt = w_s.to(h_s.dtype), w_t.to(h_t.dtype)
        bs = None if b_s is None else b_s.to(h_s.dtype)
        bt = None if b_t is None else b_t.to(h_t.dtype)
        parts = []
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            s = _project(h_s[lo:hi], ws, bs)
            # The kernels take one dtype for both sides (as kd_loss, the teacher is cast).
            t = _project(h_t[lo:hi], wt, bt).to(s.dtype)
            lab = None if labels is None else labels[lo:hi]
            if compiling:
                part, g = dense_kd(s, t, lab, code, mix, tau, cap, soft_coef, hard_coef,
                                   ignore_index, SUM, need, backend)
                parts.append(part)
                if need:
                    s = g if scale is None else g * scale.to(g.dtype)
            else:
                rows = dense_forward(
                    s, t, lab, divergence=code, mix=mix, temperature=tau, softcap=cap,
                    soft_coef=soft_coef, hard_coef=hard_coef, ignore_index=ignore_index,
                    grad=s if need else None, grad_scale=scale)
                parts.append(rows.sum())
            del t
            if need:   # s now holds d loss / d student logits for these rows
                if need_h:
                    torch.mm(s, ws, out=grad_h[lo:hi])
                if need_w:
                    if w_acc.dtype == s.dtype:
                        w_acc.addmm_(s.t(), h_s[lo:hi])
                    else:
                        w_acc.add_(torch.mm(s.t(), h_s[lo:hi]))
                if need_b:
                    b_acc.add_(s.sum(0, dtype=b_acc.dtype))
        total = (torch.stack(parts).sum() if parts
                 else h_s.new_zeros((), dtype=torch.float64 if wide else torch.float32))
        loss = total if scale is None else total * scale.to(total.dtype)
        ctx.grads = (grad_h,
                     None if w_acc is None else w_acc.to(w_s.dtype),
                     None if b_acc is None else b_acc.to(b_s.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        g_h, g_w, g_b = (None if g is None else scale_saved_grad(g, grad_loss) for g in grads)
        return (g_h, g_w, g_b) + (None,) * 9


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
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
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
        The other keywords are ``kd_loss``'s.

    Returns:
        The scalar loss (float32; float64 for float64 inputs).
    """
    hs = check.float_tensor("student_hidden", student_hidden)
    ht = check.float_tensor("teacher_hidden", teacher_hidden)
    for name, h in (("student_hidden", hs), ("teacher_hidden", ht)):
        if h.dim() < 1 or h.shape[-1] < 1:
            raise ValueError(f"{name} must have shape (..., H) with H >= 1, got {tuple(h.shape)}")
    check.leading_shape("teacher_hidden", ht, "student_hidden", hs)
    ws = check.float_tensor("student_weight", student_weight)
    wt = check.float_tensor("teacher_weight", teacher_weight)
    for name, x in (("teacher_hidden", ht), ("student_weight", ws), ("teacher_weight", wt)):
        check.same_device(name, x, "student_hidden", hs)
    for name, w, h in (("student_weight", ws, hs), ("teacher_weight", wt, ht)):
        if w.dim() != 2 or w.shape[1] != h.shape[-1]:
            raise ValueError(f"{name} must have shape (V, {h.shape[-1]}) to project the hidden "
                             f"states, got {tuple(w.shape)}")
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(f"teacher_weight has vocabulary {wt.shape[0]} but student_weight has "
                         f"{ws.shape[0]}; slice both weights to the common vocabulary")
    vocab_size = ws.shape[0]
    for name, b in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if b is not None:
            check.float_tensor(name, b)
            check.same_device(name, b, "student_hidden", hs)
            if tuple(b.shape) != (vocab_size,):
                raise ValueError(f"{name} must have shape ({vocab_size},), got {tuple(b.shape)}")
    check.choice("reduction", reduction, FUSED_REDUCTIONS)
    check.choice("backend", backend, backends.BACKENDS)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    code, mix, tau, cap, soft_coef, hard_weight = loss_constants(
        divergence, temperature, beta, alpha, hard_weight, soft_weight, scale_temperature,
        ignore_index, softcap)
    label_rows = check.labels(labels, hs, vocab_size, ignore_index)   # shape: hs's leading shape
    if hard_weight > 0 and label_rows is None:
        raise ValueError("hard_weight > 0 needs labels")
    dt_s = _compute_dtype(hs, ws, "student_hidden", "student_weight")
    dt_t = _compute_dtype(ht, wt, "teacher_hidden", "teacher_weight")
    name = backends.resolve(backend, hs.device)

    h_s2 = hs.reshape(-1, hs.shape[-1])
    h_t2 = ht.reshape(-1, ht.shape[-1]).detach()
    n = h_s2.shape[0]
    chunk = chunk_size or default_chunk_size(n, vocab_size, torch.finfo(dt_s).bits // 8)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hs.requires_grad, grad_on and ws.requires_grad,
             grad_on and student_bias is not None and student_bias.requires_grad)
    consts = (code, mix, tau, cap, soft_coef, hard_weight, ignore_index)
    # The projections run in the compute dtype chosen above, with autocast off inside.
    with torch.autocast(hs.device.type, enabled=False) if torch.is_autocast_enabled(
            hs.device.type) else contextlib.nullcontext():
        return _FusedLinearKD.apply(
            h_s2.to(dt_s), ws, student_bias, h_t2.to(dt_t), wt.detach(),
            None if teacher_bias is None else teacher_bias.detach(), label_rows, consts,
            reduction, chunk, name, needs)
