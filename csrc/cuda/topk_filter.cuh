// One-read teacher top-k (fp32, bf16 and fp16 rows, k <= filter_max_k): each row is read once.
//
// One block per row streams it in tiles of one vector per thread. Every element is folded into
// the thread's online normalizer. An element whose ranking key is above a threshold is also pushed
// to a candidate buffer in shared memory; the others, which cannot be among the row's k largest,
// add to the thread's tail sum instead.
//
// Candidates are 64-bit words (ranking key << 32 | ~id), so their unsigned order is the order of
// the result: values descending, ties to the lower id. The value comes back from the key
// (value_of_key), so a candidate costs 8 bytes and the row is never read again.
//
// When the next tile might not fit (kFilterCap words), the block compacts the buffer. A radix
// select over the words finds the k largest; the rest leave for the tail sums. The threshold
// becomes the k-th largest key: a later element with an equal key has a higher id, so it loses the
// tie. The first compaction comes after about kFilterCap elements. After it only elements above
// the k best so far enter, about k ln(V / kFilterCap) of them in a row without order, so few rows
// compact more than twice. A row sorted ascending compacts every tile: still correct, just slower.
//
// The block never reads the buffer's size from shared memory while another warp may push. Each
// warp writes how many words it pushed in a tile to one of two slots (by tile parity). After the
// tile's barrier every thread adds up the same counts, so all decide alike whether to compact,
// with one barrier per tile.
//
// At the end the k winners are sorted in shared memory (bitonic, descending) and written in order,
// so the host does not sort. The tail mass is the sum over what was rejected or evicted, kept
// relative to each thread's running max like the normalizer, so no 1 - sum cancels. Its terms
// underflow when the tail is far below the max (tail_refit.h): such a row's tail is summed once
// more, over the words below the k-th, relative to its own max (refit_tail; a second read).
#pragma once

#include <cstdint>
#include <cstring>

#include "dense_kernels.cuh"  // Pack, Acc, kWarp, shfl_state
#include "distill_ops/online_softmax.h"
#include "distill_ops/sparse_args.h"
#include "distill_ops/tail_refit.h"
#include "topk_keys.cuh"

namespace distill_ops {
namespace cuda {

constexpr int kFilterThreads = 256;
constexpr int kFilterWarps = kFilterThreads / kWarp;
constexpr int kFilterCap = 4096;  // candidate words in shared memory (32 KB)

// The largest k the filter kernel takes: after a compaction the buffer holds k words, and a whole
// tile (one 16-byte vector per thread) must fit next to them.
template <typename scalar_t>
constexpr int64_t filter_max_k() {
  return kFilterCap - kFilterThreads * static_cast<int>(16 / sizeof(scalar_t));
}

// The widest row it takes: column indices, plus a tile, stay within int.
constexpr int64_t kFilterMaxV = int64_t(1) << 30;

struct FilterShared {
  uint64_t cand[kFilterCap];
  unsigned int hist[256];
  unsigned int pushed[2][kFilterWarps];  // words each warp pushed in the last two tiles
  unsigned int warp_count[kFilterWarps];
  SoftmaxState<float, Acc> states[kFilterWarps];
  Acc tails[kFilterWarps];
  uint64_t mins[kFilterWarps];
  uint64_t prefix;
  unsigned int need;
  unsigned int done;
  unsigned int pos;  // where the next pushed word goes
};

__device__ __forceinline__ uint64_t candidate(uint32_t key, int id) {
  return (static_cast<uint64_t>(key) << 32) | static_cast<uint64_t>(~static_cast<uint32_t>(id));
}
__device__ __forceinline__ int32_t candidate_id(uint64_t c) {
  return static_cast<int32_t>(~static_cast<uint32_t>(c));
}
__device__ __forceinline__ float candidate_value(uint64_t c) {
  return value_of_key(static_cast<uint32_t>(c >> 32));
}

// Folds W values a (already / tau) into the normalizer st (unless `tail_only`: a word evicted
// from the buffer was counted when it was read); those flagged in `to_tail` also into the tail
// sum, which is kept relative to st's max (rescaled by the same factor).
template <int W, bool tail_only = false>
__device__ __forceinline__ void fold_with_tail(SoftmaxState<float, Acc>& st, Acc& tail,
                                               const float (&a)[W], unsigned to_tail) {
  float cm = a[0];
#pragma unroll
  for (int j = 1; j < W; ++j) cm = a[j] > cm ? a[j] : cm;
  Acc factor;
  const float shift = st.raise(cm, factor);
  tail *= factor;  // finite, and factor is 1 or a plain rescale
  float z = 0.f, zt = 0.f;
#pragma unroll
  for (int j = 0; j < W; ++j) {
    const float e = math::exp_(a[j] - shift);
    z += e;
    if ((to_tail >> j) & 1u) zt += e;
  }
  if (!tail_only) st.z += static_cast<Acc>(z);
  tail += static_cast<Acc>(zt);
}

// The digit of the `need`-th largest word among the histogram's bins (warp 0): writes the longer
// prefix, how many of its words are still needed, and whether they are the whole bin.
__device__ __forceinline__ void radix_digit(FilterShared& sh, uint64_t prefix, unsigned need,
                                            int shift, int lane) {
  unsigned h[8], s = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    h[j] = sh.hist[lane * 8 + j];
    s += h[j];
  }
  unsigned suffix = s;  // words in the bins of this lane and the lanes above
  for (int off = 1; off < kWarp; off <<= 1) {
    const unsigned o = __shfl_down_sync(0xffffffffu, suffix, off);
    if (lane + off < kWarp) suffix += o;
  }
  unsigned above = suffix - s;
  if (above < need && need <= suffix) {  // exactly one lane holds the digit
    for (int j = 7; j >= 0; --j) {
      if (above + h[j] >= need) {
        sh.prefix = prefix | (static_cast<uint64_t>(lane * 8 + j) << shift);
        sh.need = need - above;
        sh.done = h[j] == need - above;
        break;
      }
      above += h[j];
    }
  }
}

// Keeps the k largest of the `count` words in sh.cand (stable, in place); the evicted ones go to
// the caller's tail sum. Returns the smallest key kept, the new threshold. Called by the whole
// block; leaves sh.pos = k.
template <typename scalar_t>
__device__ __forceinline__ uint32_t compact(FilterShared& sh, unsigned count, unsigned k,
                                        float inv_tau, SoftmaxState<float, Acc>& st, Acc& tail) {
  constexpr int kKeyPasses = (key_bits<scalar_t, uint32_t>() + 7) / 8;
  const int tid = threadIdx.x, lane = tid & (kWarp - 1), warp = tid / kWarp;
  // ---- the k-th largest word: most significant byte first, over the bytes that can differ ----
  uint64_t prefix = 0, mask = 0;
  unsigned need = k;
  for (int p = 0; p < 8; ++p) {
    if (p >= kKeyPasses && p < 4) continue;  // key bytes the dtype leaves constant
    const int shift = 56 - 8 * p;
    for (int b = tid; b < 256; b += kFilterThreads) sh.hist[b] = 0;
    __syncthreads();
    for (unsigned i = tid; i < count; i += kFilterThreads) {
      const uint64_t c = sh.cand[i];
      if ((c & mask) == prefix) atomicAdd(&sh.hist[(c >> shift) & 0xffu], 1u);
    }
    __syncthreads();
    if (warp == 0) radix_digit(sh, prefix, need, shift, lane);
    __syncthreads();
    prefix = sh.prefix;
    need = sh.need;
    mask |= uint64_t(0xff) << shift;
    const bool done = sh.done != 0u;
    __syncthreads();  // sh.prefix, sh.need, sh.done and sh.hist are rewritten by the next pass
    if (done) break;  // every word of the digit's bin is taken
  }
  // Kept: (c & mask) >= prefix, exactly k words (words are distinct). Compact 256 at a time: a
  // kept word moves to a slot at or below its own, and every slot it may land on has been read.
  unsigned base = 0;
  uint64_t kept_min = ~uint64_t(0);
  for (unsigned i0 = 0; i0 < count; i0 += kFilterThreads) {
    const unsigned i = i0 + tid;
    const bool in = i < count;
    const uint64_t c = in ? sh.cand[i] : 0;
    const bool keep = in && (c & mask) >= prefix;
    if (in && !keep) {
      const float a[1] = {math::mul_rn(candidate_value(c), inv_tau)};
      fold_with_tail<1, true>(st, tail, a, 1u);
    }
    if (keep) kept_min = c < kept_min ? c : kept_min;
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) sh.warp_count[warp] = __popc(ballot);
    __syncthreads();
    unsigned at = base + __popc(ballot & ((1u << lane) - 1u));
    for (int w = 0; w < kFilterWarps; ++w) {
      if (w < warp) at += sh.warp_count[w];
      base += sh.warp_count[w];
    }
    if (keep) sh.cand[at] = c;
    __syncthreads();  // sh.warp_count is rewritten by the next slice
  }
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const uint64_t o = __shfl_down_sync(0xffffffffu, kept_min, off);
    kept_min = o < kept_min ? o : kept_min;
  }
  if (lane == 0) sh.mins[warp] = kept_min;
  if (tid == 0) sh.pos = base;
  __syncthreads();
  for (int w = 0; w < kFilterWarps; ++w) kept_min = sh.mins[w] < kept_min ? sh.mins[w] : kept_min;
  return static_cast<uint32_t>(kept_min >> 32);
}

// W consecutive elements of a row, as read (one 16-byte load when W > 1).
template <int W, typename scalar_t>
__device__ __forceinline__ Pack<scalar_t, W> load_group(const scalar_t* p) {
  if constexpr (sizeof(Pack<scalar_t, W>) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    Pack<scalar_t, W> pk;
    memcpy(&pk, &raw, 16);
    return pk;
  } else {
    return *reinterpret_cast<const Pack<scalar_t, W>*>(p);
  }
}

// One thread's part of a tile: W elements from column j0 (`valid` of them in the row); pushes the
// candidates and records the warp's count in sh.pushed[parity].
template <int W, typename scalar_t>
__device__ __forceinline__ void filter_tile(FilterShared& sh, const Pack<scalar_t, W>& pk,
                                            int j0, int valid, uint32_t threshold,
                                            float inv_tau, int parity,
                                            SoftmaxState<float, Acc>& st, Acc& tail) {
  const int lane = threadIdx.x & (kWarp - 1), warp = threadIdx.x / kWarp;
  float a[W];
  unsigned take = 0, to_tail = 0;
#pragma unroll
  for (int j = 0; j < W; ++j) {
    const float x = j < valid ? static_cast<float>(pk.v[j]) : 0.f;
    a[j] = j < valid ? math::mul_rn(x, inv_tau) : math::neg_inf<float>();
    const bool t = j < valid && rank_key(x) > threshold;
    take |= unsigned(t) << j;
    to_tail |= unsigned(j < valid && !t) << j;
  }
  fold_with_tail<W>(st, tail, a, to_tail);
  // Push: one atomic per warp, each lane's words at its offset among the warp's. After the
  // first tiles few warps push at all, so the ballots and keys are taken again rather than held
  // in registers (the bf16 kernel spilled with them).
  const unsigned total = __popc(__ballot_sync(0xffffffffu, take != 0)) == 0 ? 0u : [&] {
    unsigned n = 0;
#pragma unroll
    for (int j = 0; j < W; ++j) n += __popc(__ballot_sync(0xffffffffu, (take >> j) & 1u));
    return n;
  }();
  if (total != 0) {  // uniform over the warp
    unsigned at = 0;
    if (lane == 0) at = atomicAdd(&sh.pos, total);
    at = __shfl_sync(0xffffffffu, at, 0);
    const unsigned below = (1u << lane) - 1u;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const unsigned ballot = __ballot_sync(0xffffffffu, (take >> j) & 1u);
      if ((take >> j) & 1u) {
        const uint32_t key = rank_key(static_cast<float>(pk.v[j]));
        sh.cand[at + __popc(ballot & below)] = candidate(key, j0 + j);
      }
      at += __popc(ballot);
    }
  }
  if (lane == 0) sh.pushed[parity][warp] = total;
}

// Streams a row in tiles of W elements per thread (W = 1 where the row is not 16-byte aligned),
// then its last V % W elements one per thread. Each thread's next group is loaded before the
// current one is filtered, so a load is in flight across the tile's barrier.
template <int W, typename scalar_t>
__device__ __forceinline__ void filter_row(FilterShared& sh, const scalar_t* t_row, int V,
                                           unsigned k, float inv_tau,
                                           SoftmaxState<float, Acc>& st, Acc& tail) {
  // Column indices fit int: the host sends rows of at most filter_max_v columns.
  const int whole = V / W;                                        // W-wide groups
  const int wide = (whole + kFilterThreads - 1) / kFilterThreads;  // tiles of groups
  const int tiles = wide + (V % W != 0);  // and a last one of single elements
  unsigned count = 0;                     // words in sh.cand (the same in every thread)
  // Keys above it enter. Every key does until the first compaction: no element has key 0 (it
  // would be a NaN, which ranks as +inf).
  uint32_t threshold = 0;
  int g = threadIdx.x;  // this thread's group in the current tile
  Pack<scalar_t, W> cur{};
  if (g < whole) cur = load_group<W>(t_row + g * W);
  for (int t = 0; t < tiles; ++t) {
    __syncthreads();  // the last tile's pushes and counts are in (sh.pos = 0 for t = 0)
    if (t > 0) {
      for (int w = 0; w < kFilterWarps; ++w) count += sh.pushed[(t - 1) & 1][w];
    }
    const int width = t < wide ? W : 1;
    if (count + unsigned(kFilterThreads * width) > unsigned(kFilterCap)) {
      threshold = compact<scalar_t>(sh, count, k, inv_tau, st, tail);
      count = k;
    }
    if (t < wide) {
      const int next = g + kFilterThreads;
      Pack<scalar_t, W> nxt{};
      if (next < whole) nxt = load_group<W>(t_row + next * W);
      filter_tile<W>(sh, cur, g * W, g < whole ? W : 0, threshold, inv_tau, int(t & 1), st, tail);
      cur = nxt;
      g = next;
    } else {
      const int j = whole * W + threadIdx.x;
      Pack<scalar_t, 1> one{};
      if (j < V) one = load_group<1>(t_row + j);
      filter_tile<1>(sh, one, j, j < V ? 1 : 0, threshold, inv_tau, int(t & 1), st, tail);
    }
  }
  __syncthreads();
  if (tiles > 0) {
    for (int w = 0; w < kFilterWarps; ++w) count += sh.pushed[(tiles - 1) & 1][w];
  }
  if (count > k) compact<scalar_t>(sh, count, k, inv_tau, st, tail);
}

// Sorts sh.cand[0, k) descending (bitonic over the next power of two, padded with 0, a word no
// element has: the key 0 would be a NaN, which ranks as +inf).
__device__ __forceinline__ void sort_winners(FilterShared& sh, unsigned k) {
  unsigned p = 1;
  while (p < k) p <<= 1;
  for (unsigned i = k + threadIdx.x; i < p; i += kFilterThreads) sh.cand[i] = 0;
  __syncthreads();
  for (unsigned size = 2; size <= p; size <<= 1) {
    for (unsigned stride = size / 2; stride > 0; stride >>= 1) {
      for (unsigned i = threadIdx.x; i < p / 2; i += kFilterThreads) {
        const unsigned lo = 2 * stride * (i / stride) + (i % stride), hi = lo + stride;
        const bool desc = (lo & size) == 0;
        const uint64_t x = sh.cand[lo], y = sh.cand[hi];
        if ((x < y) == desc) {
          sh.cand[lo] = y;
          sh.cand[hi] = x;
        }
      }
      __syncthreads();
    }
  }
}

// The state of all the block's threads (kWarps warps), in every thread: butterflies within each
// warp, then each thread merges the warps' states from `slots` (kWarps entries of shared memory;
// the first barrier lets earlier readers of them finish).
template <int kWarps, typename M>
__device__ __forceinline__ SoftmaxState<M, Acc> block_state(SoftmaxState<M, Acc> st,
                                                            SoftmaxState<M, Acc>* slots) {
  for (int off = kWarp / 2; off > 0; off >>= 1) st = merge(st, shfl_state(st, off));
  __syncthreads();
  if ((threadIdx.x & (kWarp - 1)) == 0) slots[threadIdx.x / kWarp] = st;
  __syncthreads();
  SoftmaxState<M, Acc> r = slots[0];
  for (int w = 1; w < kWarps; ++w) r = merge(r, slots[w]);
  return r;
}

// log sum exp(x / tau) over the row's elements whose word is below `kth` (the k-th best's: outside
// the top-k), relative to their own max; the whole block calls it, and every thread gets the sum.
template <typename scalar_t>
__device__ __forceinline__ double refit_tail(FilterShared& sh, const scalar_t* t_row, int V,
                                            uint64_t kth, float inv_tau) {
  SoftmaxState<float, Acc> st = SoftmaxState<float, Acc>::empty();
  for (int j = threadIdx.x; j < V; j += kFilterThreads) {
    const float x = static_cast<float>(t_row[j]);
    if (candidate(rank_key(x), j) < kth) st.add(math::mul_rn(x, inv_tau));
  }
  return block_state<kFilterWarps>(st, sh.states).lse();
}

// 4 blocks an SM for 16-bit rows (64 registers, no spill on sm_90), 3 for fp32, whose kernel
// spilled 4 bytes under the 64-register cap.
template <typename scalar_t>
__global__ void __launch_bounds__(kFilterThreads, sizeof(scalar_t) == 2 ? 4 : 3)
    topk_filter_kernel(const TeacherArgs A, const bool vec) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  __shared__ FilterShared sh;
  const int tid = threadIdx.x, lane = tid & (kWarp - 1), warp = tid / kWarp;
  const unsigned k = static_cast<unsigned>(A.k);
  const float inv_tau = static_cast<float>(A.inv_tau);
  for (int64_t row = blockIdx.x; row < A.n; row += gridDim.x) {
    const scalar_t* t_row = static_cast<const scalar_t*>(A.teacher) + row * A.stride_t;
    if (tid == 0) sh.pos = 0;
    SoftmaxState<float, Acc> st = SoftmaxState<float, Acc>::empty();
    Acc tail = 0.0;
    if (vec) {
      filter_row<kVec>(sh, t_row, static_cast<int>(A.v), k, inv_tau, st, tail);
    } else {
      filter_row<1>(sh, t_row, static_cast<int>(A.v), k, inv_tau, st, tail);
    }
    sort_winners(sh, k);
    // ---- the row's normalizer and tail: warp, then block (every thread merges alike) ----
    for (int off = kWarp / 2; off > 0; off >>= 1) {
      const SoftmaxState<float, Acc> o = shfl_state(st, off);  // dense_kernels.cuh (xor)
      const Acc ot = __shfl_xor_sync(0xffffffffu, tail, off);
      Acc fx, fy;
      st = merge(st, o, fx, fy);
      tail = scaled(tail, fx) + scaled(ot, fy);
    }
    if (lane == 0) {
      sh.states[warp] = st;
      sh.tails[warp] = tail;
    }
    __syncthreads();
    SoftmaxState<float, Acc> r = sh.states[0];
    Acc zt = sh.tails[0];
    for (int w = 1; w < kFilterWarps; ++w) {
      Acc fx, fy;
      r = merge(r, sh.states[w], fx, fy);
      zt = scaled(zt, fx) + scaled(sh.tails[w], fy);
    }
    const float m = r.m == math::neg_inf<float>() ? 0.f : r.m;  // the shift, as the CPU kernel
    const double log_z = ::log(r.z);
    for (unsigned j = tid; j < k; j += kFilterThreads) {
      const uint64_t c = sh.cand[j];
      const float a = math::mul_rn(candidate_value(c), inv_tau);
      const int64_t o = row * A.k + j;
      A.ids[o] = candidate_id(c);
      // (a - m) - log z, as LogNormalizer: exact near the max
      A.logprobs[o] = static_cast<float>((static_cast<double>(a) - static_cast<double>(m)) - log_z);
    }
    double log_tail = ::log(zt);  // relative to exp(m); the same in every thread
    if (log_tail < kTailRefitLog && k < A.v) {
      log_tail = refit_tail(sh, t_row, static_cast<int>(A.v), sh.cand[k - 1], inv_tau) -
                 static_cast<double>(m);
    }
    if (tid == 0) A.tail[row] = static_cast<float>(log_tail - log_z);
    __syncthreads();  // sh is reused by the next row
  }
}

}  // namespace cuda
}  // namespace distill_ops
