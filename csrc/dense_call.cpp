// Host-side glue of the dense_forward operator: the argument checks (each error names the
// argument) and the packing into DenseArgs. Shared by the CPU and CUDA implementations.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>

#include "dense_op.h"
#include "tensor_checks.h"

namespace distill_ops {

DenseCall prepare_dense_call(const at::Tensor& student, const at::Tensor& teacher,
                             const std::optional<at::Tensor>& labels,
                             const std::optional<at::Tensor>& grad,
                             const std::optional<at::Tensor>& grad_scale, int64_t divergence,
                             double mix, double temperature, double softcap, double soft_coef,
                             double hard_coef, int64_t ignore_index, c10::DeviceType device_type) {
  const char* op = "distill_ops_native::dense_forward: ";
  TORCH_CHECK(student.device().type() == device_type, op, "student is on ", student.device(),
              ", this implementation serves ", c10::DeviceTypeName(device_type), " tensors");
  TORCH_CHECK(student.dim() == 2, op, "student must be 2-D (N, V), got shape ", student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes(), op, "teacher has shape ", teacher.sizes(),
              " but student has shape ", student.sizes());
  TORCH_CHECK(teacher.device() == student.device(), op, "teacher is on ", teacher.device(),
              " but student is on ", student.device());
  TORCH_CHECK(supported_float_dtype(student.scalar_type()), op,
              "student must be float32, bfloat16, float16 or float64, got ", student.scalar_type());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), op, "teacher has dtype ",
              teacher.scalar_type(), " but student has dtype ", student.scalar_type());
  const int64_t n = student.size(0), v = student.size(1);
  TORCH_CHECK(v >= 1 || n == 0, op, "the vocabulary (student.size(1)) must not be empty");
  TORCH_CHECK(v <= 1 || student.stride(1) == 1, op,
              "student must have unit stride on the last axis, got strides ", student.strides());
  TORCH_CHECK(v <= 1 || teacher.stride(1) == 1, op,
              "teacher must have unit stride on the last axis, got strides ", teacher.strides());
  TORCH_CHECK(student.stride(0) >= 0 && teacher.stride(0) >= 0, op, "negative row strides");
  TORCH_CHECK(divergence >= 0 && divergence <= 4, op, "divergence must be a code in 0..4, got ",
              divergence);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, op,
              "temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, op,
              "softcap must be finite and >= 0 (0: none), got ", softcap);
  TORCH_CHECK(std::isfinite(mix) && mix >= 0.0 && mix <= 1.0, op, "mix must be in [0, 1], got ",
              mix);

  DenseCall call;
  call.dtype = student.scalar_type();
  DenseArgs& a = call.args;
  a.student = student.data_ptr();
  a.teacher = teacher.data_ptr();
  a.n = n;
  a.v = v;
  a.stride_s = student.stride(0);
  a.stride_t = teacher.stride(0);
  a.divergence = static_cast<int>(divergence);
  a.mix = mix;
  a.temperature = temperature;
  a.softcap = softcap;
  a.soft_coef = soft_coef;
  a.hard_coef = hard_coef;
  a.ignore_index = ignore_index;

  if (labels.has_value()) {
    const at::Tensor& lab = *labels;
    TORCH_CHECK(lab.scalar_type() == at::kLong, op, "labels must be int64, got ",
                lab.scalar_type());
    TORCH_CHECK(lab.dim() == 1 && lab.size(0) == n, op, "labels must have shape (", n,
                ",), got ", lab.sizes());
    TORCH_CHECK(lab.device() == student.device(), op, "labels are on ", lab.device(),
                " but student is on ", student.device());
    call.labels = lab.contiguous();
    a.labels = call.labels.data_ptr<int64_t>();
  }
  if (grad.has_value()) {
    const at::Tensor& g = *grad;
    check_grad_out(op, g, student);
    a.grad = g.data_ptr();
    a.stride_g = g.stride(0);
  }
  if (grad_scale.has_value()) {
    const at::Tensor& gs = *grad_scale;
    TORCH_CHECK(gs.numel() == 1 && gs.dim() == 0, op, "grad_scale must be a 0-dim tensor, got shape ",
                gs.sizes());
    TORCH_CHECK(gs.scalar_type() == at::kFloat || gs.scalar_type() == at::kDouble, op,
                "grad_scale must be float32 or float64, got ", gs.scalar_type());
    TORCH_CHECK(gs.device() == student.device(), op, "grad_scale is on ", gs.device(),
                " but student is on ", student.device());
    a.grad_scale = gs.data_ptr();
    a.grad_scale_fp64 = gs.scalar_type() == at::kDouble;
  }
  const auto loss_dtype = call.dtype == at::kDouble ? at::kDouble : at::kFloat;
  call.loss = at::empty({n}, student.options().dtype(loss_dtype));
  a.loss = call.loss.data_ptr();
  return call;
}

}  // namespace distill_ops
