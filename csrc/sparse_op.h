// Host-side glue of the sparse-target operators: argument checks and packing into SparseArgs /
// TeacherArgs (csrc/include/distill_ops/sparse_args.h). Shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <optional>
#include <tuple>

#include "distill_ops/sparse_args.h"

namespace distill_ops {

// A validated sparse_forward call and the loss tensor it writes.
struct SparseCall {
  SparseArgs args;
  at::Tensor loss;
  at::ScalarType dtype;  // the student's
};

SparseCall prepare_sparse_call(const at::Tensor& student, const at::Tensor& ids,
                               const at::Tensor& logprobs, const std::optional<at::Tensor>& tail,
                               const std::optional<at::Tensor>& labels,
                               const std::optional<at::Tensor>& grad,
                               const std::optional<at::Tensor>& grad_scale, int64_t divergence,
                               double mix, int64_t mode, double temperature, double target_scale,
                               double soft_coef, double hard_coef, int64_t ignore_index,
                               const std::optional<at::Tensor>& target_bits,
                               c10::DeviceType device_type);

// A validated teacher_topk / teacher_sample call and its three outputs (ids, logprobs, tail).
struct TeacherCall {
  TeacherArgs args;
  at::Tensor ids, logprobs, tail;
  at::ScalarType dtype;
};

// A validated teacher_topk call, its temperature checked and set (CPU and CUDA).
TeacherCall prepare_topk_call(const at::Tensor& teacher, int64_t k, double temperature,
                              c10::DeviceType device_type);

// A validated teacher_sample call (outputs ids, logprobs, tail of (N, num_samples)) or,
// with `draws_only`, for teacher_sample_draws (output: the int64 draws (N, num_samples) in `ids`;
// the caller merges them); inv_prop and seed_key are checked and set (CPU and CUDA).
TeacherCall prepare_sample_call(const char* op, const at::Tensor& teacher, int64_t num_samples,
                                double inv_prop, int64_t seed_key, bool draws_only,
                                c10::DeviceType device_type);

}  // namespace distill_ops
