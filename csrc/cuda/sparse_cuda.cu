// CUDA kernel of sparse_forward (backends/reference_sparse.py is the contract; the CPU kernel,
// csrc/cpu/sparse_cpu.cpp, does the same steps). One block per row (grid-stride over rows):
//
//   pass 1  online normalizer of a = s / tau (and of s for the hard-label term when tau != 1; in
//           tail mode, of a over the columns outside K, whose target bit is clear: the student's
//           tail mass summed there, never 1 - Q_K), 16-byte loads, merged across the block (the
//           dense kernels' helpers);
//   slots   the threads share the k target slots: teacher and student log-normalizers over the
//           slots (block-merged), then the loss terms and C = sum qg (block sums), then the row
//           algebra of csrc/include/distill_ops/sparse_math.h, all in double;
//   pass 2  (gradient) each thread computes its slots' gradients into the slot_grad scratch (they
//           need the student logits at the ids); after a block barrier, soft_scale * c_out *
//           exp(a_j - lse_out) (+ the hard-label term) goes over the row; after another, the
//           slots overwrite their own columns (ids are unique in a row, so no two threads write
//           one element). The gradient may be the student tensor itself (inplace_grad): the
//           barriers put every read of a logit by another thread before its column is written
//           (the CPU emulator, tests/cuda_emu, found the first one missing).
//
// An id outside [-1, V) (the Python API rejects them in eager mode; under torch.compile nothing
// checks) is never dereferenced: its row's loss is NaN and its slot is not written.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../sparse_op.h"
#include "dense_kernels.cuh"
#include "distill_ops/sparse_args.h"
#include "distill_ops/sparse_math.h"

namespace distill_ops {
namespace cuda {

namespace {

__device__ __forceinline__ double slot_weight(const SparseArgs& A, int64_t idx) {
  return A.fp64 ? static_cast<const double*>(A.logprobs)[idx]
                : static_cast<double>(static_cast<const float*>(A.logprobs)[idx]);
}

template <typename scalar_t, typename T, int DIV>
__global__ void __launch_bounds__(kMaxThreads)
    sparse_row_kernel(const SparseArgs A, const MixWeights<double> w, const bool vec) {
  __shared__ SharedScratch<T> sh;
  __shared__ SharedScratch<double> shd;
  const int64_t V = A.v, K = A.k;
  const T inv_tau = static_cast<T>(1.0 / A.temperature);
  const bool hard = A.labels != nullptr && A.hard_coef != 0.0;
  const bool ce_own = hard && A.temperature != 1.0;
  double scale = 1.0;
  if (A.grad_scale != nullptr) {
    scale = A.fp64 ? *static_cast<const double*>(A.grad_scale)
                   : static_cast<double>(*static_cast<const float*>(A.grad_scale));
  }
  for (int64_t row = blockIdx.x; row < A.n; row += gridDim.x) {
    const scalar_t* s_row = static_cast<const scalar_t*>(A.student) + row * A.stride_s;
    scalar_t* g_row = A.grad != nullptr ? static_cast<scalar_t*>(A.grad) + row * A.stride_g : nullptr;
    const int32_t* ids = A.ids + row * K;
    const int64_t label = A.labels != nullptr ? A.labels[row] : int64_t(-1);
    if (A.labels != nullptr && label == A.ignore_index) {
      if (g_row != nullptr) zero_slice(g_row, 0, V, vec);
      if (threadIdx.x == 0) {
        if (A.fp64) {
          static_cast<double*>(A.loss)[row] = 0.0;
        } else {
          static_cast<float*>(A.loss)[row] = 0.0f;
        }
      }
      continue;
    }
    const bool label_ok = label >= 0 && label < V;

    // ---- pass 1: normalizers (st.b: outside K, tail mode only) ----
    RowStates<T> st = RowStates<T>::empty();
    Acc unused = 0;
    const uint32_t* bits =
        A.mode == kModeTail ? A.target_bits + row * ((V + 31) / 32) : nullptr;
    stream_slice<scalar_t>(0, V, vec, [&](auto kc, int64_t j0) {
      constexpr int KV = decltype(kc)::value;
      T x[KV], a[KV];
      load_k<KV, true>(s_row + j0, x);
#pragma unroll
      for (int i = 0; i < KV; ++i) a[i] = math::mul_rn(x[i], inv_tau);
      fold<KV, false>(st.a, unused, a, a);
      if (ce_own) fold<KV, false>(st.one, unused, x, x);
      if (bits != nullptr) {
        T o[KV];
#pragma unroll
        for (int i = 0; i < KV; ++i) {
          const int64_t j = j0 + i;
          o[i] = (bits[j >> 5] >> (j & 31)) & 1u ? math::neg_inf<T>() : a[i];
        }
        fold<KV, false>(st.b, unused, o, o);
      }
    });
    st = block_merge(st, sh, false);
    const double lse_a = st.a.lse();
    const SoftmaxState<T, Acc> st1 = ce_own ? st.one : st.a;
    const double lse_1 = st1.lse();

    // ---- the slots: normalizers, then the terms ----
    RowStates<double> ss = RowStates<double>::empty();  // a: teacher weights, one: student a_K
    Acc n_valid = 0, n_bad = 0;
    for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
      const int64_t id = ids[i];
      if (id < 0) {
        n_bad += id < -1 ? 1.0 : 0.0;
        continue;
      }
      if (id >= V) {
        n_bad += 1.0;
        continue;
      }
      n_valid += 1.0;
      const double lw = slot_weight(A, row * K + i);
      ss.a.add(A.mode == kModeTail ? lw : lw * A.target_scale);
      ss.one.add(static_cast<double>(math::mul_rn(static_cast<T>(s_row[id]), inv_tau)));
    }
    ss = block_merge(ss, shd, false);
    block_sum2(n_valid, n_bad, sh);
    const double lse_k = ss.one.lse();
    double tail_in = 0.0;
    if (A.tail != nullptr) {
      tail_in = A.fp64 ? static_cast<const double*>(A.tail)[row]
                       : static_cast<double>(static_cast<const float*>(A.tail)[row]);
    }
    const sparse::TeacherNorm tn = sparse::teacher_norm(A.mode, ss.a.lse(), A.tail != nullptr,
                                                        tail_in, n_valid == static_cast<Acc>(V));
    const bool live = n_valid > 0 && tn.z > -INFINITY;
    // The terms of slot i (recomputed for the gradient below rather than kept: k is unbounded).
    auto slot_terms = [&](int64_t i, int64_t id, double& q, double& term, double& qg) {
      const double lw = slot_weight(A, row * K + i);
      const double a_i = static_cast<double>(math::mul_rn(static_cast<T>(s_row[id]), inv_tau));
      const double lq = sparse::student_logprob(A.mode, a_i, lse_a, lse_k);
      Terms<DIV, double>::eval(lq, (A.mode == kModeTail ? lw : lw * A.target_scale) - tn.z, w, q,
                               term, qg);
    };
    Acc soft = 0, c_sum = 0;
    for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
      const int64_t id = ids[i];
      if (id < 0 || id >= V) continue;
      double q, term, qg;
      slot_terms(i, id, q, term, qg);
      soft += term;
      c_sum += qg;
    }
    block_sum2(soft, c_sum, sh);
    const sparse::RowFinish fin =
        sparse::finish_row<DIV>(A.mode, soft, c_sum, lse_a, st.b.lse(), tn.lp_tail, w, live);
    if (threadIdx.x == 0) {
      double loss = A.soft_coef * fin.soft;
      if (hard) {
        loss += A.hard_coef *
                (lse_1 - (label_ok ? static_cast<double>(static_cast<T>(s_row[label])) : NAN));
      }
      if (n_bad > 0) loss = NAN;
      if (A.fp64) {
        static_cast<double*>(A.loss)[row] = loss;
      } else {
        static_cast<float*>(A.loss)[row] = static_cast<float>(loss);
      }
    }
    if (g_row == nullptr) continue;

    // ---- pass 2: the gradient ----
    // Exponents as (x - m) - offset with m a value of the stream (exact), as LogNormalizer does.
    const double soft_scale = A.soft_coef / A.temperature;
    const T coef = static_cast<T>(soft_scale * fin.c_out * scale);
    const T m_a = st.a.m == math::neg_inf<T>() ? T(0) : st.a.m;
    const T off_a = static_cast<T>(fin.lse_out - static_cast<double>(m_a));
    const T m_1 = st1.m == math::neg_inf<T>() ? T(0) : st1.m;
    const T off_1 = static_cast<T>(lse_1 - static_cast<double>(m_1));
    const T hard_c = static_cast<T>(A.hard_coef * scale);
    const T tau1 = ce_own ? T(1) : inv_tau;
    const bool dense_soft = fin.c_out != 0.0;
    T* slot_out = static_cast<T*>(A.slot_grad) + row * K;
    for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
      const int64_t id = ids[i];
      if (id < 0 || id >= V) continue;
      double q, term, qg;
      slot_terms(i, id, q, term, qg);
      double gi = soft_scale * sparse::slot_grad(qg, q, fin.c, live);
      if (hard) {
        const T x = static_cast<T>(s_row[id]);
        const double p1 = static_cast<double>(math::exp_((x * tau1 - m_1) - off_1));
        gi += A.hard_coef * (p1 - (id == label ? 1.0 : 0.0));
      }
      slot_out[i] = static_cast<T>(gi * scale);  // read back below by this same thread
    }
    // Every read of the student logits (the slots above, thread 0's label logit for the loss)
    // happens before any thread writes the dense gradient over them (inplace_grad).
    __syncthreads();
    stream_slice<scalar_t>(0, V, vec, [&](auto kc, int64_t j0) {
      constexpr int KV = decltype(kc)::value;
      T x[KV], g[KV];
      load_k<KV, false>(s_row + j0, x);
#pragma unroll
      for (int i = 0; i < KV; ++i) {
        g[i] = dense_soft ? coef * math::exp_((math::mul_rn(x[i], inv_tau) - m_a) - off_a) : T(0);
        if (hard) {
          g[i] += hard_c * math::exp_((x[i] * tau1 - m_1) - off_1);
          if (j0 + i == label) g[i] -= hard_c;
        }
      }
      store_k<KV>(g_row + j0, g);
    });
    __syncthreads();  // the dense stores land before the slots overwrite their columns
    for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
      const int64_t id = ids[i];
      if (id >= 0 && id < V) g_row[id] = static_cast<scalar_t>(slot_out[i]);
    }
    __syncthreads();
  }
}

template <typename scalar_t, typename T>
void launch_sparse(const SparseArgs& A, cudaStream_t stream) {
  const MixWeights<double> w = mix_weights<double>(A.divergence, A.mix);
  const bool vec = aligned16<scalar_t>(A.student, A.stride_s, A.n) &&
                   (A.grad == nullptr || aligned16<scalar_t>(A.grad, A.stride_g, A.n));
  const int threads = threads_for(A.v);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(A.n, int64_t(1) << 30));
  switch (A.divergence) {
    case kForwardKL:
      sparse_row_kernel<scalar_t, T, kForwardKL><<<grid, threads, 0, stream>>>(A, w, vec);
      break;
    case kReverseKL:
      sparse_row_kernel<scalar_t, T, kReverseKL><<<grid, threads, 0, stream>>>(A, w, vec);
      break;
    case kJSD:
      sparse_row_kernel<scalar_t, T, kJSD><<<grid, threads, 0, stream>>>(A, w, vec);
      break;
    case kSkewForwardKL:
      sparse_row_kernel<scalar_t, T, kSkewForwardKL><<<grid, threads, 0, stream>>>(A, w, vec);
      break;
    default:
      sparse_row_kernel<scalar_t, T, kSkewReverseKL><<<grid, threads, 0, stream>>>(A, w, vec);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor sparse_forward_cuda(const at::Tensor& student, const at::Tensor& ids,
                               const at::Tensor& logprobs, const std::optional<at::Tensor>& tail,
                               const std::optional<at::Tensor>& labels,
                               const std::optional<at::Tensor>& grad,
                               const std::optional<at::Tensor>& grad_scale, int64_t divergence,
                               double mix, int64_t mode, double temperature, double target_scale,
                               double soft_coef, double hard_coef, int64_t ignore_index,
                               const std::optional<at::Tensor>& target_bits) {
  c10::cuda::CUDAGuard guard(student.device());
  SparseCall call = prepare_sparse_call(student, ids, logprobs, tail, labels, grad, grad_scale,
                                        divergence, mix, mode, temperature, target_scale,
                                        soft_coef, hard_coef, ignore_index, target_bits,
                                        c10::DeviceType::CUDA);
  if (call.args.n == 0) return call.loss;
  at::Tensor slot_grad;
  if (call.args.grad != nullptr) {
    const auto acc = call.dtype == at::kDouble ? at::kDouble : at::kFloat;
    slot_grad = at::empty({call.args.n, call.args.k}, student.options().dtype(acc));
    call.args.slot_grad = slot_grad.data_ptr();
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.device().index()).stream();
  switch (call.dtype) {
    case at::kFloat: launch_sparse<float, float>(call.args, stream); break;
    case at::kBFloat16: launch_sparse<c10::BFloat16, float>(call.args, stream); break;
    case at::kHalf: launch_sparse<c10::Half, float>(call.args, stream); break;
    default: launch_sparse<double, double>(call.args, stream); break;
  }
  return call.loss;
}

}  // namespace cuda
}  // namespace distill_ops

TORCH_LIBRARY_IMPL(distill_ops_native, CUDA, m) {
  m.impl("sparse_forward", &distill_ops::cuda::sparse_forward_cuda);
}
