"""The kernels' constants from the losses' hyperparameters, defined once: the losses derive them
from their keywords when called (or traced), and the ops that take the hyperparameters as tensors
(ops/scalar_args.py) derive them, with the same checks, when they run."""

from __future__ import annotations

from . import _validate as check
from .backends.base import (DIVERGENCE_CODES, FORWARD_KL, JSD, MODE_FULL, MODE_SUPPORT,
                            MODE_TAIL, REVERSE_KL)

DIVERGENCES = tuple(DIVERGENCE_CODES) + ("generalized_jsd",)


def resolve_divergence(divergence: str, beta: float, alpha: float) -> tuple[int, float]:
    """Map a divergence name and its parameters to (kernel code, mix).

    ``generalized_jsd`` follows TRL's GKD convention: beta = 0 is forward KL, beta = 1 reverse KL,
    and in between JSD(beta) with the mixture M = beta p + (1 - beta) q.
    """
    if divergence == "generalized_jsd":
        if beta == 0.0:
            return FORWARD_KL, 0.0
        if beta == 1.0:
            return REVERSE_KL, 0.0
        return JSD, beta
    code = DIVERGENCE_CODES[divergence]
    if divergence == "jsd":
        return code, beta
    if divergence.startswith("skew"):
        return code, alpha
    return code, 0.0


def divergence_constants(*, divergence: str, temperature: float, beta: float, alpha: float,
                         hard_weight: float, soft_weight: float,
                         scale_temperature: bool) -> tuple:
    """Check the divergence and its numbers (each error names its argument) and turn them into
    (divergence code, mix, tau, soft coefficient with the tau^2 factor, hard coefficient)."""
    check.choice("divergence", divergence, DIVERGENCES)
    tau = check.temperature("temperature", temperature)
    beta = check.unit_interval("beta", beta)
    alpha = check.unit_interval("alpha", alpha)
    hard_weight = check.non_negative("hard_weight", hard_weight)
    soft_weight = check.non_negative("soft_weight", soft_weight)
    code, mix = resolve_divergence(divergence, beta, alpha)
    soft_coef = soft_weight * (tau * tau if check.flag("scale_temperature", scale_temperature)
                               else 1.0)
    return code, mix, tau, soft_coef, hard_weight


def sparse_mode(tail: str, code: int) -> int:
    """The sparse kernels' mode: the tail bucket, else the full vocabulary for forward KL (its
    gradient is dense over V) and the target support for the other divergences."""
    if tail == "tail":
        return MODE_TAIL
    return MODE_FULL if code == FORWARD_KL else MODE_SUPPORT


def needs_labels(hard_weight: float, labels: object) -> None:
    if hard_weight > 0 and labels is None:
        raise ValueError("hard_weight > 0 needs labels")
