"""Pure-torch reference backend: the oracle every other backend is tested against, and the fallback.

``row_losses`` writes the loss of each divergence once, from log-probabilities, in the plainest form.
The tests differentiate it with torch.autograd in float64: that is the oracle, and it checks every
hand-derived gradient, including ``row_grads`` below, which the fallback backend uses (autograd is
switched off inside a custom op's kernel). Work is chunked over rows: no more than one chunk x V is
held at a time. Inputs are upcast to float32 (float64 stays float64).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .base import FORWARD_KL, JSD, REVERSE_KL, SKEW_FORWARD_KL, SKEW_REVERSE_KL

# Elements per chunk (rows x V). 2^22 fp32 = 16 MiB per intermediate.
CHUNK_ELEMENTS = 1 << 22


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16 inputs; fp64 when any input is fp64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def apply_softcap(x: torch.Tensor, softcap: float) -> torch.Tensor:
    """x -> c * tanh(x / c); identity for c == 0."""
    return x if softcap == 0 else softcap * torch.tanh(x / softcap)


def _plogratio(p: torch.Tensor, logp: torch.Tensor, logr: torch.Tensor) -> torch.Tensor:
    """Elementwise p * (log p - log r) with 0 * log 0 = 0, safe for autograd at p == 0.

    Only an exact zero weight is masked: a NaN weight stays NaN (NaN inputs are never hidden)."""
    live = p != 0
    diff = torch.where(live, logp - logr, torch.zeros_like(p))
    return torch.where(live, p * diff, torch.zeros_like(p))


def _weighted(w: float, d: torch.Tensor) -> torch.Tensor:
    """w * d, exactly 0 when the weight is 0 (whatever d holds: -inf, +inf)."""
    return torch.zeros_like(d) if w == 0 else w * d


def mixture_weights(divergence: int, mix: float) -> tuple[float, float]:
    """(w_p, w_q) of the mixture M = w_p p + w_q q of a mixture divergence."""
    if divergence in (JSD, SKEW_FORWARD_KL):
        return mix, 1.0 - mix
    if divergence == SKEW_REVERSE_KL:
        return 1.0 - mix, mix
    raise ValueError(f"divergence code {divergence} has no mixture")


def log_weight(w: float) -> float:
    """log w, -inf for a zero weight."""
    return math.log(w) if w > 0 else -math.inf


def log_mixture(logp: torch.Tensor, logq: torch.Tensor, wp: float, wq: float) -> torch.Tensor:
    """log(w_p p + w_q q) as a log-add-exp of log-probabilities: no underflow of M where p and q
    are below fp32's range (tau -> 0, wide logits), -inf only where both are exactly 0, and a
    finite autograd path there (the masked elements get a zero gradient, not NaN)."""
    x = logp + log_weight(wp)
    y = logq + log_weight(wq)
    dead = (x == -math.inf) & (y == -math.inf)
    zero = torch.zeros_like(x)
    lm = torch.logaddexp(torch.where(dead, zero, x), torch.where(dead, zero, y))
    return torch.where(dead, torch.full_like(x, -math.inf), lm)


def divergence_rows(logq: torch.Tensor, logp: torch.Tensor, divergence: int, mix: float) -> torch.Tensor:
    """Per-row divergence D(p, q) from log-probabilities over the last axis (divergence_terms'
    sum)."""
    return divergence_terms(logq, logp, divergence, mix).sum(-1)


def divergence_terms(logq: torch.Tensor, logp: torch.Tensor, divergence: int,
                     mix: float) -> torch.Tensor:
    """The per-element terms of divergence D(p, q), from log-probabilities (any shape; the sparse
    losses sum them over their buckets).

    forward_kl       KL(p || q)
    reverse_kl       KL(q || p)
    jsd(beta)        beta KL(p || M) + (1 - beta) KL(q || M),   M = beta p + (1 - beta) q
    skew_forward_kl  KL(p || M),                                M = alpha p + (1 - alpha) q
    skew_reverse_kl  KL(q || M),                                M = (1 - alpha) p + alpha q
    (``mix`` is beta or alpha.)
    """
    p, q = logp.exp(), logq.exp()
    if divergence == FORWARD_KL:
        terms = _plogratio(p, logp, logq)
    elif divergence == REVERSE_KL:
        terms = _plogratio(q, logq, logp)
    elif divergence == JSD:
        logm = log_mixture(logp, logq, mix, 1 - mix)
        terms = _weighted(mix, _plogratio(p, logp, logm)) + _weighted(1 - mix, _plogratio(q, logq, logm))
    elif divergence == SKEW_FORWARD_KL:
        terms = _plogratio(p, logp, log_mixture(logp, logq, mix, 1 - mix))
    elif divergence == SKEW_REVERSE_KL:
        terms = _plogratio(q, logq, log_mixture(logp, logq, 1 - mix, mix))
    else:
        raise ValueError(f"unknown divergence code {divergence}")
    return terms


def row_losses(
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
) -> torch.Tensor:
    """Per-row loss (differentiable in ``student``), exactly as backends/base.py defines it."""
    s = apply_softcap(student, softcap)
    t = apply_softcap(teacher, softcap)
    loss = torch.zeros(s.shape[:-1], dtype=s.dtype, device=s.device)
    if soft_coef != 0:
        logq = torch.log_softmax(s / temperature, dim=-1)
        logp = torch.log_softmax(t / temperature, dim=-1)
        loss = loss + soft_coef * divergence_rows(logq, logp, divergence, mix)
    if labels is None:
        return loss
    valid = labels != ignore_index
    if hard_coef != 0:
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        ce = torch.logsumexp(s, dim=-1) - s.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        loss = loss + hard_coef * ce
    return torch.where(valid, loss, torch.zeros_like(loss))


def _exp_capped(x: torch.Tensor, cap: float) -> torch.Tensor:
    """exp(min(x, cap)), NaN kept: the ratios p q / M and q^2 / M are bounded by 1 / w_q."""
    return torch.where(x > cap, torch.full_like(x, cap), x).exp()


def qg_terms(logq: torch.Tensor, logp: torch.Tensor, divergence: int, mix: float) -> torch.Tensor:
    """qg_i = q_i * dD/dq_i: with C = sum_i qg_i, dD/da_j = qg_j - q_j C (a = student logits / tau).

    The mixture ratios p q / M and q^2 / M are formed in log space, as csrc/include/distill_ops/
    divergence.h does: right where p, q and M underflow fp32, 0 where p or q is exactly 0."""
    if divergence == FORWARD_KL:
        return -logp.exp()
    if divergence == REVERSE_KL:
        return _plogratio(logq.exp(), logq, logp)
    wp, wq = mixture_weights(divergence, mix)
    logm = log_mixture(logp, logq, wp, wq)
    cap = -math.log(wq) if wq > 0 else 0.0
    floor = torch.finfo(logm.dtype).min
    logm_finite = torch.where(logm > floor, logm, torch.full_like(logm, floor))
    if divergence == JSD:
        return _weighted(wq, _plogratio(logq.exp(), logq, logm))
    if divergence == SKEW_FORWARD_KL:
        return _weighted(wq, -_exp_capped(logp + logq - logm_finite, cap))
    if divergence == SKEW_REVERSE_KL:
        return _plogratio(logq.exp(), logq, logm) - _weighted(wq, _exp_capped(2 * logq - logm_finite, cap))
    raise ValueError(f"unknown divergence code {divergence}")


def row_grads(
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
) -> torch.Tensor:
    """d row_losses / d student, in closed form (backends/base.py)."""
    s = apply_softcap(student, softcap)
    g = torch.zeros_like(s)
    if soft_coef != 0:
        logq = torch.log_softmax(s / temperature, dim=-1)
        logp = torch.log_softmax(apply_softcap(teacher, softcap) / temperature, dim=-1)
        qg = qg_terms(logq, logp, divergence, mix)
        g = g + (soft_coef / temperature) * (qg - logq.exp() * qg.sum(-1, keepdim=True))
    if labels is not None:
        valid = labels != ignore_index
        if hard_coef != 0:
            safe = torch.where(valid, labels, torch.zeros_like(labels))
            ce = torch.softmax(s, dim=-1)
            ce.scatter_add_(-1, safe.unsqueeze(-1), -torch.ones_like(ce[..., :1]))
            g = g + hard_coef * ce
        g = torch.where(valid.unsqueeze(-1), g, torch.zeros_like(g))
    if softcap != 0:
        g = g * (1 - torch.tanh(student / softcap) ** 2)
    return g


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
    """The backends/base.py contract, in chunks of rows."""
    n, v = student.shape
    dtype = compute_dtype(student, teacher)
    out = torch.empty(n, dtype=torch.float32 if dtype == torch.float32 else dtype, device=student.device)
    rows = max(1, CHUNK_ELEMENTS // max(v, 1))
    opts = dict(
        divergence=divergence, mix=mix, temperature=temperature, softcap=softcap,
        soft_coef=soft_coef, hard_coef=hard_coef, ignore_index=ignore_index,
    )
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        s = student[lo:hi].detach().to(dtype, copy=True)
        t = teacher[lo:hi].detach().to(dtype)
        lab = None if labels is None else labels[lo:hi]
        with torch.no_grad():
            out[lo:hi] = row_losses(s, t, lab, **opts)
            if grad is None:
                continue
            g = row_grads(s, t, lab, **opts)
            if grad_scale is not None:
                g = g * grad_scale.to(dtype)
            grad[lo:hi] = g.to(grad.dtype)
    return out
