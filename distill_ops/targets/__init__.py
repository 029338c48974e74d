"""Teacher side: sparse targets (top-k, sampled) and the offline cache of them.

    teacher_topk(teacher_logits, k, *, temperature=1.0, backend="auto") -> SparseTargets
    teacher_sample(teacher_logits, num_samples, *, temperature=1.0, proposal_temperature=1.0,
                   seed=0, backend="auto") -> SparseTargets
    TargetCacheWriter, TargetCache, write_teacher_cache   (targets/cache.py)
"""

from .cache import CacheError, TargetCache, TargetCacheWriter, write_teacher_cache
from .sample import teacher_sample
from .topk import teacher_topk
from .types import SparseTargets

__all__ = ["SparseTargets", "teacher_topk", "teacher_sample", "TargetCacheWriter", "TargetCache",
           "write_teacher_cache", "CacheError"]
