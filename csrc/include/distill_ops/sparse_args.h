// Plain (torch-free) descriptions of the sparse-target operator calls, shared by the CPU and CUDA
// kernels: the loss (sparse_forward), the teacher's top-k and its sampled targets.
#pragma once

#include <cstdint>

namespace distill_ops {

// sparse_forward: student logits (n, v) against k (id, log-weight) slots per row.
struct SparseArgs {
  const void* student = nullptr;     // (n, v), row stride stride_s, unit column stride
  const int32_t* ids = nullptr;      // (n, k) contiguous; -1 = padding, else unique in [0, v)
  const void* logprobs = nullptr;    // (n, k) contiguous, float (double when `fp64`)
  const void* tail = nullptr;        // (n,) contiguous, same dtype as logprobs, or null
  const int64_t* labels = nullptr;   // (n,) contiguous, or null
  // kModeTail: the row's target ids as a bit set, (n, (v + 31) / 32) contiguous, bit j % 32 of
  // word j / 32 (reference_sparse.target_bits), so the sum outside K leaves them out column by
  // column; null in the other modes.
  const uint32_t* target_bits = nullptr;
  void* grad = nullptr;              // (n, v) in the student's dtype, row stride stride_g, or null
  const void* grad_scale = nullptr;  // 0-dim float (double when `fp64`), or null for 1
  void* loss = nullptr;              // (n,) float (double when `fp64`)
  // CUDA, with grad: (n, k) scratch in the compute dtype (float; double for double logits) where
  // the target columns' gradients wait while the row pass writes over the logits they need.
  void* slot_grad = nullptr;
  int64_t n = 0, v = 0, k = 0;
  int64_t stride_s = 0, stride_g = 0;
  bool fp64 = false;                 // logprobs, tail, grad_scale and loss are double
  int divergence = 0, mode = 0;
  double mix = 0.0, temperature = 1.0, target_scale = 1.0, soft_coef = 1.0, hard_coef = 0.0;
  int64_t ignore_index = -100;
};

// teacher_topk / teacher_sample: teacher logits (n, v) -> ids int32 (n, k), logprobs float (n, k),
// tail float (n,) (all contiguous).
struct TeacherArgs {
  const void* teacher = nullptr;  // (n, v), row stride stride_t, unit column stride
  int32_t* ids = nullptr;
  float* logprobs = nullptr;
  float* tail = nullptr;
  int64_t* draws = nullptr;  // sampling, draws only: the id each (row, sample) drew, (n, k)
  int64_t n = 0, v = 0, k = 0;  // k: top-k size, or the number of samples
  int64_t stride_t = 0;
  double inv_tau = 1.0;   // top-k: 1 / temperature
  double inv_prop = 1.0;  // sampling: 1 / (temperature * proposal_temperature)
  double delta = 0.0;     // sampling: log p_i - log q_i = x_i * delta + const
  uint32_t seed_key = 0;  // sampling: targets/rng.py's seed_key(seed)
};

}  // namespace distill_ops
