// CUDA kernels of teacher_topk (backends/reference_sparse.py is the contract; csrc/cpu/teacher_cpu.cpp
// computes the same thing). One block per row (grid-stride over rows), no probability tensor.
//
// fp32, bf16 and fp16 rows with k <= filter_max_k (2048 for bf16/fp16, 3072 for fp32) go to the
// one-read kernel of topk_filter.cuh, which writes the k winners already sorted. The rest (fp64,
// larger k, or DISTILL_OPS_CUDA_TOPK=radix) go to the radix kernel below, which reads each row
// 3 (bf16) to 9 (fp64) times:
//
//   radix   the k-th largest ranking key of the row by a most-significant-digit radix select,
//           8 bits a pass over a shared-memory histogram, over the bits the input dtype can set
//           (key_bits: 2 passes for bf16, 3 for fp16, 4 for fp32, 8 for fp64); the first pass
//           also builds the row's online normalizer (max, sum exp) of a = x / tau;
//   select  one pass in id order: every element above the k-th key is taken, and of those equal to
//           it the lowest ids (a block scan per tile) until there are k; the rest goes to the
//           tail's own online normalizer (its own max, not the row's, below which its terms would
//           underflow: tail_refit.h), so the tail mass is exact however small (no 1 - sum).
//
// The radix kernel writes its k winners unsorted (a slot counter); the host then orders them,
// value descending then id ascending, with two torch sorts (ids are unique, the second sort is
// stable).
//
// Not yet run on a GPU: `auto` never picks these kernels (distill_ops/ops/sparse.py);
// backend="cuda" does.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gather.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "../sparse_op.h"
#include "dense_kernels.cuh"
#include "distill_ops/online_softmax.h"
#include "distill_ops/sparse_args.h"
#include "topk_filter.cuh"
#include "topk_keys.cuh"

namespace distill_ops {
namespace cuda {

namespace {

constexpr int kTopkThreads = 256;
constexpr int kTopkWarps = kTopkThreads / 32;
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;

template <typename T>
struct TopkShared {
  unsigned int hist[kBins];
  SoftmaxState<T, double> states[kTopkWarps];
  int warp_eq[kTopkWarps];
  typename KeyOf<T>::type prefix;
  int64_t need;  // how many of the elements whose key prefix matches are still to be taken
  unsigned int slot;
};

template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kTopkThreads)
    topk_row_kernel(const TeacherArgs A, double* __restrict__ rank_out) {
  using K = typename KeyOf<T>::type;
  constexpr int kPasses = (key_bits<scalar_t, K>() + kRadixBits - 1) / kRadixBits;
  __shared__ TopkShared<T> sh;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t V = A.v, k = A.k;
  const T inv_tau = static_cast<T>(A.inv_tau);
  for (int64_t row = blockIdx.x; row < A.n; row += gridDim.x) {
    const scalar_t* t_row = static_cast<const scalar_t*>(A.teacher) + row * A.stride_t;
    K prefix = 0, mask = 0;
    int64_t need = k;
    SoftmaxState<T, double> st = SoftmaxState<T, double>::empty();
    // ---- radix select (pass 0 also builds the normalizer) ----
    for (int pass = 0; pass < kPasses; ++pass) {
      const int shift = static_cast<int>(sizeof(K)) * 8 - kRadixBits * (pass + 1);
      for (int b = tid; b < kBins; b += kTopkThreads) sh.hist[b] = 0;
      __syncthreads();
      for (int64_t i = tid; i < V; i += kTopkThreads) {
        const T x = static_cast<T>(t_row[i]);
        if (pass == 0) {
          st.add(math::mul_rn(x, inv_tau));
        }
        const K key = rank_key(x);
        if ((key & mask) == prefix) {
          atomicAdd(&sh.hist[static_cast<int>((key >> shift) & K(kBins - 1))], 1u);
        }
      }
      __syncthreads();
      if (tid == 0) {
        // The digit of the k-th largest: walk the bins from the top until `need` is covered.
        int64_t above = 0;
        int d = kBins - 1;
        for (; d > 0; --d) {
          if (above + static_cast<int64_t>(sh.hist[d]) >= need) break;
          above += sh.hist[d];
        }
        sh.prefix = prefix | (static_cast<K>(d) << shift);
        sh.need = need - above;
      }
      __syncthreads();
      prefix = sh.prefix;
      need = sh.need;
      mask |= static_cast<K>(kBins - 1) << shift;
      __syncthreads();  // sh.hist and sh.prefix are rewritten by the next pass
    }
    // Every bit the dtype can set is decided (mask): `need` of the elements equal to kth are taken.
    const K kth = prefix;

    // ---- the row's normalizer: warp then block merge ----
    const SoftmaxState<T, double> rs = block_state<kTopkWarps>(st, sh.states);
    if (tid == 0) sh.slot = 0;  // before any take: the first tile's barrier orders it
    const T m = rs.m == math::neg_inf<T>() ? T(0) : rs.m;  // the shift, as the CPU kernel takes it
    const double log_z = ::log(rs.z);

    // ---- select in id order; the rest is tail ----
    SoftmaxState<T, double> tail = SoftmaxState<T, double>::empty();
    int64_t eq_base = 0;  // elements equal to the k-th key in earlier tiles
    for (int64_t base = 0; base < V; base += kTopkThreads) {
      const int64_t i = base + tid;
      const bool valid = i < V;
      const T x = valid ? static_cast<T>(t_row[i]) : T(0);
      const K key = rank_key(x) & mask;
      const bool eq = valid && key == kth;
      const unsigned int ballot = __ballot_sync(0xffffffffu, eq);
      if (lane == 0) sh.warp_eq[warp] = __popc(ballot);
      __syncthreads();
      int64_t before = __popc(ballot & ((1u << lane) - 1u));
      int64_t tile_eq = 0;
      for (int w = 0; w < kTopkWarps; ++w) {
        if (w < warp) before += sh.warp_eq[w];
        tile_eq += sh.warp_eq[w];
      }
      const bool take = valid && (key > kth || (eq && eq_base + before < need));
      const T a = math::mul_rn(x, inv_tau);
      if (take) {
        const unsigned int s = atomicAdd(&sh.slot, 1u);
        const int64_t o = row * k + s;
        A.ids[o] = static_cast<int32_t>(i);
        // (a - m) - log z, as LogNormalizer: exact near the max
        A.logprobs[o] =
            static_cast<float>((static_cast<double>(a) - static_cast<double>(m)) - log_z);
        // -0 ranks as +0 here, not by grace of the host sort's handling of signed zeros
        const double r = static_cast<double>(rank_value(x));
        rank_out[o] = r == 0.0 ? 0.0 : r;
      } else if (valid) {
        tail.add(a);
      }
      eq_base += tile_eq;
      __syncthreads();  // sh.warp_eq is rewritten by the next tile
    }
    tail = block_state<kTopkWarps>(tail, sh.states);
    if (tid == 0) {
      // (m_tail - m) + log z_tail - log z: -inf when there is no tail (k == V)
      A.tail[row] = static_cast<float>(
          (static_cast<double>(tail.m) - static_cast<double>(m)) + ::log(tail.z) - log_z);
    }
    __syncthreads();  // sh is reused by the next row
  }
}

template <typename scalar_t, typename T>
void launch_topk(const TeacherArgs& A, double* rank, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(A.n, int64_t(1) << 30));
  topk_row_kernel<scalar_t, T><<<grid, kTopkThreads, 0, stream>>>(A, rank);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_filter(const TeacherArgs& A, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(A.n, int64_t(1) << 30));
  const bool vec = aligned16<scalar_t>(A.teacher, A.stride_t, A.n);
  topk_filter_kernel<scalar_t><<<grid, kFilterThreads, 0, stream>>>(A, vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether the one-read kernel takes this call: DISTILL_OPS_CUDA_TOPK=radix forces the radix kernel
// (to compare the two), =filter insists on the one-read kernel (an error where it cannot).
bool use_filter(at::ScalarType dtype, int64_t k, int64_t v) {
  const int64_t max_k = v > kFilterMaxV        ? 0
                        : dtype == at::kFloat  ? filter_max_k<float>()
                        : dtype == at::kDouble ? 0
                                               : filter_max_k<c10::BFloat16>();
  const char* env = std::getenv("DISTILL_OPS_CUDA_TOPK");
  const bool radix = env != nullptr && std::strcmp(env, "radix") == 0;
  const bool filter = env != nullptr && std::strcmp(env, "filter") == 0;
  TORCH_CHECK(env == nullptr || *env == '\0' || radix || filter,
              "DISTILL_OPS_CUDA_TOPK must be 'radix' or 'filter', got '", env, "'");
  TORCH_CHECK(!filter || k <= max_k, "distill_ops_native::teacher_topk: DISTILL_OPS_CUDA_TOPK=filter "
              "takes fp32 (k <= ", filter_max_k<float>(), ") and bf16/fp16 (k <= ",
              filter_max_k<c10::BFloat16>(), ") rows of at most 2^30 columns, got ", dtype,
              " with k = ", k, ", V = ", v);
  return !radix && k <= max_k;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> teacher_topk_cuda(const at::Tensor& teacher,
                                                                 int64_t k, double temperature) {
  c10::cuda::CUDAGuard guard(teacher.device());
  TeacherCall call = prepare_topk_call(teacher, k, temperature, c10::DeviceType::CUDA);
  const TeacherArgs& A = call.args;
  if (A.n == 0) return {call.ids, call.logprobs, call.tail};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(teacher.device().index()).stream();
  if (use_filter(call.dtype, A.k, A.v)) {  // the winners come out sorted
    switch (call.dtype) {
      case at::kFloat: launch_filter<float>(A, stream); break;
      case at::kBFloat16: launch_filter<c10::BFloat16>(A, stream); break;
      default: launch_filter<c10::Half>(A, stream); break;
    }
    return {call.ids, call.logprobs, call.tail};
  }
  at::Tensor rank = at::empty({A.n, A.k}, teacher.options().dtype(at::kDouble));
  switch (call.dtype) {
    case at::kFloat: launch_topk<float, float>(A, rank.data_ptr<double>(), stream); break;
    case at::kBFloat16:
      launch_topk<c10::BFloat16, float>(A, rank.data_ptr<double>(), stream);
      break;
    case at::kHalf: launch_topk<c10::Half, float>(A, rank.data_ptr<double>(), stream); break;
    default: launch_topk<double, double>(A, rank.data_ptr<double>(), stream); break;
  }
  // Order the winners: by id, then (stable) by value descending, so ties keep the lower id first.
  const at::Tensor by_id = std::get<1>(at::sort(call.ids, /*dim=*/1));
  const at::Tensor rank_by_id = rank.gather(1, by_id);
  const at::Tensor by_value = std::get<1>(at::sort(rank_by_id, /*stable=*/true, /*dim=*/1,
                                                   /*descending=*/true));
  const at::Tensor order = by_id.gather(1, by_value);
  return {call.ids.gather(1, order), call.logprobs.gather(1, order), call.tail};
}

}  // namespace cuda
}  // namespace distill_ops

TORCH_LIBRARY_IMPL(distill_ops_native, CUDA, m) {
  m.impl("teacher_topk", &distill_ops::cuda::teacher_topk_cuda);
}
