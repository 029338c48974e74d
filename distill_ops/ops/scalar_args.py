"""Hyperparameters given as 0-d tensors: a schedule under torch.compile without recompiles.

torch.compile takes a Python float passed to a custom op as a constant of the graph, so each new
temperature compiled the step anew (until dynamo's recompile limit sent it back to eager). A tensor
is a graph input instead, as torch.optim's tensor learning rates are: the losses also take
``temperature``, ``beta``, ``alpha``, ``soft_weight`` and ``hard_weight`` as 0-d CPU tensors,
changed in place between steps. In eager mode they are read at once and the float path runs.
Compiled, the five go packed in one float64 tensor to the ops' ``*_scalars`` variants, which read
it on the host when they run and check it there with the float path's own functions (the errors
name the same arguments).
"""

from __future__ import annotations

import inspect
from typing import Mapping

import torch

from ..constants import divergence_constants, needs_labels

NAMES = ("temperature", "beta", "alpha", "soft_weight", "hard_weight")

# Valid stand-ins for the tensor-held values while the losses check their other arguments at
# trace time: a hard weight of 0 asks for no labels (the ops check the real values as they run).
STAND_INS = {"temperature": 1.0, "beta": 0.5, "alpha": 0.1, "soft_weight": 1.0,
             "hard_weight": 0.0}


def _op_tags() -> dict:
    """The values are read on the host when the op runs, so a CUDA graph would replay the ones
    read at capture: the cudagraph_unsafe tag keeps inductor from capturing the op (its graph
    partitions run it outside). As custom_op's keywords: none where torch has no such tag, or
    custom_op no ``tags`` (then inductor skips CUDA graphs for a graph with CPU tensors in it,
    and unpack refuses a capture)."""
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    if tag is None or "tags" not in inspect.signature(torch.library.custom_op).parameters:
        return {}
    return {"tags": (tag,)}


OP_TAGS = _op_tags()


def resolve(values: Mapping[str, object]) -> tuple[dict, bool]:
    """``(values, held)`` for the hyperparameters ``values`` (named as the losses' keywords). Each
    tensor is checked (0-d, floating point, on the CPU, not requiring grad; the error names it).
    In eager mode the tensors are read into floats and ``held`` is False; compiled, they stay and
    ``held`` says whether there is any (then the ops' ``*_scalars`` variants run)."""
    held = False
    for name, v in values.items():
        if isinstance(v, torch.Tensor):
            _check(name, v)
            held = True
    if held and not torch.compiler.is_compiling():
        return {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in values.items()}, False
    return dict(values), held


def _check(name: str, v: torch.Tensor) -> None:
    if v.dim() != 0:
        raise ValueError(f"{name} as a tensor must be 0-d (one value), got shape {tuple(v.shape)}")
    if not v.dtype.is_floating_point:
        raise TypeError(f"{name} as a tensor must be floating point, got {v.dtype}")
    if v.device.type != "cpu":
        raise ValueError(f"{name} as a tensor must be on the CPU (the loss reads it on the host "
                         f"when it runs), got {v.device}")
    if v.requires_grad:
        raise ValueError(f"{name} takes no gradient: pass a tensor that does not require grad "
                         "(detach it)")


def stand_ins(values: Mapping[str, object]) -> dict:
    """``values`` with each tensor replaced by a valid stand-in (STAND_INS)."""
    return {k: STAND_INS[k] if isinstance(v, torch.Tensor) else v for k, v in values.items()}


def pack(values: Mapping[str, object]) -> torch.Tensor:
    """The five values, in NAMES order, as one float64 CPU tensor (tensors stay graph inputs)."""
    return torch.stack([
        values[k].to(torch.float64) if isinstance(values[k], torch.Tensor)
        else torch.tensor(values[k], dtype=torch.float64)
        for k in NAMES])


def unpack(scalars: torch.Tensor, student: torch.Tensor) -> dict:
    """pack's values back as floats, read when the op runs; refused inside a CUDA graph capture,
    which would keep the values read now for every replay."""
    if student.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "distill_ops: a loss given tensor hyperparameters reads them on the host when it "
            "runs, and a CUDA graph would replay the values read at capture; capture it with "
            "float hyperparameters, or run it outside the graph")
    return dict(zip(NAMES, scalars.tolist()))


def read_constants(scalars: torch.Tensor, student: torch.Tensor, labels: object, *,
                   divergence: str, scale_temperature: bool) -> tuple:
    """constants.divergence_constants of pack's values, read and checked as the op runs (and a
    hard weight above 0 needs ``labels``): (code, mix, tau, soft coefficient, hard coefficient)."""
    consts = divergence_constants(divergence=divergence, scale_temperature=scale_temperature,
                                  **unpack(scalars, student))
    needs_labels(consts[4], labels)
    return consts
