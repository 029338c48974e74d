// CUDA kernel of teacher_sample_draws: the raw Gumbel-max draws of sampled targets
// (backends/reference_sparse.py sample_forward is the contract; csrc/cpu/teacher_cpu.cpp draws the
// same ids). Duplicates are merged afterwards, on the host side, by reference_sparse.merge_draws,
// so the importance weights have one definition.
//
// Sample s of row r is argmax_j (x_j * inv_prop + gumbel(s, j)), the lowest j on ties, with the
// counter-based noise of csrc/include/distill_ops/rng.h in the compute dtype T (float, or double
// for float64 logits), computed exactly as the reference computes it: the product x * inv_prop is
// rounded before the noise is added (math::mul_rn: never contracted into an FMA) and the
// logs are rng::noise_log (fixed operations, products rounded on their own), so the scores are the
// reference's bits.
//
// Unpruned, the work is S x V noise evaluations per row (two logs each): compute-bound, so the
// grid is (rows x groups of up to kMaxGroup samples, column splits), the group fastest: the blocks
// that read one slice of a row run next to each other, and all but the first find it in L2. A
// block reads its slice twice (its argmax, then the races) and races the group's samples over it,
// skipping exactly what cannot win (sample_draw_kernel); each thread keeps a
// running (score, id) per sample, merged across the block by (score desc, id asc). With one split
// the winner is the draw; with several (few rows: too few blocks to fill the GPU) each split
// writes its winner to a workspace and a second kernel merges the splits in column order. A NaN
// score never wins; a row of -inf and NaN only draws id 0 (as in the CPU kernel).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../sparse_op.h"
#include "dense_kernels.cuh"  // sm_count
#include "distill_ops/macros.h"
#include "distill_ops/rng.h"
#include "distill_ops/sparse_args.h"

namespace distill_ops {
namespace cuda {

namespace {

constexpr int kSampleThreads = 256;
constexpr int kSampleWarps = kSampleThreads / 32;
constexpr int kMaxGroup = 8;  // samples raced per block: the row slice is read once for all of them

template <typename T>
struct Draw {
  T score;
  int64_t id;
};

// (score desc, id asc); a NaN score never wins, and an empty draw (-inf, id -1) loses to any real
// one, which has a score > -inf.
template <typename T>
__device__ __forceinline__ bool beats(const Draw<T>& x, const Draw<T>& y) {
  return x.score > y.score || (x.score == y.score && x.id >= 0 && (y.id < 0 || x.id < y.id));
}

template <typename T>
__device__ __forceinline__ Draw<T> warp_best(Draw<T> d) {
  for (int off = 16; off > 0; off >>= 1) {
    const Draw<T> o{__shfl_down_sync(0xffffffffu, d.score, off),
                    __shfl_down_sync(0xffffffffu, d.id, off)};
    if (beats(o, d)) d = o;
  }
  return d;
}

// The block's best draw, on every thread (sh: one slot per warp).
template <typename T>
__device__ __forceinline__ Draw<T> block_best(Draw<T> d, Draw<T>* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  d = warp_best(d);
  if (lane == 0) sh[warp] = d;
  __syncthreads();
  d = sh[0];
  for (int w = 1; w < kSampleWarps; ++w) {
    if (beats(sh[w], d)) d = sh[w];
  }
  __syncthreads();  // sh may be reused
  return d;
}

// Grid (row * groups + group, 1, split). Writes the winner of each of the group's samples over the
// split's columns: to draws (n, S) when there is one split, else to part (n, S, splits). A slice
// with no logit above -inf skips pass 2: every race keeps its start, (-inf, c0), as it would.
//
// Pass 1 finds the slice's largest a_j and its first column jm; every race starts at jm's score
// (a lower bound of its winner's), so in pass 2 a thread skips, exactly, each column more than
// kGumbelMax below its lowest leader, and each (sample, column) pair whose uniform rank is below
// rng::losing_rank (on the hash alone, before the two logs): most of a peaked or a flat row.
template <typename scalar_t, typename T, int kGroup>
__global__ void __launch_bounds__(kSampleThreads)
    sample_draw_kernel(const TeacherArgs A, int64_t cols_per_split, Draw<T>* __restrict__ part) {
  __shared__ Draw<T> sh[kSampleWarps][kGroup];
  __shared__ Draw<T> sh_top[kSampleWarps];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t S = A.k, splits = gridDim.z, groups = (S + kGroup - 1) / kGroup;
  const int64_t row = blockIdx.x / groups;
  const int64_t s0 = (blockIdx.x % groups) * kGroup;
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * cols_per_split;
  const int64_t c1 = c0 + cols_per_split < A.v ? c0 + cols_per_split : A.v;
  const scalar_t* t_row = static_cast<const scalar_t*>(A.teacher) + row * A.stride_t;
  const T inv_prop = static_cast<T>(A.inv_prop);
  const T gmax = static_cast<T>(rng::kGumbelMax);
  Draw<T> top{-INFINITY, -1};  // NaN never wins; -inf only: jm = c0
  for (int64_t j = c0 + tid; j < c1; j += kSampleThreads) {
    const T a = math::mul_rn(static_cast<T>(t_row[j]), inv_prop);
    if (a > top.score) top = Draw<T>{a, j};
  }
  top = block_best(top, sh_top);
  const int64_t jm = top.id < 0 ? c0 : top.id;
  const uint32_t rk = rng::row_key(A.seed_key, row);
  const uint32_t vk_m = rng::vocab_key(jm);
  uint32_t skey[kGroup];
  Draw<T> best[kGroup];
  T floor_best = INFINITY;  // this thread's lowest leader
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    skey[g] = rng::sample_key(rk, s0 + g);
    // The score the race computes at jm; samples past S never race (+inf leads, never written).
    best[g] = s0 + g < S ? Draw<T>{top.score + rng::gumbel<T>(skey[g], vk_m), jm}
                         : Draw<T>{INFINITY, jm};
    floor_best = best[g].score < floor_best ? best[g].score : floor_best;
  }
  const int64_t c_end = top.id < 0 ? c0 : c1;  // block-uniform: top is the block's
  for (int64_t j = c0 + tid; j < c_end; j += kSampleThreads) {
    const T a = math::mul_rn(static_cast<T>(t_row[j]), inv_prop);
    if (!(a + gmax >= floor_best)) continue;  // NaN too
    const uint32_t lose = rng::losing_rank(static_cast<float>(a), static_cast<float>(floor_best));
    const uint32_t vk = rng::vocab_key(j);
    bool moved = false;
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      if (s0 + g >= S) break;  // the last group's idle samples: no noise to compute
      const uint32_t k = rng::uniform_rank(skey[g], vk);
      if (k < lose) continue;
      const Draw<T> d{a + rng::gumbel_of<T>(rng::uniform_of_rank(k)), j};
      if (beats(d, best[g])) {
        best[g] = d;
        moved = true;
      }
    }
    if (moved) {
      floor_best = best[0].score;
#pragma unroll
      for (int g = 1; g < kGroup; ++g) {
        floor_best = best[g].score < floor_best ? best[g].score : floor_best;
      }
    }
  }
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    const Draw<T> w = warp_best(best[g]);
    if (lane == 0) sh[warp][g] = w;
  }
  __syncthreads();
  if (tid < kGroup && s0 + tid < S) {
    Draw<T> d = sh[0][tid];
    for (int w = 1; w < kSampleWarps; ++w) {
      if (beats(sh[w][tid], d)) d = sh[w][tid];
    }
    const int64_t s = s0 + tid;
    if (splits == 1) {
      A.draws[row * S + s] = d.id;
    } else {
      part[(row * S + s) * splits + blockIdx.z] = d;
    }
  }
}

// One thread per (row, sample): the splits' winners in column order (strict >: the lowest id).
template <typename T>
__global__ void merge_splits_kernel(const Draw<T>* __restrict__ part, int64_t count, int64_t splits,
                                    int64_t* __restrict__ draws) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  Draw<T> d = part[i * splits];
  for (int64_t p = 1; p < splits; ++p) {
    const Draw<T> o = part[i * splits + p];
    if (beats(o, d)) d = o;
  }
  draws[i] = d.id;
}

template <typename scalar_t, typename T, int kGroup>
void launch_group(const at::Tensor& teacher, const TeacherArgs& A, cudaStream_t stream) {
  const int64_t groups = (A.k + kGroup - 1) / kGroup;
  // Enough blocks for ~4 waves of 8 per SM; a split keeps at least 16 columns per thread.
  const int64_t want = int64_t(sm_count(teacher.get_device())) * 32;
  const int64_t max_splits = std::max<int64_t>(1, A.v / (int64_t(kSampleThreads) * 16));
  int64_t splits = std::min<int64_t>({max_splits, (want + A.n * groups - 1) / (A.n * groups),
                                      int64_t(65535)});
  splits = std::max<int64_t>(splits, 1);
  const int64_t cols = (A.v + splits - 1) / splits;
  splits = (A.v + cols - 1) / cols;  // no empty split
  // Rows x groups on x (up to 2^31 - 1), splits on z (up to 65535).
  TORCH_CHECK(A.n * groups <= 0x7FFFFFFFll, "distill_ops_native::teacher_sample_draws: N = ", A.n,
              " rows x ", groups, " groups of ", kGroup, " samples exceed the grid (2^31 - 1)");
  at::Tensor part;
  if (splits > 1) {
    part = at::empty({A.n * A.k * splits * static_cast<int64_t>(sizeof(Draw<T>))},
                     teacher.options().dtype(at::kByte));
  }
  Draw<T>* part_ptr = splits > 1 ? reinterpret_cast<Draw<T>*>(part.data_ptr()) : nullptr;
  const dim3 grid(static_cast<unsigned>(A.n * groups), 1, static_cast<unsigned>(splits));
  sample_draw_kernel<scalar_t, T, kGroup><<<grid, kSampleThreads, 0, stream>>>(A, cols, part_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const int64_t count = A.n * A.k;
    const unsigned blocks = static_cast<unsigned>((count + 255) / 256);
    merge_splits_kernel<T><<<blocks, 256, 0, stream>>>(part_ptr, count, splits, A.draws);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The group size: kMaxGroup, or the smallest power of two that holds S (no idle races when S < 8).
template <typename scalar_t, typename T>
void launch_draws(const at::Tensor& teacher, const TeacherArgs& A, cudaStream_t stream) {
  if (A.k >= 8) return launch_group<scalar_t, T, kMaxGroup>(teacher, A, stream);
  if (A.k >= 3) return launch_group<scalar_t, T, 4>(teacher, A, stream);
  if (A.k == 2) return launch_group<scalar_t, T, 2>(teacher, A, stream);
  return launch_group<scalar_t, T, 1>(teacher, A, stream);
}

}  // namespace

at::Tensor teacher_sample_draws_cuda(const at::Tensor& teacher, int64_t num_samples,
                                     double inv_prop, int64_t seed_key) {
  c10::cuda::CUDAGuard guard(teacher.device());
  const char* op = "distill_ops_native::teacher_sample_draws: ";
  TeacherCall call = prepare_sample_call(op, teacher, num_samples, inv_prop, seed_key,
                                         /*draws_only=*/true, c10::DeviceType::CUDA);
  const TeacherArgs& A = call.args;
  TORCH_CHECK(A.n <= 0x7FFFFFFFll, op, "N = ", A.n, " rows exceed the grid (2^31 - 1)");
  if (A.n == 0) return call.ids;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(teacher.device().index()).stream();
  switch (call.dtype) {
    case at::kFloat: launch_draws<float, float>(teacher, A, stream); break;
    case at::kBFloat16: launch_draws<c10::BFloat16, float>(teacher, A, stream); break;
    case at::kHalf: launch_draws<c10::Half, float>(teacher, A, stream); break;
    default: launch_draws<double, double>(teacher, A, stream); break;
  }
  return call.ids;
}

}  // namespace cuda
}  // namespace distill_ops

TORCH_LIBRARY_IMPL(distill_ops_native, CUDA, m) {
  m.impl("teacher_sample_draws", &distill_ops::cuda::teacher_sample_draws_cuda);
}
