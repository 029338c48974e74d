"""Pure-torch reference backend: the oracle every other backend is tested against, and the fallback.

``row_losses`` writes the loss of each divergence once, from log-probabilities, in the plainest form.
The tests differentiate it with torch.autograd in float64: that is the oracle, and it checks every
hand-derived gradient, including ``row_grads`` below, which the fallback backend uses (autograd is
switched off inside a custom op's kernel). Work is chunked over rows: no more than one chunk x V is
held at a time. Inputs are upcast to float32 (float64 stays float64).
"""

from __future__ import annotations

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
    """Elementwise p * (log p - log r) with 0 * log 0 = 0, safe for autograd at p == 0."""
    live = p > 0
    diff = torch.where(live, logp - logr, torch.zeros_like(p))
    return torch.where(live, p * diff, torch.zeros_like(p))


def _safe_log(m: torch.Tensor) -> torch.Tensor:
    """log m, with log 0 = -inf but a finite autograd path (the zeros are masked by the caller)."""
    return torch.where(m > 0, torch.log(torch.where(m > 0, m, torch.ones_like(m))), -torch.inf)


def divergence_rows(logq: torch.Tensor, logp: torch.Tensor, divergence: int, mix: float) -> torch.Tensor:
    """Per-row divergence D(p, q) from log-probabilities over the last axis.

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
        logm = _safe_log(mix * p + (1 - mix) * q)
        terms = mix * _plogratio(p, logp, logm) + (1 - mix) * _plogratio(q, logq, logm)
    elif divergence == SKEW_FORWARD_KL:
        logm = _safe_log(mix * p + (1 - mix) * q)
        terms = _plogratio(p, logp, logm)
    elif divergence == SKEW_REVERSE_KL:
        logm = _safe_log((1 - mix) * p + mix * q)
        terms = _plogratio(q, logq, logm)
    else:
        raise ValueError(f"unknown divergence code {divergence}")
    return terms.sum(-1)


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


def _qg(logq: torch.Tensor, logp: torch.Tensor, divergence: int, mix: float) -> torch.Tensor:
    """qg_i = q_i * dD/dq_i: with C = sum_i qg_i, dD/da_j = qg_j - q_j C (a = student logits / tau)."""
    p, q = logp.exp(), logq.exp()
    if divergence == FORWARD_KL:
        return -p
    if divergence == REVERSE_KL:
        return _plogratio(q, logq, logp)
    if divergence == JSD:
        return (1 - mix) * _plogratio(q, logq, _safe_log(mix * p + (1 - mix) * q))
    if divergence == SKEW_FORWARD_KL:
        m = mix * p + (1 - mix) * q
        return torch.where(m > 0, -(1 - mix) * p * q / torch.where(m > 0, m, 1), 0)
    if divergence == SKEW_REVERSE_KL:
        m = (1 - mix) * p + mix * q
        ratio = torch.where(m > 0, q * q / torch.where(m > 0, m, 1), 0)
        return _plogratio(q, logq, _safe_log(m)) - mix * ratio
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
        qg = _qg(logq, logp, divergence, mix)
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
