"""Public sparse-target functions: the loss against a few teacher targets per token
(``sparse_kd_loss``), and the teacher side that makes them (``teacher_topk``, ``teacher_sample``)."""

from __future__ import annotations

import math

from typing import NamedTuple, Optional, Sequence, Union

import torch

from . import _validate as check
from .backends.base import MODE_TAIL
from .constants import needs_labels, sparse_mode
from .functional import Scalar, loss_constants
from .ops.fused_grad import REDUCTIONS
from .ops.sparse import resolve as resolve_backend
from .ops import scalar_args
from .ops.sparse import inplace_sparse_kd, sparse_kd, sparse_kd_scalars
from .targets.sample import teacher_sample
from .targets.topk import TRITON_MAX_K, teacher_topk
from .targets.types import SparseTargets

TAILS = ("renorm", "tail")
# How far above 0 a stored log-mass may sit (rounding of fp16/bf16 storage) before it is an error.
LOGMASS_SLACK = 1e-2

__all__ = ["sparse_kd_loss", "teacher_topk", "teacher_sample", "SparseTargets", "TAILS"]


def _eager() -> bool:
    """Data-dependent value checks run in eager mode only (under torch.compile they would force a
    graph break on every call)."""
    return not torch.compiler.is_compiling()


def _check_ids(ids: object, student: torch.Tensor) -> torch.Tensor:
    name = "target_ids"
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.dim() != student.dim() or ids.shape[:-1] != student.shape[:-1]:
        raise ValueError(
            f"{name} must have shape {tuple(student.shape[:-1])} + (k,) (the student logits' "
            f"leading dims, then the targets), got {tuple(ids.shape)}"
        )
    if ids.shape[-1] < 1:
        raise ValueError(f"{name} has no target slots (k = 0)")
    check.same_device(name, ids, "student_logits", student)
    if _eager() and ids.numel():
        v = student.shape[-1]
        wide = ids.to(torch.int64)   # (in uint8, -1 would wrap to 255)
        bad = (wide < -1) | (wide >= v)
        if bool(bad.any()):
            raise ValueError(f"{name} must be in [0, {v}) or -1 (padding); found "
                             f"{wide[bad][0].item()}")
        srt = wide.reshape(-1, ids.shape[-1]).sort(-1).values
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        if bool(dup.any()):
            row, col = dup.nonzero()[0].tolist()
            raise ValueError(f"{name} repeats id {srt[row, col + 1].item()} in row {row} (of the "
                             "flattened leading dims); ids must be unique within a row")
    return ids


def _check_logprobs(lp: object, ids: torch.Tensor, counted: Optional[torch.Tensor]) -> torch.Tensor:
    name = "target_logprobs"
    if not isinstance(lp, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(lp).__name__}")
    if lp.dtype not in check.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {lp.dtype}")
    if lp.shape != ids.shape:
        raise ValueError(f"{name} must have the shape of target_ids {tuple(ids.shape)}, "
                         f"got {tuple(lp.shape)}")
    check.same_device(name, lp, "target_ids", ids)
    if _eager() and lp.numel():
        live = lp[(ids >= 0) & _rows(counted, ids)]
        if bool(torch.isnan(live).any()):
            raise ValueError(f"{name} has NaN at a valid (id >= 0) slot")
        if bool((live == torch.inf).any()):
            raise ValueError(f"{name} has +inf at a valid (id >= 0) slot (weights must be finite)")
    return lp


def _rows(counted: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The rows whose label counts (all without labels), broadcast over ``like``'s last axis when
    it has one more: the value checks skip ignored rows, which the kernels never read (a teacher
    row of -inf, labelled -100, has NaN log-probabilities)."""
    if counted is None:
        return torch.ones((), dtype=torch.bool, device=like.device)
    return counted.unsqueeze(-1) if like.dim() > counted.dim() else counted


def _check_tail(tail: object, student: torch.Tensor,
                counted: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    name = "tail_logmass"
    if tail is None:
        return None
    if not isinstance(tail, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(tail).__name__}")
    if tail.dtype not in check.FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float tensor, got {tail.dtype}")
    if tail.shape != student.shape[:-1]:
        raise ValueError(f"{name} must have shape {tuple(student.shape[:-1])} (the student "
                         f"logits without the vocabulary axis), got {tuple(tail.shape)}")
    check.same_device(name, tail, "student_logits", student)
    if _eager() and tail.numel():
        seen = torch.where(_rows(counted, tail), tail, -torch.inf)
        if bool(torch.isnan(seen).any()):
            raise ValueError(f"{name} has NaN")
        if bool((seen > LOGMASS_SLACK).any()):
            raise ValueError(f"{name} is the log of a mass in [0, 1] and must be <= 0; found "
                             f"{seen.max().item()}")
    return tail


def _check_tail_mode_mass(lp: torch.Tensor, ids: torch.Tensor, tail: Optional[torch.Tensor],
                          counted: Optional[torch.Tensor]) -> None:
    """tail='tail' reads target_logprobs as full-vocabulary log-probabilities: a row's ids (plus
    tail_logmass, when given) must hold a mass of at most 1 (to LOGMASS_SLACK), else the tail
    bucket's mass 1 - P_K would be negative. Unnormalised weights belong to tail='renorm'."""
    if not _eager() or not lp.numel():
        return
    valid = (ids >= 0) & _rows(counted, ids)
    wide = torch.float64 if lp.dtype == torch.float64 else torch.float32
    mass = torch.logsumexp(torch.where(valid, lp.detach().to(wide), -torch.inf), -1)
    what = "target_logprobs"
    if tail is not None:
        mass = torch.logaddexp(mass, torch.where(_rows(counted, tail), tail.detach().to(wide),
                                                 -torch.inf))
        what = "target_logprobs plus tail_logmass"
    over = mass > LOGMASS_SLACK
    if bool(over.any()):
        row = int(over.reshape(-1).nonzero()[0])
        raise ValueError(f"tail='tail' needs full-vocabulary log-probabilities: the mass of "
                         f"{what} must be at most 1, found {math.exp(float(mass.reshape(-1)[row])):.4g} "
                         f"in row {row} (flattened leading dims); use tail='renorm' for "
                         "unnormalised weights")


def sparse_kd_loss(
    student_logits: torch.Tensor,
    target_ids: Union[torch.Tensor, SparseTargets],
    target_logprobs: Optional[torch.Tensor] = None,
    *,
    divergence: str = "forward_kl",
    temperature: Scalar = 1.0,
    tail: str = "renorm",
    tail_logmass: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    hard_weight: Scalar = 0.0,
    soft_weight: Scalar = 1.0,
    scale_temperature: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    target_temperature: Optional[float] = None,
    beta: Scalar = 0.5,
    alpha: Scalar = 0.1,
    inplace_grad: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Distillation loss against sparse teacher targets (top-k or sampled), fused with its gradient.

    Per token: ``soft_weight * tau^2 * D + hard_weight * CE(student at tau=1, label)``, where the
    teacher is k (id, log-weight) pairs per token. Targets are used at the temperature they were
    made with; ``target_temperature=t`` re-tempers them, w_i -> w_i^(1/t) renormalised over the
    valid ids. The student side uses q = softmax(student_logits / tau). With
    p~ = exp(target_logprobs) normalised over the valid ids:

    - ``tail="renorm"``, ``forward_kl``: D = sum_K p~_i (log p~_i - log q_i), q over the FULL
      vocabulary; the gradient (q_j - p~_j [j in K]) / tau is dense over V.
    - ``tail="renorm"``, other divergences (``reverse_kl``, ``jsd`` with ``beta``,
      ``skew_forward_kl``/``skew_reverse_kl`` with ``alpha``, ``generalized_jsd``): the divergence
      between p~ and q restricted and renormalised to the target support; zero gradient outside it.
    - ``tail="tail"``: one more bucket for the mass outside K: the divergence between the teacher's
      (P_1..P_k, 1 - P_K) and the student's (q_1..q_k, 1 - Q_K), with P_i = exp(target_logprobs)
      un-normalised and 1 - P_K = exp(tail_logmass) when given (else 1 - sum P_i); forward KL:
      sum_K P_i log(P_i / q_i) + (1 - P_K) log((1 - P_K) / (1 - Q_K)). Needs targets whose
      logprobs are full-vocabulary log-probabilities (top-k), not re-tempered.

    Args:
        student_logits: (..., V) float32/bfloat16/float16/float64; the gradient flows into it.
        target_ids: integer (..., k), each in [0, V) and unique in its row, or -1 (padding); rows
            with no valid id contribute only their CE term, as do rows whose valid slots all
            have logprob -inf (no teacher mass: no divergence term). Or a SparseTargets (then
            target_logprobs and tail_logmass come from it).
        target_logprobs: float (..., k): log-weights of the ids (no NaN or +inf at valid slots).
            The targets are constants: no gradient flows into them (nor into tail_logmass).
        tail_logmass: optional float (...): log of the teacher mass outside the ids (tail mode).
        temperature, beta, alpha, labels, hard_weight, soft_weight, scale_temperature,
            ignore_index, reduction, inplace_grad, backend: as in :func:`distill_ops.kd_loss`
            (the five numbers may be 0-d CPU tensors here too; ``inplace_grad=True`` writes
            the gradient over ``student_logits``, eager mode only). Backends: ``torch``,
            ``triton`` and ``cpu`` (``auto`` picks Triton on a GPU, the compiled CPU kernels on
            the CPU; ``cuda`` when named).

    Returns:
        The loss (float32; float64 if an input is float64): a scalar, or (...) for
        ``reduction="none"``.
    """
    student = check.logits("student_logits", student_logits)
    hyper, held = scalar_args.resolve(dict(temperature=temperature, beta=beta, alpha=alpha,
                                           soft_weight=soft_weight, hard_weight=hard_weight))
    call = prepare_sparse_call(student, target_ids, target_logprobs, divergence=divergence,
                               **scalar_args.stand_ins(hyper), tail=tail,
                               tail_logmass=tail_logmass, labels=labels,
                               scale_temperature=scale_temperature, ignore_index=ignore_index,
                               reduction=reduction, target_temperature=target_temperature,
                               backend=backend)
    v = student.shape[-1]
    lead = student.shape[:-1]
    student2d = student.reshape(-1, v)
    if student2d.stride(-1) != 1:
        student2d = student2d.contiguous()
    red = REDUCTIONS.index(reduction)
    need_grad = torch.is_grad_enabled() and student.requires_grad
    if check.flag("inplace_grad", inplace_grad) and need_grad:
        if torch.compiler.is_compiling():
            raise RuntimeError("inplace_grad=True is an eager-mode option; it cannot be compiled")
        check.distinct_rows("student_logits", student2d)
        for arg, t in (("target_logprobs", call.logprobs), ("tail_logmass", call.tail)):
            check.no_overlap(arg, t, "student_logits", student2d)
        loss = inplace_sparse_kd(student2d, call.ids, call.logprobs, call.tail, call.labels,
                                     *call.consts, red, call.backend)
    elif held:   # compiled, with tensor hyperparameters: read when the op runs
        target_scale = call.consts[4]
        loss, _ = sparse_kd_scalars(student2d, call.ids, call.logprobs, call.tail, call.labels,
                                    scalar_args.pack(hyper), divergence, tail, target_scale,
                                    scale_temperature, ignore_index, red, need_grad,
                                    call.backend)
    else:
        loss, _ = sparse_kd(student2d, call.ids, call.logprobs, call.tail, call.labels,
                            *call.consts, red, need_grad, call.backend)
    return loss.reshape(lead) if red == 0 else loss


def sparse_keywords(*, divergence: str, temperature: float, tail: str, hard_weight: float,
                    soft_weight: float, scale_temperature: bool, ignore_index: int,
                    reduction: str, target_temperature: Optional[float], beta: float, alpha: float,
                    backend: str, inplace_grad: bool = False,
                    reductions: Sequence[str] = REDUCTIONS) -> tuple:
    """Check the keywords of the sparse losses (sparse_kd_loss, fused_linear_sparse_kd_loss and
    SparseKDLoss, which calls this at construction; each error names its argument) and turn them
    into the kernels' constants: (divergence code, mix, mode, tau, target scale, soft coefficient
    with the tau^2 factor, hard coefficient)."""
    # The keywords the dense losses share, checked by their own function (no softcap here).
    code, mix, tau, _, soft_coef, hard_weight = loss_constants(
        divergence=divergence, temperature=temperature, beta=beta, alpha=alpha,
        hard_weight=hard_weight, soft_weight=soft_weight, scale_temperature=scale_temperature,
        ignore_index=ignore_index, softcap=None, reduction=reduction, backend=backend,
        inplace_grad=inplace_grad, reductions=reductions)
    check.choice("tail", tail, TAILS)
    target_scale = 1.0
    if target_temperature is not None:
        target_scale = 1.0 / check.temperature("target_temperature", target_temperature)
        if tail == "tail":
            raise ValueError("target_temperature re-tempers the targets over their ids and needs "
                             "tail='renorm' (the tail bucket cannot be re-tempered)")
    return code, mix, sparse_mode(tail, code), tau, target_scale, soft_coef, hard_weight


class SparseCall(NamedTuple):
    """A checked sparse-loss call, flattened for the kernels: ids (rows, k) int32, logprobs
    (rows, k), tail (rows,) or None, labels (rows,) int64 or None, the kernels' constants
    (divergence code, mix, mode, tau, target scale, soft coef, hard coef, ignore_index) and the
    backend name."""
    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    consts: tuple
    backend: str


def prepare_sparse_call(student: torch.Tensor, target_ids, target_logprobs, *, divergence: str,
                        temperature: float, tail: str, tail_logmass, labels, hard_weight: float,
                        soft_weight: float, scale_temperature: bool, ignore_index: int,
                        reduction: str, target_temperature: Optional[float], beta: float,
                        alpha: float, backend: str,
                        reductions: Sequence[str] = REDUCTIONS) -> SparseCall:
    """The checks of sparse_kd_loss (each error names its argument) against ``student``, which
    only lends its shape (..., V), dtype and device; the student data is never read."""
    if isinstance(target_ids, SparseTargets):
        if target_logprobs is not None:
            raise ValueError("pass either a SparseTargets or target_ids and target_logprobs")
        targets = target_ids
        target_ids, target_logprobs = targets.ids, targets.logprobs
        if tail_logmass is None:
            tail_logmass = targets.tail_logmass
    elif target_logprobs is None:
        raise TypeError("sparse_kd_loss needs target_logprobs (or a SparseTargets as target_ids)")
    code, mix, mode, tau, target_scale, soft_coef, hard_weight = sparse_keywords(
        divergence=divergence, temperature=temperature, tail=tail, hard_weight=hard_weight,
        soft_weight=soft_weight, scale_temperature=scale_temperature, ignore_index=ignore_index,
        reduction=reduction, target_temperature=target_temperature, beta=beta, alpha=alpha,
        backend=backend, reductions=reductions)
    ids = _check_ids(target_ids, student)
    v = student.shape[-1]
    label_rows = check.labels(labels, student, v, ignore_index)
    # (from the int64 labels: in a narrower dtype ignore_index could wrap)
    counted = None if label_rows is None else (label_rows != ignore_index).reshape(labels.shape)
    logprobs = _check_logprobs(target_logprobs, ids, counted)
    tails = _check_tail(tail_logmass, student, counted)
    needs_labels(hard_weight, label_rows)
    if mode == MODE_TAIL:
        _check_tail_mode_mass(logprobs, ids, tails, counted)

    name = resolve_backend(backend, student.device)
    if name == "triton" and ids.shape[-1] > TRITON_MAX_K:
        raise ValueError(f"target_ids has k = {ids.shape[-1]} slots; the Triton backend takes at "
                         f"most {TRITON_MAX_K}")
    k = ids.shape[-1]
    ids2d = ids.reshape(-1, k).to(torch.int32, memory_format=torch.contiguous_format)
    lp2d = logprobs.detach().reshape(-1, k)
    if lp2d.stride(-1) != 1:
        lp2d = lp2d.contiguous()
    tail1d = None
    if tails is not None and mode == MODE_TAIL:
        tail1d = tails.detach().reshape(-1).contiguous()
    consts = (code, mix, mode, tau, target_scale, soft_coef, hard_weight, ignore_index)
    return SparseCall(ids2d, lp2d, tail1d, label_rows, consts, name)

