"""SparseTargets: what the teacher side hands to the sparse loss (and what the cache stores)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class SparseTargets(NamedTuple):
    """Per token position, a few teacher targets.

    ids:          int32 (..., k); -1 marks an unused (padding) slot.
    logprobs:     float32 (..., k); top-k targets: log-probabilities under the teacher's
                  FULL-vocabulary softmax at ``temperature``, sorted descending (ties: lower id
                  first); sampled targets: log of the normalised importance weights (they sum to 1
                  over the valid slots), sorted descending. -inf in padding slots.
    tail_logmass: float32 (...); log of the teacher mass outside ``ids`` (top-k), -inf when there
                  is none (sampled targets: the weights already stand for the whole distribution).

    A NamedTuple: unpack it (``ids, logprobs, tail = targets``) or pass it whole to
    ``sparse_kd_loss(student_logits, targets)``.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logmass: torch.Tensor

    @property
    def k(self) -> int:
        """Number of target slots per position."""
        return int(self.ids.shape[-1])

    def num_valid(self) -> torch.Tensor:
        """Valid (non-padding) targets per position, int64 (...)."""
        return (self.ids >= 0).sum(-1)

    def to(self, *args, **kwargs) -> "SparseTargets":
        """Move to a device; a dtype argument applies to the float fields only."""
        return SparseTargets(
            self.ids.to(*[a for a in args if not isinstance(a, torch.dtype)],
                        **{k: v for k, v in kwargs.items() if k != "dtype"}),
            self.logprobs.to(*args, **kwargs),
            self.tail_logmass.to(*args, **kwargs),
        )

    def reshape(self, *lead: int) -> "SparseTargets":
        """Reshape the leading (token) dimensions, e.g. ``targets.reshape(-1)`` to (N, k)."""
        return SparseTargets(self.ids.reshape(*lead, self.k), self.logprobs.reshape(*lead, self.k),
                             self.tail_logmass.reshape(*lead))
