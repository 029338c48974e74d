"""User-facing functions: the fused distillation losses."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import _validate as check
from . import backends
from .constants import divergence_constants, needs_labels
from .ops import scalar_args
from .ops.dense import dense_kd, dense_kd_scalars, inplace_dense_kd
from .ops.fused_grad import REDUCTIONS
from .ops.teacher_dtype import teacher_as

VOCAB_MODES = ("strict", "common_prefix")
# A hyperparameter: a number, or a 0-d CPU tensor (ops/scalar_args.py)
Scalar = Union[float, torch.Tensor]


def loss_constants(*, divergence: str, temperature: float, beta: float, alpha: float,
                   hard_weight: float, soft_weight: float, scale_temperature: bool,
                   ignore_index: int, softcap: Optional[float], reduction: str, backend: str,
                   vocab: str = "strict", inplace_grad: bool = False,
                   reductions: Sequence[str] = REDUCTIONS) -> tuple:
    """Check the keywords of the dense losses (kd_loss, fused_linear_kd_loss and their modules,
    which call this at construction; each error names its argument) and turn them into the
    kernels' constants: (divergence code, mix, tau, softcap or 0, soft coefficient with the tau^2
    factor, hard coefficient)."""
    code, mix, tau, soft_coef, hard_weight = divergence_constants(
        divergence=divergence, temperature=temperature, beta=beta, alpha=alpha,
        hard_weight=hard_weight, soft_weight=soft_weight, scale_temperature=scale_temperature)
    cap = 0.0 if softcap is None else check.positive("softcap", softcap)
    check.integer("ignore_index", ignore_index)
    check.choice("reduction", reduction, reductions)
    check.choice("vocab", vocab, VOCAB_MODES)
    check.choice("backend", backend, backends.BACKENDS)
    check.flag("inplace_grad", inplace_grad)
    return code, mix, tau, cap, soft_coef, hard_weight


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: Scalar = 1.0,
    beta: Scalar = 0.5,
    alpha: Scalar = 0.1,
    labels: Optional[torch.Tensor] = None,
    hard_weight: Scalar = 0.0,
    soft_weight: Scalar = 1.0,
    scale_temperature: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: Optional[float] = None,
    vocab: str = "strict",
    inplace_grad: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused distillation loss between student and teacher logits of shape (..., V).

    Per token: ``soft_weight * tau^2 * D(p, q) + hard_weight * CE(student, label)`` where
    q = softmax(student / tau), p = softmax(teacher / tau) and D is the chosen divergence
    (``forward_kl`` KL(p||q), ``reverse_kl`` KL(q||p), ``jsd`` with ``beta``, ``skew_forward_kl`` and
    ``skew_reverse_kl`` with ``alpha``, ``generalized_jsd`` as TRL's GKD). The tau^2 factor is dropped
    with ``scale_temperature=False``; CE uses the student logits at temperature 1.

    Args:
        student_logits: (..., V) float32/bfloat16/float16/float64; the gradient flows into it.
        teacher_logits: (..., V) same leading shape, same device; never differentiated. Any
            float dtype: cast to the student's, a narrowing cast after subtracting each row's
            max (the softmax is unchanged; not with a softcap, which is not shift-invariant).
        labels: optional integer (...) hard labels; rows equal to ``ignore_index`` contribute
            nothing, get a zero gradient and are not counted by ``mean``.
        temperature, beta, alpha, hard_weight, soft_weight: numbers, or 0-d floating CPU tensors
            (not requiring grad). Under torch.compile a float is a constant of the graph, so a
            new value compiles the step anew; a tensor, changed in place between steps (as
            torch.optim's tensor learning rates), serves every value with one graph.
        reduction: ``none`` (per token, float32), ``sum``, ``mean`` (over non-ignored tokens; 0 if
            all are ignored) or ``batchmean`` (sum over the number of tokens, ignored ones
            included: F.kl_div's batchmean on (tokens, V) inputs; TRL's GKD batchmean, which
            divides by the kept tokens, is ``mean`` here).
        softcap: optional c > 0: logits -> c * tanh(logits / c) before the temperature (both sides).
        vocab: ``strict`` (vocabularies must match) or ``common_prefix`` (use the first
            min(V_student, V_teacher) entries of both; the rest of the student gets zero gradient).
        inplace_grad: write the gradient into ``student_logits``' own memory (eager mode only):
            saves one N x V buffer, but the logits are overwritten by the forward.
        backend: ``auto``, ``torch``, ``triton``, ``cpu`` or ``cuda`` (env ``DISTILL_OPS_BACKEND``
            overrides ``auto``).

    Returns:
        The loss: a scalar, or per-token values for ``reduction="none"`` (float32; float64 for
        float64 inputs).
    """
    student = check.logits("student_logits", student_logits)
    teacher = check.logits("teacher_logits", teacher_logits)
    check.same_device("teacher_logits", teacher, "student_logits", student)
    check.leading_shape("teacher_logits", teacher, "student_logits", student)
    hyper, held = scalar_args.resolve(dict(temperature=temperature, beta=beta, alpha=alpha,
                                           soft_weight=soft_weight, hard_weight=hard_weight))
    code, mix, tau, cap, soft_coef, hard_weight = loss_constants(
        divergence=divergence, **scalar_args.stand_ins(hyper),
        scale_temperature=scale_temperature, ignore_index=ignore_index, softcap=softcap,
        reduction=reduction, backend=backend, vocab=vocab, inplace_grad=inplace_grad)

    v_student, v_teacher = student.shape[-1], teacher.shape[-1]
    if v_student != v_teacher:
        if vocab == "strict":
            raise ValueError(
                f"teacher_logits has vocabulary {v_teacher} but student_logits has {v_student}; "
                "pass vocab='common_prefix' to distill over the first min(V) entries"
            )
        v = min(v_student, v_teacher)
        if inplace_grad:
            raise ValueError("inplace_grad=True needs equal vocabularies (vocab='common_prefix' "
                             "would leave the student's extra columns holding logits)")
        student, teacher = student[..., :v], teacher[..., :v]
    vocab_size = student.shape[-1]
    label_rows = check.labels(labels, student, vocab_size, ignore_index)
    needs_labels(hard_weight, label_rows)

    name = backends.resolve(backend, student.device)
    lead = student.shape[:-1]
    student2d = student.reshape(-1, vocab_size)
    # Never differentiated (as sparse_kd_loss's targets and the fused-linear teacher): detached,
    # so a teacher that requires grad does not make the loss require one the op cannot give.
    teacher2d = teacher.detach().reshape(-1, vocab_size)
    if student2d.stride(-1) != 1:
        student2d = student2d.contiguous()
    # Kernels take one dtype for both sides; a mixed pair costs one cast of the teacher (rows
    # shifted by their max first when it narrows: ops.teacher_dtype).
    teacher2d = teacher_as(teacher2d, student2d.dtype, softcapped=cap > 0)
    if teacher2d.stride(-1) != 1:
        # (Not .to(memory_format=...): for a transposed 2-D view that aliases instead of copying.)
        teacher2d = teacher2d.contiguous()
    red = REDUCTIONS.index(reduction)
    args = (code, mix, tau, cap, soft_coef, hard_weight, ignore_index, red)

    need_grad = torch.is_grad_enabled() and student.requires_grad
    if inplace_grad and need_grad:
        if torch.compiler.is_compiling():
            raise RuntimeError("inplace_grad=True is an eager-mode option; it cannot be compiled")
        check.distinct_rows("student_logits", student2d)
        check.no_overlap("teacher_logits", teacher2d, "student_logits", student2d)
        loss = inplace_dense_kd(student2d, teacher2d, label_rows, *args, name)
    elif held:   # compiled, with tensor hyperparameters: read when the op runs
        loss, _ = dense_kd_scalars(student2d, teacher2d, label_rows, scalar_args.pack(hyper),
                                   divergence, scale_temperature, cap, ignore_index, red,
                                   need_grad, name)
    else:
        loss, _ = dense_kd(student2d, teacher2d, label_rows, *args, need_grad, name)
    return loss.reshape(lead) if red == 0 else loss
