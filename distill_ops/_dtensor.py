"""Sharded lm_head weights (FSDP2's DTensor parameters) as the fused-linear losses take them.

Under FSDP2 a parameter is a DTensor sharded over the ranks outside its module's forward: an lm_head
sharded as a unit of its own (or read without a forward) comes to the loss that way. The loss needs
the whole weight, gathered once per call; what matters is the way back. Each rank's gradient of the
gathered weight is that rank's partial gradient (its own tokens), so it must be reduced over the
ranks onto the shards, averaged as FSDP2 averages its other gradients. ``full_tensor()`` (what TRL's
fused loss calls) treats the gathered weight as replicated, and its backward hands each rank its own
slice of its own gradient: every shard of the lm_head then trains on one rank's tokens alone
(measured: 1.5e-2 off the averaged gradient on two gloo ranks, where this is exact).
"""

from __future__ import annotations

from typing import Optional

import torch


def _dtensor_class():
    tensor_mod = getattr(torch.distributed, "tensor", None) if torch.distributed.is_available() \
        else None
    return getattr(tensor_mod, "DTensor", None)


def is_dtensor(t: object) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def gathered(t: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None
             ) -> Optional[torch.Tensor]:
    """``t`` as a plain tensor: a DTensor (FSDP2's sharding, HSDP's 2-D mesh) all-gathered in
    ``dtype`` when given (FSDP2's mixed precision gathers its parameters in param_dtype: a float32
    shard reaches the loss beside bfloat16 hidden states), its gradient reduce-scattered back
    averaged over every mesh dimension, as FSDP2 averages (a replicated dimension's ranks hold
    other tokens; a tensor-parallel one's hold the same gradient, whose average is itself).
    Anything else is returned as is."""
    if not is_dtensor(t):
        return t
    from torch.distributed.tensor import Partial, Replicate

    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)   # differentiable: the gradient returns to the shards in their dtype
    dims = t.device_mesh.ndim
    return t.redistribute(placements=[Replicate()] * dims).to_local(
        grad_placements=[Partial("avg")] * dims)
