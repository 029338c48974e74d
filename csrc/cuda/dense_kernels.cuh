// CUDA kernels of dense_forward (backends/base.py contract), and the per-element passes the
// resident kernel (dense_resident.cuh) shares; their launch is in dense_launch.cuh.
//
// Many rows (N >= ~2 x SMs): one block per row (row_kernel), streaming over the row with 16-byte
// loads (scalar where pointers or row strides are not 16-byte aligned; the tail of a row that is
// not a whole number of vectors is done scalar too):
//   pass 1  per-thread online-softmax states of a = s'/tau, b = t'/tau (and s' for CE when tau != 1,
//           plus reverse KL's running sum), merged across the block with warp shuffles;
//   pass 2  the loss terms, and the gradient where C is known (forward KL, reverse KL); for the
//           mixtures the block sums C = sum qg instead;
//   pass 3  (mixtures) the gradient.
// Few rows: each row is split over `splits` blocks (split path): split_state_kernel writes partial
// states to a workspace; split_terms_kernel merges them (every block, in the same order: no atomics,
// deterministic) and runs pass 2 on its slice; split_grad_kernel (mixtures) runs pass 3;
// split_finalize_kernel adds up each row's loss.
//
// Accuracy: per-thread sums (softmax normalizers, reverse KL's sum, loss terms, C) are kept in
// double, fed with float partial sums of one vector (<= 8 elements): in float, adding many small
// terms to a partial sum near 1 loses ~1e-6 relative. Element math is in T (float, or double for
// float64 inputs).
//
// A student element is read before the gradient element at the same index is written and never
// read after it (within a kernel, by the thread that writes it; across the split kernels, by
// stream order), so grad may be the student tensor itself. For that reason the student and grad
// pointers are not __restrict__ and pass 1 is the only pass that reads through the read-only cache.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "distill_ops/dense_args.h"
#include "distill_ops/divergence.h"
#include "distill_ops/online_softmax.h"

namespace distill_ops {
namespace cuda {

constexpr int kMaxThreads = 512;
constexpr int kMinBlocks = 2;  // resident blocks of kMaxThreads per SM the row kernel is built for
using Acc = double;  // per-thread and per-row accumulators
constexpr int kWarp = 32;
// Workspace slot of one (row, split): a.m a.z a.w b.m b.z one.m one.z loss c s_label
constexpr int kSlot = 10;

// ------------------------------------------------------------------------------------------------
// loads and stores of K consecutive elements (K * sizeof == 16: one vector access)

template <typename scalar_t, int K>
struct alignas(sizeof(scalar_t) * K) Pack {
  scalar_t v[K];
};

template <int K, bool RO, typename scalar_t, typename T>
__device__ __forceinline__ void load_k(const scalar_t* p, T (&out)[K]) {
  Pack<scalar_t, K> pk;
  if constexpr (sizeof(pk) == 16) {
    const uint4 raw = RO ? __ldg(reinterpret_cast<const uint4*>(p)) : *reinterpret_cast<const uint4*>(p);
    memcpy(&pk, &raw, 16);
  } else {
    pk = *reinterpret_cast<const Pack<scalar_t, K>*>(p);
  }
#pragma unroll
  for (int k = 0; k < K; ++k) out[k] = static_cast<T>(pk.v[k]);
}

template <int K, typename scalar_t, typename T>
__device__ __forceinline__ void store_k(scalar_t* p, const T (&in)[K]) {
  Pack<scalar_t, K> pk;
#pragma unroll
  for (int k = 0; k < K; ++k) pk.v[k] = static_cast<scalar_t>(in[k]);
  if constexpr (sizeof(pk) == 16) {
    uint4 raw;
    memcpy(&raw, &pk, 16);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
    *reinterpret_cast<Pack<scalar_t, K>*>(p) = pk;
  }
}

// Visit [lo, hi) of a row: f(integral_constant<int, K>, j0) for K elements starting at j0; K is
// the vector width on the aligned part when `vec`, else 1. lo must be a multiple of the vector width.
template <typename scalar_t, typename F>
__device__ __forceinline__ void stream_slice(int64_t lo, int64_t hi, bool vec, F&& f) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  int64_t start = lo;
  if (vec) {
    const int64_t nvec = (hi - lo) / VEC;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      f(std::integral_constant<int, VEC>(), lo + i * VEC);
    }
    start = lo + nvec * VEC;
  }
  for (int64_t j = start + threadIdx.x; j < hi; j += blockDim.x) {
    f(std::integral_constant<int, 1>(), j);
  }
}

// ------------------------------------------------------------------------------------------------
// per-row state, its block reduction, and the row constants

// Online states of a = s'/tau, b = t'/tau and s' (CE at temperature 1, when tau != 1), with max in
// the element type M and sums in Acc; w: reverse KL's sum exp(a - m_a) (a - b), relative to m_a.
template <typename M>
struct RowStates {
  SoftmaxState<M, Acc> a, b, one;
  Acc w;

  __device__ __forceinline__ static RowStates empty() {
    return RowStates{SoftmaxState<M, Acc>::empty(), SoftmaxState<M, Acc>::empty(),
                     SoftmaxState<M, Acc>::empty(), Acc(0)};
  }
};

template <typename M>
__device__ __forceinline__ RowStates<M> merge_states(const RowStates<M>& x, const RowStates<M>& y) {
  RowStates<M> r;
  Acc fx, fy;
  r.a = merge(x.a, y.a, fx, fy);
  r.w = scaled(x.w, fx) + scaled(y.w, fy);
  r.b = merge(x.b, y.b);
  r.one = merge(x.one, y.one);
  return r;
}

template <typename M>
__device__ __forceinline__ SoftmaxState<M, Acc> shfl_state(const SoftmaxState<M, Acc>& s, int off) {
  return SoftmaxState<M, Acc>{__shfl_xor_sync(0xffffffffu, s.m, off),
                              __shfl_xor_sync(0xffffffffu, s.z, off)};
}

template <typename M>
__device__ __forceinline__ RowStates<M> warp_merge(RowStates<M> s, bool with_w) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const RowStates<M> o{shfl_state(s.a, off), shfl_state(s.b, off), shfl_state(s.one, off),
                         with_w ? __shfl_xor_sync(0xffffffffu, s.w, off) : Acc(0)};
    s = merge_states(s, o);
  }
  return s;
}

template <typename M>
struct SharedScratch {
  RowStates<M> states[kMaxThreads / kWarp];
  RowStates<M> state_out;
  Acc sums[2][kMaxThreads / kWarp];
  Acc sums_out[2];
  RowStates<M> split_state;  // split path: the row's merged state, computed by thread 0
  Acc split_c;
};

// The block's merged state, returned to every thread.
template <typename M>
__device__ __forceinline__ RowStates<M> block_merge(RowStates<M> s, SharedScratch<M>& sh,
                                                    bool with_w) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = (blockDim.x + kWarp - 1) / kWarp;
  s = warp_merge(s, with_w);
  if (lane == 0) sh.states[warp] = s;
  __syncthreads();
  if (warp == 0) {
    RowStates<M> x = lane < nwarps ? sh.states[lane] : RowStates<M>::empty();
    x = warp_merge(x, with_w);
    if (lane == 0) sh.state_out = x;
  }
  __syncthreads();
  const RowStates<M> r = sh.state_out;
  __syncthreads();  // the scratch may be reused right after
  return r;
}

// Block sums of (x, y), returned to every thread.
template <typename M>
__device__ __forceinline__ void block_sum2(Acc& x, Acc& y, SharedScratch<M>& sh) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = (blockDim.x + kWarp - 1) / kWarp;
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, off);
    y += __shfl_xor_sync(0xffffffffu, y, off);
  }
  if (lane == 0) {
    sh.sums[0][warp] = x;
    sh.sums[1][warp] = y;
  }
  __syncthreads();
  if (warp == 0) {
    Acc u = lane < nwarps ? sh.sums[0][lane] : Acc(0);
    Acc v = lane < nwarps ? sh.sums[1][lane] : Acc(0);
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) {
      u += __shfl_xor_sync(0xffffffffu, u, off);
      v += __shfl_xor_sync(0xffffffffu, v, off);
    }
    if (lane == 0) {
      sh.sums_out[0] = u;
      sh.sums_out[1] = v;
    }
  }
  __syncthreads();
  x = sh.sums_out[0];
  y = sh.sums_out[1];
  __syncthreads();
}

template <typename T>
struct RowConsts {
  LogNormalizer<T> a, b, one;  // of s'/tau, t'/tau, s'
  T c;
};

template <int DIV, typename T>
__device__ __forceinline__ RowConsts<T> row_consts(const RowStates<T>& st,
                                                   const LossConsts<T>& K) {
  RowConsts<T> rc;
  rc.a = normalizer<T>(st.a);
  rc.b = normalizer<T>(st.b);
  rc.one = K.ce_own_lse ? normalizer<T>(st.one) : rc.a;
  rc.c = DIV == kForwardKL   ? T(-1)
         : DIV == kReverseKL ? static_cast<T>(reverse_kl_from_states(st.a, st.w, st.b))
                             : T(0);
  return rc;
}

// log-sum-exp of s' (the CE term's normalizer).
template <typename T>
__device__ __forceinline__ Acc ce_lse(const RowStates<T>& st, const LossConsts<T>& K) {
  return K.ce_own_lse ? st.one.lse() : st.a.lse();
}

// The row's loss from its divergence sum, lse(s') and the labelled logit s'.
template <typename T>
__device__ __forceinline__ T row_loss(const LossConsts<T>& K, Acc div_sum, Acc lse_1, T s_label) {
  Acc loss = K.soft ? Acc(K.soft_coef) * div_sum : Acc(0);
  if (K.hard) loss += Acc(K.hard_coef) * (lse_1 - Acc(s_label));
  return static_cast<T>(loss);
}

// s'[label] (NaN for a label outside [0, V): the caller checks labels, this only avoids a bad read).
template <typename scalar_t, typename T>
__device__ __forceinline__ T label_logit(const scalar_t* s_row, int64_t label, int64_t V,
                                         const LossConsts<T>& K) {
  if (label < 0 || label >= V) return static_cast<T>(NAN);
  T x = static_cast<T>(s_row[label]);
  return K.cap_on ? softcap(x, K.cap, K.inv_cap) : x;
}

template <typename scalar_t>
__device__ __forceinline__ void zero_slice(scalar_t* g_row, int64_t lo, int64_t hi, bool vec) {
  stream_slice<scalar_t>(lo, hi, vec, [&](auto kc, int64_t j0) {
    constexpr int K = decltype(kc)::value;
    float z[K];
#pragma unroll
    for (int k = 0; k < K; ++k) z[k] = 0.0f;
    store_k<K>(g_row + j0, z);
  });
}

// ------------------------------------------------------------------------------------------------
// the passes over [lo, hi) of one row

template <typename scalar_t, typename T>
struct RowPtrs {
  const scalar_t* s;
  const scalar_t* __restrict__ t;
  scalar_t* g;
  int64_t label;
};

template <typename scalar_t, typename T>
__device__ __forceinline__ RowPtrs<scalar_t, T> row_ptrs(const DenseArgs& A, int64_t row,
                                                         int64_t label) {
  RowPtrs<scalar_t, T> p;
  p.s = static_cast<const scalar_t*>(A.student) + row * A.stride_s;
  p.t = static_cast<const scalar_t*>(A.teacher) + row * A.stride_t;
  p.g = A.grad != nullptr ? static_cast<scalar_t*>(A.grad) + row * A.stride_g : nullptr;
  p.label = label;
  return p;
}

// Fold K values x into st; with W, also exp(x - m) (x - y) into w_acc.
template <int K, bool W, typename T>
__device__ __forceinline__ void fold(SoftmaxState<T, Acc>& st, Acc& w_acc, const T (&x)[K],
                                     const T (&y)[K]) {
  T cm = x[0];
#pragma unroll
  for (int k = 1; k < K; ++k) cm = x[k] > cm ? x[k] : cm;
  Acc factor;
  const T shift = st.raise(cm, factor);
  if (W) w_acc = scaled(w_acc, factor);
  T z = T(0);
  Acc w = Acc(0);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const T e = math::exp_(x[k] - shift);
    z += e;
    // a - b in Acc: exact, so that R = w / z - (m_a - m_b) - ... cancels exactly
    if (W) w += weighted(static_cast<Acc>(e), static_cast<Acc>(x[k]) - static_cast<Acc>(y[k]));
  }
  st.z += static_cast<Acc>(z);
  if (W) w_acc += w;
}

// Folds K elements (raw student x, raw teacher t) into st. Elements from `valid` on are padding
// (the resident kernel's last vector of a row) and count as -inf: they add exactly 0.
template <int K, int DIV, typename T>
__device__ __forceinline__ void fold_elems(RowStates<T>& st, const LossConsts<T>& Kc,
                                           const T (&x)[K], const T (&t)[K], int valid = K) {
  T sp[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    sp[k] = k >= valid ? math::neg_inf<T>() : Kc.cap_on ? softcap(x[k], Kc.cap, Kc.inv_cap) : x[k];
  }
  if (Kc.soft) {
    T a[K], b[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      a[k] = math::mul_rn(sp[k], Kc.inv_tau);  // (never contracted: see primitives.h mul_rn)
      b[k] = k >= valid ? math::neg_inf<T>()
                        : math::mul_rn(Kc.cap_on ? softcap(t[k], Kc.cap, Kc.inv_cap) : t[k],
                                       Kc.inv_tau);
    }
    fold<K, DIV == kReverseKL>(st.a, st.w, a, b);
    fold<K, false>(st.b, st.w, b, b);
  }
  if (Kc.ce_own_lse) fold<K, false>(st.one, st.w, sp, sp);
}

template <typename scalar_t, typename T, int DIV>
__device__ __forceinline__ RowStates<T> pass_states(const RowPtrs<scalar_t, T>& P,
                                                    const LossConsts<T>& Kc, int64_t lo,
                                                    int64_t hi, bool vec) {
  RowStates<T> st = RowStates<T>::empty();
  stream_slice<scalar_t>(lo, hi, vec, [&](auto kc, int64_t j0) {
    constexpr int K = decltype(kc)::value;
    // t is zeroed where it is not loaded (no soft term): left undefined, ptxas spilled here.
    T x[K], t[K] = {};
    load_k<K, true>(P.s + j0, x);
    if (Kc.soft) load_k<K, true>(P.t + j0, t);
    fold_elems<K, DIV>(st, Kc, x, t);
  });
  return st;
}

enum class Mode { kLoss, kLossGrad, kLossC, kGrad };

// The loss terms of K elements (raw x, t starting at column j0) added to dsum, their qg to csum
// (kLossC), and their gradient g (kLossGrad, kGrad). Elements from `valid` on are padding: left
// out of the sums, their g unset.
template <Mode MODE, int K, int DIV, typename T>
__device__ __forceinline__ void terms_elems(const LossConsts<T>& Kc, const RowConsts<T>& rc,
                                            T scale, const T (&x)[K], const T (&t)[K],
                                            int64_t j0, int64_t label, T& dsum, T& csum,
                                            T (&g)[K], int valid = K) {
  constexpr bool kGradOut = MODE == Mode::kLossGrad || MODE == Mode::kGrad;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (k >= valid) continue;
    const T sp = Kc.cap_on ? softcap(x[k], Kc.cap, Kc.inv_cap) : x[k];
    T q = T(0), qg = T(0);
    if (Kc.soft) {
      const T bk = math::mul_rn(Kc.cap_on ? softcap(t[k], Kc.cap, Kc.inv_cap) : t[k], Kc.inv_tau);
      T term;
      Terms<DIV, T>::eval(rc.a.log_prob(math::mul_rn(sp, Kc.inv_tau)), rc.b.log_prob(bk), Kc.mix,
                          q, term, qg);
      if (MODE != Mode::kGrad) dsum += term;
      if (MODE == Mode::kLossC) csum += qg;
    }
    if (kGradOut) {
      T gk = Kc.soft ? soft_grad(qg, q, rc.c, Kc.soft_scale) : T(0);
      if (Kc.hard) {
        const T sm = Kc.ce_own_lse ? math::exp_(rc.one.log_prob(sp)) : q;
        gk += hard_grad(sm, j0 + k == label, Kc.hard_coef);
      }
      if (Kc.cap_on) gk *= softcap_grad(x[k], Kc.inv_cap);
      g[k] = gk * scale;
    }
  }
}

// Pass 2 (kLoss, kLossGrad, kLossC) or 3 (kGrad) over [lo, hi): per-thread sums of the loss terms
// (div_sum) and of qg (c_sum); the gradient written in kLossGrad and kGrad.
template <Mode MODE, typename scalar_t, typename T, int DIV>
__device__ __forceinline__ void pass_terms(const RowPtrs<scalar_t, T>& P, const LossConsts<T>& Kc,
                                           const RowConsts<T>& rc, T scale, int64_t lo,
                                           int64_t hi, bool vec, Acc& div_sum, Acc& c_sum) {
  constexpr bool kGradOut = MODE == Mode::kLossGrad || MODE == Mode::kGrad;
  stream_slice<scalar_t>(lo, hi, vec, [&](auto kc, int64_t j0) {
    constexpr int K = decltype(kc)::value;
    T x[K], t[K], g[K];
    T dsum = T(0), csum = T(0);
    load_k<K, false>(P.s + j0, x);
    if (Kc.soft) load_k<K, false>(P.t + j0, t);
    terms_elems<MODE, K, DIV>(Kc, rc, scale, x, t, j0, P.label, dsum, csum, g);
    if (MODE != Mode::kGrad) div_sum += static_cast<Acc>(dsum);
    if (MODE == Mode::kLossC) c_sum += static_cast<Acc>(csum);
    if (kGradOut) store_k<K>(P.g + j0, g);
  });
}

// ------------------------------------------------------------------------------------------------
// kernels

template <typename scalar_t, typename T, int DIV>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    row_kernel(const DenseArgs A, const LossConsts<T> Kc, const bool vec) {
  __shared__ SharedScratch<T> sh;
  T* __restrict__ loss_out = static_cast<T*>(A.loss);
  const T scale = grad_scale_of<T>(A);
  for (int64_t row = blockIdx.x; row < A.n; row += gridDim.x) {
    const int64_t label = Kc.has_labels ? A.labels[row] : int64_t(-1);
    const RowPtrs<scalar_t, T> P = row_ptrs<scalar_t, T>(A, row, label);
    if (Kc.has_labels && label == A.ignore_index) {
      if (Kc.need_grad) zero_slice(P.g, 0, A.v, vec);
      if (threadIdx.x == 0) loss_out[row] = T(0);
      continue;
    }
    // Read before any thread writes the row (the block barriers of pass 1 come first).
    const T s_label = (Kc.hard && threadIdx.x == 0) ? label_logit(P.s, label, A.v, Kc) : T(0);
    RowStates<T> st = pass_states<scalar_t, T, DIV>(P, Kc, 0, A.v, vec);
    st = block_merge(st, sh, DIV == kReverseKL);
    RowConsts<T> rc = row_consts<DIV>(st, Kc);
    const Acc lse_1 = Kc.hard ? ce_lse(st, Kc) : Acc(0);
    Acc div_sum = 0, c_sum = 0;
    if (needs_c_pass(DIV)) {
      pass_terms<Mode::kLossC, scalar_t, T, DIV>(P, Kc, rc, scale, 0, A.v, vec, div_sum, c_sum);
    } else if (Kc.need_grad) {
      pass_terms<Mode::kLossGrad, scalar_t, T, DIV>(P, Kc, rc, scale, 0, A.v, vec, div_sum, c_sum);
    } else {
      pass_terms<Mode::kLoss, scalar_t, T, DIV>(P, Kc, rc, scale, 0, A.v, vec, div_sum, c_sum);
    }
    block_sum2(div_sum, c_sum, sh);
    if (threadIdx.x == 0) loss_out[row] = row_loss(Kc, div_sum, lse_1, s_label);
    if (needs_c_pass(DIV) && Kc.need_grad) {
      rc.c = static_cast<T>(c_sum);
      pass_terms<Mode::kGrad, scalar_t, T, DIV>(P, Kc, rc, scale, 0, A.v, vec, div_sum, c_sum);
    }
  }
}

// Split path. Grid (splits, rows); block (split, row) owns [split * slice, min(V, + slice)).
// Workspace: one slot of kSlot Acc per (row, split).

template <typename T>
__device__ __forceinline__ RowStates<T> load_split_states(const Acc* __restrict__ ws, int64_t row,
                                                          int splits) {
  RowStates<T> st = RowStates<T>::empty();
  for (int i = 0; i < splits; ++i) {
    const Acc* s = ws + (row * splits + i) * kSlot;
    const RowStates<T> x{SoftmaxState<T, Acc>{static_cast<T>(s[0]), s[1]},
                         SoftmaxState<T, Acc>{static_cast<T>(s[3]), s[4]},
                         SoftmaxState<T, Acc>{static_cast<T>(s[5]), s[6]}, s[2]};
    st = merge_states(st, x);
  }
  return st;
}

template <typename scalar_t, typename T, bool RKL>
__global__ void __launch_bounds__(kMaxThreads)
    split_state_kernel(const DenseArgs A, const LossConsts<T> Kc, const bool vec,
                       const int64_t slice, const int splits, Acc* __restrict__ ws) {
  __shared__ SharedScratch<T> sh;
  const int split = blockIdx.x;
  const int64_t lo = split * slice, hi = std::min<int64_t>(A.v, lo + slice);
  for (int64_t row = blockIdx.y; row < A.n; row += gridDim.y) {
    const int64_t label = Kc.has_labels ? A.labels[row] : int64_t(-1);
    if (Kc.has_labels && label == A.ignore_index) continue;
    const RowPtrs<scalar_t, T> P = row_ptrs<scalar_t, T>(A, row, label);
    RowStates<T> st =
        pass_states<scalar_t, T, RKL ? kReverseKL : kForwardKL>(P, Kc, lo, hi, vec);
    st = block_merge(st, sh, RKL);
    if (threadIdx.x == 0) {
      Acc* s = ws + (row * splits + split) * kSlot;
      s[0] = st.a.m; s[1] = st.a.z; s[2] = st.w;
      s[3] = st.b.m; s[4] = st.b.z;
      s[5] = st.one.m; s[6] = st.one.z;
      s[9] = (Kc.hard && split == 0) ? Acc(label_logit(P.s, label, A.v, Kc)) : Acc(0);
    }
  }
}

template <typename scalar_t, typename T, int DIV>
__global__ void __launch_bounds__(kMaxThreads)
    split_terms_kernel(const DenseArgs A, const LossConsts<T> Kc, const bool vec,
                       const int64_t slice, const int splits, Acc* __restrict__ ws) {
  __shared__ SharedScratch<T> sh;
  const int split = blockIdx.x;
  const int64_t lo = split * slice, hi = std::min<int64_t>(A.v, lo + slice);
  const T scale = grad_scale_of<T>(A);
  for (int64_t row = blockIdx.y; row < A.n; row += gridDim.y) {
    const int64_t label = Kc.has_labels ? A.labels[row] : int64_t(-1);
    const RowPtrs<scalar_t, T> P = row_ptrs<scalar_t, T>(A, row, label);
    if (Kc.has_labels && label == A.ignore_index) {
      if (Kc.need_grad) zero_slice(P.g, lo, hi, vec);
      continue;
    }
    if (threadIdx.x == 0) sh.split_state = load_split_states<T>(ws, row, splits);
    __syncthreads();
    const RowConsts<T> rc = row_consts<DIV>(sh.split_state, Kc);
    __syncthreads();
    Acc div_sum = 0, c_sum = 0;
    if (needs_c_pass(DIV)) {
      pass_terms<Mode::kLossC, scalar_t, T, DIV>(P, Kc, rc, scale, lo, hi, vec, div_sum, c_sum);
    } else if (Kc.need_grad) {
      pass_terms<Mode::kLossGrad, scalar_t, T, DIV>(P, Kc, rc, scale, lo, hi, vec, div_sum, c_sum);
    } else {
      pass_terms<Mode::kLoss, scalar_t, T, DIV>(P, Kc, rc, scale, lo, hi, vec, div_sum, c_sum);
    }
    block_sum2(div_sum, c_sum, sh);
    if (threadIdx.x == 0) {
      Acc* s = ws + (row * splits + split) * kSlot;
      s[7] = div_sum;
      s[8] = c_sum;
    }
  }
}

template <typename scalar_t, typename T, int DIV>
__global__ void __launch_bounds__(kMaxThreads)
    split_grad_kernel(const DenseArgs A, const LossConsts<T> Kc, const bool vec,
                      const int64_t slice, const int splits, const Acc* __restrict__ ws) {
  __shared__ SharedScratch<T> sh;
  const int split = blockIdx.x;
  const int64_t lo = split * slice, hi = std::min<int64_t>(A.v, lo + slice);
  const T scale = grad_scale_of<T>(A);
  for (int64_t row = blockIdx.y; row < A.n; row += gridDim.y) {
    const int64_t label = Kc.has_labels ? A.labels[row] : int64_t(-1);
    if (Kc.has_labels && label == A.ignore_index) continue;  // zeroed by split_terms_kernel
    const RowPtrs<scalar_t, T> P = row_ptrs<scalar_t, T>(A, row, label);
    if (threadIdx.x == 0) {
      sh.split_state = load_split_states<T>(ws, row, splits);
      Acc c = 0;
      for (int i = 0; i < splits; ++i) c += ws[(row * splits + i) * kSlot + 8];
      sh.split_c = c;
    }
    __syncthreads();
    RowConsts<T> rc = row_consts<DIV>(sh.split_state, Kc);
    rc.c = static_cast<T>(sh.split_c);
    __syncthreads();
    Acc unused0 = 0, unused1 = 0;
    pass_terms<Mode::kGrad, scalar_t, T, DIV>(P, Kc, rc, scale, lo, hi, vec, unused0, unused1);
  }
}

template <typename T>
__global__ void split_finalize_kernel(const DenseArgs A, const LossConsts<T> Kc, const int splits,
                                      const Acc* __restrict__ ws) {
  T* __restrict__ loss_out = static_cast<T*>(A.loss);
  for (int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; row < A.n;
       row += int64_t(gridDim.x) * blockDim.x) {
    const int64_t label = Kc.has_labels ? A.labels[row] : int64_t(-1);
    if (Kc.has_labels && label == A.ignore_index) {
      loss_out[row] = T(0);
      continue;
    }
    Acc div_sum = 0;
    for (int i = 0; i < splits; ++i) div_sum += ws[(row * splits + i) * kSlot + 7];
    const Acc lse_1 = Kc.hard ? ce_lse(load_split_states<T>(ws, row, splits), Kc) : Acc(0);
    loss_out[row] = row_loss(Kc, div_sum, lse_1, static_cast<T>(ws[row * splits * kSlot + 9]));
  }
}

// ------------------------------------------------------------------------------------------------
// launch helpers (the dense, sparse, top-k and sampling launches)

// A device attribute, asked once per device (the query costs more than a short launch).
template <cudaDeviceAttr ATTR>
inline int device_attribute(int device) {
  static int cache[128] = {0};
  if (device >= 0 && device < 128 && cache[device] > 0) return cache[device];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, ATTR, device));
  if (device >= 0 && device < 128) cache[device] = n;
  return n;
}

inline int sm_count(int device) { return device_attribute<cudaDevAttrMultiProcessorCount>(device); }

// The most blocks a grid may have along y (65535 on every GPU so far): the split and resident
// kernels put rows there and loop over the rest (the emulator lowers it to test that loop).
inline int max_grid_y(int device) { return device_attribute<cudaDevAttrMaxGridDimY>(device); }

inline int threads_for(int64_t len) {
  return len >= 16384 ? kMaxThreads : len >= 4096 ? 256 : 128;
}

template <typename scalar_t>
inline bool aligned16(const void* p, int64_t row_stride, int64_t n) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 &&
         (n <= 1 || (row_stride * int64_t(sizeof(scalar_t))) % 16 == 0);
}

}  // namespace cuda
}  // namespace distill_ops
