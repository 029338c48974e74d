"""FSDP2 (``fsdp: true`` with several processes): the student's and the teacher's parameters
sharded over the ranks (torch.distributed.fsdp.fully_shard), so models that do not fit one
device's memory with their optimizer state can be distilled.

Each decoder layer is a unit of its own and the whole model the root, which holds the embeddings,
the final norm and the lm_head (one unit, as tied weights require). The root's parameters are
gathered when the root's forward runs and stay gathered until the backward, so the loop always
calls the root (fused_linear included: ``LastHidden`` runs the whole model for one logit row and
hands on the decoder's output: LastHidden(through_root=True)), and the fused loss then reads a plain
lm_head. Checkpoints hold full tensors, as a single process writes them
(torch.distributed.checkpoint.state_dict), so they load anywhere.

A model read from a directory is read by rank 0 alone: the other ranks build it on the meta device
from its config (trainer.loop.load_model), allocate only their shards, and receive rank 0's
weights (``shard(..., from_rank0=True)``). So one process reads the files, one copy of the whole
model sits in host memory per machine instead of one per rank, and the ranks cannot differ.
"""

from __future__ import annotations

from typing import Any

import torch

from .._dtensor import is_dtensor
from . import dist


def _layers(model: torch.nn.Module, hint: str) -> list:
    """The decoder layers of a transformers causal LM (``model.model.layers`` and the like)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if layers is None:
        raise ValueError(f"fsdp: cannot find the decoder layers of {type(model).__name__} (no "
                         f".layers or .h on its decoder); {hint}")
    return list(layers)


def _check_same_layout(model: torch.nn.Module, tensors: list, device: torch.device) -> None:
    """Raise on every rank unless every rank's model has rank 0's tensor names, shapes and dtypes
    (``tensors``: (name, tensor) pairs). Rank 0's weights go into the others' shards one tensor
    at a time: a model built with another dtype or config would fail inside a collective, or
    hang there (a from_config without the dtype that from_pretrained was given, say)."""
    layout = [(name, tuple(t.shape), str(t.dtype)) for name, t in tensors]
    theirs = [layout if dist.rank() == 0 else None]
    torch.distributed.broadcast_object_list(theirs, src=0)
    first = next((f"{a} here, {b} on rank 0" for a, b in zip(layout, theirs[0]) if a != b),
                 None if len(layout) == len(theirs[0]) else
                 f"{len(layout)} tensors here, {len(theirs[0])} on rank 0")
    if dist.all_reduce_max([float(first is not None)], device)[0]:
        raise ValueError(f"fsdp: the ranks' {type(model).__name__} models differ from rank 0's "
                         f"(names, shapes or dtypes: {first or 'on another rank'}); build them "
                         "from the same config, with the same dtype")


def _check_same_weights(model: torch.nn.Module, device: torch.device) -> None:
    """Raise unless every rank holds the same weights. fully_shard keeps each rank's own slice of
    its own tensors (DDP would broadcast rank 0's): ranks that loaded or initialised different
    weights would train a model stitched from them. A float64 sum per tensor, compared, made a
    slice at a time: a float64 copy of a whole embedding (V x H) would be 8 V H bytes at once."""
    sums = [sum(float(part.double().sum()) for part in t.detach().reshape(-1).split(1 << 24))
            for t in model.state_dict().values()]
    # one collective: the largest of each sum and of its negation (minus the smallest)
    both = dist.all_reduce_max(sums + [-s for s in sums], device)
    high, low = both[:len(sums)], both[len(sums):]
    if any(a != -b for a, b in zip(high, low)):
        raise RuntimeError("fsdp: the ranks hold different weights (other files, or a random "
                           "initialisation with other seeds); FSDP2 would stitch the model from "
                           "their shards")


def shard(model: torch.nn.Module, device: torch.device, *, from_rank0: bool = False,
          hint: str = "use fsdp=false (DDP)") -> torch.nn.Module:
    """fully_shard every decoder layer, then the model (the root), over all ranks on ``device``.
    The parameters move to ``device`` as shards: the whole model never sits on one device.

    ``from_rank0``: rank 0's model holds the weights and every other rank's is the same
    architecture on the meta device; those ranks allocate their shards and rank 0 broadcasts its
    tensors into them (their names, shapes and dtypes checked equal first). Otherwise every rank
    holds the weights, checked equal first. ``hint``: what to do instead, said in the error for a
    model whose decoder layers are not found."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if from_rank0:
        # rank 0's full tensors, held past fully_shard (which replaces them by shards); the
        # non-persistent buffers (rotary frequencies and the like) are in no state dict
        state = model.state_dict()
        full = state if dist.rank() == 0 else {}
        buffers = [name for name, _ in model.named_buffers() if name not in state]
        _check_same_layout(model, list(state.items())
                           + [(name, model.get_buffer(name)) for name in buffers], device)
    else:
        _check_same_weights(model, device)
    mesh = init_device_mesh(device.type, (dist.world_size(),))
    for layer in _layers(model, hint):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if from_rank0:
        if dist.rank() != 0:
            model.to_empty(device=device)   # the shards and buffers, uninitialised
        load_model_state(model, full, from_rank0=True)
        del full
        for name in buffers:
            torch.distributed.broadcast(model.get_buffer(name), src=0)
    return model


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered parameters of a sharded model that no backward will follow (the teacher).
    FSDP2 leaves the root unit's parameters gathered after a forward, for the backward it expects
    next: without one they would stay whole on every rank for the run (a teacher's embeddings and
    lm_head, 2 V H values). Call once the forward's outputs (the loss's teacher side included)
    are computed."""
    model.reshard()


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """FSDP2's no_sync: reduce-scatter the gradients only on the last micro-batch of a step."""
    model.set_requires_gradient_sync(sync)


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_'s total norm over DTensor gradients is itself a DTensor: the full value."""
    return norm.full_tensor() if is_dtensor(norm) else norm


def _options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def model_state(model: torch.nn.Module) -> dict:
    """The full state dict (CPU tensors on rank 0, empty elsewhere). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state dict, keyed by parameter names (rank 0; every rank calls)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_model_state(model: torch.nn.Module, state: dict, *, from_rank0: bool = False) -> None:
    """Shard a full state dict into the model's parameters: every rank's (each read it), or, with
    ``from_rank0``, rank 0's, broadcast one tensor at a time (the others pass an empty dict)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state,
                         options=_options(strict=False, broadcast_from_rank0=from_rank0))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options())
