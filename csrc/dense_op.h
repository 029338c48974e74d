// Host-side glue of the dense_forward operator: argument checks and packing into DenseArgs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <optional>

#include "distill_ops/dense_args.h"

namespace distill_ops {

// A validated call: the plain arguments, the loss tensor they point at, and the tensors that must
// stay alive while the kernels run (a contiguous copy of the labels, if one was made).
struct DenseCall {
  DenseArgs args;
  at::Tensor loss;
  at::Tensor labels;
  at::ScalarType dtype;
};

// Checks every argument (naming it in the error) and allocates the loss. `device_type` is the
// device the calling kernel serves.
DenseCall prepare_dense_call(const at::Tensor& student, const at::Tensor& teacher,
                             const std::optional<at::Tensor>& labels,
                             const std::optional<at::Tensor>& grad,
                             const std::optional<at::Tensor>& grad_scale, int64_t divergence,
                             double mix, double temperature, double softcap, double soft_coef,
                             double hard_coef, int64_t ignore_index, c10::DeviceType device_type);

}  // namespace distill_ops
