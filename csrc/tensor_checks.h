// Argument checks that more than one operator makes (dense_forward in dense_call.cpp,
// sparse_forward and the teacher ops in sparse_call.cpp): one wording of each error.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace distill_ops {

// The logit dtypes the kernels are instantiated for.
inline bool supported_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// A logits matrix the kernels read row by row: a tensor of the device type this implementation
// serves, 2-D (N, V), a dtype the kernels are instantiated for, V >= 1 unless there are no rows,
// unit stride on the vocabulary axis (vectorised loads) and a non-negative row stride.
inline void check_logits(const char* op, const char* name, const at::Tensor& x,
                         c10::DeviceType device_type) {
  TORCH_CHECK(x.device().type() == device_type, op, name, " is on ", x.device(),
              ", this implementation serves ", c10::DeviceTypeName(device_type), " tensors");
  TORCH_CHECK(x.dim() == 2, op, name, " must be 2-D (N, V), got shape ", x.sizes());
  TORCH_CHECK(supported_float_dtype(x.scalar_type()), op, name,
              " must be float32, bfloat16, float16 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) >= 1 || x.size(0) == 0, op, "the vocabulary (", name,
              ".size(1)) must not be empty");
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, op, name,
              " must have unit stride on the last axis, got strides ", x.strides());
  TORCH_CHECK(x.stride(0) >= 0, op, name, " has a negative row stride");
}

// Hard labels: int64 of shape (N,) beside the student; contiguity is the caller's concern.
inline void check_labels_arg(const char* op, const at::Tensor& labels, const at::Tensor& student) {
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, "labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == student.size(0), op,
              "labels must have shape (", student.size(0), ",), got ", labels.sizes());
  TORCH_CHECK(labels.device() == student.device(), op, "labels are on ", labels.device(),
              " but student is on ", student.device());
}

// A scalar the math divides by or raises to a power (temperature, target_scale, inv_prop).
inline void check_finite_positive(const char* op, const char* name, double x) {
  TORCH_CHECK(std::isfinite(x) && x > 0.0, op, name, " must be finite and > 0, got ", x);
}

// The divergence code (backends/base.py numbering) and its mixture weight (beta or alpha).
inline void check_divergence(const char* op, int64_t divergence, double mix) {
  TORCH_CHECK(divergence >= 0 && divergence <= 4, op, "divergence must be a code in 0..4, got ",
              divergence);
  TORCH_CHECK(std::isfinite(mix) && mix >= 0.0 && mix <= 1.0, op, "mix must be in [0, 1], got ",
              mix);
}

// A gradient output the kernels write row by row: the student's shape, dtype and device, unit
// stride on the vocabulary axis, a non-negative row stride; either the student tensor itself (an
// in-place gradient: the kernels read each value before writing over it) or no memory of it.
inline void check_grad_out(const char* op, const at::Tensor& g, const at::Tensor& student) {
  TORCH_CHECK(g.sizes() == student.sizes(), op, "grad has shape ", g.sizes(),
              " but student has shape ", student.sizes());
  TORCH_CHECK(g.scalar_type() == student.scalar_type(), op, "grad has dtype ", g.scalar_type(),
              " but student has dtype ", student.scalar_type());
  TORCH_CHECK(g.device() == student.device(), op, "grad is on ", g.device(),
              " but student is on ", student.device());
  TORCH_CHECK(student.size(1) <= 1 || g.stride(1) == 1, op,
              "grad must have unit stride on the last axis, got strides ", g.strides());
  TORCH_CHECK(g.stride(0) >= 0, op, "grad has a negative row stride");
  TORCH_CHECK(at::get_overlap_status(g, student) != at::MemOverlapStatus::Partial, op,
              "grad overlaps the student logits without being them");
  // Rows that share memory (an expanded tensor): one row's gradient would land on another's.
  TORCH_CHECK(g.size(0) <= 1 || g.stride(0) >= g.size(1), op,
              "grad's rows share memory (row stride ", g.stride(0), " < V = ", g.size(1), ")");
}

}  // namespace distill_ops
