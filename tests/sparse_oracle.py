"""The float64 oracle of ``distill_ops.sparse_kd_loss`` (a helper module, not a test file).

Written from the definitions, one row at a time, with dense tensors: the teacher's bucket
distribution is built explicitly, the student's tail bucket is a logsumexp over the complement of
the target ids (no log1mexp shortcut), and the divergences are ``reference.divergence_rows`` (the
dense oracle's definitions). The gradient is torch.autograd's. Also: generators of sparse targets
with padding and of the awkward cases.
"""

from __future__ import annotations

import torch

from distill_ops.backends import reference
from distill_ops.backends.base import FORWARD_KL
from distill_ops.constants import resolve_divergence


def oracle_rows(s, ids, lw, *, divergence="forward_kl", temperature=1.0, tail="renorm",
                tail_logmass=None, labels=None, hard_weight=0.0, soft_weight=1.0,
                scale_temperature=True, ignore_index=-100, target_temperature=None, beta=0.5,
                alpha=0.1):
    """Per-row loss (N,) of 2-D float64 inputs, differentiable in ``s``."""
    code, mix = resolve_divergence(divergence, beta, alpha)
    soft_coef = soft_weight * (temperature ** 2 if scale_temperature else 1.0)
    n, v = s.shape
    out = []
    for r in range(n):
        row = s[r]
        logq = torch.log_softmax(row / temperature, -1)
        valid = ids[r] >= 0
        kid = ids[r][valid].long()
        w = lw[r][valid]
        soft = row.sum() * 0.0
        if kid.numel():
            if tail == "renorm":
                wt = w / target_temperature if target_temperature is not None else w
                if torch.logsumexp(wt, 0) > -torch.inf:
                    lp = torch.log_softmax(wt, 0)
                    if code == FORWARD_KL:
                        # p~ against the FULL-vocabulary q, written as a dense V-vector.
                        p_dense = torch.zeros(v, dtype=s.dtype).index_put((kid,), lp.exp())
                        lp_dense = torch.full((v,), -torch.inf, dtype=s.dtype).index_put((kid,), lp)
                        soft = reference.divergence_rows(logq, lp_dense, code, mix)
                        assert torch.allclose(p_dense.sum(), torch.ones((), dtype=s.dtype))
                    else:
                        lq = torch.log_softmax(row[kid] / temperature, 0)
                        soft = reference.divergence_rows(lq, lp, code, mix)
            else:
                p = w.exp()
                if tail_logmass is not None:
                    t_mass = tail_logmass[r].exp()
                else:
                    t_mass = (1 - p.sum()).clamp_min(0)
                if kid.numel() == v:  # no vocabulary outside the targets: no tail bucket
                    t_mass = t_mass * 0.0
                total = p.sum() + t_mass
                if total > 0:
                    p_b = torch.cat([p, t_mass.reshape(1)]) / total
                    outside = torch.ones(v, dtype=torch.bool)
                    outside[kid] = False
                    lq_tail = torch.logsumexp(logq[outside], 0) if outside.any() else \
                        torch.tensor(-torch.inf, dtype=s.dtype)
                    lq_b = torch.cat([logq[kid], lq_tail.reshape(1)])
                    lp_b = torch.where(p_b > 0, torch.log(p_b), -torch.inf)
                    soft = reference.divergence_rows(lq_b, lp_b, code, mix)
        loss = soft_coef * soft
        if labels is not None:
            lab = int(labels[r])
            if lab == ignore_index:
                loss = row.sum() * 0.0
            elif hard_weight:
                loss = loss + hard_weight * (torch.logsumexp(row, 0) - row[lab])
        out.append(loss)
    return torch.stack(out)


def sparse_oracle(student, ids, logprobs, *, reduction="mean", grad_output=None, labels=None,
                  ignore_index=-100, tail_logmass=None, **kw):
    """float64 (loss, d(sum(loss * grad_output)) / d student) of sparse_kd_loss(**kw)."""
    s_full = student.detach().cpu().to(torch.float64).requires_grad_(True)
    v, k = s_full.shape[-1], ids.shape[-1]
    lead = s_full.shape[:-1]
    s = s_full.reshape(-1, v)
    ids2 = ids.detach().cpu().reshape(-1, k)
    lw = logprobs.detach().cpu().to(torch.float64).reshape(-1, k)
    lab = None if labels is None else labels.detach().cpu().reshape(-1)
    tl = None if tail_logmass is None else tail_logmass.detach().cpu().double().reshape(-1)
    with torch.enable_grad():
        rows = oracle_rows(s, ids2, lw, labels=lab, ignore_index=ignore_index, tail_logmass=tl,
                           **kw)
        n = rows.shape[0]
        if reduction == "none":
            loss = rows.reshape(lead)
        elif reduction == "sum":
            loss = rows.sum()
        elif reduction == "mean":
            count = n if lab is None else int((lab != ignore_index).sum())
            loss = rows.sum() / count if count else rows.sum() * 0.0
        else:
            loss = rows.sum() / max(n, 1)
        go = torch.ones_like(loss) if grad_output is None else grad_output.detach().cpu().to(loss)
        (grad,) = torch.autograd.grad(loss, s_full, go)
    return loss.detach(), grad.detach()


def make_targets(n: int, v: int, k: int, *, seed: int, pad: bool = True,
                 empty_row: bool = True, teacher_spread: float = 3.0, device="cpu"):
    """(ids int32 (n, k), logprobs float32 (n, k), tail_logmass float32 (n,)) from the top-k of a
    random teacher, in a shuffled slot order, with some slots padded (-1) and, if asked, one row with
    no valid target."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * teacher_spread
    logp = torch.log_softmax(t, -1)
    lp, ids = torch.topk(logp, k, -1)
    tail = torch.log1p(-lp.exp().sum(-1).clamp(max=1 - 1e-12))
    perm = torch.argsort(torch.rand(n, k, generator=g), -1)
    ids, lp = ids.gather(1, perm), lp.gather(1, perm)
    if pad:
        drop = torch.rand(n, k, generator=g) < 0.3
        drop[:, 0] = False
        ids = torch.where(drop, -1, ids)
        lp = torch.where(drop, -torch.inf, lp)
        # tail_logmass stays that of the full top-k (padding drops mass in renorm only)
        if empty_row and n > 1:
            ids[1] = -1
            lp[1] = -torch.inf
    return (ids.to(torch.int32).to(device), lp.float().to(device), tail.float().to(device))


def make_student(shape, v, *, seed, dtype=torch.float32, spread=2.0, device="cpu"):
    if isinstance(shape, int):
        shape = (shape,)
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(*shape, v, generator=g, dtype=torch.float64) * spread).to(device=device,
                                                                                 dtype=dtype)


def run_sparse(student, ids, logprobs, *, grad_output=None, **kw):
    """sparse_kd_loss on a fresh leaf copy: (loss, grad)."""
    from distill_ops.sparse import sparse_kd_loss

    x = student.detach().clone().requires_grad_(True)
    loss = sparse_kd_loss(x, ids, logprobs, **kw)
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss)
    loss.backward(go)
    return loss.detach(), x.grad


def rel_err(out: torch.Tensor, ref: torch.Tensor, zero: float = 1e-6) -> float:
    out = out.detach().cpu().double()
    ref = ref.detach().cpu().double()
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    d = torch.linalg.vector_norm(out - ref).item()
    sc = torch.linalg.vector_norm(ref).item()
    return d / sc if sc > zero else d


MIXTURES = ("jsd", "skew_forward_kl", "skew_reverse_kl", "generalized_jsd")


def tolerance(dtype, divergence, what) -> float:
    if dtype in (torch.bfloat16, torch.float16):
        return 1e-2
    if dtype == torch.float64:
        return 1e-10
    if what == "grad" and divergence in MIXTURES:
        return 1e-4
    return 1e-5


def check_sparse(student, ids, logprobs, *, grad_output=None, loss_tol=None, grad_tol=None,
                 **kw) -> tuple[float, float]:
    """Assert sparse_kd_loss(**kw) matches the oracle; returns the (loss, grad) relative errors."""
    loss, grad = run_sparse(student, ids, logprobs, grad_output=grad_output, **kw)
    opts = {k: v for k, v in kw.items() if k != "backend"}
    ref_loss, ref_grad = sparse_oracle(student, ids, logprobs, grad_output=grad_output, **opts)
    assert loss.shape == ref_loss.shape
    assert grad.dtype == student.dtype and grad.shape == student.shape
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    div = kw.get("divergence", "forward_kl")
    lt = tolerance(student.dtype, div, "loss") if loss_tol is None else loss_tol
    gt = tolerance(student.dtype, div, "grad") if grad_tol is None else grad_tol
    el, eg = rel_err(loss, ref_loss), rel_err(grad, ref_grad)
    assert el < lt, f"loss rel err {el:.3g} >= {lt:g} ({loss} vs {ref_loss})"
    assert eg < gt, f"grad rel err {eg:.3g} >= {gt:g}"
    return el, eg
