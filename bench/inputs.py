"""The inputs of one case, and the bytes that must move (the bandwidth floor).

Every provider of a case sees the same values (fixed seed). Teacher logits are scaled so the
distributions are peaked like a real LM's rather than flat.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .providers import sparse_uses_full_vocab

SEED = 1234
LOGIT_SCALE = 4.0
# Rows processed at a time while making sparse targets (bounds the fp32 temporaries).
_TARGET_CHUNK_ELEMENTS = 1 << 26


def _logits(n: int, v: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    x = torch.randn(n, v, dtype=dtype, device=device, generator=gen)
    return x.mul_(LOGIT_SCALE)


def sparse_targets(teacher: torch.Tensor, k: int) -> tuple:
    """Top-k ids (int64) and their fp32 log-probabilities under the full-vocabulary softmax."""
    n, v = teacher.shape
    ids = torch.empty(n, k, dtype=torch.int64, device=teacher.device)
    logw = torch.empty(n, k, dtype=torch.float32, device=teacher.device)
    rows = max(1, _TARGET_CHUNK_ELEMENTS // max(v, 1))
    for start in range(0, n, rows):
        chunk = teacher[start:start + rows].float()
        lse = torch.logsumexp(chunk, dim=-1, keepdim=True)
        top, idx = chunk.topk(min(k, v), dim=-1)
        ids[start:start + rows] = idx
        logw[start:start + rows] = top - lse
    return ids, logw


def make(case, n: int, device: torch.device, *, seed_offset: int = 0) -> dict:
    """One input set: a dict with the tensors a provider's function takes."""
    gen = torch.Generator(device=device)
    gen.manual_seed(SEED + seed_offset)
    dtype = case.torch_dtype
    out: dict = {}
    if case.suite == "dense":
        out["student"] = _logits(n, case.v, dtype, device, gen)
        out["teacher"] = _logits(n, case.v, dtype, device, gen)
        if case.hard_label:
            out["labels"] = torch.randint(0, case.v, (n,), device=device, generator=gen)
    elif case.suite == "sparse":
        out["student"] = _logits(n, case.v, dtype, device, gen)
        teacher = _logits(n, case.v, dtype, device, gen)
        out["ids"], out["logw"] = sparse_targets(teacher, case.k)
        del teacher
    elif case.suite in ("topk", "sample"):
        out["teacher"] = _logits(n, case.v, dtype, device, gen)
    elif case.suite == "linear":
        # hidden ~ randn, weights ~ randn * LOGIT_SCALE / sqrt(H): logits ~ randn * LOGIT_SCALE
        for side, h in (("s", case.h), ("t", teacher_hidden(case))):
            out["h" + side] = torch.randn(n, h, dtype=dtype, device=device, generator=gen)
            out["w" + side] = torch.randn(case.v, h, dtype=dtype, device=device,
                                          generator=gen).mul_(LOGIT_SCALE / math.sqrt(h))
        if case.hard_label:
            out["labels"] = torch.randint(0, case.v, (n,), device=device, generator=gen)
    else:  # pragma: no cover - config validates suites
        raise ValueError(case.suite)
    return out


def teacher_hidden(case) -> int:
    """The linear suite's teacher hidden size: 1.5x the student's (as 3B over 1B Llamas)."""
    return case.h * 3 // 2


def linear_flops(case, n: int) -> int:
    """The linear suite's GEMM flops: both projections (2 N V H each), and for a gradient the
    student's two more (hidden and weight gradients)."""
    fwd = 2 * n * case.v * (case.h + teacher_hidden(case))
    return fwd + (4 * n * case.v * case.h if case.mode != "fwd" else 0)


def set_bytes(case, n: int) -> int:
    """Bytes of one input set."""
    elem = torch.empty(0, dtype=case.torch_dtype).element_size()
    if case.suite == "linear":
        return (n + case.v) * (case.h + teacher_hidden(case)) * elem
    nv = n * case.v * elem
    if case.suite == "dense":
        return 2 * nv + (8 * n if case.hard_label else 0)
    if case.suite == "sparse":
        return nv + n * case.k * 12
    return nv


# Rotation copies: at most this many sets, and together at most this many bytes (one set alone
# may be larger: then nothing rotates). 2x a CPU's last-level cache (a 384 MB L3 at most today)
# fits under the byte cap; a GPU's L2 (50-100 MB) under both.
MAX_COPIES = 32
ROTATION_CAP_BYTES = 2 ** 30


def copies_for_cache(case, n: int, cache_bytes: Optional[int], max_copies: int = MAX_COPIES,
                     cap_bytes: int = ROTATION_CAP_BYTES) -> int:
    """How many input sets to rotate among so that together they exceed twice the cache that
    would otherwise hold them between calls (a GPU's L2, a CPU's last-level cache), within
    ``max_copies`` sets and ``cap_bytes`` bytes in all."""
    if not cache_bytes:
        return 1
    one = max(set_bytes(case, n), 1)
    wanted = math.ceil(2 * cache_bytes / one)
    return max(1, min(max_copies, cap_bytes // one, wanted))


def floor_bytes(case, n: int) -> int:
    """Bytes that must move: read the logits once (fwd), and write the gradient once (fwdbwd, bwd).

    dense  fwd: student + teacher;  fwdbwd: student + teacher + gradient;  bwd: gradient only
           (every divergence: each needs both full rows, the mixture ones (JSD, skew KL,
           generalized JSD) no more than the KLs; their extra work is arithmetic, not bytes)
    sparse fwd: student + targets;  fwdbwd: student + targets + gradient;  bwd: gradient only
           (forward KL: q over the full vocabulary, every student logit read; the other
           divergences compare on the target support, so only the student's k logits at the ids
           must be read (n k elements), while the gradient is still a dense N x V tensor (zeros
           outside the ids) that must be written)
    topk   fwd: teacher + the k ids (int64) and log-probabilities (fp32) written per row
    sample fwd: the same, k = the number of samples (compute-bound: S x V noise draws per row)
    linear: the hidden states and weights read, their gradients written (the GEMMs dominate).
    All in the input dtype. ``bwd``: what a backward alone must write. The runner holds no bwd row
    against it (the fused providers make the gradient in the forward, so their bwd rows time a
    scale of it): bwd rows report times only.
    """
    elem = torch.empty(0, dtype=case.torch_dtype).element_size()
    nv = n * case.v * elem
    labels = 8 * n if case.hard_label else 0
    if case.suite == "linear":   # compute-bound: see linear_flops; bytes of inputs and gradients
        student = (n + case.v) * case.h * elem
        return {"fwd": set_bytes(case, n), "fwdbwd": set_bytes(case, n) + student,
                "bwd": student}[case.mode] + labels
    if case.suite == "dense":
        return {"fwd": 2 * nv + labels, "fwdbwd": 3 * nv + labels, "bwd": nv}[case.mode]
    targets = n * case.k * 12
    if case.suite == "sparse":
        if sparse_uses_full_vocab(case.divergence):
            student = nv
        else:
            student = n * case.k * elem
        return {"fwd": student + targets, "fwdbwd": student + targets + nv, "bwd": nv}[case.mode]
    return nv + targets
