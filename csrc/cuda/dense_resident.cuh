// The one-read dense kernel (sm_90 thread-block clusters). The row kernels of dense_kernels.cuh
// read each row two or three times; only the first read comes from memory when the row is still
// in L2 for the next, which it is not once a few hundred rows of 128k columns are in flight. Here
// the row is split over a cluster of up to 16 blocks and every thread keeps its part of the
// student and teacher rows in registers (kResVectors 16-byte vectors of each: 32 KB of a block of
// 256 threads), so the logits are read from memory once and the gradient written once: the
// bandwidth floor's bytes.
//
//   load     each thread's vectors of the row slice, all issued before any is used;
//   pass 1   the block's online-softmax states (fold_elems), merged in the block, written to the
//            block's shared memory; cluster.sync; every block merges all blocks' states in rank
//            order (distributed shared memory), so all hold the same row constants, bit for bit;
//   pass 2   from the registers: the loss terms and the gradient (forward / reverse KL), or the
//            loss terms and C = sum qg (the mixtures); cluster.sync; the mixtures sum C over the
//            cluster in rank order and write the gradient (pass 3, from the registers again);
//            block 0 adds up the row's loss.
//
// The same math as the row and split kernels (the per-element functions of dense_kernels.cuh),
// over another partition of the row into threads and blocks, so the results agree with theirs to
// rounding, not to the bit; within the kernel every block merges the same states in rank order.
// Every element is read, and later written, by the same thread, and s'[label] is read before the
// first cluster.sync: grad may alias the student.
//
// Opt-in (DISTILL_OPS_CUDA_RESIDENT=1) until it has been timed on a GPU; taken for 16-bit and
// float32 rows of at most 16 x resident_chunk(512) columns (262144 16-bit, 131072 float32) on
// devices with clusters, else the row and split kernels run.
#pragma once

#include <cooperative_groups.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "dense_kernels.cuh"

namespace distill_ops {
namespace cuda {

// Built for blocks of up to 512 threads, one per SM, so at most 128 registers a thread: 4 vectors
// of each input (32 registers) and the passes' working set fit without spills (8 vectors spill).
// Launched with 256 threads (two blocks an SM, so one block's cluster.sync overlaps the other's
// loads) where a cluster of 16 such blocks covers the row, else 512.
constexpr int kResMaxThreads = 512;
constexpr int kResVectors = 4;      // 16-byte vectors of each input a thread keeps
constexpr int kResMaxCluster = 16;  // blocks per row (over 8 needs the non-portable cluster size)

// The columns one block of `threads` holds.
template <typename scalar_t>
constexpr int64_t resident_chunk(int threads) {
  return int64_t(threads) * kResVectors * (16 / sizeof(scalar_t));
}

// What each block of the cluster publishes in its shared memory for the others.
template <typename T>
struct ClusterSlot {
  RowStates<T> state;
  Acc div_sum, c_sum;
};

// Vector i of this thread: the column it starts at, and how many of its columns are in the row.
template <int VEC>
__device__ __forceinline__ int64_t resident_col(int64_t lo, int i) {
  return lo + (int64_t(i) * blockDim.x + threadIdx.x) * VEC;
}

template <int VEC>
__device__ __forceinline__ int resident_valid(int64_t j0, int64_t v) {
  return j0 >= v ? 0 : v - j0 >= VEC ? VEC : static_cast<int>(v - j0);
}

// READ_ONLY: through the read-only cache (__ldg), for the teacher; not for the student, whose
// buffer the kernel may write the gradient into (ld.global.nc is for memory the kernel never
// writes).
template <bool READ_ONLY, typename scalar_t, int VEC>
__device__ __forceinline__ void resident_load(const scalar_t* p, int valid, bool vec,
                                              Pack<scalar_t, VEC>& out) {
  if (vec && valid == VEC) {
    const uint4 raw = READ_ONLY ? __ldg(reinterpret_cast<const uint4*>(p))
                                : *reinterpret_cast<const uint4*>(p);
    memcpy(&out, &raw, 16);
    return;
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) out.v[e] = e < valid ? p[e] : scalar_t(0);
}

template <typename T, typename scalar_t, int VEC>
__device__ __forceinline__ void unpack(const Pack<scalar_t, VEC>& pk, T (&out)[VEC]) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = static_cast<T>(pk.v[e]);
}

template <typename scalar_t, typename T, int VEC>
__device__ __forceinline__ void resident_store(scalar_t* p, int valid, bool vec,
                                               const T (&g)[VEC]) {
  if (vec && valid == VEC) {
    store_k<VEC>(p, g);
    return;
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    if (e < valid) p[e] = static_cast<scalar_t>(g[e]);
  }
}

// Pass 2 or 3 over the thread's registers (terms_elems on each vector).
template <Mode MODE, int DIV, typename scalar_t, typename T, int VEC>
__device__ __forceinline__ void resident_terms(const RowPtrs<scalar_t, T>& P,
                                               const LossConsts<T>& Kc, const RowConsts<T>& rc,
                                               T scale, int64_t lo, int64_t v, bool vec,
                                               const Pack<scalar_t, VEC> (&xs)[kResVectors],
                                               const Pack<scalar_t, VEC> (&ts)[kResVectors],
                                               Acc& div_sum, Acc& c_sum) {
  constexpr bool kGradOut = MODE == Mode::kLossGrad || MODE == Mode::kGrad;
#pragma unroll
  for (int i = 0; i < kResVectors; ++i) {
    const int64_t j0 = resident_col<VEC>(lo, i);
    const int valid = resident_valid<VEC>(j0, v);
    if (valid == 0) continue;
    T x[VEC], t[VEC] = {}, g[VEC];  // t: zeros without a soft term (an undefined array spills)
    unpack(xs[i], x);
    if (Kc.soft) unpack(ts[i], t);
    T dsum = T(0), csum = T(0);
    terms_elems<MODE, VEC, DIV>(Kc, rc, scale, x, t, j0, P.label, dsum, csum, g, valid);
    if (MODE != Mode::kGrad) div_sum += static_cast<Acc>(dsum);
    if (MODE == Mode::kLossC) c_sum += static_cast<Acc>(csum);
    if (kGradOut) resident_store(P.g + j0, valid, vec, g);
  }
}

// Grid (cluster size, rows): the cluster of blocks (0..C-1, y) owns row y; block r the columns
// [r * chunk, (r + 1) * chunk).
template <typename scalar_t, typename T, int DIV>
__global__ void __launch_bounds__(kResMaxThreads, 1)
    resident_kernel(const DenseArgs A, const LossConsts<T> Kc, const bool vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // never launched: the host takes this path only where the kernel was built for sm_90+
#else
  namespace cg = cooperative_groups;
  constexpr int VEC = 16 / sizeof(scalar_t);
  __shared__ SharedScratch<T> sh;
  __shared__ ClusterSlot<T> slot;
  const auto cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int nblocks = static_cast<int>(cluster.num_blocks());
  const int64_t lo = rank * resident_chunk<scalar_t>(blockDim.x);
  const int64_t hi = std::min<int64_t>(A.v, lo + resident_chunk<scalar_t>(blockDim.x));
  const T scale = grad_scale_of<T>(A);
  T* __restrict__ loss_out = static_cast<T*>(A.loss);
  for (int64_t row = blockIdx.y; row < A.n; row += gridDim.y) {
    const int64_t label = Kc.has_labels ? A.labels[row] : int64_t(-1);
    const RowPtrs<scalar_t, T> P = row_ptrs<scalar_t, T>(A, row, label);
    if (Kc.has_labels && label == A.ignore_index) {  // the whole cluster skips the row
      if (Kc.need_grad && lo < hi) zero_slice(P.g, lo, hi, vec);
      if (rank == 0 && threadIdx.x == 0) loss_out[row] = T(0);
      continue;
    }
    const T s_label =
        (Kc.hard && rank == 0 && threadIdx.x == 0) ? label_logit(P.s, label, A.v, Kc) : T(0);

    Pack<scalar_t, VEC> xs[kResVectors], ts[kResVectors];
#pragma unroll
    for (int i = 0; i < kResVectors; ++i) {
      const int64_t j0 = resident_col<VEC>(lo, i);
      const int valid = resident_valid<VEC>(j0, A.v);
      resident_load<false>(P.s + j0, valid, vec, xs[i]);
      if (Kc.soft) resident_load<true>(P.t + j0, valid, vec, ts[i]);
    }

    // pass 1 and the cluster's row constants
    RowStates<T> st = RowStates<T>::empty();
#pragma unroll
    for (int i = 0; i < kResVectors; ++i) {
      const int valid = resident_valid<VEC>(resident_col<VEC>(lo, i), A.v);
      if (valid == 0) continue;
      T x[VEC], t[VEC] = {};
      unpack(xs[i], x);
      if (Kc.soft) unpack(ts[i], t);
      fold_elems<VEC, DIV>(st, Kc, x, t, valid);
    }
    st = block_merge(st, sh, DIV == kReverseKL);
    if (threadIdx.x == 0) slot.state = st;
    cluster.sync();
    if (threadIdx.x == 0) {
      RowStates<T> m = RowStates<T>::empty();
      for (int r = 0; r < nblocks; ++r) m = merge_states(m, cluster.map_shared_rank(&slot, r)->state);
      sh.split_state = m;
    }
    __syncthreads();
    RowConsts<T> rc = row_consts<DIV>(sh.split_state, Kc);
    const Acc lse_1 = Kc.hard ? ce_lse(sh.split_state, Kc) : Acc(0);

    // pass 2
    Acc div_sum = 0, c_sum = 0;
    if (needs_c_pass(DIV)) {
      resident_terms<Mode::kLossC, DIV>(P, Kc, rc, scale, lo, A.v, vec, xs, ts, div_sum, c_sum);
    } else if (Kc.need_grad) {
      resident_terms<Mode::kLossGrad, DIV>(P, Kc, rc, scale, lo, A.v, vec, xs, ts, div_sum, c_sum);
    } else {
      resident_terms<Mode::kLoss, DIV>(P, Kc, rc, scale, lo, A.v, vec, xs, ts, div_sum, c_sum);
    }
    block_sum2(div_sum, c_sum, sh);
    if (threadIdx.x == 0) {
      slot.div_sum = div_sum;
      slot.c_sum = c_sum;
    }
    cluster.sync();
    if (rank == 0 && threadIdx.x == 0) {
      Acc d = 0;
      for (int r = 0; r < nblocks; ++r) d += cluster.map_shared_rank(&slot, r)->div_sum;
      loss_out[row] = row_loss(Kc, d, lse_1, s_label);
    }

    // pass 3 (mixtures)
    if (needs_c_pass(DIV) && Kc.need_grad) {
      if (threadIdx.x == 0) {
        Acc c = 0;
        for (int r = 0; r < nblocks; ++r) c += cluster.map_shared_rank(&slot, r)->c_sum;
        sh.split_c = c;
      }
      __syncthreads();
      rc.c = static_cast<T>(sh.split_c);
      Acc unused0 = 0, unused1 = 0;
      resident_terms<Mode::kGrad, DIV>(P, Kc, rc, scale, lo, A.v, vec, xs, ts, unused0, unused1);
    }
    // The slots are rewritten only after the next row's first cluster.sync, which every block
    // reaches after its reads of this row's slots: no barrier needed here.
  }
  cluster.sync();  // no block exits while another may still read its slot
#endif
}

// DISTILL_OPS_CUDA_RESIDENT: unset or 0, never; 1, where it applies; "require", always (an error
// naming the reason where it does not apply: benchmarks and tests know what they measure). Read at
// every call.
enum class Resident { kOff, kWhereItApplies, kRequire };

inline Resident resident_mode() {
  const char* env = std::getenv("DISTILL_OPS_CUDA_RESIDENT");
  if (env == nullptr || std::strcmp(env, "") == 0 || std::strcmp(env, "0") == 0) return Resident::kOff;
  if (std::strcmp(env, "1") == 0) return Resident::kWhereItApplies;
  TORCH_CHECK(std::strcmp(env, "require") == 0,
              "DISTILL_OPS_CUDA_RESIDENT must be 0, 1 or require, got ", env);
  return Resident::kRequire;
}

// Where the resident kernel cannot run this call: false, or under "require" an error saying why.
inline bool resident_refused(Resident mode, const char* why) {
  TORCH_CHECK(mode != Resident::kRequire, "DISTILL_OPS_CUDA_RESIDENT=require: the resident dense ",
              "kernel does not apply: ", why);
  return false;
}

// Launches the resident kernel and returns true where it is asked for and applies (see the top of
// this file); returns false, launching nothing, otherwise.
template <typename scalar_t, typename T, int DIV>
bool launch_resident(const DenseArgs& A, const LossConsts<T>& Kc, bool vec, int device,
                     cudaStream_t stream) {
  const Resident mode = resident_mode();
  if (mode == Resident::kOff) return false;
  if constexpr (sizeof(scalar_t) > 4) {
    return resident_refused(mode, "float64 rows would need twice the registers");
  } else {
    int threads = kResMaxThreads / 2;
    if ((A.v + resident_chunk<scalar_t>(threads) - 1) / resident_chunk<scalar_t>(threads) >
        kResMaxCluster) {
      threads = kResMaxThreads;
    }
    const int64_t chunk = resident_chunk<scalar_t>(threads);
    const int64_t blocks = (A.v + chunk - 1) / chunk;
    if (blocks > kResMaxCluster) {
      return resident_refused(mode, "the row is wider than 16 blocks of registers");
    }
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    if (major < 9) return resident_refused(mode, "the device has no thread-block clusters (sm_90+)");
    void (*kernel)(const DenseArgs, const LossConsts<T>, const bool) =
        resident_kernel<scalar_t, T, DIV>;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = static_cast<unsigned>(blocks);
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(blocks),
                       static_cast<unsigned>(std::min<int64_t>(A.n, max_grid_y(device))));
    cfg.blockDim = dim3(static_cast<unsigned>(threads));
    cfg.dynamicSmemBytes = 0;
    cfg.stream = stream;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    // Over 8 blocks is the non-portable cluster size, allowed per kernel (set at every such call:
    // a cudaDeviceReset forgets it, not the verdicts below).
    if (blocks > 8) {
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    }
    // Whether this build and device run the shape: asked once per device and shape (the queries
    // cost more than a short launch). 0: not asked yet, 1: yes, 2: no sm_90 code, 3: too big.
    constexpr int kDevices = 64;
    static std::atomic<int> known[kDevices][2][kResMaxCluster + 1];
    std::atomic<int>* slot = device >= 0 && device < kDevices
                                 ? &known[device][threads == kResMaxThreads][blocks]
                                 : nullptr;
    int verdict = slot != nullptr ? slot->load(std::memory_order_relaxed) : 0;
    if (verdict == 0) {
      cudaFuncAttributes fattr;
      C10_CUDA_CHECK(cudaFuncGetAttributes(&fattr, kernel));
      verdict = 1;
      // The code's architecture is the PTX's: a build for sm_80 only runs on sm_90 as its PTX,
      // compiled by the driver (binaryVersion 90), and that code is the __trap() stub.
      if (fattr.ptxVersion < 90 || fattr.binaryVersion < 90) {
        verdict = 2;
      } else {
        int active = 0;
        const cudaError_t err = cudaOccupancyMaxActiveClusters(&active, kernel, &cfg);
        if (err != cudaSuccess) {
          // Not cached (it may pass another time), and cleared so that the other kernels' launch
          // checks do not report it.
          (void)cudaGetLastError();
          const std::string why =
              std::string("the cluster occupancy query failed: ") + cudaGetErrorString(err);
          return resident_refused(mode, why.c_str());
        }
        if (active == 0) verdict = 3;
      }
      if (slot != nullptr) slot->store(verdict, std::memory_order_relaxed);
    }
    if (verdict == 2) return resident_refused(mode, "this build has no sm_90 code of it");
    if (verdict == 3) {
      return resident_refused(mode, "the device cannot schedule a cluster of this size");
    }
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, A, Kc, vec));
    return true;
  }
}

}  // namespace cuda
}  // namespace distill_ops
