// The ranking rule of teacher top-k, shared by the CPU and CUDA kernels (backends/reference_sparse.py
// is the contract): values descending, ties to the lower id, NaN ranked as +inf.
#pragma once

#include <cmath>

#include "macros.h"

namespace distill_ops {

// The value an element is ranked by: the logit itself, NaN as +inf.
template <typename T>
DOPS_HD DOPS_INLINE T rank_value(T x) {
  return x != x ? static_cast<T>(INFINITY) : x;
}

}  // namespace distill_ops
