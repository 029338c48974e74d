"""distill-ops: fused distillation losses for large-vocabulary language models.

Public API::

    kd_loss(student_logits, teacher_logits, *, divergence="forward_kl", temperature=1.0, ...)
    KDLoss(**same keywords)
"""

from .functional import DIVERGENCES, kd_loss
from .modules import KDLoss

__all__ = ["kd_loss", "KDLoss", "DIVERGENCES"]
__version__ = "0.1.0"
