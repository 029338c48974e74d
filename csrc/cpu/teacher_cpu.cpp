// CPU kernels of the teacher side (backends/reference_sparse.py is the contract): top-k targets and
// sampled targets, one streaming pass over each row of teacher logits, no probability tensor.
//
// Top-k: the row streams in chunks through an online normalizer; a candidate list holds the
// elements that beat the current k-th best (value descending, then id ascending; NaN ranks as
// +inf, as in the reference); when it reaches 2k it is cut back to k. Every element that is
// rejected (on arrival or at a cut) adds its exp to the tail sum at that moment, relative to the
// running max, so the tail mass is exact even when it is tiny (no 1 - sum subtraction). Once there
// has been a cut, a chunk is screened with vectorised loops (its max; the masked sum of what
// cannot enter) and only the few elements above the k-th best are handled one at a time. A tail
// too far below the row max for that sum (it underflows: tail_refit.h) is summed again at the end.
//
// Sampling: num_samples Gumbel-max races over the row on the counter-based noise of
// csrc/include/distill_ops/rng.h (the reference's bits, in the reference's dtype), started at the
// row's largest logit and skipping the columns too far below it to win (rng::kGumbelMax: exact);
// among the columns left, the (sample, column) pairs whose uniform cannot reach the races' lowest
// leader are skipped on the hash alone (rng::losing_rank: exact too), before the logs;
// then duplicates are merged and weighted as in reference_sparse.merge_draws.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../sparse_op.h"
#include "cpu_common.h"
#include "distill_ops/online_softmax.h"
#include "distill_ops/rng.h"
#include "distill_ops/sparse_args.h"
#include "distill_ops/tail_refit.h"
#include "distill_ops/topk_rank.h"

namespace distill_ops {
namespace cpu {

namespace {

// ------------------------------------------------------------------------------------------------
// top-k

template <typename T>
struct Cand {
  T value;  // the raw logit (NaN as +inf), the ranking key
  int64_t id;
};

template <typename T>
DOPS_INLINE bool better(const Cand<T>& x, const Cand<T>& y) {
  return x.value > y.value || (x.value == y.value && x.id < y.id);
}

constexpr int64_t kGroup = 64;  // the screening unit inside a chunk

template <typename scalar_t, typename T>
struct TopkRow {
  const TeacherArgs& A;
  std::vector<Cand<T>> cand;
  alignas(64) T xbuf[kChunk];  // a chunk converted to T (low-precision inputs)
  alignas(64) T e[kChunk];

  explicit TopkRow(const TeacherArgs& a) : A(a) { cand.reserve(2 * a.k + 1); }

  // Keep the k best candidates; the others' mass goes to the tail (relative to `shift`). Returns
  // the k-th best.
  DOPS_INLINE Cand<T> cut(double& zt, T shift, T inv_tau) {
    const int64_t k = A.k;
    std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), better<T>);
    for (size_t i = k; i < cand.size(); ++i) {
      const T v = cand[i].value;
      zt += static_cast<double>(math::exp_(math::mul_rn(v, inv_tau) - shift));
    }
    cand.resize(k);
    return cand[k - 1];
  }

  // Add a candidate; at 2k, cut back to k and update the k-th best. Returns whether it cut.
  DOPS_INLINE bool push(const Cand<T>& c, double& zt, T shift, T inv_tau, Cand<T>& kth) {
    cand.push_back(c);
    if (static_cast<int64_t>(cand.size()) < 2 * A.k) return false;
    kth = cut(zt, shift, inv_tau);
    return true;
  }

  // log sum exp(a) over the row's elements outside the top-k, whose k-th best is `kth`, relative
  // to the tail's own max (tail_refit.h: the streamed sum underflowed). One more read of the row.
  DOPS_INLINE double refit_tail(const scalar_t* t_row, const Cand<T>& kth, T inv_tau) {
    SoftmaxState<double> st = SoftmaxState<double>::empty();
    for (int64_t c0 = 0; c0 < A.v; c0 += kChunk) {
      const int64_t n = A.v - c0 < kChunk ? A.v - c0 : kChunk;
      const T* x = chunk_as(t_row + c0, n, xbuf);
      fold_where(st, scaled_chunk(x, inv_tau, n, e), n,
                 [&](int64_t i) { return better(kth, Cand<T>{rank_value(x[i]), c0 + i}); });
    }
    return st.lse();
  }

  DOPS_INLINE void run(int64_t row) {
    const int64_t V = A.v, k = A.k;
    const scalar_t* t_row = static_cast<const scalar_t*>(A.teacher) + row * A.stride_t;
    const T inv_tau = static_cast<T>(A.inv_tau);
    SoftmaxState<double> st = SoftmaxState<double>::empty();
    double zt = 0.0;  // the tail mass, relative to exp(st.m)
    cand.clear();
    Cand<T> kth{static_cast<T>(INFINITY), -1};  // the k-th best, once there has been a cut
    bool have_kth = false;
    for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
      const int64_t n = V - c0 < kChunk ? V - c0 : kChunk;
      const T* __restrict__ x = chunk_as(t_row + c0, n, xbuf);
      T cm = math::neg_inf<T>();
      T best = math::neg_inf<T>();  // the chunk's best ranking value
      // the scaled chunk goes to e first, the exponentials over it below (scaled_chunk: rounded
      // on their own, not contracted into the subtraction)
      DOPS_SIMD_MAX(cm, best)
      for (int64_t i = 0; i < n; ++i) {
        e[i] = x[i] * inv_tau;
        cm = e[i] > cm ? e[i] : cm;
        const T r = rank_value(x[i]);
        best = r > best ? r : best;
      }
      double factor;
      const T shift = static_cast<T>(st.raise(static_cast<double>(cm), factor));
      zt = scaled(zt, factor);
      double z = 0.0;
      DOPS_SIMD_SUM(z)
      for (int64_t i = 0; i < n; ++i) {
        e[i] = math::exp_(e[i] - shift);
        z += static_cast<double>(e[i]);
      }
      st.z += z;
      if (have_kth) {
        // Elements in later chunks lose ties to the k-th best (their ids are larger): only a
        // value above `thr` can enter. `thr` is the k-th best as the chunk starts; a cut inside
        // the chunk raises the real one, and what it then drops is tail at that cut.
        const T thr = kth.value;
        if (!(best > thr)) {  // the whole chunk is tail: almost every chunk once k are held
          zt += z;
          continue;
        }
        double zr = 0.0;
        DOPS_SIMD_SUM(zr)
        for (int64_t i = 0; i < n; ++i) {
          zr += rank_value(x[i]) > thr ? 0.0 : static_cast<double>(e[i]);
        }
        zt += zr;
        // Most chunks early in the row hold an entrant or two: screen groups of kGroup first.
        for (int64_t g0 = 0; g0 < n; g0 += kGroup) {
          const int64_t m = n - g0 < kGroup ? n - g0 : kGroup;
          T gbest = math::neg_inf<T>();
          DOPS_SIMD_MAX(gbest)
          for (int64_t j = 0; j < m; ++j) {
            const T r = rank_value(x[g0 + j]);
            gbest = r > gbest ? r : gbest;
          }
          if (!(gbest > thr)) continue;
          for (int64_t i = g0; i < g0 + m; ++i) {
            const T r = rank_value(x[i]);
            if (r > thr) push({r, c0 + i}, zt, shift, inv_tau, kth);
          }
        }
        continue;
      }
      for (int64_t i = 0; i < n; ++i) {  // until the first cut: every element enters
        const Cand<T> c{rank_value(x[i]), c0 + i};
        if (!have_kth || better(c, kth)) {
          have_kth = push(c, zt, shift, inv_tau, kth) || have_kth;
        } else {
          zt += static_cast<double>(e[i]);
        }
      }
    }
    const T shift = static_cast<T>(st.m == -INFINITY ? 0.0 : st.m);
    if (static_cast<int64_t>(cand.size()) > k) cut(zt, shift, inv_tau);
    std::sort(cand.begin(), cand.end(), better<T>);
    const double log_z = std::log(st.z);
    for (int64_t i = 0; i < k; ++i) {
      const int64_t id = cand[i].id;
      const T a = Convert<scalar_t, T>::load(t_row[id]) * inv_tau;
      // (a - m) - log z, as LogNormalizer: exact near the max
      A.ids[row * k + i] = static_cast<int32_t>(id);
      A.logprobs[row * k + i] =
          static_cast<float>((static_cast<double>(a) - static_cast<double>(shift)) - log_z);
    }
    double log_tail = std::log(zt);  // relative to exp(shift)
    if (log_tail < kTailRefitLog && k < V) {
      log_tail = refit_tail(t_row, cand[k - 1], inv_tau) - static_cast<double>(shift);
    }
    A.tail[row] = static_cast<float>(log_tail - log_z);
  }
};

template <typename scalar_t, typename T>
DOPS_INLINE void topk_rows(const TeacherArgs& A, int64_t begin, int64_t end) {
  TopkRow<scalar_t, T> r(A);
  for (int64_t row = begin; row < end; ++row) r.run(row);
}

// ------------------------------------------------------------------------------------------------
// sampling

// One sample's race over a candidate column: a higher score, or the same score at a lower id.
template <typename T>
DOPS_INLINE void race(T score, int64_t j, T& best, int64_t& best_id) {
  if (score > best || (score == best && j < best_id)) {
    best = score;
    best_id = j;
  }
}

template <typename scalar_t, typename T>
DOPS_INLINE void sample_rows(const TeacherArgs& A, int64_t begin, int64_t end) {
  const int64_t V = A.v, S = A.k;
  const T inv_prop = static_cast<T>(A.inv_prop);
  const T delta = static_cast<T>(A.delta);
  const T gmax = static_cast<T>(rng::kGumbelMax);
  std::vector<uint32_t> skey(S);
  std::vector<T> best(S), x_at(S), lw(S);
  std::vector<int64_t> best_id(S), order(S);
  std::vector<char> first(S);
  alignas(64) T a[kChunk];
  alignas(64) uint32_t lose[kChunk];  // pass 2: the chunk's losing ranks (rng::losing_rank)
  alignas(64) uint32_t vk[kChunk];  // and vocabulary keys
  const auto scaled_chunk = [&](const scalar_t* t_row, int64_t c0, int64_t n) {
    load_chunk(t_row + c0, n, a);
    T cmax = math::neg_inf<T>();  // NaN ignored: a NaN score never wins
    DOPS_SIMD_MAX(cmax)
    for (int64_t i = 0; i < n; ++i) {
      a[i] = a[i] * inv_prop;
      cmax = a[i] > cmax ? a[i] : cmax;
    }
    return cmax;
  };
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* t_row = static_cast<const scalar_t*>(A.teacher) + row * A.stride_t;
    const uint32_t rk = rng::row_key(A.seed_key, row);
    // Pass 1: the largest a_j and its first column jm. Every sample's score at jm bounds its
    // winner's from below, so the race starts there and pass 2 skips every column j with
    // a_j + kGumbelMax below the bound (most of a peaked row).
    T amax = math::neg_inf<T>();
    int64_t jm = 0;
    for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
      const int64_t n = V - c0 < kChunk ? V - c0 : kChunk;
      const T cmax = scaled_chunk(t_row, c0, n);
      if (cmax > amax) {
        int64_t i = 0;
        while (a[i] != cmax) ++i;
        amax = cmax;
        jm = c0 + i;
      }
    }
    const uint32_t vk_m = rng::vocab_key(jm);
    for (int64_t s = 0; s < S; ++s) {
      skey[s] = rng::sample_key(rk, s);
      // The same score the scan would compute at jm (amax is a_jm, rounded as a chunk's a[i]).
      best[s] = amax + rng::gumbel<T>(skey[s], vk_m);
      best_id[s] = jm;
    }
    // Nothing beats -inf when every a_j is -inf or NaN: every sample keeps column 0 (the CPU,
    // CUDA and reference kernels agree).
    if (amax == math::neg_inf<T>()) {
      for (int64_t s = 0; s < S; ++s) best_id[s] = 0;
    } else {
      // Pass 2: the columns that can still win some sample (a_j + kGumbelMax >= the lowest best).
      T floor_best = *std::min_element(best.begin(), best.end());
      for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
        const int64_t n = V - c0 < kChunk ? V - c0 : kChunk;
        const T cmax = scaled_chunk(t_row, c0, n);
        if (!(cmax + gmax >= floor_best)) continue;
        // Ranks below lose[i] cannot lift column i to floor_best (<= every best): for most
        // (sample, column) pairs of a flat row the integer hash decides, in loops vectorised over
        // the chunk, and only the few pairs left pay for the two logs. A column far below
        // floor_best still passes its top 84 ranks (losing_rank's 1 - 1e-5 margin): the race
        // loop's kGumbelMax test drops those. A NaN column has lose = 0 and races, where a NaN
        // score never wins.
        DOPS_SIMD
        for (int64_t i = 0; i < n; ++i) {
          vk[i] = rng::vocab_key(c0 + i);
          lose[i] = rng::losing_rank(a[i], floor_best);
        }
        for (int64_t s = 0; s < S; ++s) {
          if (cmax + gmax < best[s]) continue;
          const uint32_t sk = skey[s];
          int32_t live = 0;
          DOPS_SIMD_SUM(live)
          for (int64_t i = 0; i < n; ++i) live += rng::uniform_rank(sk, vk[i]) >= lose[i] ? 1 : 0;
          if (live == 0) continue;
          for (int64_t i = 0; i < n; ++i) {
            const uint32_t k = rng::uniform_rank(sk, vk[i]);
            if (k < lose[i] || a[i] + gmax < best[s]) continue;
            race(a[i] + rng::gumbel_of<T>(rng::uniform_of_rank(k)), c0 + i, best[s], best_id[s]);
          }
        }
        floor_best = *std::min_element(best.begin(), best.end());
      }
    }
    if (A.draws != nullptr) {  // teacher_sample_draws: the caller merges
      for (int64_t s = 0; s < S; ++s) A.draws[row * S + s] = best_id[s];
      continue;
    }
    // Merge duplicates: the first draw of each id carries log(count) + (x - x_max) * delta,
    // relative to the largest drawn logit (reference_sparse.merge_draws says why).
    T x_max = math::neg_inf<T>();
    for (int64_t s = 0; s < S; ++s) {
      x_at[s] = Convert<scalar_t, T>::load(t_row[best_id[s]]);
      x_max = x_at[s] > x_max ? x_at[s] : x_max;
    }
    T mx = math::neg_inf<T>();
    for (int64_t s = 0; s < S; ++s) {
      int64_t count = 0;
      bool is_first = true;
      for (int64_t r = 0; r < S; ++r) {
        if (best_id[r] == best_id[s]) {
          ++count;
          if (r < s) is_first = false;
        }
      }
      first[s] = is_first;
      lw[s] = is_first ? std::log(static_cast<T>(count)) + math::mul_rn(x_at[s] - x_max, delta)
                       : math::neg_inf<T>();
      mx = lw[s] > mx ? lw[s] : mx;
    }
    T z = T(0);
    for (int64_t s = 0; s < S; ++s) z += std::exp(lw[s] - mx);
    const T lse = mx + std::log(z);
    for (int64_t s = 0; s < S; ++s) {
      order[s] = s;
      lw[s] = first[s] ? lw[s] - lse : math::neg_inf<T>();
    }
    // weight descending, then id ascending; merged duplicates (padding) last
    std::sort(order.begin(), order.end(), [&](int64_t p, int64_t q) {
      if (first[p] != first[q]) return first[p] > first[q];
      if (!first[p]) return p < q;
      if (lw[p] != lw[q]) return lw[p] > lw[q];
      return best_id[p] < best_id[q];
    });
    for (int64_t s = 0; s < S; ++s) {
      const int64_t o = order[s];
      A.ids[row * S + s] = first[o] ? static_cast<int32_t>(best_id[o]) : -1;
      A.logprobs[row * S + s] = first[o] ? static_cast<float>(lw[o]) : -INFINITY;
    }
    A.tail[row] = -INFINITY;
  }
}

DOPS_CPU_ROW_ENTRY_POINTS(topk_entry, TeacherArgs, topk_rows);
DOPS_CPU_ROW_ENTRY_POINTS(sample_entry, TeacherArgs, sample_rows);

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_teacher(TeacherCall& call,
                                                           const RowEntryPoints<TeacherArgs>& rows) {
  const TeacherArgs& A = call.args;
  if (A.n > 0) parallel_rows(rows, call.dtype, A, A.v * (A.k > 8 ? 2 : 1));
  return {call.ids, call.logprobs, call.tail};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> teacher_topk_cpu(const at::Tensor& teacher,
                                                                int64_t k, double temperature) {
  TeacherCall call = prepare_topk_call(teacher, k, temperature, c10::DeviceType::CPU);
  return run_teacher(call, topk_entry);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> teacher_sample_cpu(const at::Tensor& teacher,
                                                                  int64_t num_samples,
                                                                  double inv_prop, double delta,
                                                                  int64_t seed_key) {
  const char* op = "distill_ops_native::teacher_sample: ";
  TORCH_CHECK(std::isfinite(delta), op, "delta must be finite, got ", delta);
  TeacherCall call = prepare_sample_call(op, teacher, num_samples, inv_prop, seed_key,
                                         /*draws_only=*/false, c10::DeviceType::CPU);
  call.args.delta = delta;
  return run_teacher(call, sample_entry);
}

at::Tensor teacher_sample_draws_cpu(const at::Tensor& teacher, int64_t num_samples,
                                    double inv_prop, int64_t seed_key) {
  TeacherCall call = prepare_sample_call("distill_ops_native::teacher_sample_draws: ", teacher,
                                         num_samples, inv_prop, seed_key, /*draws_only=*/true,
                                         c10::DeviceType::CPU);
  return std::get<0>(run_teacher(call, sample_entry));
}

}  // namespace cpu
}  // namespace distill_ops

TORCH_LIBRARY_IMPL(distill_ops_native, CPU, m) {
  m.impl("teacher_topk", &distill_ops::cpu::teacher_topk_cpu);
  m.impl("teacher_sample", &distill_ops::cpu::teacher_sample_cpu);
  m.impl("teacher_sample_draws", &distill_ops::cpu::teacher_sample_draws_cpu);
}
