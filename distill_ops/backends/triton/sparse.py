"""Triton kernel of the sparse-target loss (the closed forms are in backends/reference_sparse.py).

One program per row:

  pass 1  stream the student row once: online normalizer lse(s / tau) (and lse(s) for the hard-label
          term when tau != 1; in tail mode, lse(s / tau) over the columns outside the targets,
          whose bit in reference_sparse.target_bits is clear, with its own running max: the
          student's tail mass is summed there, never formed as 1 - Q_K, which cancels to 0 for a
          student sure of its targets, and not relative to the row max, below which it underflows);
  middle  gather the k student logits at the target ids and do the bucket algebra on the k (+1 tail)
          values held in registers: loss, C = sum qg, the per-target gradients u and the coefficient
          c_out of the dense part outside the support;
  pass 2  (only when a gradient is needed) stream once more writing c_out * exp(a_j - lse_out) (+ the
          hard-label term), then, after a barrier, overwrite the k target columns with their own
          values (ids are unique in a row, so the scattered stores never collide).

No probability tensor is materialised; the gradient is written in the forward and scaled in the
backward. fp32 accumulation (fp64 for fp64 inputs); 64-bit row offsets.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..base import (FORWARD_KL, JSD, MODE_FULL, MODE_SUPPORT, MODE_TAIL, REVERSE_KL,
                    SKEW_FORWARD_KL, SKEW_REVERSE_KL)
from ..reference_sparse import target_bits
from .dense import _mixture_args, _online_update, _terms
from .mul_rn import mul_rn
from .scalars import acc_scalar

LN2 = tl.constexpr(0.6931471805599453)  # a kernel may read only constexpr globals


@triton.jit
def _lse(x, axis: tl.constexpr):
    """logsumexp along ``axis`` (-inf for an all -inf slice, never NaN)."""
    m = tl.max(x, axis=axis)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m_safe + tl.log(tl.sum(tl.exp(x - m_safe), axis=axis))


@triton.jit
def _expm1(x):
    """exp(x) - 1 without cancellation near 0 (Kahan: (u - 1) x / log u with u = exp(x))."""
    u = tl.exp(x)
    um1 = u - 1.0
    safe = tl.where((u == 1.0) | (um1 == -1.0), 1.0, um1)
    r = safe * x / tl.log(tl.where(u == 1.0, 2.0, u))
    return tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, r))


@triton.jit
def _log1p(y):
    """log(1 + y) without cancellation near 0 (Kahan: y log(1 + y) / ((1 + y) - 1))."""
    w = 1.0 + y
    d = w - 1.0
    return tl.where(d == 0.0, y, y * tl.log(w) / tl.where(d == 0.0, 1.0, d))


@triton.jit
def _log1mexp(x):
    """log(1 - exp(x)) for x <= 0."""
    x = tl.minimum(x, 0.0)
    return tl.where(x > -LN2, tl.log(-_expm1(x)), _log1p(-tl.exp(x)))


@triton.jit
def _sparse_kd_kernel(
    s_ptr, ids_ptr, lw_ptr, tail_ptr, labels_ptr, g_ptr, scale_ptr, loss_ptr, bits_ptr,
    V, K, stride_s, stride_i, stride_w, stride_g, stride_b,
    inv_tau: tl.float64, wp: tl.float64, wq: tl.float64, lwp: tl.float64, lwq: tl.float64,
    ratio_cap: tl.float64, target_scale: tl.float64, soft_coef: tl.float64,
    hard_coef: tl.float64, ignore_index,
    DIV: tl.constexpr, MODE: tl.constexpr, HAS_TAIL: tl.constexpr, RETEMPER: tl.constexpr,
    HAS_LABELS: tl.constexpr, HARD: tl.constexpr, NEED_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr, CE_SEPARATE: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr, KP: tl.constexpr,
):
    inv_tau = acc_scalar(inv_tau, ACC)
    wp = acc_scalar(wp, ACC)
    wq = acc_scalar(wq, ACC)
    lwp = acc_scalar(lwp, ACC)
    lwq = acc_scalar(lwq, ACC)
    ratio_cap = acc_scalar(ratio_cap, ACC)
    target_scale = acc_scalar(target_scale, ACC)
    soft_coef = acc_scalar(soft_coef, ACC)
    hard_coef = acc_scalar(hard_coef, ACC)
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    g_row = g_ptr + row * stride_g
    base = tl.arange(0, BLOCK)
    neg_inf = float("-inf")

    row_ok = True
    label = -1
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        row_ok = label != ignore_index

    if row_ok:
        # ---- pass 1: normalizers ----
        m_a = tl.full([], neg_inf, ACC)
        z_a = tl.zeros([], ACC)
        m_1 = tl.full([], neg_inf, ACC)
        z_1 = tl.zeros([], ACC)
        # tail mode: the normalizer of a outside the targets, with its own max (relative to m_a,
        # the terms underflow when the student is sure of its targets)
        m_o = tl.full([], neg_inf, ACC)
        z_o = tl.zeros([], ACC)
        for start in range(0, V, BLOCK):
            offs = start + base
            mask = offs < V
            s = tl.load(s_row + offs, mask=mask, other=neg_inf).to(ACC)
            a = mul_rn(s, inv_tau)
            m_a, z_a, _r, _e = _online_update(m_a, z_a, a)
            if MODE == 2:
                word = tl.load(bits_ptr + row * stride_b + (offs >> 5), mask=mask, other=0)
                target = ((word >> (offs & 31)) & 1) != 0
                m_o, z_o, _r, _e = _online_update(m_o, z_o, tl.where(target, neg_inf, a))
            if HARD and CE_SEPARATE:
                m_1, z_1, _r, _e = _online_update(m_1, z_1, s)
        lse_a = m_a + tl.log(z_a)
        lse_1 = lse_a
        if HARD and CE_SEPARATE:
            lse_1 = m_1 + tl.log(z_1)

        # ---- the k targets: bucket algebra in registers ----
        kk = tl.arange(0, KP)
        kmask = kk < K
        ids = tl.load(ids_ptr + row * stride_i + kk, mask=kmask, other=-1).to(tl.int64)
        valid = (ids >= 0) & (ids < V)  # an id >= V is never read (unchecked under compile)
        n_bad = tl.sum(((ids < -1) | (ids >= V)).to(tl.int32), axis=0)
        lw = tl.load(lw_ptr + row * stride_w + kk, mask=valid, other=0.0).to(ACC)
        lw = tl.where(valid, lw, neg_inf)
        s_k = tl.load(s_row + ids, mask=valid, other=0.0).to(ACC)
        a_k = tl.where(valid, mul_rn(s_k, inv_tau), neg_inf)
        if MODE == 2:
            lk = _lse(lw, 0)
            if HAS_TAIL:
                lt = tl.load(tail_ptr + row).to(ACC)
            else:
                lt = _log1mexp(lk)
            # Targets covering the whole vocabulary leave no tail bucket (whatever rounding says).
            lt = tl.where(tl.sum(valid.to(tl.int32), axis=0) == V, neg_inf, lt)
            mz = tl.maximum(lk, lt)
            mz_safe = tl.where(mz == neg_inf, 0.0, mz)
            z = mz_safe + tl.log(tl.exp(lk - mz_safe) + tl.exp(lt - mz_safe))
            lp = tl.where(valid, lw - z, neg_inf)
            lp_tail = lt - z
        else:
            if RETEMPER:
                lw = lw * target_scale
            z = _lse(lw, 0)
            lp = tl.where(valid, lw - z, neg_inf)
        live = (z > neg_inf) & (tl.sum(valid.to(tl.int32), axis=0) > 0)
        # log q as (a - max) - log z: a - lse rounds at the logits' scale
        if MODE == 1:
            m_k = tl.max(a_k, axis=0)
            m_k = tl.where(m_k == neg_inf, 0.0, m_k)
            lq = tl.where(valid, (a_k - m_k) - tl.log(tl.sum(tl.exp(a_k - m_k), axis=0)), neg_inf)
        else:
            lq = tl.where(valid, (a_k - tl.where(m_a == neg_inf, 0.0, m_a)) - tl.log(z_a), neg_inf)
        # the dense kernel's per-element terms (mixtures in log space), over the k buckets
        term, qg, q = _terms(lq, lp, wp, wq, lwp, lwq, ratio_cap, DIV)
        soft = tl.sum(term, axis=0)
        big_c = tl.sum(qg, axis=0)
        if MODE == 2:
            lse_tail = m_o + tl.log(z_o)  # -inf when the targets cover the vocabulary
            lq_tail = lse_tail - lse_a
            t_term, t_qg, t_q = _terms(lq_tail, lp_tail, wp, wq, lwp, lwq, ratio_cap, DIV)
            soft += t_term
            big_c += t_qg
        soft = tl.where(live, soft, 0.0)
        loss = soft_coef * soft
        if HARD:
            s_lab = tl.load(s_row + label, mask=(label >= 0) & (label < V),
                            other=float("nan")).to(ACC)
            loss += hard_coef * (lse_1 - s_lab)
        loss = tl.where(n_bad > 0, float("nan"), loss)  # as the CUDA kernel: NaN, no read
        tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty))

        # ---- pass 2: the gradient ----
        if NEED_GRAD:
            soft_scale = soft_coef * inv_tau
            scale = 1.0
            if HAS_SCALE:
                scale = tl.load(scale_ptr).to(ACC)
            lse_out = lse_a
            if MODE == 0:
                c_out = -big_c
            elif MODE == 2:
                c_out = t_qg - t_q * big_c
                lse_out = lse_tail
            else:
                c_out = tl.zeros([], ACC)
            c_out = tl.where(live, c_out, 0.0)
            lse_out = tl.where(c_out != 0, lse_out, 0.0)
            coef = soft_scale * c_out
            for start in range(0, V, BLOCK):
                offs = start + base
                mask = offs < V
                s = tl.load(s_row + offs, mask=mask, other=neg_inf).to(ACC)
                g = tl.where(coef != 0, coef * tl.exp(mul_rn(s, inv_tau) - lse_out), 0.0)
                if HARD:
                    g += hard_coef * (tl.exp(s - lse_1) - tl.where(offs == label, 1.0, 0.0))
                g = g * scale
                tl.store(g_row + offs, g.to(g_row.dtype.element_ty), mask=mask)
            # The dense stores above must land before the target columns are overwritten.
            tl.debug_barrier()
            u = tl.where(valid, qg - q * big_c, 0.0)
            u = tl.where(live, u, 0.0)
            g_k = soft_scale * u
            if HARD:
                g_k += hard_coef * (tl.exp(s_k - lse_1) - tl.where(ids == label, 1.0, 0.0))
            g_k = g_k * scale
            tl.store(g_row + ids, g_k.to(g_row.dtype.element_ty), mask=valid)
    else:
        tl.store(loss_ptr + row, tl.zeros([], loss_ptr.dtype.element_ty))
        if NEED_GRAD:
            zeros = tl.zeros([BLOCK], g_ptr.dtype.element_ty)
            for start in range(0, V, BLOCK):
                offs = start + base
                tl.store(g_row + offs, zeros, mask=offs < V)


def _block_and_warps(v: int, elem_bytes: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(max(v, 1)), 16384 // elem_bytes if elem_bytes > 2 else 8192)
    block = max(block, 16)
    warps = 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, warps


def sparse_forward(
    student: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    tail_logmass: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    *,
    divergence: int,
    mix: float,
    mode: int,
    temperature: float,
    target_scale: float,
    soft_coef: float,
    hard_coef: float,
    ignore_index: int,
    grad: Optional[torch.Tensor],
    grad_scale: Optional[torch.Tensor],
) -> torch.Tensor:
    """reference_sparse.sparse_forward's contract on the Triton kernel."""
    assert divergence in (FORWARD_KL, REVERSE_KL, JSD, SKEW_FORWARD_KL, SKEW_REVERSE_KL)
    assert mode in (MODE_FULL, MODE_SUPPORT, MODE_TAIL)
    n, v = student.shape
    k = ids.shape[1]
    fp64 = torch.float64 in (student.dtype, logprobs.dtype)
    loss = torch.empty(n, dtype=torch.float64 if fp64 else torch.float32, device=student.device)
    if n == 0:
        return loss
    block, warps = _block_and_warps(v, student.element_size())
    hard = labels is not None and hard_coef != 0
    g = grad if grad is not None else student  # never written when NEED_GRAD is False
    bits = target_bits(ids, v) if mode == MODE_TAIL else ids  # (a stand-in, never read)
    _sparse_kd_kernel[(n,)](
        student, ids, logprobs, tail_logmass if tail_logmass is not None else logprobs,
        labels if labels is not None else ids, g,
        grad_scale if grad_scale is not None else loss, loss, bits,
        v, k, student.stride(0), ids.stride(0), logprobs.stride(0), g.stride(0), bits.stride(0),
        1.0 / temperature, *_mixture_args(divergence, mix), target_scale, soft_coef, hard_coef,
        ignore_index,
        DIV=divergence, MODE=mode, HAS_TAIL=tail_logmass is not None,
        RETEMPER=target_scale != 1.0, HAS_LABELS=labels is not None, HARD=hard,
        NEED_GRAD=grad is not None, HAS_SCALE=grad_scale is not None,
        CE_SEPARATE=temperature != 1.0, ACC=tl.float64 if fp64 else tl.float32,
        BLOCK=block, KP=max(triton.next_power_of_2(k), 2), num_warps=warps,
    )
    return loss
