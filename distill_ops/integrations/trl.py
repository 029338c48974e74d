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
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Optional, Union

import torch

from ..functional import kd_loss

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
    ``labels`` (B, T) is already aligned with the logits (no shift here), -100 masks a position.
    ``num_items_in_batch``, when given, divides the summed loss instead of ``reduction``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
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


def _gkd_classes() -> list:
    classes = []
    for name in GKD_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # missing, or an optional dependency of trl is
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
    classes = _gkd_classes()
    if not classes:
        raise ImportError("trl is installed but no GKDTrainer could be imported from "
                          f"{', '.join(GKD_MODULES)}")
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
