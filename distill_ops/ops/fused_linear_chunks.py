"""The fused-linear losses' chunk loop (fused_linear.py), and the custom op torch.compile sees.

Per chunk of tokens: project both sides to logits, run the fused kernel, which writes d loss /
d student-logits over the student chunk's own buffer, and turn that gradient into the gradients of
the student hidden states, weight and bias with two GEMMs.

Why a custom op: traced, the Python loop ``range(0, N, chunk)`` pins the token count N, so every
new N compiled the step anew (and ``fullgraph=True`` failed at dynamo's recompile limit). As one
opaque node with a fake kernel, the loop runs eagerly inside the compiled step, N stays symbolic,
and the kernels write the gradient in place there too (no second chunk-sized buffer).
"""

# (No `from __future__ import annotations`, and typing.List: torch 2.4's custom_op reads the
# annotations as objects and knows typing.List[int], not list[int].)

from typing import List, Optional

import torch

from .. import backends
from ..constants import sparse_mode
from . import scalar_args
from .sparse import _impl as sparse_impl
from .teacher_dtype import teacher_as

# A chunk's logits, per side, at most this many bytes when no chunk size is given.
CHUNK_BYTES = 256 * 1024 * 1024
# Rows per slice of the entropy metric: its float32 temporaries stay near 16 MiB.
ENTROPY_ELEMENTS = 1 << 22
# Which of each kind's constants are ints (the rest are floats): the custom op takes them as
# two lists. dense: (divergence, mix, temperature, softcap, soft_coef, hard_coef, ignore_index);
# sparse: (divergence, mix, mode, temperature, target_scale, soft_coef, hard_coef, ignore_index).
INT_SLOTS = {"dense": (0, 6), "sparse": (0, 2, 7)}


def default_chunk_size(n: int, v: int, itemsize: int) -> int:
    """The largest power of two of rows whose logits fit in CHUNK_BYTES (at least 1, at most n)."""
    rows = max(1, CHUNK_BYTES // max(v * itemsize, 1))
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(n, rows))


def project(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.mm(h, w.t()) if b is None else torch.addmm(b, h, w.t())


def entropy_sum(logits: torch.Tensor, tau: float, cap: float) -> torch.Tensor:
    """Sum over the rows of the entropy (nats) of softmax(cap tanh(logits / cap) / tau), in float32:
    a metric (TRL's DistillationTrainer logs it), never differentiated."""
    rows = max(1, ENTROPY_ELEMENTS // max(logits.shape[1], 1))
    total = logits.new_zeros((), dtype=torch.float32)
    for lo in range(0, logits.shape[0], rows):
        z = logits[lo:lo + rows].float()
        if cap:
            z = torch.tanh(z / cap) * cap
        total += torch.special.entr(torch.softmax(z / tau, -1)).sum()
    return total


def grad_dtypes(w_s: torch.Tensor, b_s: Optional[torch.Tensor], defer: bool) -> tuple:
    """The dtypes of the weight's and the bias's gradients as run_chunks returns them: their own,
    or float32 (or wider) when the float16 forward defers the mean's 1/N (then they are sums over
    the tokens, which in float16 could pass 65504)."""
    wide = (lambda t: None if t is None else torch.promote_types(t.dtype, torch.float32))
    own = (lambda t: None if t is None else t.dtype)
    return (wide(w_s), wide(b_s)) if defer else (own(w_s), own(b_s))


def _chunk_loss(kind: str, kernel, s: torch.Tensor, lo: int, hi: int, targets: tuple, labels,
                consts: tuple, need: bool, scale) -> torch.Tensor:
    """One chunk's summed loss; the backend writes d loss / d s (times ``scale``) over ``s``."""
    lab = None if labels is None else labels[lo:hi]
    grad = s if need else None
    if kind == "dense":   # targets: the teacher's hidden states, weight, bias
        h_t, w_t, b_t = targets
        code, mix, tau, cap, soft_coef, hard_coef, ignore_index = consts
        # The kernels take one dtype for both sides (as kd_loss, the teacher is cast).
        t = teacher_as(project(h_t[lo:hi], w_t, b_t), s.dtype, softcapped=cap > 0)
        rows = kernel(s, t, lab, divergence=code, mix=mix, temperature=tau, softcap=cap,
                      soft_coef=soft_coef, hard_coef=hard_coef, ignore_index=ignore_index,
                      grad=grad, grad_scale=scale)
    else:                 # sparse: the ids, log-weights and tail log-mass
        ids, lp, tail = targets
        code, mix, mode, tau, target_scale, soft_coef, hard_coef, ignore_index = consts
        rows = kernel(s, ids[lo:hi], lp[lo:hi], None if tail is None else tail[lo:hi], lab,
                      divergence=code, mix=mix, mode=mode, temperature=tau,
                      target_scale=target_scale, soft_coef=soft_coef, hard_coef=hard_coef,
                      ignore_index=ignore_index, grad=grad, grad_scale=scale)
    return rows.sum()


def run_chunks(kind: str, h_s: torch.Tensor, w_s: torch.Tensor, b_s: Optional[torch.Tensor],
               targets: tuple, labels: Optional[torch.Tensor], consts: tuple,
               scale: Optional[torch.Tensor], chunk: int, backend: str, needs: tuple,
               defer: bool, wide: bool, entropy: bool) -> tuple:
    """The loop, eagerly. ``h_s`` (N, H) is in the compute dtype; ``targets`` the dense teacher's
    (hidden states in its compute dtype, weight, bias) or the sparse (ids, log-weights, tail);
    ``chunk`` 0 picks default_chunk_size for the wider side's logits; ``scale`` is folded into the
    gradients unless ``defer``. Returns (summed loss, d/d h_s, d/d w_s, d/d b_s, the student's
    entropy sum or None); a gradient not in ``needs`` is None."""
    need_h, need_w, need_b = needs
    need = need_h or need_w or need_b
    n = h_s.shape[0]
    if not chunk:
        item = max(h_s.element_size(), targets[0].element_size() if kind == "dense" else 0)
        chunk = default_chunk_size(n, w_s.shape[0], item)
    kernel = (backends.get(backend, "dense_forward") if kind == "dense"
              else sparse_impl(backend, "loss").sparse_forward)
    grad_h = torch.empty_like(h_s) if need_h else None
    w_acc = None
    if need_w:
        # Accumulated in place in the weight's dtype when the GEMMs produce it; else in float32
        # (or better), so a bf16 chunk product is not rounded again per chunk.
        acc = (w_s.dtype if w_s.dtype == h_s.dtype and not defer
               else torch.promote_types(w_s.dtype, torch.float32))
        w_acc = torch.zeros(w_s.shape, dtype=acc, device=w_s.device)
    b_acc = (torch.zeros(b_s.shape, dtype=torch.promote_types(b_s.dtype, torch.float32),
                         device=b_s.device) if need_b else None)
    # A cast weight (autocast) is made once, not per chunk.
    ws = w_s.to(h_s.dtype)
    bs = None if b_s is None else b_s.to(h_s.dtype)
    if kind == "dense":
        h_t, w_t, b_t = targets
        targets = (h_t, w_t.to(h_t.dtype), None if b_t is None else b_t.to(h_t.dtype))
    parts = []
    ent = h_s.new_zeros((), dtype=torch.float32) if entropy else None
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        s = project(h_s[lo:hi], ws, bs)
        if entropy:   # the student's, before s is overwritten
            ent += entropy_sum(s, consts[2], consts[3])
        parts.append(_chunk_loss(kind, kernel, s, lo, hi, targets, labels, consts, need,
                                 None if defer else scale))
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
    w_dtype, b_dtype = grad_dtypes(w_s, b_s, defer)
    return (total, grad_h, None if w_acc is None else w_acc.to(w_dtype),
            None if b_acc is None else b_acc.to(b_dtype), ent)


@torch.library.custom_op("distill_ops::fused_linear_chunks", mutates_args=())
def fused_linear_chunks(
    h_s: torch.Tensor,
    w_s: torch.Tensor,
    b_s: Optional[torch.Tensor],
    target0: torch.Tensor,
    target1: torch.Tensor,
    target2: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    kind: str,
    int_consts: List[int],
    float_consts: List[float],
    chunk: int,
    backend: str,
    needs: List[bool],
    defer: bool,
    wide: bool,
    entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """run_chunks as one node: (loss, grad_h, grad_w, grad_b, entropy), a gradient not needed (and
    the entropy not asked for) as an empty tensor."""
    consts = _merged(kind, int_consts, float_consts)
    return _as_outputs(h_s, run_chunks(kind, h_s, w_s, b_s, (target0, target1, target2), labels,
                                       consts, scale, chunk, backend, tuple(needs), defer, wide,
                                       entropy))


@torch.library.custom_op("distill_ops::fused_linear_chunks_scalars", mutates_args=(),
                         **scalar_args.OP_TAGS)
def fused_linear_chunks_scalars(
    h_s: torch.Tensor,
    w_s: torch.Tensor,
    b_s: Optional[torch.Tensor],
    target0: torch.Tensor,
    target1: torch.Tensor,
    target2: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    kind: str,
    int_consts: List[int],
    float_consts: List[float],
    chunk: int,
    backend: str,
    needs: List[bool],
    defer: bool,
    wide: bool,
    entropy: bool,
    scalars: torch.Tensor,
    divergence: str,
    tail: str,
    scale_temperature: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fused_linear_chunks with the temperature, beta, alpha and weights packed in ``scalars``
    (ops/scalar_args.py), read and checked when it runs; the constants they make replace
    the stand-ins' in ``int_consts`` and ``float_consts``."""
    consts = _with_values(kind, _merged(kind, int_consts, float_consts), h_s, labels, scalars,
                          divergence, tail, scale_temperature)
    return _as_outputs(h_s, run_chunks(kind, h_s, w_s, b_s, (target0, target1, target2), labels,
                                       consts, scale, chunk, backend, tuple(needs), defer, wide,
                                       entropy))


def _merged(kind: str, int_consts, float_consts) -> tuple:
    ints, floats = iter(int_consts), iter(float_consts)
    return tuple(next(ints) if i in INT_SLOTS[kind] else next(floats)
                 for i in range(len(int_consts) + len(float_consts)))


def _with_values(kind: str, consts: tuple, h_s, labels, scalars, divergence: str, tail: str,
                 scale_temperature: bool) -> tuple:
    code, mix, tau, soft_coef, hard_coef = scalar_args.read_constants(
        scalars, h_s, labels, divergence=divergence, scale_temperature=scale_temperature)
    if kind == "dense":
        cap, ignore_index = consts[3], consts[6]
        return (code, mix, tau, cap, soft_coef, hard_coef, ignore_index)
    target_scale, ignore_index = consts[4], consts[7]
    return (code, mix, sparse_mode(tail, code), tau, target_scale, soft_coef, hard_coef,
            ignore_index)


def _as_outputs(h_s: torch.Tensor, out: tuple) -> tuple:
    # a fresh empty per slot: outputs may not alias one another
    return tuple(h_s.new_empty(0) if t is None else t for t in out)


def _fake_outputs(h_s, w_s, b_s, needs, defer, wide, entropy) -> tuple:
    w_dtype, b_dtype = grad_dtypes(w_s, b_s, defer)
    need_h, need_w, need_b = needs
    return (h_s.new_empty((), dtype=torch.float64 if wide else torch.float32),
            torch.empty_like(h_s) if need_h else h_s.new_empty(0),
            w_s.new_empty(w_s.shape, dtype=w_dtype) if need_w else h_s.new_empty(0),
            b_s.new_empty(b_s.shape, dtype=b_dtype) if need_b else h_s.new_empty(0),
            h_s.new_empty((), dtype=torch.float32) if entropy else h_s.new_empty(0))


@fused_linear_chunks.register_fake
def _(h_s, w_s, b_s, target0, target1, target2, labels, scale, kind, int_consts, float_consts,
      chunk, backend, needs, defer, wide, entropy):
    return _fake_outputs(h_s, w_s, b_s, needs, defer, wide, entropy)


@fused_linear_chunks_scalars.register_fake
def _(h_s, w_s, b_s, target0, target1, target2, labels, scale, kind, int_consts, float_consts,
      chunk, backend, needs, defer, wide, entropy, scalars, divergence, tail, scale_temperature):
    return _fake_outputs(h_s, w_s, b_s, needs, defer, wide, entropy)


def run_chunks_traced(kind: str, h_s, w_s, b_s, targets: tuple, labels, consts: tuple, scale,
                      chunk: int, backend: str, needs: tuple, defer: bool, wide: bool,
                      entropy: bool, held: Optional[tuple] = None) -> tuple:
    """run_chunks through the custom op (under torch.compile), with its Nones back. ``held``:
    (scalars, divergence, tail, scale_temperature) when the hyperparameters are tensors (then
    ``consts`` holds stand-ins for what they make)."""
    slots = INT_SLOTS[kind]
    args = (h_s, w_s, b_s, *targets, labels, scale, kind,
            [c for i, c in enumerate(consts) if i in slots],
            [c for i, c in enumerate(consts) if i not in slots], chunk, backend, list(needs),
            defer, wide, entropy)
    out = (fused_linear_chunks(*args) if held is None
           else fused_linear_chunks_scalars(*args, *held))
    keep = (True,) + tuple(needs) + (entropy,)
    return tuple(t if k else None for t, k in zip(out, keep))
