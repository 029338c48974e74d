// Tensor argument checks that more than one operator makes (dense_forward in dense_call.cpp,
// sparse_forward and the teacher ops in sparse_call.cpp): one wording of each error.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace distill_ops {

// The logit dtypes the kernels are instantiated for.
inline bool supported_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
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
}

}  // namespace distill_ops
