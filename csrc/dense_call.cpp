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
  check_logits(op, "student", student, device_type);
  TORCH_CHECK(teacher.device() == student.device(), op, "teacher is on ", teacher.device(),
              " but student is on ", student.device());
  TORCH_CHECK(teacher.sizes() == student.sizes(), op, "teacher has shape ", teacher.sizes(),
              " but student has shape ", student.sizes());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), op, "teacher has dtype ",
              teacher.scalar_type(), " but student has dtype ", student.scalar_type());
  check_logits(op, "teacher", teacher, device_type);
  check_divergence(op, divergence, mix);
  check_finite_positive(op, "temperature", temperature);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, op,
              "softcap must be finite and >= 0 (0: none), got ", softcap);
  const int64_t n = student.size(0), v = student.size(1);

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
    check_labels_arg(op, *labels, student);
    call.labels = labels->contiguous();
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
