"""Triton kernels of the dense distillation losses (backends/base.py contract).

One program per row streams over the vocabulary in blocks, holding only per-row state:

  pass 1  online softmax normalizers of a = s'/tau and b = t'/tau (and of s' for the CE term), and
          for reverse KL the running sum that yields its loss R = C before any gradient is written;
  pass 2  the loss terms; the gradient too where C is known (forward KL: C = -1; reverse KL: C = R);
          for the mixture divergences (JSD, skew KL) C = sum_i qg_i is accumulated instead;
  pass 3  (mixtures only) the gradient, once C is known.

The gradient is written in the forward (it is what the backward needs) and only scaled in the
backward. Accumulation is fp32 (fp64 for fp64 inputs). Indices are 64-bit.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..base import FORWARD_KL, JSD, REVERSE_KL, SKEW_FORWARD_KL, SKEW_REVERSE_KL
from ..reference import log_weight, mixture_weights
from .mul_rn import mul_rn
from .scalars import acc_scalar


@triton.jit
def _softcap(x, CAP: tl.constexpr, cap):
    """c * tanh(x / c), via exp of a non-positive argument (no overflow)."""
    if CAP:
        y = x / cap
        e = tl.exp(-2.0 * tl.abs(y))
        th = (1.0 - e) / (1.0 + e)
        x = cap * tl.where(y < 0, -th, th)
    return x


@triton.jit
def _softcap_grad(x, CAP: tl.constexpr, cap):
    """d softcap / dx = 1 - tanh(x / c)^2."""
    e = tl.exp(-2.0 * tl.abs(x / cap))
    th = (1.0 - e) / (1.0 + e)
    return 1.0 - th * th


@triton.jit
def _load_row(s_row, t_row, offs, mask, inv_tau, cap, ACC: tl.constexpr, CAP: tl.constexpr):
    """Raw student logits x, softcapped s' (both -inf outside the row), a = s'/tau, b = t'/tau."""
    x = tl.load(s_row + offs, mask=mask, other=0.0).to(ACC)
    t = tl.load(t_row + offs, mask=mask, other=0.0).to(ACC)
    s = _softcap(x, CAP, cap)
    t = _softcap(t, CAP, cap)
    neg_inf = float("-inf")
    s = tl.where(mask, s, neg_inf)
    a = tl.where(mask, mul_rn(s, inv_tau), neg_inf)
    b = tl.where(mask, mul_rn(t, inv_tau), neg_inf)
    return x, s, a, b


@triton.jit
def _online_update(m, z, x):
    """Merge a block into the running (max, sum exp(x - max)); returns (m, z, rescale, exp(x - m))."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = tl.exp(m - m_safe)
    e = tl.exp(x - m_safe)
    return m_new, z * rescale + tl.sum(e, axis=0), rescale, e


@triton.jit
def _weighted(w, d):
    """w * d, exactly 0 where the weight w is 0 (0 log 0 = 0); a NaN weight stays NaN."""
    return tl.where(w == 0, 0.0, w * d)


@triton.jit
def _log_add_exp(x, y):
    """log(exp(x) + exp(y)); -inf when both are -inf (divergence.h: log_add_exp)."""
    m = tl.maximum(x, y)
    d = x - y
    e = tl.exp(tl.where(d < 0, d, -d))  # exp(-|x - y|) in [0, 1]; NaN when both are -inf
    # log1p(e) to full precision (Goldberg: log(u) * e / (u - 1), u = 1 + e rounded)
    u = 1.0 + e
    l1p = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    return tl.where(x == y, x + 0.6931471805599453, m + l1p)


@triton.jit
def _terms(lq, lp, wp, wq, lwp, lwq, cap, DIV: tl.constexpr):
    """Per-element loss term and qg = q * dD/dq for divergence DIV (divergence.h: Terms).

    The mixture M = wp p + wq q is taken in log space (lwp, lwq = log of the weights, -inf for 0):
    no underflow where p and q are tiny. The skew-KL ratios p q / M and q^2 / M are formed as exps
    of log differences capped at cap = -log wq (their bound; 0 when wq = 0)."""
    q = tl.exp(lq)
    if DIV == 0:  # forward KL
        p = tl.exp(lp)
        loss = _weighted(p, lp - lq)
        qg = -p
    elif DIV == 1:  # reverse KL
        loss = _weighted(q, lq - lp)
        qg = loss
    else:
        lm = _log_add_exp(lp + lwp, lq + lwq)
        lm_finite = tl.maximum(lm, -3.4028234663852886e38)
        if DIV == 2:  # JSD(beta), M = beta p + (1 - beta) q
            p = tl.exp(lp)
            qg = _weighted(wq, _weighted(q, lq - lm))
            loss = _weighted(wp, _weighted(p, lp - lm)) + qg
        elif DIV == 3:  # skew forward KL(alpha), M = alpha p + (1 - alpha) q
            p = tl.exp(lp)
            loss = _weighted(p, lp - lm)
            qg = -wq * tl.exp(tl.minimum(lp + lq - lm_finite, cap))
        else:  # skew reverse KL(alpha), M = (1 - alpha) p + alpha q
            loss = _weighted(q, lq - lm)
            qg = loss - wq * tl.exp(tl.minimum(lq + lq - lm_finite, cap))
    return loss, qg, q


@triton.jit
def _write_grad(g_row, offs, mask, s, q, qg, C, m1, lz1, label, soft_scale, hard_coef, scale,
                x_raw, cap, CAP: tl.constexpr, HARD: tl.constexpr):
    # (soft_coef = 0: no divergence term, so nothing of the teacher's, NaN or -inf rows included,
    # reaches the gradient: the C++ kernels do not even read it then)
    g = tl.where(soft_scale != 0, soft_scale * (qg - q * C), 0.0)
    if HARD:
        g += hard_coef * (tl.exp((s - m1) - lz1) - tl.where(offs == label, 1.0, 0.0))
    if CAP:
        g = g * _softcap_grad(x_raw, CAP, cap)
    g = g * scale
    tl.store(g_row + offs, g.to(g_row.dtype.element_ty), mask=mask)


@triton.jit
def _dense_kd_row(
    row, s_ptr, t_ptr, labels_ptr, g_ptr, scale_ptr, loss_ptr,
    V, stride_s, stride_t, stride_g,
    inv_tau, wp, wq, lwp, lwq, ratio_cap, cap, soft_coef, hard_coef, ignore_index,
    DIV: tl.constexpr, HAS_LABELS: tl.constexpr, HARD: tl.constexpr, CAP: tl.constexpr,
    NEED_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr, CE_SEPARATE: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    g_row = g_ptr + row * stride_g
    base = tl.arange(0, BLOCK)

    valid = True
    label = -1
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index

    if valid:
        neg_inf = float("-inf")
        m_a = tl.full([], neg_inf, ACC)
        z_a = tl.zeros([], ACC)
        m_b = tl.full([], neg_inf, ACC)
        z_b = tl.zeros([], ACC)
        m_1 = tl.full([], neg_inf, ACC)
        z_1 = tl.zeros([], ACC)
        w_r = tl.zeros([], ACC)  # reverse KL: sum exp(a - m_a) (a - b)
        # ---- pass 1: normalizers ----
        for start in range(0, V, BLOCK):
            offs = start + base
            mask = offs < V
            x, s, a, b = _load_row(s_row, t_row, offs, mask, inv_tau, cap, ACC, CAP)
            m_a, z_a, r_a, e_a = _online_update(m_a, z_a, a)
            m_b, z_b, _r, _e = _online_update(m_b, z_b, b)
            if DIV == 1:
                w_r = w_r * r_a + tl.sum(tl.where(e_a > 0, e_a * (a - b), 0.0), axis=0)
            if HARD and CE_SEPARATE:
                m_1, z_1, _r1, _e1 = _online_update(m_1, z_1, s)
        # log-probabilities are formed as (x - m) - log z, never x - (m + log z): rounding
        # m + log z to fp32 costs |lse| ulps in every element, which the mixtures' q (g - C) amplify.
        lz_a = tl.log(z_a)
        lz_b = tl.log(z_b)
        m_1s = m_a
        lz_1 = lz_a
        if HARD and CE_SEPARATE:
            m_1s = m_1
            lz_1 = tl.log(z_1)
        if DIV == 0:
            C = tl.full([], -1.0, ACC)
        elif DIV == 1:
            # R = sum q (a - b) - lse_a + lse_b, grouped so that the shifts cancel exactly.
            C = w_r / z_a - (m_a - m_b) - tl.log(z_a) + tl.log(z_b)
        else:
            C = tl.zeros([], ACC)
        soft_scale = soft_coef * inv_tau
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr).to(ACC)
        s_lab = tl.zeros([], ACC)
        if HARD:
            # Read before pass 2: with the in-place gradient, pass 2 overwrites the row.
            # (a label outside [0, V) -- unchecked under torch.compile -- is NaN, never a read
            # outside the row, as in the CUDA kernels' label_logit)
            s_lab = _softcap(tl.load(s_row + label, mask=(label >= 0) & (label < V),
                                     other=float("nan")).to(ACC), CAP, cap)

        # ---- pass 2: loss (and gradient when C is known) ----
        # Backwards over the row: the blocks pass 1 read last are re-read first, from L2.
        loss_acc = tl.zeros([BLOCK], ACC)
        c_acc = tl.zeros([BLOCK], ACC)
        n_blocks = tl.cdiv(V, BLOCK)
        for i in range(0, n_blocks):
            offs = (n_blocks - 1 - i) * BLOCK + base
            mask = offs < V
            x, s, a, b = _load_row(s_row, t_row, offs, mask, inv_tau, cap, ACC, CAP)
            term, qg, q = _terms((a - m_a) - lz_a, (b - m_b) - lz_b, wp, wq, lwp, lwq, ratio_cap, DIV)
            loss_acc += term
            if DIV >= 2:
                c_acc += qg
            if NEED_GRAD and DIV <= 1:  # mixtures know C only after this pass: see pass 3
                _write_grad(g_row, offs, mask, s, q, qg, C, m_1s, lz_1, label, soft_scale, hard_coef,
                            scale, x, cap, CAP, HARD)
        loss = tl.where(soft_coef != 0, soft_coef * tl.sum(loss_acc, axis=0), 0.0)
        if HARD:
            loss += hard_coef * ((m_1s - s_lab) + lz_1)
        tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty))

        # ---- pass 3: gradient of the mixtures ----
        if NEED_GRAD and DIV >= 2:
            C = tl.sum(c_acc, axis=0)
            for start in range(0, V, BLOCK):
                offs = start + base
                mask = offs < V
                x, s, a, b = _load_row(s_row, t_row, offs, mask, inv_tau, cap, ACC, CAP)
                _term, qg, q = _terms((a - m_a) - lz_a, (b - m_b) - lz_b, wp, wq, lwp, lwq, ratio_cap, DIV)
                _write_grad(g_row, offs, mask, s, q, qg, C, m_1s, lz_1, label, soft_scale, hard_coef,
                            scale, x, cap, CAP, HARD)
    else:
        tl.store(loss_ptr + row, tl.zeros([], loss_ptr.dtype.element_ty))
        if NEED_GRAD:
            zeros = tl.zeros([BLOCK], g_ptr.dtype.element_ty)
            for start in range(0, V, BLOCK):
                offs = start + base
                tl.store(g_row + offs, zeros, mask=offs < V)


@triton.jit
def _dense_kd_kernel(
    s_ptr, t_ptr, labels_ptr, g_ptr, scale_ptr, loss_ptr,
    V, stride_s, stride_t, stride_g,
    inv_tau: tl.float64, wp: tl.float64, wq: tl.float64, lwp: tl.float64, lwq: tl.float64,
    ratio_cap: tl.float64, cap: tl.float64, soft_coef: tl.float64, hard_coef: tl.float64,
    ignore_index,
    DIV: tl.constexpr, HAS_LABELS: tl.constexpr, HARD: tl.constexpr, CAP: tl.constexpr,
    NEED_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr, CE_SEPARATE: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per row. (A persistent grid of 1-8 programs per SM, meant to keep the rows in
    # flight in L2 between passes, measured no faster on an H100: see bench/NOTES.md.)
    _dense_kd_row(
        tl.program_id(0).to(tl.int64), s_ptr, t_ptr, labels_ptr, g_ptr, scale_ptr, loss_ptr,
        V, stride_s, stride_t, stride_g, acc_scalar(inv_tau, ACC), acc_scalar(wp, ACC),
        acc_scalar(wq, ACC), acc_scalar(lwp, ACC), acc_scalar(lwq, ACC), acc_scalar(ratio_cap, ACC),
        acc_scalar(cap, ACC), acc_scalar(soft_coef, ACC), acc_scalar(hard_coef, ACC), ignore_index,
        DIV, HAS_LABELS, HARD, CAP, NEED_GRAD, HAS_SCALE, CE_SEPARATE, ACC, BLOCK,
    )


def _block_and_warps(v: int, elem_bytes: int) -> tuple[int, int]:
    """Block of the vocabulary per iteration and warps per program."""
    block = min(triton.next_power_of_2(max(v, 1)), 32768 // elem_bytes if elem_bytes > 2 else 8192)
    block = max(block, 16)
    warps = 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, warps


def _mixture_args(divergence: int, mix: float) -> tuple[float, float, float, float, float]:
    """(w_p, w_q, log w_p, log w_q, -log w_q or 0) of the mixture M = w_p p + w_q q."""
    if divergence not in (JSD, SKEW_FORWARD_KL, SKEW_REVERSE_KL):
        return 0.0, 0.0, 0.0, 0.0, 0.0
    wp, wq = mixture_weights(divergence, mix)
    lwp, lwq = log_weight(wp), log_weight(wq)
    return wp, wq, lwp, lwq, (-lwq if wq > 0 else 0.0)


def dense_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    *,
    divergence: int,
    mix: float,
    temperature: float,
    softcap: float,
    soft_coef: float,
    hard_coef: float,
    ignore_index: int,
    grad: Optional[torch.Tensor],
    grad_scale: Optional[torch.Tensor],
) -> torch.Tensor:
    """backends/base.py contract on the Triton kernels."""
    assert divergence in (FORWARD_KL, REVERSE_KL, JSD, SKEW_FORWARD_KL, SKEW_REVERSE_KL)
    n, v = student.shape
    fp64 = student.dtype == torch.float64
    loss = torch.empty(n, dtype=torch.float64 if fp64 else torch.float32, device=student.device)
    if n == 0:
        return loss
    block, warps = _block_and_warps(v, student.element_size())
    hard = labels is not None and hard_coef != 0
    g = grad if grad is not None else student  # never written when NEED_GRAD is False
    _dense_kd_kernel[(n,)](
        student, teacher, labels if labels is not None else student, g,
        grad_scale if grad_scale is not None else loss, loss,
        v, student.stride(0), teacher.stride(0), g.stride(0),
        1.0 / temperature, *_mixture_args(divergence, mix), softcap, soft_coef, hard_coef, ignore_index,
        DIV=divergence, HAS_LABELS=labels is not None, HARD=hard, CAP=softcap != 0,
        NEED_GRAD=grad is not None, HAS_SCALE=grad_scale is not None,
        CE_SEPARATE=temperature != 1.0, ACC=tl.float64 if fp64 else tl.float32,
        BLOCK=block, num_warps=warps,
    )
    return loss

