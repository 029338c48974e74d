"""nn.Module wrappers of the functional losses."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .functional import kd_loss, loss_constants
from .ops import scalar_args
from .fused_linear import FUSED_REDUCTIONS, check_chunk_size, fused_linear_kd_loss
from .sparse import sparse_keywords, sparse_kd_loss
from .targets.types import SparseTargets


def check_keywords(loss: Callable, n_tensors: int, kwargs: dict, checker: Callable,
                   **fixed: Any) -> None:
    """Check a module's keywords at construction, as its functional ``loss`` would at its first
    call: unknown names (binding them to ``loss``'s signature) and their values (``checker``, the
    functional's own keyword check, given the bound values with the defaults filled in), so that a
    mistake fails where it was made, not at the first forward."""
    bound = inspect.signature(loss).bind(*([None] * n_tensors), **kwargs)
    bound.apply_defaults()
    accepted = inspect.signature(checker).parameters
    values = {k: v for k, v in bound.arguments.items() if k in accepted}
    # Hyperparameters given as tensors are checked as their values now (changed in place later,
    # they are checked again at each call).
    hyper, _ = scalar_args.resolve({k: values[k] for k in scalar_args.NAMES if k in values})
    checker(**dict(values, **scalar_args.stand_ins(hyper)), **fixed)


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
        check_keywords(kd_loss, 2, kwargs, loss_constants)
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
        check_keywords(fused_linear_kd_loss, 4, kwargs, loss_constants, reductions=FUSED_REDUCTIONS)
        check_chunk_size(kwargs.get("chunk_size"))
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
        check_keywords(sparse_kd_loss, 2, kwargs, sparse_keywords)
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
