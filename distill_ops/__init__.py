"""distill-ops: fused distillation losses for large-vocabulary language models.

Public API::

    kd_loss(student_logits, teacher_logits, *, divergence="forward_kl", temperature=1.0, ...)
    KDLoss(**same keywords)
    fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, ...)
    FusedLinearKDLoss(**same keywords)
    fused_linear_sparse_kd_loss(student_hidden, student_weight, target_ids, target_logprobs, ...)
    sparse_kd_loss(student_logits, target_ids, target_logprobs, *, tail="renorm", ...)
    SparseKDLoss(**same keywords)
    teacher_topk(teacher_logits, k, *, temperature=1.0, backend="auto") -> SparseTargets
    teacher_sample(teacher_logits, num_samples, *, temperature=1.0, proposal_temperature=1.0,
                   seed=0, backend="auto") -> SparseTargets

The trainer (``distill_ops.trainer``), the offline target cache (``distill_ops.targets``) and the
drop-ins for transformers / TRL (``distill_ops.integrations``) are imported on demand.
"""

from .constants import DIVERGENCES
from .functional import kd_loss
from .fused_linear import fused_linear_kd_loss, fused_linear_sparse_kd_loss
from .modules import FusedLinearKDLoss, KDLoss, SparseKDLoss
from .sparse import TAILS, SparseTargets, sparse_kd_loss, teacher_sample, teacher_topk

__all__ = ["kd_loss", "KDLoss", "fused_linear_kd_loss", "fused_linear_sparse_kd_loss",
           "FusedLinearKDLoss", "DIVERGENCES",
           "sparse_kd_loss", "SparseKDLoss", "teacher_topk", "teacher_sample", "SparseTargets", "TAILS"]
__version__ = "0.1.0"
