"""Sampled teacher targets (after "Sparse Logit Sampling", arXiv 2503.16870).

Per position, ``num_samples`` ids are drawn with replacement from the proposal q =
softmax(teacher_logits / (temperature * proposal_temperature)), by the Gumbel-max trick on the
counter-based noise of targets/rng.py (reproducible from ``seed``; the reference, the Triton and the
CPU kernels draw the same ids). Duplicates are merged into unique ids with counts c_i, and each
unique id gets the importance weight w_i = c_i p_i / q_i normalised over the draws, p =
softmax(teacher_logits / temperature). With proposal_temperature = 1 the proposal is p itself and
w_i = c_i / num_samples: E[w_i] = p_i, so the sparse forward-KL gradient sum_i w_i d(-log
q_student_i) is an unbiased estimate of the dense one. Other proposal temperatures (> 1 draws more
of the tail) give the self-normalised estimate: consistent, with a bias of order 1 / num_samples.
"""

from __future__ import annotations

import torch

from .. import _validate as check
from .. import backends
from ..ops import sparse as sparse_ops
from .topk import TRITON_MAX_K, _teacher_2d, count_arg
from .types import SparseTargets

MAX_SAMPLES = TRITON_MAX_K


def teacher_sample(teacher_logits: torch.Tensor, num_samples: int, *, temperature: float = 1.0,
                   proposal_temperature: float = 1.0, seed: int = 0,
                   backend: str = "auto") -> SparseTargets:
    """Sampled sparse targets of each position of ``teacher_logits`` (..., V).

    Returns SparseTargets with ``num_samples`` slots: the unique drawn ids (int32; -1 pads the slots
    of merged duplicates), ordered by weight descending then id ascending; logprobs = log of the
    normalised importance weights (float32; -inf in padding); tail_logmass = -inf (the weights stand
    for the whole distribution; use these targets with tail="renorm"). A row's draws depend only on
    (seed, its row index in the flattened leading dims, the logits); any int is a seed, taken
    modulo 2**63 (so -1 and 2**63 - 1 draw alike). NaN logits are refused;
    -inf ones are never drawn (a row of -inf only draws id 0).
    """
    x = check.logits("teacher_logits", teacher_logits)
    n = count_arg("num_samples", num_samples, high=MAX_SAMPLES)
    tau = check.temperature("temperature", temperature)
    tp = check.temperature("proposal_temperature", proposal_temperature)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    check.choice("backend", backend, backends.BACKENDS)
    name = sparse_ops.resolve(backend, x.device)
    # A NaN logit has no probability to draw from; the row max propagates it (one read, N floats).
    # Eager mode only: under torch.compile a value check would break the graph on every call.
    if not torch.compiler.is_compiling() and x.numel() and bool(torch.isnan(x.amax(dim=-1)).any()):
        raise ValueError("teacher_logits has NaN")
    lead = x.shape[:-1]
    ids, lps, tail = sparse_ops.teacher_sample_op(_teacher_2d(x), n, tau, tp, seed % (1 << 63), name)
    return SparseTargets(ids.reshape(*lead, n), lps.reshape(*lead, n), tail.reshape(lead))
