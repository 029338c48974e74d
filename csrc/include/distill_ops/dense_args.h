// Plain (torch-free) description of one dense_forward call, shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include "divergence.h"
#include "macros.h"

namespace distill_ops {

struct DenseArgs {
  const void* student = nullptr;  // (n, v), row stride stride_s, unit column stride
  const void* teacher = nullptr;  // (n, v), row stride stride_t
  const int64_t* labels = nullptr;  // (n,) contiguous, or null
  void* grad = nullptr;             // (n, v), row stride stride_g, or null; may alias student
  const void* grad_scale = nullptr;  // 0-dim float (double when grad_scale_fp64), or null for 1
  bool grad_scale_fp64 = false;      // float64 calls get a float64 scale (1/3 is not a float)
  void* loss = nullptr;             // (n,) contiguous: float, double for double inputs
  int64_t n = 0, v = 0;
  int64_t stride_s = 0, stride_t = 0, stride_g = 0;
  int divergence = 0;
  double mix = 0.0, temperature = 1.0, softcap = 0.0, soft_coef = 1.0, hard_coef = 0.0;
  int64_t ignore_index = -100;
};

// The factor every gradient row is multiplied by, in the accumulation type.
template <typename T>
DOPS_HD DOPS_INLINE T grad_scale_of(const DenseArgs& A) {
  if (A.grad_scale == nullptr) return T(1);
  return A.grad_scale_fp64 ? static_cast<T>(*static_cast<const double*>(A.grad_scale))
                           : static_cast<T>(*static_cast<const float*>(A.grad_scale));
}

// Per-call constants in the accumulation type, and which parts of the loss are live.
template <typename T>
struct LossConsts {
  T inv_tau;
  T cap, inv_cap;
  T soft_coef, soft_scale;  // soft_scale = soft_coef / tau
  T hard_coef;
  MixWeights<T> mix;
  bool soft;        // soft_coef != 0: the divergence term is computed (teacher read)
  bool hard;        // labels given and hard_coef != 0: the cross-entropy term
  bool has_labels;  // labels given (they mark ignored rows even without the CE term)
  bool cap_on;      // softcap != 0
  bool ce_own_lse;  // the CE term needs lse(s') apart from lse(s'/tau)
  bool need_grad;
};

template <typename T>
inline LossConsts<T> loss_consts(const DenseArgs& a) {
  LossConsts<T> k;
  k.inv_tau = static_cast<T>(1.0 / a.temperature);
  k.cap = static_cast<T>(a.softcap);
  k.inv_cap = static_cast<T>(a.softcap != 0.0 ? 1.0 / a.softcap : 0.0);
  k.soft_coef = static_cast<T>(a.soft_coef);
  k.soft_scale = static_cast<T>(a.soft_coef / a.temperature);
  k.hard_coef = static_cast<T>(a.hard_coef);
  k.mix = mix_weights<T>(a.divergence, a.mix);
  k.soft = a.soft_coef != 0.0;
  k.has_labels = a.labels != nullptr;
  k.hard = k.has_labels && a.hard_coef != 0.0;
  k.cap_on = a.softcap != 0.0;
  k.ce_own_lse = k.hard && (!k.soft || a.temperature != 1.0);
  k.need_grad = a.grad != nullptr;
  return k;
}

}  // namespace distill_ops
