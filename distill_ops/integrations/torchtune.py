"""torchtune drop-ins: the distillation losses of ``torchtune.modules.loss`` on the fused kernels.

torchtune's knowledge-distillation recipes build their loss from a config entry
(``kd_loss: _component_: torchtune.modules.loss.ForwardKLWithChunkedOutputLoss``); pointing it at
``distill_ops.integrations.torchtune.ForwardKLWithChunkedOutputLoss`` is the whole change. Each class
here takes the same constructor arguments (plus ``backend``), is called the same way and returns the
same values as torchtune 0.6's; none imports torchtune.

Semantics (torchtune 0.6), with p = softmax(teacher), q = softmax(student), no temperature:

- ``ForwardKLLoss``: -sum_i p_i log q_i per token. That is KL(p||q) + H(p), the cross-entropy: the
  gradient is forward KL's, and the value carries the teacher's entropy, which torchtune reports.
  Here the kernels compute KL(p||q) with its gradient, and H(p) is added without a gradient: one
  more read of the teacher logits (``H(p) = log V - KL(p || uniform)``, the same kernel);
  ``teacher_entropy=False`` skips it and returns KL(p||q), with the same gradient.
- ``ReverseKLLoss``: KL(q||p). ``SymmetricKLLoss(sym_kd_ratio=r)``: r forward + (1 - r) reverse.
- Tokens whose label is ``ignore_index`` count for nothing; labels are only that mask (any value
  is accepted). ``normalize=True`` divides the sum over the other tokens by their number (0 when
  there are none), ``normalize=False`` returns the sum.
- The ``*WithChunkedOutputLoss`` forms take lists of logit chunks (as torchtune's models return
  them with ``set_num_output_chunks``) and labels (B, T) chunked the same way along T, and divide
  the sum over every chunk by the number of kept tokens. A list whose length differs from the
  label chunks' is an error here (torchtune's zip would drop the extra chunks). With every token
  ignored they return 0 (torchtune's chunked reverse and symmetric losses return NaN there).

One difference: torchtune zeroes the terms at vocabulary entries whose logits are infinite. The
kernels follow the math, so entries that are -inf in both models agree (p_i = q_i = 0 add nothing),
but an entry where only the student is -inf while the teacher puts mass on it makes the forward
loss infinite (torchtune drops that mass), and likewise the reverse loss where only the teacher is.

    # torchtune config
    kd_loss:
      _component_: distill_ops.integrations.torchtune.ForwardKLWithChunkedOutputLoss
      num_output_chunks: 8
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import nn

from .. import _validate as check
from ..functional import kd_loss

# kd_loss's ignore_index for the mask labels built here: valid tokens carry label 0.
_DROP = -1


def _mask_labels(labels: object, rows: int, ignore_index: int) -> torch.Tensor:
    """torchtune's labels as kd_loss's: 0 where kept, _DROP where ignore_index (values unchecked)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.numel() != rows:
        raise ValueError(f"labels has {labels.numel()} elements (shape {tuple(labels.shape)}) but "
                         f"the logits have {rows} tokens")
    flat = labels.reshape(-1)
    return torch.where(flat != ignore_index, torch.zeros_like(flat), torch.full_like(flat, _DROP))


def _teacher_entropy_sum(teacher2d: torch.Tensor, mask: torch.Tensor, kept: torch.Tensor,
                         backend: str) -> torch.Tensor:
    """sum over the ``kept`` tokens of H(p) = log V - KL(p || uniform), no gradient. The uniform
    student is a row of zeros broadcast to every token (row stride 0): no N x V buffer."""
    n, v = teacher2d.shape
    with torch.no_grad():
        uniform = teacher2d.new_zeros(1, v).expand(n, v)
        kl_uniform = kd_loss(uniform, teacher2d, labels=mask, ignore_index=_DROP, reduction="sum",
                             backend=backend)
        return kept.to(kl_uniform.dtype) * math.log(v) - kl_uniform


def _token_sum(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
               ignore_index: int, forward_weight: float, teacher_entropy: bool,
               backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over kept tokens of forward_weight * forward + (1 - forward_weight) * reverse, the
    number of kept tokens), torchtune's per-token losses on one tensor of logits; the forward term
    is KL(p||q) without ``teacher_entropy``."""
    check.logits("student_logits", student)
    check.logits("teacher_logits", teacher)
    v = student.shape[-1]
    student2d = student.reshape(-1, v)
    teacher2d = teacher.reshape(-1, teacher.shape[-1])
    mask = _mask_labels(labels, student2d.shape[0], ignore_index)
    kept = (mask != _DROP).sum()
    common = dict(labels=mask, ignore_index=_DROP, reduction="sum", backend=backend)
    total = None
    if forward_weight != 0:
        fwd = kd_loss(student2d, teacher2d, divergence="forward_kl", **common)
        if teacher_entropy:
            fwd = fwd + _teacher_entropy_sum(teacher2d, mask, kept, backend)
        total = forward_weight * fwd
    if forward_weight != 1:
        rev = (1 - forward_weight) * kd_loss(student2d, teacher2d, divergence="reverse_kl", **common)
        total = rev if total is None else total + rev
    return total, kept


def _normalized(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count, 0 (with zero gradients) where no token is kept; no host synchronisation."""
    return total / count.clamp_min(1).to(total.dtype)


class _KDLoss(nn.Module):
    forward_weight = 1.0
    teacher_entropy = True

    def __init__(self, ignore_index: int = -100, *, backend: str = "auto") -> None:
        super().__init__()
        self.ignore_index = int(ignore_index)
        self.backend = backend

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """student_logits, teacher_logits: (..., V); labels: one per token (any shape with that
        many elements, as torchtune's (B, T) for (B*T, V) logits). Returns a 0-d tensor."""
        total, count = _token_sum(student_logits, teacher_logits, labels, self.ignore_index,
                                  self.forward_weight, self.teacher_entropy, self.backend)
        return _normalized(total, count) if check.flag("normalize", normalize) else total


class ForwardKLLoss(_KDLoss):
    """torchtune's ForwardKLLoss: mean over kept tokens of -sum p log q (module docstring).
    ``teacher_entropy=False`` returns KL(p||q) instead: the same gradient, one teacher read less."""

    def __init__(self, ignore_index: int = -100, *, teacher_entropy: bool = True,
                 backend: str = "auto") -> None:
        super().__init__(ignore_index, backend=backend)
        self.teacher_entropy = check.flag("teacher_entropy", teacher_entropy)


class ReverseKLLoss(_KDLoss):
    """torchtune's ReverseKLLoss: mean over kept tokens of KL(q||p)."""

    forward_weight = 0.0


class SymmetricKLLoss(_KDLoss):
    """torchtune's SymmetricKLLoss: sym_kd_ratio * ForwardKLLoss + (1 - sym_kd_ratio) * ReverseKLLoss
    (``teacher_entropy`` as ForwardKLLoss's)."""

    def __init__(self, sym_kd_ratio: float = 0.5, ignore_index: int = -100, *,
                 teacher_entropy: bool = True, backend: str = "auto") -> None:
        super().__init__(ignore_index, backend=backend)
        self.forward_weight = check.unit_interval("sym_kd_ratio", sym_kd_ratio)
        self.teacher_entropy = check.flag("teacher_entropy", teacher_entropy)


class _ChunkedKDLoss(nn.Module):
    forward_weight = 1.0
    teacher_entropy = True

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100, *,
                 backend: str = "auto") -> None:
        super().__init__()
        if isinstance(num_output_chunks, bool) or not isinstance(num_output_chunks, int) \
                or num_output_chunks < 1:
            raise ValueError(f"num_output_chunks must be an integer >= 1, got {num_output_chunks!r}")
        self.num_output_chunks = num_output_chunks
        self.ignore_index = int(ignore_index)
        self.backend = backend

    def forward(self, student_logits: Sequence[torch.Tensor], teacher_logits: Sequence[torch.Tensor],
                labels: torch.Tensor) -> torch.Tensor:
        """student_logits, teacher_logits: lists of (B, T_c, V) chunks; labels: (B, T), chunked
        along T as ``labels.chunk(num_output_chunks, dim=1)``. Returns a 0-d tensor."""
        for name, chunks in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
            if isinstance(chunks, torch.Tensor) or not isinstance(chunks, (list, tuple)) or not chunks:
                raise TypeError(f"{name} must be a non-empty list of logit chunks, got "
                                f"{type(chunks).__name__}")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
            raise ValueError("labels must be a (batch, tokens) tensor, got "
                             f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else labels!r}")
        label_chunks: List[torch.Tensor] = list(labels.chunk(self.num_output_chunks, dim=1))
        if not len(student_logits) == len(teacher_logits) == len(label_chunks):
            raise ValueError(
                f"student_logits has {len(student_logits)} chunks, teacher_logits "
                f"{len(teacher_logits)} and labels.chunk({self.num_output_chunks}, dim=1) "
                f"{len(label_chunks)}: they must be the same chunks")
        total, count = None, None
        for i, (s, t, lab) in enumerate(zip(student_logits, teacher_logits, label_chunks)):
            if s.shape[:-1] != lab.shape:
                raise ValueError(f"student_logits[{i}] has shape {tuple(s.shape)} but its label "
                                 f"chunk has shape {tuple(lab.shape)}")
            part, kept = _token_sum(s, t, lab, self.ignore_index, self.forward_weight,
                                    self.teacher_entropy, self.backend)
            total = part if total is None else total + part
            count = kept if count is None else count + kept
        return _normalized(total, count)


class ForwardKLWithChunkedOutputLoss(_ChunkedKDLoss):
    """torchtune's ForwardKLWithChunkedOutputLoss (ForwardKLLoss over lists of chunks)."""

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100, *,
                 teacher_entropy: bool = True, backend: str = "auto") -> None:
        super().__init__(num_output_chunks, ignore_index, backend=backend)
        self.teacher_entropy = check.flag("teacher_entropy", teacher_entropy)


class ReverseKLWithChunkedOutputLoss(_ChunkedKDLoss):
    """torchtune's ReverseKLWithChunkedOutputLoss (ReverseKLLoss over lists of chunks)."""

    forward_weight = 0.0


class SymmetricKLWithChunkedOutputLoss(_ChunkedKDLoss):
    """torchtune's SymmetricKLWithChunkedOutputLoss (SymmetricKLLoss over lists of chunks)."""

    def __init__(self, num_output_chunks: int = 8, sym_kd_ratio: float = 0.5,
                 ignore_index: int = -100, *, teacher_entropy: bool = True,
                 backend: str = "auto") -> None:
        super().__init__(num_output_chunks, ignore_index, backend=backend)
        self.forward_weight = check.unit_interval("sym_kd_ratio", sym_kd_ratio)
        self.teacher_entropy = check.flag("teacher_entropy", teacher_entropy)
