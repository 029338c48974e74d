"""Top-k teacher targets: one streaming pass over the teacher logits per row."""

from __future__ import annotations

import torch

from .. import _validate as check
from .. import backends
from ..ops import sparse as sparse_ops
from .types import SparseTargets

# Largest k (and num_samples) the Triton kernels take: their per-row state lives in registers.
TRITON_MAX_K = 1024


def _teacher_2d(teacher_logits: torch.Tensor) -> torch.Tensor:
    x = teacher_logits.detach()
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def count_arg(name: str, value: object, *, low: int = 1, high: int | None = None,
              high_name: str = "") -> int:
    """An int in [low, high]; the error names the argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high_name or high}, got {value}")
    return value


def teacher_topk(teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0,
                 backend: str = "auto") -> SparseTargets:
    """The k most likely tokens of each position of ``teacher_logits`` (..., V).

    Returns SparseTargets: ids int32 (..., k) sorted by probability descending (ties: lower id
    first), logprobs float32 (..., k) = log softmax(teacher_logits / temperature) at those ids (the
    full-vocabulary normaliser, so they sum to less than 1), and tail_logmass float32 (...) = log of
    the probability mass outside the k ids (-inf when k == V; a row with a +inf logit, or all
    -inf, has no softmax: NaN), however small (a row whose tail is
    below e^-40 of its top is read a second time for it). One streaming pass per row on the
    Triton and CPU backends; on CUDA a one-read filter kernel (fp32/bf16/fp16, k <= 2048; 3072
    for fp32), else a radix select. No (N x V) probability tensor is made. Never differentiated.
    """
    x = check.logits("teacher_logits", teacher_logits)
    v = x.shape[-1]
    k = count_arg("k", k, high=v, high_name=f"the vocabulary size V = {v}")
    tau = check.temperature("temperature", temperature)
    check.choice("backend", backend, backends.BACKENDS)
    name = sparse_ops.resolve(backend, x.device)
    if name == "triton" and k > TRITON_MAX_K:
        raise ValueError(f"k must be <= {TRITON_MAX_K} on the Triton backend, got {k}")
    lead = x.shape[:-1]
    ids, lps, tail = sparse_ops.teacher_topk_op(_teacher_2d(x), k, tau, name)
    return SparseTargets(ids.reshape(*lead, k), lps.reshape(*lead, k), tail.reshape(lead))
