"""Pure-torch reference of the sparse-target ops: the fallback, and the closed forms the Triton
kernels follow. (The tests' float64 oracle, tests/sparse_oracle.py, is written independently from
the definitions, with dense tensors and autograd.) Work is chunked over rows (and over the
vocabulary where a third axis appears), so no more than about CHUNK_ELEMENTS values are live.

The sparse loss, per row (student logits s of length V; k target slots with ids K, -1 = padding,
and teacher log-weights w; temperature tau; a = s / tau, lse_a = logsumexp(a)):

  The loss depends on s only through a_K (the student logits at the target ids) and lse_a, so
  d loss / d a_j = [j in K] (...) + c_out * exp(a_j - lse_out): dense outside K, and one value per
  target inside it. Three modes, each a divergence D between two distributions over "buckets":

  MODE_FULL     (tail="renorm", forward KL): buckets = K; teacher p~ = softmax_K(w / t_target);
                student log q_i = a_i - lse_a (full-vocabulary softmax, NOT renormalised):
                D = sum_K p~ (log p~ - log q); grad_j = q_j - p~_j [j in K].
  MODE_SUPPORT  (tail="renorm", other divergences): buckets = K; teacher p~ as above; student
                q~ = softmax_K(a_K) (renormalised to the support): dense D on k entries;
                grad_j = 0 outside K.
  MODE_TAIL     (tail="tail", any divergence): buckets = K + one tail bucket; teacher (P_i, T)
                with P_i = exp(w_i), T = exp(tail_logmass) or max(0, 1 - sum P), normalised to sum
                1 (a no-op for consistent inputs); student (q_i, 1 - Q_K), Q_K = sum_K q_i,
                with 1 - Q_K = exp(lse_out - lse_a), lse_out the logsumexp of a over the columns
                outside K, summed there (never 1 - Q_K by subtraction: a student sure of K leaves
                less outside than the rounding of Q_K, and the subtraction gave 0 and an infinite
                loss). The tail bucket is a softmax over the complement of K, so
                grad_j (j not in K) = dD/d(tail logit) * q_j / (1 - Q_K).

  For any divergence over buckets with student bucket log-probs lq_b, teacher lp_b:
  qg_b = q_b dD/dq_b, C = sum_b qg_b, dD/d(bucket logit b) = qg_b - q_b C (as the dense table).

Loss = soft_coef * D + hard_coef * CE(s at tau=1, label); rows with label == ignore_index: 0,
rows without valid targets (or with zero teacher mass): their CE only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..targets import rng
from .base import MODE_FULL, MODE_SUPPORT, MODE_TAIL
from .reference import divergence_terms, qg_terms

CHUNK_ELEMENTS = 1 << 22
LN2 = math.log(2.0)


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) \
        else torch.float32


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurately on both sides of -log 2."""
    x = x.clamp(max=0.0)
    return torch.where(x > -LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def target_bits(ids: torch.Tensor, v: int) -> torch.Tensor:
    """The target ids of each row as a bit set, int32 (N, ceil(V / 32)): bit j % 32 of word j // 32
    is set when j is a valid (>= 0) id of the row. The GPU kernels of MODE_TAIL test a column's bit
    to leave the targets out of the sum outside K (ids are unique in a row, so adding the bits of a
    word is or-ing them)."""
    n = ids.shape[0]
    bits = torch.zeros(n, (v + 31) // 32, dtype=torch.int32, device=ids.device)
    valid = ids >= 0
    ids = torch.where(valid, ids, torch.zeros_like(ids)).to(torch.int64)
    # 2^(id % 32) as an int32 bit pattern, made on the ids' device (no host table copied per
    # call): exact in int64, then bit 31 (2^31) becomes -2^31 before the narrowing.
    shift = ids & 31
    one_bit = torch.bitwise_left_shift(torch.ones_like(ids), shift)
    one_bit = torch.where(shift == 31, one_bit - (1 << 32), one_bit).to(torch.int32)
    return bits.scatter_add_(1, ids >> 5, torch.where(valid, one_bit, torch.zeros_like(one_bit)))


def bucket_terms(lq: torch.Tensor, lp: torch.Tensor, divergence: int, mix: float):
    """Per-bucket (loss term, qg = q dD/dq, q) of divergence D(p, q); zero where q = p = 0. The
    dense reference's per-element terms (the mixtures in log space: a teacher bucket below fp32's
    range against a student's ~0 gave M = 0 and an infinite term when formed as w_p p + w_q q)."""
    return (divergence_terms(lq, lp, divergence, mix), qg_terms(lq, lp, divergence, mix),
            lq.exp())


def _teacher_buckets(lw, valid, tail, mode, target_scale, vocab):
    """Teacher bucket log-probs (k slots, and the tail bucket for MODE_TAIL) and a 'live' mask."""
    lw = torch.where(valid, lw, -torch.inf)
    if mode != MODE_TAIL:
        if target_scale != 1.0:
            lw = lw * target_scale
        z = torch.logsumexp(lw, -1, keepdim=True)
        live = z.squeeze(-1) > -torch.inf
        return torch.where(valid, lw - z, -torch.inf), None, live
    lk = torch.logsumexp(lw, -1)
    lt = log1mexp(lk) if tail is None else tail
    # Targets covering the whole vocabulary leave no tail bucket (whatever rounding says).
    lt = torch.where(valid.sum(-1) == vocab, -torch.inf, lt)
    z = torch.logaddexp(lk, lt)
    live = z > -torch.inf
    return torch.where(valid, lw - z.unsqueeze(-1), -torch.inf), lt - z, live


def _log_softmax_at(x: torch.Tensor, x_k: torch.Tensor) -> torch.Tensor:
    """log softmax(x) (over the last axis) at the values x_k, as (x_k - m) - log z with m the row
    max: x_k - m is exact near the max, where x_k - logsumexp(x) rounds at the scale of x (|x| ~
    290 at tau = 0.2 is 3e-5 in float32, and reverse KL multiplies it by R). A -inf max shifts by
    0 (no NaN); a +inf or NaN one makes the row NaN."""
    m = x.amax(-1, keepdim=True)
    m = torch.where(m == -torch.inf, torch.zeros_like(m), m)
    return (x_k - m) - torch.log(torch.exp(x - m).sum(-1, keepdim=True))


def _sparse_chunk(s, ids, lw, tail, labels, *, divergence, mix, mode, temperature, target_scale,
                  soft_coef, hard_coef, ignore_index, want_grad):
    """(per-row loss, gradient or None) of one chunk of rows, in the compute dtype of ``s``."""
    a = s / temperature
    lse_a = torch.logsumexp(a, -1)
    valid = ids >= 0
    safe = torch.where(valid, ids, torch.zeros_like(ids))
    a_k = torch.where(valid, a.gather(1, safe), -torch.inf)
    lp, lp_tail, live = _teacher_buckets(lw, valid, tail, mode, target_scale, s.shape[1])
    # log q as (a - max) - log z (LogNormalizer's order): a - lse rounds at the logits' scale
    lq = torch.where(valid, _log_softmax_at(a_k if mode == MODE_SUPPORT else a, a_k), -torch.inf)
    term, qg, q = bucket_terms(lq, lp, divergence, mix)
    soft = term.sum(-1)
    big_c = qg.sum(-1)
    rows = torch.arange(s.shape[0], device=s.device).unsqueeze(-1).expand_as(ids)
    if mode == MODE_TAIL:
        outside = a.clone()
        outside[rows[valid], ids[valid]] = -torch.inf
        # in float64, as the kernels' row algebra: the difference of two logsumexps of the size of
        # a would lose that many ulps of the compute dtype
        wide_out = torch.logsumexp(outside.to(torch.float64), -1)
        lq_tail = (wide_out - torch.logsumexp(a.to(torch.float64), -1)).to(a.dtype)
        lse_out = wide_out.to(a.dtype)
        t_term, t_qg, t_q = bucket_terms(lq_tail, lp_tail, divergence, mix)
        soft = soft + t_term
        big_c = big_c + t_qg
    live = live & valid.any(-1)
    soft = torch.where(live, soft, torch.zeros_like(soft))
    loss = soft_coef * soft
    row_ok = torch.ones_like(live) if labels is None else labels != ignore_index
    lse_1 = lse_a if temperature == 1.0 else torch.logsumexp(s, -1)
    if labels is not None and hard_coef != 0:
        lab = torch.where(row_ok, labels, torch.zeros_like(labels))
        loss = loss + hard_coef * (lse_1 - s.gather(1, lab.unsqueeze(-1)).squeeze(-1))
    loss = torch.where(row_ok, loss, torch.zeros_like(loss))
    if not want_grad:
        return loss, None

    soft_scale = soft_coef / temperature
    u = torch.where(live.unsqueeze(-1) & valid, qg - q * big_c.unsqueeze(-1), torch.zeros_like(qg))
    if mode == MODE_FULL:
        c_out, lse_out = -big_c, lse_a
    elif mode == MODE_TAIL:
        c_out = t_qg - t_q * big_c
    else:
        c_out, lse_out = torch.zeros_like(big_c), lse_a
    c_out = torch.where(live, c_out, torch.zeros_like(c_out))
    dense_w = torch.exp(a - lse_out.unsqueeze(-1))
    g = torch.where((c_out != 0).unsqueeze(-1), (soft_scale * c_out).unsqueeze(-1) * dense_w,
                    torch.zeros_like(a))
    g[rows[valid], ids[valid]] = (soft_scale * u)[valid]
    if labels is not None and hard_coef != 0:
        ce = torch.exp(s - lse_1.unsqueeze(-1))
        ce.scatter_add_(1, lab.unsqueeze(-1), -torch.ones_like(ce[:, :1]))
        g = g + hard_coef * ce
    g = torch.where(row_ok.unsqueeze(-1), g, torch.zeros_like(g))
    return loss, g


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
    """Per-row sparse loss (N,) (float32; float64 for float64 inputs); writes d loss / d student into
    ``grad`` (times ``grad_scale``) when given. ``ids`` (N, k) int32/int64, -1 = padding; every
    valid id in [0, V) and unique in its row (checked by the caller)."""
    n, v = student.shape
    dtype = compute_dtype(student, logprobs)
    out = torch.empty(n, dtype=dtype, device=student.device)
    rows = max(1, CHUNK_ELEMENTS // max(v, 1))
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        with torch.no_grad():
            loss, g = _sparse_chunk(
                student[lo:hi].detach().to(dtype), ids[lo:hi].to(torch.int64),
                logprobs[lo:hi].detach().to(dtype),
                None if tail_logmass is None else tail_logmass[lo:hi].detach().to(dtype),
                None if labels is None else labels[lo:hi],
                divergence=divergence, mix=mix, mode=mode, temperature=temperature,
                target_scale=target_scale, soft_coef=soft_coef, hard_coef=hard_coef,
                ignore_index=ignore_index, want_grad=grad is not None,
            )
            out[lo:hi] = loss
            if g is not None:
                if grad_scale is not None:
                    g = g * grad_scale.to(dtype)
                grad[lo:hi] = g.to(grad.dtype)
    return out


# ----------------------------------------------------------------------------- teacher side


def _select_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of the k largest entries of each row, by value descending then id ascending, in O(V)
    per row (torch.topk alone does not promise which of tied values it keeps). NaN ranks first."""
    x = torch.nan_to_num(x, nan=torch.inf, posinf=torch.inf, neginf=-torch.inf)
    kth = torch.topk(x, k, dim=-1, sorted=False).values.min(-1, keepdim=True).values
    above = x > kth
    need = k - above.sum(-1, keepdim=True)
    tied = x == kth
    take = above | (tied & (tied.cumsum(-1) <= need))
    sel = take.nonzero()[:, 1].reshape(x.shape[0], k)  # ascending ids per row
    order = torch.sort(x.gather(1, sel), dim=-1, descending=True, stable=True).indices
    return sel.gather(1, order)


def topk_forward(teacher: torch.Tensor, k: int, *, temperature: float):
    """(ids int32 (N, k), logprobs float32 (N, k), tail_logmass float32 (N,)) of each row's top-k
    under softmax(teacher / temperature); ties by lower id; tail = log of the mass outside."""
    n, v = teacher.shape
    ids = torch.empty(n, k, dtype=torch.int32, device=teacher.device)
    lps = torch.empty(n, k, dtype=torch.float32, device=teacher.device)
    tail = torch.empty(n, dtype=torch.float32, device=teacher.device)
    dtype = compute_dtype(teacher)
    rows = max(1, CHUNK_ELEMENTS // max(v, 1))
    with torch.no_grad():
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            x = teacher[lo:hi].to(dtype)
            # Shifted by the row max before anything is subtracted: a - m is exact, while
            # a - logsumexp(a) rounds at the scale of the logits (4.8e-4 off at |logits| ~ 1e4 in
            # fp32; the CPU and CUDA kernels, which work in double, were 1e-7 off).
            a = x / temperature
            m = a.amax(-1, keepdim=True)
            # (a +inf max shifts too: inf - inf makes the row NaN, as in the kernels; a row with
            # a +inf logit has no softmax)
            a = a - torch.where(m == -torch.inf, torch.zeros_like(m), m)
            lse = torch.logsumexp(a, -1, keepdim=True)
            sel = _select_topk(x, k)
            ids[lo:hi] = sel.to(torch.int32)
            lps[lo:hi] = (a.gather(1, sel) - lse).to(torch.float32)
            rest = a.scatter(1, sel, -torch.inf)
            tail[lo:hi] = (torch.logsumexp(rest, -1, keepdim=True) - lse).squeeze(-1).float()
    return ids, lps, tail


def merge_draws(best_id: torch.Tensor, x_at: torch.Tensor, delta: torch.Tensor):
    """Merge duplicate draws (best_id int64 (N, S); x_at, the logits at them, in the compute dtype;
    delta, 0-dim in that dtype): unique ids with log normalised weights log(count) + (x - x_max)
    delta, ordered by weight descending then id ascending, padded with (-1, -inf). x_max, the row's
    largest drawn logit, cancels on normalisation; without it x delta rounds at the logits' scale
    (at |x| ~ 3e4 a float32 weight was 1e-3 off), with it at the scale of their differences."""
    sorted_ids, order = torch.sort(best_id, dim=-1, stable=True)
    xs = x_at.gather(1, order)
    xs = xs - xs.amax(-1, keepdim=True)
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    group = first.to(torch.int64).cumsum(-1) - 1
    counts = torch.zeros_like(xs).scatter_add_(1, group, torch.ones_like(xs))
    lw = torch.where(first, torch.log(counts.gather(1, group)) + xs * delta, -torch.inf)
    # (the padding stays -inf even when a row's weights are NaN: an all -inf row, -inf * 0)
    lp = torch.where(first, lw - torch.logsumexp(lw, -1, keepdim=True), -torch.inf)
    out_ids = torch.where(first, sorted_ids, torch.full_like(sorted_ids, -1))
    perm = torch.sort(lp, dim=-1, descending=True, stable=True).indices
    return out_ids.gather(1, perm), lp.gather(1, perm)


def merge_sampled(teacher: torch.Tensor, draws: torch.Tensor, delta: torch.Tensor):
    """sample_forward's outputs from raw draws (the CUDA kernel's, and the Triton kernel's past
    its in-kernel merge): merge_draws over the logits at the drawn ids."""
    dtype = delta.dtype
    ids, lps = merge_draws(draws, teacher.gather(1, draws).to(dtype), delta.to(teacher.device))
    tail = torch.full((teacher.shape[0],), -torch.inf, dtype=torch.float32, device=teacher.device)
    return ids.to(torch.int32), lps.to(torch.float32), tail


def sample_forward(teacher: torch.Tensor, num_samples: int, *, temperature: float,
                   proposal_temperature: float, seed: int):
    """(ids int32 (N, S), logprobs float32 (N, S), tail_logmass float32 (N,) = -inf): num_samples
    draws with replacement from softmax(teacher / (temperature * proposal_temperature)) by the
    Gumbel-max trick on targets/rng.py's noise, merged into unique ids with log normalised
    importance weights log(count_i p_i / q_i) (p at ``temperature``, q the proposal)."""
    n, v = teacher.shape
    s_count = num_samples
    dtype = compute_dtype(teacher)
    dev = teacher.device
    # (torch.full: a fill kernel, where torch.tensor copies from host memory, which a CUDA graph
    # capture does not allow)
    inv_prop = torch.full((), 1.0 / (temperature * proposal_temperature), dtype=dtype, device=dev)
    # log p_i - log q_i = x_i (1/T - 1/(T Tp)) + const; the constant cancels on normalisation.
    delta = torch.full((), 1.0 / temperature, dtype=dtype, device=dev) - inv_prop
    key = rng.seed_key(seed)
    ids = torch.empty(n, s_count, dtype=torch.int32, device=dev)
    lps = torch.empty(n, s_count, dtype=torch.float32, device=dev)
    tail = torch.full((n,), -torch.inf, dtype=torch.float32, device=dev)
    rows = max(1, min(n, CHUNK_ELEMENTS // max(v, 1)))
    cols = max(1, CHUNK_ELEMENTS // (rows * s_count))
    samples = torch.arange(s_count, device=dev)
    with torch.no_grad():
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            x = teacher[lo:hi].to(dtype)
            sk = rng.sample_keys(rng.row_keys(key, torch.arange(lo, hi, device=dev)), samples)
            best = torch.full((hi - lo, s_count), -torch.inf, dtype=dtype, device=dev)
            best_id = torch.zeros(hi - lo, s_count, dtype=torch.int64, device=dev)
            for c0 in range(0, v, cols):
                c1 = min(v, c0 + cols)
                noise = rng.gumbel(sk.unsqueeze(-1), rng.vocab_keys(torch.arange(c0, c1, device=dev)),
                                   dtype)
                score = (x[:, c0:c1] * inv_prop).unsqueeze(1) + noise
                bmax, barg = score.max(-1)
                upd = bmax > best
                best = torch.where(upd, bmax, best)
                best_id = torch.where(upd, barg + c0, best_id)
            out_ids, out_lp = merge_draws(best_id, x.gather(1, best_id), delta)
            ids[lo:hi] = out_ids.to(torch.int32)
            lps[lo:hi] = out_lp.to(torch.float32)
    return ids, lps, tail
