// CUDA implementation of distill_ops_native::dense_forward: argument checks, device guard, stream,
// dtype dispatch. The kernels are in dense_kernels.cuh and dense_resident.cuh, their launch in
// dense_launch.cuh; float32/float64 are instantiated here and bfloat16/float16 in
// dense_cuda_half.cu (two translation units compile in parallel).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../dense_op.h"
#include "dense_launch.cuh"

namespace distill_ops {
namespace cuda {

void launch_dense_f32(const DenseArgs& A, int device, cudaStream_t stream, const at::Tensor& like) {
  launch_dense<float, float>(A, device, stream, like);
}

void launch_dense_f64(const DenseArgs& A, int device, cudaStream_t stream, const at::Tensor& like) {
  launch_dense<double, double>(A, device, stream, like);
}

at::Tensor dense_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                              const std::optional<at::Tensor>& labels,
                              const std::optional<at::Tensor>& grad,
                              const std::optional<at::Tensor>& grad_scale, int64_t divergence,
                              double mix, double temperature, double softcap, double soft_coef,
                              double hard_coef, int64_t ignore_index) {
  c10::cuda::CUDAGuard guard(student.device());
  DenseCall call = prepare_dense_call(student, teacher, labels, grad, grad_scale, divergence, mix,
                                      temperature, softcap, soft_coef, hard_coef, ignore_index,
                                      c10::DeviceType::CUDA);
  if (call.args.n == 0) return call.loss;
  const int device = student.device().index();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  switch (call.dtype) {
    case at::kFloat: launch_dense_f32(call.args, device, stream, student); break;
    case at::kBFloat16: launch_dense_bf16(call.args, device, stream, student); break;
    case at::kHalf: launch_dense_f16(call.args, device, stream, student); break;
    default: launch_dense_f64(call.args, device, stream, student); break;
  }
  return call.loss;
}

}  // namespace cuda
}  // namespace distill_ops

TORCH_LIBRARY_IMPL(distill_ops_native, CUDA, m) {
  m.impl("dense_forward", &distill_ops::cuda::dense_forward_cuda);
}
