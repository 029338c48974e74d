"""TRL drop-in: ``generalized_jsd_loss`` with the semantics of TRL's ``GKDTrainer``, computed by the
fused kernels, and ``patch_gkd_trainer()`` to make GKDTrainer use it.

Semantics (TRL's GKD): p = softmax(teacher / T), q = softmax(student / T); ``beta = 0`` is forward
KL(p||q), ``beta = 1`` reverse KL(q||p), in between the generalized JSD with
M = beta p + (1-beta) q: beta KL(p||M) + (1-beta) KL(q||M). No T^2 factor. Positions whose label
is -100 are dropped.

Reductions as in TRL 1.16: ``batchmean`` = sum / number of kept tokens when labels are given
(0 when every label is -100), else sum / ``student_logits.shape[0]`` (the batch size; TRL releases
before 1.x divided by B * T); ``sum``; ``mean`` = sum / (kept tokens * V) (TRL averages over its
per-element tensor). ``num_items_in_batch`` (what GKDTrainer.compute_loss passes, for gradient
accumulation) overrides the reduction with sum / num_items_in_batch, as TRL does. One documented
difference, forced by never building the (tokens x V) tensor: ``none`` returns one value per token
(the row sum over the vocabulary; TRL returns the element-wise tensor).

    from distill_ops.integrations.trl import patch_gkd_trainer
    patch_gkd_trainer()          # every GKDTrainer from now on computes its loss with distill-ops

TRL's DistillationTrainer (trl >= 1.16) computes its loss from hidden states and lm_heads in
``trl.trainer.distillation_trainer._chunked_divergence_loss``; :func:`chunked_divergence_loss` is
that function on :func:`distill_ops.fused_linear_kd_loss`, and ``patch_distillation_trainer()``
installs it.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Optional, Union

import torch

from ..functional import kd_loss
from ..fused_linear import _dense_call

REDUCTIONS = ("batchmean", "sum", "mean", "none")

# Where trl has kept GKDTrainer across versions (newest first).
GKD_MODULES = ("trl.experimental.gkd", "trl.experimental.gkd.gkd_trainer",
               "trl.trainer.gkd_trainer", "trl")


def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         labels: Optional[torch.Tensor] = None, beta: float = 0.5,
                         temperature: float = 1.0, reduction: str = "batchmean",
                         num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
                         backend: str = "auto") -> torch.Tensor:
    """TRL ``GKDTrainer.generalized_jsd_loss`` on the fused kernels (see the module docstring).

    ``student_logits`` and ``teacher_logits`` are (B, T, V) (any leading shape works);
    ``labels`` (B, T) is already aligned with the logits (no shift here), -100 masks a position;
    its other values are not read (as TRL's).
    ``num_items_in_batch``, when given, divides the summed loss instead of ``reduction``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(labels, torch.Tensor):
        # TRL reads labels only as a mask (!= -100): any other value keeps its position, even one
        # outside the vocabulary, which kd_loss would refuse as a class id
        labels = torch.where(labels != -100, torch.zeros_like(labels), labels)
    common = dict(divergence="generalized_jsd", beta=beta, temperature=temperature,
                  scale_temperature=False, labels=labels, ignore_index=-100, backend=backend)
    if num_items_in_batch is not None:
        total = kd_loss(student_logits, teacher_logits, reduction="sum", **common)
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "batchmean":
        if labels is not None:   # mean over kept tokens (0 when none is kept, as TRL's clamp)
            return kd_loss(student_logits, teacher_logits, reduction="mean", **common)
        rows = student_logits.shape[0] if student_logits.dim() > 1 else 1
        return kd_loss(student_logits, teacher_logits, reduction="sum", **common) / max(rows, 1)
    if reduction == "sum":
        return kd_loss(student_logits, teacher_logits, reduction="sum", **common)
    if reduction == "mean":
        return (kd_loss(student_logits, teacher_logits, reduction="mean", **common)
                / student_logits.shape[-1])
    return kd_loss(student_logits, teacher_logits, reduction="none", **common)


def _gkd_classes(errors: Optional[list] = None) -> list:
    """The GKDTrainer classes of GKD_MODULES that import; each module that does not is skipped,
    and its error appended to ``errors`` (when given) as "module: error"."""
    classes = []
    for name in GKD_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # missing, or an optional dependency of trl is
            if errors is not None:
                errors.append(f"{name}: {exc!r}")
            continue
        cls = getattr(module, "GKDTrainer", None)
        if isinstance(cls, type) and cls not in classes:
            classes.append(cls)
    return classes


_ORIGINALS: dict = {}


def patch_gkd_trainer() -> list:
    """Replace ``GKDTrainer.generalized_jsd_loss`` (a staticmethod, looked up through ``self``) with
    :func:`generalized_jsd_loss` in every trl module that defines GKDTrainer. Subclasses that do not
    override it follow. Returns the patched classes; raises ImportError when trl (or its GKDTrainer)
    is not importable. ``unpatch_gkd_trainer()`` restores the originals."""
    if importlib.util.find_spec("trl") is None:
        raise ImportError("trl is not installed: pip install trl (patch_gkd_trainer patches its "
                          "GKDTrainer)")
    errors: list = []
    classes = _gkd_classes(errors)
    if not classes:
        raise ImportError("trl is installed but no GKDTrainer could be imported from "
                          f"{', '.join(GKD_MODULES)}: {'; '.join(errors) or 'no such class'}")
    for cls in classes:
        if cls not in _ORIGINALS:
            _ORIGINALS[cls] = cls.__dict__.get("generalized_jsd_loss")
        cls.generalized_jsd_loss = staticmethod(generalized_jsd_loss)
    return classes


def unpatch_gkd_trainer() -> None:
    """Undo :func:`patch_gkd_trainer`."""
    for cls, original in list(_ORIGINALS.items()):
        if original is None:
            if "generalized_jsd_loss" in cls.__dict__:
                delattr(cls, "generalized_jsd_loss")
        else:
            cls.generalized_jsd_loss = original
        del _ORIGINALS[cls]


# ----------------------------------------------------------------------------- DistillationTrainer

DISTILLATION_MODULE = "trl.trainer.distillation_trainer"
_DISTILLATION_ORIGINAL: dict = {}


def chunked_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
    student_lm_head_bias: Optional[torch.Tensor] = None,
    teacher_lm_head_bias: Optional[torch.Tensor] = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: Optional[float] = None,
    teacher_final_logit_softcapping: Optional[float] = None,
    temperature: float = 1.0,
    *,
    entropy: bool = True,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL DistillationTrainer's ``_chunked_divergence_loss`` (same arguments, same results) on
    :func:`distill_ops.fused_linear_kd_loss`: the generalized JSD (beta 0 forward KL, 1 reverse KL,
    no T^2 factor) between the student's and the teacher's softmax(softcap(scale * (h W^T + b)) / T)
    over the completion positions (``completion_mask != 0``), never building either logits tensor.

    Returns (loss, entropy_sum, n_valid): the loss summed over the valid positions and divided by
    ``num_items_in_batch`` when given, else by n_valid (at least 1); the sum of the student's
    per-token entropy at T (detached; ``entropy=False`` skips its extra pass over each chunk of
    logits and returns NaN, which TRL's logger drops); the number of valid positions.

    Differences, each an error rather than a silent approximation: one softcap for both models
    (the kernels cap both sides alike), so two different ``*_final_logit_softcapping`` raise. The
    logit scales are folded into the hidden states and biases (scale * h), which rounds once in the
    hidden states' dtype instead of in the logits'.
    """
    s_cap, t_cap = student_final_logit_softcapping, teacher_final_logit_softcapping
    if s_cap != t_cap:
        raise ValueError(
            f"student_final_logit_softcapping ({s_cap}) and teacher_final_logit_softcapping "
            f"({t_cap}) differ; distill-ops applies one softcap to both models' logits")
    for name, value in (("student_logit_scale", student_logit_scale),
                        ("teacher_logit_scale", teacher_logit_scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{name} must be a number > 0, got {value!r}")
    if not isinstance(completion_mask, torch.Tensor):
        raise TypeError("completion_mask must be a torch.Tensor")
    if completion_mask.shape != student_hidden_states.shape[:-1]:
        raise ValueError(f"completion_mask has shape {tuple(completion_mask.shape)} but the "
                         f"student hidden states have {tuple(student_hidden_states.shape[:-1])}")
    valid = (completion_mask != 0).reshape(-1).to(student_hidden_states.device)
    n_valid = valid.sum()
    h_s = student_hidden_states.reshape(-1, student_hidden_states.shape[-1])[valid]
    h_t = teacher_hidden_states.reshape(-1, teacher_hidden_states.shape[-1])[valid]
    # An FSDP2 lm_head (DTensor) goes to the loss as it is: it gathers it with its gradient
    # averaged back onto the shards (_dtensor.gathered; TRL's full_tensor() left each shard one
    # rank's gradient)
    w_s, b_s = student_lm_head_weight, student_lm_head_bias
    w_t, b_t = teacher_lm_head_weight, teacher_lm_head_bias
    if student_logit_scale != 1.0:   # scale * (h W^T + b) = (scale h) W^T + scale b
        h_s = h_s * student_logit_scale
        b_s = None if b_s is None else b_s * student_logit_scale
    if teacher_logit_scale != 1.0:
        h_t = h_t * teacher_logit_scale
        b_t = None if b_t is None else b_t * teacher_logit_scale
    sums: Optional[list] = [] if entropy else None
    total = _dense_call(h_s, w_s, h_t.detach(), w_t.detach(), student_bias=b_s,
                        teacher_bias=None if b_t is None else b_t.detach(), labels=None,
                        divergence="generalized_jsd", temperature=temperature, beta=beta,
                        alpha=0.1, hard_weight=0.0, soft_weight=1.0, scale_temperature=False,
                        ignore_index=-100, reduction="sum", softcap=s_cap, chunk_size=chunk_size,
                        backend=backend, entropy=sums)
    if num_items_in_batch is None:
        loss = total / n_valid.clamp(min=1).to(total.dtype)
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    if sums is None:
        entropy_sum = total.new_full((), float("nan"), dtype=torch.float32)
    else:
        entropy_sum = (torch.stack(sums).sum() if sums
                       else total.new_zeros((), dtype=torch.float32))
    return loss, entropy_sum.detach(), n_valid


def patch_distillation_trainer(*, entropy: bool = True) -> None:
    """Make TRL's DistillationTrainer compute its loss with :func:`chunked_divergence_loss` (it
    calls ``trl.trainer.distillation_trainer._chunked_divergence_loss`` by module name).
    ``entropy=False`` drops the entropy metric to save its pass. Raises ImportError when that
    module is missing; ``unpatch_distillation_trainer()`` restores TRL's function."""
    try:
        module = importlib.import_module(DISTILLATION_MODULE)
    except ImportError as e:
        raise ImportError(f"patch_distillation_trainer needs trl >= 1.16 ({DISTILLATION_MODULE}): "
                          f"{e}") from e
    if not callable(getattr(module, "_chunked_divergence_loss", None)):
        raise ImportError(f"{DISTILLATION_MODULE} has no _chunked_divergence_loss to replace "
                          "(another trl version)")
    if "fn" not in _DISTILLATION_ORIGINAL:
        _DISTILLATION_ORIGINAL["fn"] = module._chunked_divergence_loss

    def loss(*args, **kwargs):
        return chunked_divergence_loss(*args, entropy=entropy, **kwargs)

    loss.__doc__ = chunked_divergence_loss.__doc__
    module._chunked_divergence_loss = loss


def unpatch_distillation_trainer() -> None:
    """Undo :func:`patch_distillation_trainer`."""
    if "fn" in _DISTILLATION_ORIGINAL:
        module = importlib.import_module(DISTILLATION_MODULE)
        module._chunked_divergence_loss = _DISTILLATION_ORIGINAL.pop("fn")
