// Argument checks of the sparse-target operators (each error names the argument), shared by the
// CPU and CUDA implementations. The Python API (distill_ops/sparse.py) checks values (ids in range
// and unique, no NaN weights) before it gets here; this layer checks what the kernels rely on.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

#include <cmath>
#include <limits>

#include "distill_ops/sparse_math.h"
#include "sparse_op.h"
#include "tensor_checks.h"

namespace distill_ops {

namespace {

void check_rows(const char* op, const char* name, const at::Tensor& t, const at::Tensor& student) {
  TORCH_CHECK(t.device() == student.device(), op, name, " is on ", t.device(),
              " but student is on ", student.device());
  TORCH_CHECK(t.is_contiguous(), op, name, " must be contiguous");
}

}  // namespace

SparseCall prepare_sparse_call(const at::Tensor& student, const at::Tensor& ids,
                               const at::Tensor& logprobs, const std::optional<at::Tensor>& tail,
                               const std::optional<at::Tensor>& labels,
                               const std::optional<at::Tensor>& grad,
                               const std::optional<at::Tensor>& grad_scale, int64_t divergence,
                               double mix, int64_t mode, double temperature, double target_scale,
                               double soft_coef, double hard_coef, int64_t ignore_index,
                               const std::optional<at::Tensor>& target_bits,
                               c10::DeviceType device_type) {
  const char* op = "distill_ops_native::sparse_forward: ";
  check_logits(op, "student", student, device_type);
  const int64_t n = student.size(0), v = student.size(1);
  TORCH_CHECK(ids.scalar_type() == at::kInt, op, "ids must be int32, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == n && ids.size(1) >= 1, op,
              "ids must have shape (", n, ", k >= 1), got ", ids.sizes());
  check_rows(op, "ids", ids, student);
  const bool fp64 = logprobs.scalar_type() == at::kDouble;
  TORCH_CHECK(logprobs.scalar_type() == at::kFloat || fp64, op,
              "logprobs must be float32 or float64, got ", logprobs.scalar_type());
  TORCH_CHECK(logprobs.sizes() == ids.sizes(), op, "logprobs has shape ", logprobs.sizes(),
              " but ids has shape ", ids.sizes());
  check_rows(op, "logprobs", logprobs, student);
  check_divergence(op, divergence, mix);
  TORCH_CHECK(mode >= 0 && mode <= 2, op, "mode must be a code in 0..2, got ", mode);
  check_finite_positive(op, "temperature", temperature);
  check_finite_positive(op, "target_scale", target_scale);

  SparseCall call;
  call.dtype = student.scalar_type();
  SparseArgs& a = call.args;
  a.student = student.data_ptr();
  a.ids = ids.data_ptr<int32_t>();
  a.logprobs = logprobs.data_ptr();
  a.n = n;
  a.v = v;
  a.k = ids.size(1);
  a.stride_s = student.stride(0);
  a.fp64 = fp64;
  a.divergence = static_cast<int>(divergence);
  a.mode = static_cast<int>(mode);
  a.mix = mix;
  a.temperature = temperature;
  a.target_scale = target_scale;
  a.soft_coef = soft_coef;
  a.hard_coef = hard_coef;
  a.ignore_index = ignore_index;
  if (tail.has_value()) {
    TORCH_CHECK(tail->scalar_type() == logprobs.scalar_type(), op, "tail has dtype ",
                tail->scalar_type(), " but logprobs has dtype ", logprobs.scalar_type());
    TORCH_CHECK(tail->dim() == 1 && tail->size(0) == n, op, "tail must have shape (", n,
                ",), got ", tail->sizes());
    check_rows(op, "tail", *tail, student);
    a.tail = tail->data_ptr();
  }
  if (labels.has_value()) {
    check_labels_arg(op, *labels, student);
    TORCH_CHECK(labels->is_contiguous(), op, "labels must be contiguous");
    a.labels = labels->data_ptr<int64_t>();
  }
  if (grad.has_value()) {
    const at::Tensor& g = *grad;
    check_grad_out(op, g, student);
    a.grad = g.data_ptr();
    a.stride_g = g.stride(0);
  }
  if (grad_scale.has_value()) {
    const at::Tensor& gs = *grad_scale;
    TORCH_CHECK(gs.dim() == 0, op, "grad_scale must be a 0-dim tensor, got shape ", gs.sizes());
    TORCH_CHECK(gs.scalar_type() == logprobs.scalar_type(), op, "grad_scale has dtype ",
                gs.scalar_type(), " but logprobs has dtype ", logprobs.scalar_type());
    TORCH_CHECK(gs.device() == student.device(), op, "grad_scale is on ", gs.device(),
                " but student is on ", student.device());
    a.grad_scale = gs.data_ptr();
  }
  if (mode == kModeTail) {
    TORCH_CHECK(target_bits.has_value(), op,
                "target_bits is required in tail mode (mode 2): reference_sparse.target_bits(ids, V)");
    const at::Tensor& b = *target_bits;
    TORCH_CHECK(b.scalar_type() == at::kInt, op, "target_bits must be int32, got ", b.scalar_type());
    TORCH_CHECK(b.dim() == 2 && b.size(0) == n && b.size(1) == (v + 31) / 32, op,
                "target_bits must have shape (", n, ", ", (v + 31) / 32, "), got ", b.sizes());
    check_rows(op, "target_bits", b, student);
    a.target_bits = reinterpret_cast<const uint32_t*>(b.data_ptr<int32_t>());
  }
  call.loss = at::empty({n}, student.options().dtype(fp64 ? at::kDouble : at::kFloat));
  a.loss = call.loss.data_ptr();
  return call;
}

namespace {

// The checks and geometry the teacher ops share; the outputs are allocated by the callers.
TeacherCall teacher_call(const char* op, const at::Tensor& teacher, c10::DeviceType device_type) {
  check_logits(op, "teacher", teacher, device_type);
  const int64_t n = teacher.size(0), v = teacher.size(1);
  TORCH_CHECK(v >= 1, op, "the vocabulary (teacher.size(1)) must not be empty");
  TORCH_CHECK(v <= std::numeric_limits<int32_t>::max(), op, "V = ", v, " does not fit int32 ids");
  TeacherCall call;
  call.dtype = teacher.scalar_type();
  TeacherArgs& a = call.args;
  a.teacher = teacher.data_ptr();
  a.n = n;
  a.v = v;
  a.stride_t = teacher.stride(0);
  return call;
}

// ids int32 (N, k), logprobs float32 (N, k), tail float32 (N,).
void allocate_targets(TeacherCall& call, const at::Tensor& teacher, int64_t k) {
  const int64_t n = call.args.n;
  call.ids = at::empty({n, k}, teacher.options().dtype(at::kInt));
  call.logprobs = at::empty({n, k}, teacher.options().dtype(at::kFloat));
  call.tail = at::empty({n}, teacher.options().dtype(at::kFloat));
  call.args.ids = call.ids.data_ptr<int32_t>();
  call.args.logprobs = call.logprobs.data_ptr<float>();
  call.args.tail = call.tail.data_ptr<float>();
  call.args.k = k;
}

}  // namespace

TeacherCall prepare_topk_call(const at::Tensor& teacher, int64_t k, double temperature,
                              c10::DeviceType device_type) {
  const char* op = "distill_ops_native::teacher_topk: ";
  check_finite_positive(op, "temperature", temperature);
  TeacherCall call = teacher_call(op, teacher, device_type);
  TORCH_CHECK(k >= 1 && k <= call.args.v, op, "k must be in [1, V = ", call.args.v, "], got ", k);
  allocate_targets(call, teacher, k);
  call.args.inv_tau = 1.0 / temperature;
  return call;
}

TeacherCall prepare_sample_call(const char* op, const at::Tensor& teacher, int64_t num_samples,
                                double inv_prop, int64_t seed_key, bool draws_only,
                                c10::DeviceType device_type) {
  check_finite_positive(op, "inv_prop", inv_prop);
  TORCH_CHECK(seed_key >= 0 && seed_key <= 0xFFFFFFFFll, op, "seed_key must be a 32-bit key, got ",
              seed_key);
  // Draws are with replacement: num_samples may exceed V.
  TORCH_CHECK(num_samples >= 1, op, "num_samples must be >= 1, got ", num_samples);
  TeacherCall call = teacher_call(op, teacher, device_type);
  if (draws_only) {
    call.ids = at::empty({call.args.n, num_samples}, teacher.options().dtype(at::kLong));
    call.args.draws = call.ids.data_ptr<int64_t>();
    call.args.k = num_samples;
  } else {
    allocate_targets(call, teacher, num_samples);
  }
  call.args.inv_prop = inv_prop;
  call.args.seed_key = static_cast<uint32_t>(seed_key);
  return call;
}

}  // namespace distill_ops
