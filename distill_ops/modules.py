"""nn.Module wrappers of the functional losses."""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import nn

from .functional import kd_loss


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
