// CPU kernel of sparse_forward (backends/reference_sparse.py is the contract): rows in parallel,
// each row in two streaming passes over the student logits, as the Triton kernel does:
//
//   pass 1  online normalizer of a = s / tau (and of s for the hard-label term when tau != 1; and,
//           in tail mode, the sum outside K: the chunk's kept exponentials at columns whose
//           target bit is clear, so a student sure of K still gets its tail mass, where
//           1 - Q_K would round to 0; summed again relative to its own max when it is too far
//           below the row max for the kept exponentials: tail_refit.h);
//   slots   gather the k student logits at the target ids and run the row algebra of
//           csrc/include/distill_ops/sparse_math.h (in double): loss, C, the per-slot gradients and
//           the coefficient of the dense part outside the support;
//   pass 2  (gradient) the k target columns' gradients are computed first (they need the student
//           logits at the ids), then soft_scale * c_out * exp(a_j - lse_out) (+ the hard-label
//           term) is written over the row, then the k target columns are overwritten (ids are
//           unique in a row).
//
// Pass 1 keeps the row's exponentials exp(a_j - shift) (shift: the running max at the chunk), so
// that pass 2 writes exp(a_j - lse_out) as one multiply by a chunk factor exp(shift - lse_out):
// one exponential per element instead of two (as the dense kernel's RowStash).
//
// No probability tensor; the gradient is written in the forward and scaled in the backward. The
// gradient may be the student tensor itself (inplace_grad): every student value is read before
// the column holding it is written.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "../sparse_op.h"
#include "cpu_common.h"
#include "distill_ops/online_softmax.h"
#include "distill_ops/sparse_args.h"
#include "distill_ops/sparse_math.h"
#include "distill_ops/tail_refit.h"

namespace distill_ops {
namespace cpu {

namespace {

template <typename T>
struct SparseBuffers {
  alignas(64) T x[kChunk];  // raw student logits
  alignas(64) T a[kChunk];  // x / tau (scaled_chunk)
  alignas(64) T g[kChunk];
  std::vector<double> q, qg, a_k, g_k;  // per slot
  std::vector<T> ea;                    // the row's exp(a - shift), kept by pass 1 (with a grad)
  std::vector<double> shift;            // per chunk (-inf while the running max was -inf)
  SparseBuffers(int64_t k, int64_t v, bool grad)
      : q(k), qg(k), a_k(k), g_k(k), ea(grad ? static_cast<size_t>(v) : 0),
        shift(static_cast<size_t>((v + kChunk - 1) / kChunk)) {}
};

// sum of e[0, n) over the columns c0 + i that are not targets (bit clear in the row's bit set; c0
// is a multiple of 32), in double.
template <typename T>
DOPS_INLINE double sum_outside(const T* __restrict__ e, const uint32_t* __restrict__ bits,
                               int64_t c0, int64_t n) {
  double z = 0.0;
  for (int64_t w0 = 0; w0 < n; w0 += 32) {
    const uint32_t word = bits[(c0 + w0) >> 5];
    const int64_t m = n - w0 < 32 ? n - w0 : 32;
    if (word == 0) {
      DOPS_SIMD_SUM(z)
      for (int64_t i = 0; i < m; ++i) z += static_cast<double>(e[w0 + i]);
    } else {
      for (int64_t i = 0; i < m; ++i) {
        if (!((word >> i) & 1u)) z += static_cast<double>(e[w0 + i]);
      }
    }
  }
  return z;
}

// The logsumexp of a = s / tau over the columns outside the targets, each chunk relative to its
// own max there: the tail mode's sum when the kept exponentials (relative to the row's running
// max) underflowed (tail_refit.h). Returns the online state of those columns.
template <typename scalar_t, typename T>
DOPS_INLINE SoftmaxState<double> outside_state(const scalar_t* s_row, const uint32_t* bits,
                                               int64_t V, T inv_tau, SparseBuffers<T>& B) {
  SoftmaxState<double> st = SoftmaxState<double>::empty();
  auto outside = [&](int64_t j) { return !((bits[j >> 5] >> (j & 31)) & 1u); };
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = V - c0 < kChunk ? V - c0 : kChunk;
    const T* a = scaled_chunk(chunk_as(s_row + c0, n, B.x), inv_tau, n, B.a);
    fold_where(st, a, n, [&](int64_t i) { return outside(c0 + i); });
  }
  return st;
}

// Fold x[0, n) (already scaled) into the online state; with `keep`, the exponentials
// exp(x - shift) are stored there. Returns their shift (kept_shift).
template <typename T>
DOPS_INLINE double fold(SoftmaxState<double>& st, const T* __restrict__ x, int64_t n,
                        T* __restrict__ keep = nullptr) {
  T cm = math::neg_inf<T>();
  DOPS_SIMD_MAX(cm)
  for (int64_t i = 0; i < n; ++i) cm = x[i] > cm ? x[i] : cm;
  // NaN: `>` drops it from the max, but exp(NaN - shift) makes z NaN below.
  const T shift = static_cast<T>(st.raise(static_cast<double>(cm)));
  st.z += sum_exp(x, shift, n, keep);
  return kept_shift(st, shift);
}

// Force-inlined (as every step below the clone entry points): a function that is not inlined
// into the DOPS_CPU_CLONES entry points is compiled once, for the baseline ISA.
template <typename scalar_t, typename T, int DIV>
DOPS_INLINE void sparse_row(const SparseArgs& A, int64_t row, SparseBuffers<T>& B) {
  using C = Convert<scalar_t, T>;
  const int64_t V = A.v, K = A.k;
  const scalar_t* s_row = static_cast<const scalar_t*>(A.student) + row * A.stride_s;
  scalar_t* g_row = A.grad != nullptr ? static_cast<scalar_t*>(A.grad) + row * A.stride_g : nullptr;
  const int32_t* ids = A.ids + row * K;
  auto weight = [&](int64_t i) {
    return A.fp64 ? static_cast<const double*>(A.logprobs)[row * K + i]
                  : static_cast<double>(static_cast<const float*>(A.logprobs)[row * K + i]);
  };
  auto store_loss = [&](double v) {
    if (A.fp64) {
      static_cast<double*>(A.loss)[row] = v;
    } else {
      static_cast<float*>(A.loss)[row] = static_cast<float>(v);
    }
  };
  double scale = 1.0;
  if (A.grad_scale != nullptr) {
    scale = A.fp64 ? *static_cast<const double*>(A.grad_scale)
                   : static_cast<double>(*static_cast<const float*>(A.grad_scale));
  }

  int64_t label = -1;
  if (A.labels != nullptr) {
    label = A.labels[row];
    if (label == A.ignore_index) {
      store_loss(0.0);
      if (g_row != nullptr) {
        const scalar_t zero = C::store(T(0));
        for (int64_t j = 0; j < V; ++j) g_row[j] = zero;
      }
      return;
    }
  }
  const bool hard = A.labels != nullptr && A.hard_coef != 0.0;
  const bool ce_own = hard && A.temperature != 1.0;
  const T inv_tau = static_cast<T>(1.0 / A.temperature);

  // ---- pass 1: normalizers ----
  SoftmaxState<double> sa = SoftmaxState<double>::empty();
  SoftmaxState<double> s1 = SoftmaxState<double>::empty();
  const uint32_t* bits = A.mode == kModeTail ? A.target_bits + row * ((V + 31) / 32) : nullptr;
  sparse::LseAcc outside;  // tail mode: logsumexp of a over the columns outside K
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = V - c0 < kChunk ? V - c0 : kChunk;
    const T* x = chunk_as(s_row + c0, n, B.x);
    // (without a gradient the tail mode keeps the chunk's exponentials in the g scratch)
    T* keep = g_row != nullptr ? B.ea.data() + c0 : bits != nullptr ? B.g : nullptr;
    const double shift = fold(sa, scaled_chunk(x, inv_tau, n, B.a), n, keep);
    B.shift[c0 / kChunk] = shift;
    if (bits != nullptr && shift > -INFINITY) {
      const double z = sum_outside(keep, bits, c0, n);
      if (z != 0.0) outside.add(shift + std::log(z));  // (NaN poisons it)
    }
    if (ce_own) fold(s1, x, n);
  }
  const double lse_a = sa.lse();
  const SoftmaxState<double>& st1 = ce_own ? s1 : sa;
  const double lse_1 = st1.lse();

  // ---- the k slots ----
  sparse::LseAcc tw, sk;
  int64_t n_valid = 0;
  for (int64_t i = 0; i < K; ++i) {
    if (ids[i] < 0) continue;
    ++n_valid;
    const T a = C::load(s_row[ids[i]]) * inv_tau;
    B.a_k[i] = static_cast<double>(a);
    sk.add(B.a_k[i]);
    tw.add(A.mode == kModeTail ? weight(i) : weight(i) * A.target_scale);
  }
  const double lse_k = sk.lse();
  double tail_in = 0.0;
  if (A.tail != nullptr) {
    tail_in = A.fp64 ? static_cast<const double*>(A.tail)[row]
                     : static_cast<double>(static_cast<const float*>(A.tail)[row]);
  }
  const sparse::TeacherNorm tn =
      sparse::teacher_norm(A.mode, tw.lse(), A.tail != nullptr, tail_in, n_valid == V);
  const bool live = n_valid > 0 && tn.z > -INFINITY;
  const MixWeights<double> w = mix_weights<double>(A.divergence, A.mix);
  double soft = 0.0, c_sum = 0.0;
  for (int64_t i = 0; i < K; ++i) {
    if (ids[i] < 0) continue;
    const double lw = A.mode == kModeTail ? weight(i) : weight(i) * A.target_scale;
    const double lq = sparse::student_logprob(A.mode, B.a_k[i], lse_a, lse_k);
    double term;
    Terms<DIV, double>::eval(lq, lw - tn.z, w, B.q[i], term, B.qg[i]);
    soft += term;
    c_sum += B.qg[i];
  }
  // The tail mass too far below the row max for the kept exponentials: summed again (then pass 2
  // exponentiates outside K relative to its own normalizer, not with the kept values).
  double lse_out = outside.lse();
  SoftmaxState<double> out_st = SoftmaxState<double>::empty();
  const bool refit = bits != nullptr && n_valid < V && lse_out - sa.m < kTailRefitLog;
  if (refit) {
    out_st = outside_state(s_row, bits, V, inv_tau, B);
    lse_out = out_st.lse();
  }
  const sparse::RowFinish fin =
      sparse::finish_row<DIV>(A.mode, soft, c_sum, lse_a, lse_out, tn.lp_tail, w, live);
  double loss = A.soft_coef * fin.soft;
  if (hard) loss += A.hard_coef * (lse_1 - static_cast<double>(C::load(s_row[label])));
  store_loss(loss);
  if (g_row == nullptr) return;

  // ---- pass 2: the gradient ----
  // The dense part from the kept exponentials: soft_scale * c_out * exp(a_j - lse_out) = e_j
  // times the chunk's coef * exp(shift - lse_out), and the CE term's softmax (when it shares
  // lse_a) is e_j times hard_c * exp(shift - lse_1); exp(-inf - lse) = 0 for a chunk that was all
  // -inf. The CE term's own normalizer (tau != 1) has no kept exponentials: exponents as
  // (x - m) - offset, with m a value of the stream (exact), as LogNormalizer does.
  const double soft_scale = A.soft_coef / A.temperature;
  const double coef = soft_scale * fin.c_out * scale;
  const T m_1 = static_cast<T>(st1.m == -INFINITY ? 0.0 : st1.m);
  const T off_1 = static_cast<T>(lse_1 - static_cast<double>(m_1));
  const T hard_c = static_cast<T>(A.hard_coef * scale);
  const bool dense_soft = fin.c_out != 0.0;
  const T tau1 = ce_own ? T(1) : inv_tau;
  // refit: exp(a_j - lse_out) as (a_j - m_out) - off_out (m_out a value of the stream: exact)
  const T m_out = static_cast<T>(out_st.m == -INFINITY ? 0.0 : out_st.m);
  const T off_out = static_cast<T>(fin.lse_out - static_cast<double>(m_out));
  const T coef_t = static_cast<T>(coef);
  // The target columns first: with an in-place gradient their logits are gone after the row pass.
  for (int64_t i = 0; i < K; ++i) {
    const int64_t id = ids[i];
    if (id < 0) continue;
    double gi = soft_scale * sparse::slot_grad(B.qg[i], B.q[i], fin.c, live);
    if (hard) {
      const T x = C::load(s_row[id]);
      const double p1 = static_cast<double>(math::exp_((x * tau1 - m_1) - off_1));
      gi += A.hard_coef * (p1 - (id == label ? 1.0 : 0.0));
    }
    B.g_k[i] = gi * scale;
  }
  const bool aliased = static_cast<const void*>(g_row) == static_cast<const void*>(s_row);
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = V - c0 < kChunk ? V - c0 : kChunk;
    const double shift = B.shift[c0 / kChunk];
    const T* __restrict__ e = B.ea.data() + c0;
    T* __restrict__ g = B.g;
    // In place, the chunk is copied out before its columns are overwritten (no aliased pointers).
    const T* __restrict__ x =
        refit || (hard && ce_own) ? chunk_as(s_row + c0, n, B.x, aliased) : nullptr;
    if (dense_soft && refit) {
      const T* __restrict__ a = scaled_chunk(x, inv_tau, n, B.a);
      DOPS_SIMD
      for (int64_t i = 0; i < n; ++i) g[i] = coef_t * math::exp_((a[i] - m_out) - off_out);
    } else if (dense_soft) {
      const T f = static_cast<T>(coef * std::exp(shift - fin.lse_out));
      DOPS_SIMD
      for (int64_t i = 0; i < n; ++i) g[i] = f * e[i];
    } else {
      for (int64_t i = 0; i < n; ++i) g[i] = T(0);
    }
    if (hard && !ce_own) {
      const T f = static_cast<T>(static_cast<double>(hard_c) * std::exp(shift - lse_1));
      DOPS_SIMD
      for (int64_t i = 0; i < n; ++i) g[i] += f * e[i];
    } else if (hard) {
      DOPS_SIMD
      for (int64_t i = 0; i < n; ++i) g[i] += hard_c * math::exp_((x[i] * tau1 - m_1) - off_1);
    }
    if (hard && label >= c0 && label < c0 + n) g[label - c0] -= hard_c;
    scalar_t* __restrict__ out = g_row + c0;
    DOPS_SIMD
    for (int64_t i = 0; i < n; ++i) out[i] = C::store(g[i]);
  }
  for (int64_t i = 0; i < K; ++i) {
    if (ids[i] >= 0) g_row[ids[i]] = C::store(static_cast<T>(B.g_k[i]));
  }
}

template <typename scalar_t, typename T>
DOPS_INLINE void run_sparse_rows(const SparseArgs& A, int64_t begin, int64_t end) {
  SparseBuffers<T> buf(A.k, A.v, A.grad != nullptr);
  for (int64_t row = begin; row < end; ++row) {
    switch (A.divergence) {
      case kForwardKL: sparse_row<scalar_t, T, kForwardKL>(A, row, buf); break;
      case kReverseKL: sparse_row<scalar_t, T, kReverseKL>(A, row, buf); break;
      case kJSD: sparse_row<scalar_t, T, kJSD>(A, row, buf); break;
      case kSkewForwardKL: sparse_row<scalar_t, T, kSkewForwardKL>(A, row, buf); break;
      default: sparse_row<scalar_t, T, kSkewReverseKL>(A, row, buf); break;
    }
  }
}

DOPS_CPU_ROW_ENTRY_POINTS(sparse_rows, SparseArgs, run_sparse_rows);

}  // namespace

at::Tensor sparse_forward_cpu(const at::Tensor& student, const at::Tensor& ids,
                              const at::Tensor& logprobs, const std::optional<at::Tensor>& tail,
                              const std::optional<at::Tensor>& labels,
                              const std::optional<at::Tensor>& grad,
                              const std::optional<at::Tensor>& grad_scale, int64_t divergence,
                              double mix, int64_t mode, double temperature, double target_scale,
                              double soft_coef, double hard_coef, int64_t ignore_index,
                              const std::optional<at::Tensor>& target_bits) {
  SparseCall call = prepare_sparse_call(student, ids, logprobs, tail, labels, grad, grad_scale,
                                        divergence, mix, mode, temperature, target_scale,
                                        soft_coef, hard_coef, ignore_index, target_bits,
                                        c10::DeviceType::CPU);
  const SparseArgs& A = call.args;
  if (A.n == 0) return call.loss;
  // The kernel indexes the row with the ids and labels: check them first (cheap: N x k).
  for (int64_t i = 0; i < A.n * A.k; ++i) {
    TORCH_CHECK(A.ids[i] >= -1 && A.ids[i] < A.v, "distill_ops_native::sparse_forward: ids[",
                i / A.k, ", ", i % A.k, "] = ", A.ids[i], " is neither -1 nor in [0, ", A.v, ")");
  }
  check_labels("distill_ops_native::sparse_forward: ", A.labels, A.n, A.v, A.ignore_index);
  advise_huge_pages(grad, student);
  parallel_rows(sparse_rows, call.dtype, A, A.v);
  return call.loss;
}

}  // namespace cpu
}  // namespace distill_ops

TORCH_LIBRARY_IMPL(distill_ops_native, CPU, m) {
  m.impl("sparse_forward", &distill_ops::cpu::sparse_forward_cpu);
}
