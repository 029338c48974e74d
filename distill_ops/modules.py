"""nn.Module wrappers of the functional losses."""

from __future__ import annotations

import inspect
from typing import Any, Optional, Union

import torch
from torch import nn

from .functional import kd_loss
from .fused_linear import fused_linear_kd_loss
from .sparse import sparse_kd_loss
from .targets.types import SparseTargets


class KDLoss(nn.Module):
    """Module form of :func:`distill_ops.kd_loss`; takes the same keywords.

    Example::

        loss_fn = KDLoss(divergence="forward_kl", temperature=2.0, hard_weight=0.5)
        loss = loss_fn(student_logits, teacher_logits, labels)
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        if "labels" in kwargs:
            raise TypeError("labels is an argument of forward(), not of KDLoss()")
        # An unknown keyword fails here, at construction, not at the first forward.
        inspect.signature(kd_loss).bind(None, None, **kwargs)
        self.kwargs = kwargs

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, labels=labels, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class FusedLinearKDLoss(nn.Module):
    """Module form of :func:`distill_ops.fused_linear_kd_loss`; takes the same keywords (not the
    tensors, the biases or the labels, which go to forward()).

    Example::

        loss_fn = FusedLinearKDLoss(temperature=2.0, hard_weight=0.5)
        loss = loss_fn(h_student, student.lm_head.weight, h_teacher, teacher.lm_head.weight, labels)
    """

    _PER_CALL = ("student_bias", "teacher_bias", "labels")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        for name in self._PER_CALL:
            if name in kwargs:
                raise TypeError(f"{name} is an argument of forward(), not of FusedLinearKDLoss()")
        inspect.signature(fused_linear_kd_loss).bind(None, None, None, None, **kwargs)
        self.kwargs = kwargs

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                labels: Optional[torch.Tensor] = None, *,
                student_bias: Optional[torch.Tensor] = None,
                teacher_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                    student_bias=student_bias, teacher_bias=teacher_bias,
                                    labels=labels, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class SparseKDLoss(nn.Module):
    """Module form of :func:`distill_ops.sparse_kd_loss`; takes the same keywords (not the targets,
    the tail mass or the labels, which go to forward()).

    Example::

        loss_fn = SparseKDLoss(temperature=2.0, tail="tail", hard_weight=0.5)
        loss = loss_fn(student_logits, teacher_topk(teacher_logits, 64), labels)
    """

    _PER_CALL = ("target_ids", "target_logprobs", "tail_logmass", "labels")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        for name in self._PER_CALL:
            if name in kwargs:
                raise TypeError(f"{name} is an argument of forward(), not of SparseKDLoss()")
        inspect.signature(sparse_kd_loss).bind(None, None, **kwargs)
        self.kwargs = kwargs

    def forward(self, student_logits: torch.Tensor,
                targets: Union[SparseTargets, torch.Tensor],
                labels: Optional[torch.Tensor] = None, *,
                target_logprobs: Optional[torch.Tensor] = None,
                tail_logmass: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``targets``: a SparseTargets, or the target ids with ``target_logprobs``."""
        return sparse_kd_loss(student_logits, targets, target_logprobs, tail_logmass=tail_logmass,
                              labels=labels, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
