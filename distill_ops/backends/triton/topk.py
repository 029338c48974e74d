"""Triton kernels of the teacher side: top-k targets and sampled targets, one streaming pass over
the teacher logits per row, with no probability tensor.

Top-k. Each (value, id) pair is packed into one int64 key, (order-preserving bits of the float32
value) << 32 | (2^32 - 1 - id), so that one integer comparison orders by value descending and then
id ascending (ties go to the lower id). A program keeps the row's running top-k keys in registers;
for each block it updates the online normalizer and, only if some key of the block beats the current
k-th key, merges the block into the running set with Triton's bitonic top-k. The mass outside the
top-k is accumulated exactly, without a subtraction: every element that is never in (or drops out
of) the running set adds its exp to a tail sum at the moment it is rejected. A tail too far below
the row max for that sum (its terms underflow) is summed again at the end, over the keys below the
k-th, relative to its own max (TAIL_REFIT_LOG).

Sampling. num_samples Gumbel-max races run side by side over the row: for each block, a
(samples x block) tile of counter-based noise (targets/rng.py: the same bits as the reference)
is added to the tempered logits and each sample keeps its running argmax (the lower id on ties).
Then duplicates are merged (a samples x samples comparison in the kernel up to
MERGE_IN_KERNEL_MAX_S samples, else reference_sparse.merge_sampled on the raw draws), the log
normalised importance weights
log(count_i) + x_i (1/T - 1/(T Tp)) - lse are computed and the unique ids are written by weight
descending, then id ascending, padded with (-1, -inf).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...targets import rng
from ..reference_sparse import merge_sampled
from .dense import _online_update
from .mul_rn import mul_rn
from .scalars import acc_scalar

MIN_KEY = tl.constexpr(-(1 << 63))  # a kernel may read only constexpr globals
# rng.noise_log's constants and rng.h kGumbelMax, as Triton compile-time constants.
P0, P1, P2, P3, P4, P5, P6, P7, P8 = (tl.constexpr(c) for c in rng.LOG_POLY)
LN2_HI = tl.constexpr(rng.LN2_HI)
LN2_LO = tl.constexpr(rng.LN2_LO)
SQRT_HALF = tl.constexpr(rng.SQRT_HALF)
GUMBEL_MAX = tl.constexpr(rng.GUMBEL_MAX)
# csrc/include/distill_ops/tail_refit.h kTailRefitLog: a tail whose streamed log-mass relative to
# the row max is below it is summed again (the streamed terms underflow far below the max).
TAIL_REFIT_LOG = tl.constexpr(-40.0)
# Tests set this to force several blocks per row on small vocabularies (the interpreter is slow).
BLOCK_OVERRIDE = None


@triton.jit
def _order_bits(x):
    """float32 -> int32 whose signed order is the float order (-0.0 and +0.0 equal)."""
    b = (x + 0.0).to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_value(key):
    """The float32 value packed in a key."""
    o = (key >> 32).to(tl.int32)
    return (o ^ ((o >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _key_id(key):
    return 0xFFFFFFFF - (key & 0xFFFFFFFF)


@triton.jit
def _topk_kernel(
    x_ptr, ids_ptr, lp_ptr, tail_ptr,
    V, K, stride_x, stride_i, stride_l, inv_tau: tl.float64,
    ACC: tl.constexpr, BLOCK: tl.constexpr, KP: tl.constexpr,
):
    inv_tau = acc_scalar(inv_tau, ACC)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    base = tl.arange(0, BLOCK)
    kk = tl.arange(0, KP)
    neg_inf = float("-inf")
    run = tl.full([KP], MIN_KEY, tl.int64)
    kth = tl.full([], MIN_KEY, tl.int64)
    m = tl.full([], neg_inf, ACC)
    z = tl.zeros([], ACC)
    zt = tl.zeros([], ACC)  # mass outside the running top-k, relative to exp(m)
    for start in range(0, V, BLOCK):
        offs = start + base
        mask = offs < V
        x = tl.load(x_row + offs, mask=mask, other=neg_inf)
        a = mul_rn(x.to(ACC), inv_tau)
        m_new = tl.maximum(m, tl.max(a, axis=0))
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
        r = tl.exp(m - m_safe)
        e = tl.exp(a - m_safe)
        z = z * r + tl.sum(e, axis=0)
        zt = zt * r
        m = m_new
        key = (_order_bits(x.to(tl.float32)).to(tl.int64) << 32) | (0xFFFFFFFF - offs.to(tl.int64))
        key = tl.where(mask, key, MIN_KEY)
        if tl.max(key, axis=0) > kth:
            cand = tl.topk(key, KP)
            merged = tl.topk(tl.join(run, cand).reshape(2 * KP), KP)
            merged = tl.where(kk < K, merged, MIN_KEY)
            new_kth = tl.min(tl.where(kk < K, merged, 0x7FFFFFFFFFFFFFFF), axis=0)
            # Rejected now: the block's elements below the new k-th key and the old members that
            # fell below it (old members below the old k-th key were counted when rejected).
            zt += tl.sum(tl.where(key < new_kth, e, 0.0), axis=0)
            old_a = mul_rn(_key_value(run).to(ACC), inv_tau)
            dropped = (run > MIN_KEY) & (run < new_kth)
            zt += tl.sum(tl.where(dropped, tl.exp(old_a - m_safe), 0.0), axis=0)
            run = merged
            kth = new_kth
        else:
            zt += tl.sum(e, axis=0)
    # log-probabilities as (a - m) - log z: a - m is exact, m + log z would round at the scale of
    # the logits (4.8e-4 off at |logits| ~ 1e4 in fp32).
    m_safe = tl.where(m == neg_inf, 0.0, m)
    log_z = tl.log(z)  # (an all -inf row: log 0 = -inf, and its log-probabilities NaN as before)
    kmask = kk < K
    ids = _key_id(run)
    lp = (mul_rn(_key_value(run).to(ACC), inv_tau) - m_safe) - log_z
    tl.store(ids_ptr + row * stride_i + kk, ids.to(tl.int32), mask=kmask)
    tl.store(lp_ptr + row * stride_l + kk, lp.to(tl.float32), mask=kmask)
    log_tail = tl.log(zt)  # relative to exp(m)
    if (log_tail < TAIL_REFIT_LOG) & (K < V):
        m_o = tl.full([], neg_inf, ACC)
        z_o = tl.zeros([], ACC)
        for start in range(0, V, BLOCK):
            offs = start + base
            mask = offs < V
            x = tl.load(x_row + offs, mask=mask, other=neg_inf)
            a = mul_rn(x.to(ACC), inv_tau)
            key = (_order_bits(x.to(tl.float32)).to(tl.int64) << 32) | (0xFFFFFFFF - offs.to(tl.int64))
            m_o, z_o, _r, _e = _online_update(m_o, z_o, tl.where(mask & (key < kth), a, neg_inf))
        log_tail = (m_o - m_safe) + tl.log(z_o)
    tail = log_tail - log_z
    tl.store(tail_ptr + row, tail.to(tl.float32))


@triton.jit
def _fmix32(h):
    h ^= h >> 16
    h *= 0x7FEB352D
    h ^= h >> 15
    h *= 0x846CA68B
    h ^= h >> 16
    return h


@triton.jit
def _vocab_key(cols):
    return _fmix32(cols.to(tl.uint32) ^ 0x2545F491)


@triton.jit
def _uniform_rank(sample_key, vocab_key):
    """rng.uniform_rank: bits >> 9, the 23-bit rank that u (and the noise) is a function of."""
    return _fmix32(sample_key ^ vocab_key) >> 9


@triton.jit
def _noise_log(x):
    """rng.noise_log: the same operations in the same order (the kernel is compiled without FMA
    contraction, so every product is rounded on its own)."""
    b = x.to(tl.int32, bitcast=True)
    e = ((b >> 23) - 126).to(tl.float32)
    m = ((b & 0x7FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    small = m < SQRT_HALF
    e = tl.where(small, e - 1.0, e)
    f = tl.where(small, (m + m) - 1.0, m - 1.0)
    z = f * f
    p = f * 0.0 + P0
    p = p * f + P1
    p = p * f + P2
    p = p * f + P3
    p = p * f + P4
    p = p * f + P5
    p = p * f + P6
    p = p * f + P7
    p = p * f + P8
    y = (p * f) * z
    y = y + e * LN2_LO
    y = y - z * 0.5
    r = f + y
    return r + e * LN2_HI


@triton.jit
def _gumbel_of_rank(k, ACC: tl.constexpr):
    u = (k.to(tl.float32) + 0.5) * 1.1920928955078125e-07
    return (-_noise_log(-_noise_log(u))).to(ACC)


@triton.jit
def _losing_rank(a, bound):
    """rng.h losing_rank: ranks below it cannot lift a column at a to the score `bound`."""
    d = a - bound
    raised = d * tl.where(d < 0.0, 1.0 - 2e-6, 1.0 + 2e-6) + (2e-3 + 4e-6 * tl.abs(bound))
    lose = tl.exp(-tl.exp(raised)) * 0.99999
    k = tl.ceil(lose * 8388608.0 - 0.5)
    return tl.where(k > 0.0, k, 0.0).to(tl.uint32)


@triton.jit(do_not_specialize=["seed_key"])
def _sample_kernel(
    x_ptr, ids_ptr, lp_ptr, draws_ptr,
    V, S, stride_x, stride_i, stride_l, stride_d, inv_prop: tl.float64, delta: tl.float64, seed_key,
    ACC: tl.constexpr, BLOCK: tl.constexpr, SP: tl.constexpr, MERGE: tl.constexpr,
):
    inv_prop = acc_scalar(inv_prop, ACC)
    delta = acc_scalar(delta, ACC)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    neg_inf = float("-inf")
    ss = tl.arange(0, SP)
    key = seed_key.to(tl.uint32)
    row_key = _fmix32(key ^ _fmix32(row.to(tl.uint32) + 0x9E3779B9))
    sample_key = _fmix32(row_key ^ _fmix32(ss.to(tl.uint32) + 0x632BE5AB))
    base = tl.arange(0, BLOCK)
    # Pass 1: the row's largest a_j = x_j * inv_prop and its first column jm (NaN ignored). Every
    # race starts at jm's score, a good leader from the start, so pass 2 can skip exactly: a block
    # whose largest a_j is more than GUMBEL_MAX below the lowest leader, and otherwise, unless some
    # (sample, column) rank of the block reaches rng.h losing_rank, the block's logs.
    amax = tl.full([], neg_inf, ACC)
    jm = tl.zeros([], tl.int64)
    for start in range(0, V, BLOCK):
        offs = start + base
        a = tl.load(x_row + offs, mask=offs < V, other=neg_inf).to(ACC) * inv_prop
        a = tl.where(a == a, a, neg_inf)
        bm, bi = tl.max(a, axis=0, return_indices=True, return_indices_tie_break_left=True)
        upd = bm > amax
        jm = tl.where(upd, start + bi.to(tl.int64), jm)
        amax = tl.where(upd, bm, amax)
    best = amax + _gumbel_of_rank(_uniform_rank(sample_key, _vocab_key(jm)), ACC)
    best_id = tl.zeros([SP], tl.int64) + jm
    valid = ss < S  # the padding samples up to SP: not in the floor, not raced, not written
    for start in range(0, V, BLOCK):
        offs = start + base
        mask = offs < V
        a = tl.load(x_row + offs, mask=mask, other=neg_inf).to(ACC) * inv_prop
        a = tl.where(a == a, a, neg_inf)  # a NaN score never wins (as in the CPU and CUDA kernels)
        floor = tl.min(tl.where(valid, best, float("inf")), axis=0)
        if tl.max(a, axis=0) + GUMBEL_MAX >= floor:
            lose = _losing_rank(a.to(tl.float32), floor.to(tl.float32))
            rank = _uniform_rank(sample_key[:, None], _vocab_key(offs)[None, :])
            live = (rank >= lose[None, :]) & mask[None, :] & valid[:, None]
            if tl.max(live.to(tl.int32)) > 0:
                score = tl.where(live, a[None, :] + _gumbel_of_rank(rank, ACC), neg_inf)
                bmax, barg = tl.max(score, axis=1, return_indices=True,
                                    return_indices_tie_break_left=True)
                bid = start + barg.to(tl.int64)
                upd = (bmax > best) | ((bmax == best) & (bid < best_id))
                best = tl.where(upd, bmax, best)
                best_id = tl.where(upd, bid, best_id)

    if not MERGE:  # the raw draws; sample_forward merges them (merge_sampled)
        tl.store(draws_ptr + row * stride_d + ss, best_id, mask=valid)
        return
    # Merge duplicates and weight the unique ids.
    x_at = tl.load(x_row + best_id, mask=valid, other=0.0).to(ACC)
    same = (best_id[:, None] == best_id[None, :]) & valid[:, None] & valid[None, :]
    count = tl.sum(same.to(tl.int32), axis=1)
    earlier = same & (ss[None, :] < ss[:, None])
    first = valid & (tl.sum(earlier.to(tl.int32), axis=1) == 0)
    # relative to the largest drawn logit (reference_sparse.merge_draws says why)
    x_rel = x_at - tl.max(tl.where(valid, x_at, neg_inf), axis=0)
    lw = tl.where(first, tl.log(count.to(ACC)) + mul_rn(x_rel, delta), neg_inf)
    mx = tl.max(lw, axis=0)
    lp = lw - (mx + tl.log(tl.sum(tl.exp(lw - mx), axis=0)))
    # Output slot: rank by (weight desc, id asc) among the unique ids; the duplicates fill the
    # remaining slots in sample order, as padding.
    lp_i = lp[:, None]
    lp_j = lp[None, :]
    before = first[None, :] & ((lp_j > lp_i) | ((lp_j == lp_i) & (best_id[None, :] < best_id[:, None])))
    rank = tl.sum(before.to(tl.int32), axis=1)
    n_unique = tl.sum(first.to(tl.int32), axis=0)
    dup = valid & (first == 0)
    rank_dup = tl.sum((dup[None, :] & (ss[None, :] < ss[:, None])).to(tl.int32), axis=1)
    slot = tl.where(first, rank, n_unique + rank_dup)
    out_id = tl.where(first, best_id, -1)
    out_lp = tl.where(first, lp, neg_inf)
    tl.store(ids_ptr + row * stride_i + slot, out_id.to(tl.int32), mask=valid)
    tl.store(lp_ptr + row * stride_l + slot, out_lp.to(tl.float32), mask=valid)


def topk_forward(teacher: torch.Tensor, k: int, *, temperature: float):
    """reference_sparse.topk_forward's contract on the Triton kernel. Ranks by the value rounded to
    float32 (exact for fp32/bf16/fp16 inputs)."""
    n, v = teacher.shape
    dev = teacher.device
    ids = torch.empty(n, k, dtype=torch.int32, device=dev)
    lps = torch.empty(n, k, dtype=torch.float32, device=dev)
    tail = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return ids, lps, tail
    kp = max(triton.next_power_of_2(k), 2)
    block = max(min(triton.next_power_of_2(v), BLOCK_OVERRIDE or 1024), kp, 16)
    fp64 = teacher.dtype == torch.float64
    _topk_kernel[(n,)](
        teacher, ids, lps, tail, v, k, teacher.stride(0), ids.stride(0), lps.stride(0),
        1.0 / temperature, ACC=tl.float64 if fp64 else tl.float32, BLOCK=block, KP=kp,
        num_warps=4,
    )
    return ids, lps, tail


# The most samples whose duplicates the kernel merges itself: the merge compares every pair, in
# SP x SP tiles, and above this they spill (S = 256: 2.8 KB of stack a thread on sm_90) and
# take minutes to compile (S = 1024: a 9.5 MB PTX, 24 min on a 2-core machine). Past it the
# kernel writes the raw draws and reference_sparse.merge_sampled merges them (as for CUDA).
MERGE_IN_KERNEL_MAX_S = 128


def sample_forward(teacher: torch.Tensor, num_samples: int, *, temperature: float,
                   proposal_temperature: float, seed: int):
    """reference_sparse.sample_forward's contract on the Triton kernel."""
    n, v = teacher.shape
    dev = teacher.device
    ids = torch.empty(n, num_samples, dtype=torch.int32, device=dev)
    lps = torch.empty(n, num_samples, dtype=torch.float32, device=dev)
    tail = torch.full((n,), -torch.inf, dtype=torch.float32, device=dev)
    if n == 0:
        return ids, lps, tail
    sp = max(triton.next_power_of_2(num_samples), 2)
    # A (samples x block) tile of 4096 noise values over 8 warps: 58-128 registers on sm_90 and no
    # spills (8192 values over 4 warps took 225-255 and spilled at S = 64; bench/triton_aot.py).
    block = max(min(triton.next_power_of_2(v), BLOCK_OVERRIDE or max(4096 // sp, 16)), 16)
    fp64 = teacher.dtype == torch.float64
    inv_prop = 1.0 / (temperature * proposal_temperature)
    if fp64:
        delta = 1.0 / temperature - inv_prop
    else:  # the same float32 rounding as the reference
        inv32 = torch.tensor(inv_prop, dtype=torch.float32)
        delta = float(torch.tensor(1.0 / temperature, dtype=torch.float32) - inv32)
    merge = num_samples <= MERGE_IN_KERNEL_MAX_S
    draws = ids if merge else torch.empty(n, num_samples, dtype=torch.int64, device=dev)
    _sample_kernel[(n,)](
        teacher, ids, lps, draws, v, num_samples, teacher.stride(0), ids.stride(0),
        lps.stride(0), draws.stride(0), inv_prop, delta, rng.seed_key(seed),
        ACC=tl.float64 if fp64 else tl.float32, BLOCK=block, SP=sp, MERGE=merge,
        # per-sample state is spread over the threads: from 128 samples on, 16 warps halve the
        # registers (sm_90, ptxas: S = 128 255 -> 128, 512 243 -> 125; S = 1024 still spills
        # 296 B of stack, against 568 B on 8 warps)
        num_warps=8 if sp <= 64 else 16, enable_fp_fusion=False,
    )
    if not merge:
        dtype = torch.float64 if fp64 else torch.float32
        # torch.full, not a copy from host memory (which a CUDA graph capture refuses)
        return merge_sampled(teacher, draws, torch.full((), delta, dtype=dtype, device=dev))
    return ids, lps, tail
