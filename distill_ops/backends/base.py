"""The contract every dense-loss backend implements.

Every backend (reference torch, Triton, the compiled CPU and CUDA kernels) exposes one function,
``dense_forward``, with exactly this meaning. The public API (``distill_ops.kd_loss``) validates
its inputs, resolves its options into these plain numbers, and calls it.

Per row r (student logits s, teacher logits t, both of length V):

    s' = softcap(s), t' = softcap(t)          softcap(x) = c * tanh(x / c); identity when c == 0
    a = s' / tau,  b = t' / tau
    log q = log_softmax(a),  log p = log_softmax(b)
    D     = divergence(p, q)                  see DIVERGENCES below
    CE    = logsumexp(s') - s'[label]         hard-label cross-entropy at temperature 1
    loss[r] = soft_coef * D + hard_coef * CE  (0 for rows whose label == ignore_index)

Gradient (written only when ``grad`` is given, into ``grad`` in grad's dtype):

    grad[r, j] = grad_scale * softcap'(s_j) * ( soft_coef / tau * dD/da_j
                                                 + hard_coef * (softmax(s')_j - [j == label]) )

and 0 for ignored rows. For every divergence dD/da_j = qg_j - q_j * C with C = sum_i qg_i, where
qg_i = q_i * dD/dq_i (see ``distill_ops/backends/reference.py`` for the per-divergence formulas;
it is the oracle).

Shapes: ``student`` and ``teacher`` are 2-D (N, V) with unit stride on the last axis (row strides
may be larger than V: common-prefix views are passed without a copy); same N and V; the same dtype,
one of fp32/bf16/fp16/fp64 (the public API casts the teacher to the student's dtype if they differ: ops.teacher_dtype). ``labels`` is int64 (N,) or None; every label is either
ignore_index or in [0, V) (checked by the caller). ``grad_scale`` is a 0-dim float32 tensor (float64 for
float64 inputs) on the same device, or None for 1.0 (it carries 1/count for the "mean" reduction without a host sync).
``grad`` is None or (N, V) with unit last stride; it may be ``student`` itself (in-place gradient):
a backend must therefore read every student element of a row before it writes that element.
Returns ``loss``: (N,) float32, float64 for float64 inputs (accumulation is in fp32 for
fp32/bf16/fp16 and in fp64 for fp64).
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch

# Divergence codes shared with the kernels (csrc/include/distill_ops/divergence.h, triton/dense.py).
FORWARD_KL = 0
REVERSE_KL = 1
JSD = 2
SKEW_FORWARD_KL = 3
SKEW_REVERSE_KL = 4

DIVERGENCE_CODES = {
    "forward_kl": FORWARD_KL,
    "reverse_kl": REVERSE_KL,
    "jsd": JSD,
    "skew_forward_kl": SKEW_FORWARD_KL,
    "skew_reverse_kl": SKEW_REVERSE_KL,
}


# Sparse-loss modes shared with the kernels (csrc/include/distill_ops/sparse_math.h,
# triton/sparse.py): the student normalised over the full vocabulary, over the target support, or
# with a tail bucket.
MODE_FULL, MODE_SUPPORT, MODE_TAIL = 0, 1, 2


class DenseForward(Protocol):
    def __call__(
        self,
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
        """Return per-row float32 losses; write the row gradients into ``grad`` when given.

        ``mix`` is beta for JSD and alpha for the skew divergences (unused otherwise).
        """
        ...
