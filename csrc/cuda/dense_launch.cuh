// Launch of the dense kernels: picks the resident kernel (dense_resident.cuh, where asked for and
// where it applies), else one block per row (row_kernel) or the split path (dense_kernels.cuh).
// Included by the dense_cuda_*.cu files, each of which instantiates `launch_dense<scalar_t, T>`
// for some dtypes.
#pragma once

#include "dense_kernels.cuh"
#include "dense_resident.cuh"

namespace distill_ops {
namespace cuda {

// How many blocks share one row: 1 (row_kernel) unless there are too few rows to fill the GPU.
// DISTILL_OPS_CUDA_SPLITS=k forces k (1: never split), for tests and tuning.
inline int choose_splits(int64_t n, int64_t v, int sms) {
  int64_t splits = 1;
  if (const char* env = std::getenv("DISTILL_OPS_CUDA_SPLITS")) {
    const long forced = std::strtol(env, nullptr, 10);
    if (forced > 0) splits = forced;
  } else if (n < 2 * int64_t(sms) && v >= 16384) {
    splits = (4 * int64_t(sms) + n - 1) / n;
    splits = std::min<int64_t>(splits, v / 4096);
  }
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, 256));
  return static_cast<int>(splits);
}

template <typename scalar_t, typename T, int DIV>
void launch_div(const DenseArgs& A, const LossConsts<T>& Kc, bool vec, int device,
                cudaStream_t stream, const at::Tensor& like) {
  if (launch_resident<scalar_t, T, DIV>(A, Kc, vec, device, stream)) return;
  const int sms = sm_count(device);
  int splits = choose_splits(A.n, A.v, sms);
  // Slices are whole multiples of 64 elements (so each starts 16-byte aligned).
  int64_t slice = (A.v + splits - 1) / splits;
  slice = (slice + 63) / 64 * 64;
  splits = static_cast<int>((A.v + slice - 1) / slice);
  if (splits <= 1) {
    const int threads = threads_for(A.v);
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>(A.n, int64_t(1) << 30));
    row_kernel<scalar_t, T, DIV><<<grid, threads, 0, stream>>>(A, Kc, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int threads = threads_for(slice);
  const unsigned rows_y = static_cast<unsigned>(std::min<int64_t>(A.n, max_grid_y(device)));
  const dim3 grid(static_cast<unsigned>(splits), rows_y);
  at::Tensor ws_t = at::empty({A.n * splits * kSlot}, like.options().dtype(at::kDouble));
  Acc* ws = ws_t.data_ptr<Acc>();
  split_state_kernel<scalar_t, T, DIV == kReverseKL>
      <<<grid, threads, 0, stream>>>(A, Kc, vec, slice, splits, ws);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  split_terms_kernel<scalar_t, T, DIV><<<grid, threads, 0, stream>>>(A, Kc, vec, slice, splits, ws);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (needs_c_pass(DIV) && Kc.need_grad) {
    split_grad_kernel<scalar_t, T, DIV><<<grid, threads, 0, stream>>>(A, Kc, vec, slice, splits, ws);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int fin_threads = 128;
  const unsigned fin_grid =
      static_cast<unsigned>(std::min<int64_t>((A.n + fin_threads - 1) / fin_threads, 65535));
  split_finalize_kernel<T><<<fin_grid, fin_threads, 0, stream>>>(A, Kc, splits, ws);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs dense_forward for one dtype (scalar_t storage, T accumulation) on the current stream.
template <typename scalar_t, typename T>
void launch_dense(const DenseArgs& A, int device, cudaStream_t stream, const at::Tensor& like) {
  const LossConsts<T> Kc = loss_consts<T>(A);
  const bool vec = aligned16<scalar_t>(A.student, A.stride_s, A.n) &&
                   (!Kc.soft || aligned16<scalar_t>(A.teacher, A.stride_t, A.n)) &&
                   (!Kc.need_grad || aligned16<scalar_t>(A.grad, A.stride_g, A.n));
  switch (A.divergence) {
    case kForwardKL: launch_div<scalar_t, T, kForwardKL>(A, Kc, vec, device, stream, like); break;
    case kReverseKL: launch_div<scalar_t, T, kReverseKL>(A, Kc, vec, device, stream, like); break;
    case kJSD: launch_div<scalar_t, T, kJSD>(A, Kc, vec, device, stream, like); break;
    case kSkewForwardKL:
      launch_div<scalar_t, T, kSkewForwardKL>(A, Kc, vec, device, stream, like);
      break;
    default: launch_div<scalar_t, T, kSkewReverseKL>(A, Kc, vec, device, stream, like); break;
  }
}

// Explicit instantiations live in dense_cuda_*.cu.
void launch_dense_f32(const DenseArgs& A, int device, cudaStream_t stream, const at::Tensor& like);
void launch_dense_f64(const DenseArgs& A, int device, cudaStream_t stream, const at::Tensor& like);
void launch_dense_bf16(const DenseArgs& A, int device, cudaStream_t stream, const at::Tensor& like);
void launch_dense_f16(const DenseArgs& A, int device, cudaStream_t stream, const at::Tensor& like);

}  // namespace cuda
}  // namespace distill_ops
