// bfloat16 and float16 instantiations of the dense kernels (see dense_cuda.cu).
#include "dense_launch.cuh"

namespace distill_ops {
namespace cuda {

void launch_dense_bf16(const DenseArgs& A, int device, cudaStream_t stream, const at::Tensor& like) {
  launch_dense<c10::BFloat16, float>(A, device, stream, like);
}

void launch_dense_f16(const DenseArgs& A, int device, cudaStream_t stream, const at::Tensor& like) {
  launch_dense<c10::Half, float>(A, device, stream, like);
}

}  // namespace cuda
}  // namespace distill_ops
