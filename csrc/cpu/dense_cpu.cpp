// CPU kernels of dense_forward (backends/base.py contract): rows in parallel (at::parallel_for),
// each row streamed in chunks of kChunk elements held in L1-sized buffers, in two or three passes:
//
//   pass 1  normalizers: online (max, sum exp) of a = s'/tau, b = t'/tau (and of s' for the CE
//           term when tau != 1); for reverse KL also sum exp(a - m) (a - b), which gives its loss
//           R = C before any gradient is written;
//   pass 2  the loss terms; the gradient too where C is known (forward KL C = -1, reverse KL C = R);
//           for the mixtures (JSD, skew KL) C = sum qg is accumulated instead;
//   pass 3  (mixtures) the gradient.
//
// The exponentials are what these kernels spend their time on (the row is read from L2/L3 again,
// not from memory): pass 1 keeps the row's exp(a - shift), exp(b - shift) (RowStash), and pass 2
// gets q and p from them with one multiply, instead of two more exponentials per element. For the
// mixtures pass 2 also keeps qg (over the teacher's exponentials, read by then), so that pass 3 is
// the gradient's arithmetic alone, without the divergence terms or the teacher.
//
// Every step is a simple loop over a chunk buffer so that the compiler vectorises it; the element
// math comes from csrc/include/distill_ops (shared with the CUDA kernels). Row totals are
// accumulated in double. A student element is always read before the gradient element at the same
// index is written, so grad may be the student tensor itself.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../dense_op.h"
#include "cpu_common.h"
#include "distill_ops/dense_args.h"
#include "distill_ops/divergence.h"
#include "distill_ops/online_softmax.h"

namespace distill_ops {
namespace cpu {

// ------------------------------------------------------------------------------------------------
// One row.

template <typename T>
struct Buffers {
  alignas(64) T x[kChunk];   // raw student logits
  alignas(64) T sp[kChunk];  // softcapped student logits s'
  alignas(64) T a[kChunk];   // s' / tau
  alignas(64) T b[kChunk];   // t' / tau
  alignas(64) T q[kChunk];
  alignas(64) T qg[kChunk];
  alignas(64) T g[kChunk];
};

// The exponentials of pass 1 for one row: e[i] = exp(x_i - shift_c) of student (a) and teacher (b),
// and per chunk c of kChunk elements its shift (-inf while the running max was -inf: every e of
// the chunk is 0), replaced after pass 1 by the factor f_c = exp(shift_c - lse) that makes
// e[i] * f_c = exp(x_i - lse), the probability. Two rows' worth of T per thread (1 MiB at
// V = 128256 in float), reused from row to row: it stays in L2/L3 between the passes.
template <typename T>
struct RowStash {
  std::vector<T> ea, eb;
  std::vector<double> fa, fb;

  explicit RowStash(int64_t v)
      : ea(static_cast<size_t>(v)), eb(static_cast<size_t>(v)),
        fa(static_cast<size_t>((v + kChunk - 1) / kChunk)), fb(fa.size()) {}

  // The chunk shifts become the probability factors, once lse is known. exp(-inf - lse) = 0; a NaN
  // lse (NaN logits) makes every factor NaN, and so q and p, as exp(x - lse) would.
  static void to_factors(std::vector<double>& f, double lse) {
    for (double& x : f) x = std::exp(x - lse);
  }
};

template <typename scalar_t, typename T, int DIV>
class RowKernel {
 public:
  RowKernel(const DenseArgs& args, const LossConsts<T>& k, T scale, Buffers<T>& buf,
            RowStash<T>& stash)
      : A(args), K(k), scale_(scale), B(buf), S(stash) {}

  DOPS_INLINE void run(int64_t row) {
    const int64_t V = A.v;
    s_row_ = static_cast<const scalar_t*>(A.student) + row * A.stride_s;
    t_row_ = static_cast<const scalar_t*>(A.teacher) + row * A.stride_t;
    g_row_ = K.need_grad ? static_cast<scalar_t*>(A.grad) + row * A.stride_g : nullptr;
    T* loss_out = static_cast<T*>(A.loss);

    label_ = -1;
    if (K.has_labels) {
      label_ = A.labels[row];
      if (label_ == A.ignore_index) {
        loss_out[row] = T(0);
        if (g_row_ != nullptr) {
          const scalar_t zero = Convert<scalar_t, T>::store(T(0));
          for (int64_t j = 0; j < V; ++j) g_row_[j] = zero;
        }
        return;
      }
    }
    // The labelled logit, read before any gradient is written (grad may alias the student).
    T s_label = T(0);
    if (K.hard) {
      s_label = Convert<scalar_t, T>::load(s_row_[label_]);
      if (K.cap_on) s_label = softcap(s_label, K.cap, K.inv_cap);
    }

    // ---- pass 1: normalizers ----
    SoftmaxState<double> sa = SoftmaxState<double>::empty();
    SoftmaxState<double> sb = SoftmaxState<double>::empty();
    SoftmaxState<double> s1 = SoftmaxState<double>::empty();
    double wa = 0.0;  // reverse KL: sum exp(a - m_a) (a - b)
    for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
      const int64_t n = V - c0 < kChunk ? V - c0 : kChunk;
      load(c0, n);
      if (K.soft) {
        S.fa[c0 / kChunk] = accumulate<DIV == kReverseKL>(sa, wa, B.a, B.b, n, S.ea.data() + c0);
        S.fb[c0 / kChunk] = accumulate<false>(sb, wa, B.b, B.b, n,
                                              Terms<DIV, T>::kUsesP ? S.eb.data() + c0 : nullptr);
      }
      if (K.ce_own_lse) accumulate<false>(s1, wa, sp_, sp_, n);
    }
    if (K.soft) {
      RowStash<T>::to_factors(S.fa, sa.lse());
      if (Terms<DIV, T>::kUsesP) RowStash<T>::to_factors(S.fb, sb.lse());
    }
    na_ = normalizer<T>(sa);
    nb_ = normalizer<T>(sb);
    n1_ = K.ce_own_lse ? normalizer<T>(s1) : na_;
    c_ = DIV == kForwardKL ? T(-1)
         : DIV == kReverseKL ? static_cast<T>(reverse_kl_from_states(sa, wa, sb))
                             : T(0);

    // ---- pass 2: loss (+ gradient when C is known, + C for the mixtures) ----
    const bool grad_now = K.need_grad && !needs_c_pass(DIV);
    double loss = 0.0, c_sum = 0.0;
    for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
      const int64_t n = V - c0 < kChunk ? V - c0 : kChunk;
      load(c0, n);
      if (K.soft) {
        if (grad_now) {
          loss += terms<true, false, false>(c0, n, c_sum);
        } else if (K.need_grad) {  // a mixture: C, and qg kept for pass 3
          loss += terms<false, true, true>(c0, n, c_sum);
        } else {
          loss += terms<false, needs_c_pass(DIV), false>(c0, n, c_sum);
        }
      }
      if (grad_now) write_grad(c0, n);
    }
    if (needs_c_pass(DIV)) c_ = static_cast<T>(c_sum);

    double total = K.soft ? static_cast<double>(K.soft_coef) * loss : 0.0;
    if (K.hard) {
      const double lse_1 = K.ce_own_lse ? s1.lse() : sa.lse();
      total += static_cast<double>(K.hard_coef) * (lse_1 - static_cast<double>(s_label));
    }
    loss_out[row] = static_cast<T>(total);

    // ---- pass 3: gradient of the mixtures ----
    if (K.need_grad && needs_c_pass(DIV)) {
      for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
        const int64_t n = V - c0 < kChunk ? V - c0 : kChunk;
        // the raw student only where write_grad reads it: the softcap's derivative, the CE term's
        // own softmax
        if (K.cap_on || K.ce_own_lse) load(c0, n, /*teacher=*/false);
        if (K.soft) {  // q from the kept exponentials, qg kept by pass 2
          const T fa = static_cast<T>(S.fa[c0 / kChunk]);
          const T* __restrict__ ea = S.ea.data() + c0;
          const T* __restrict__ kept_qg = S.eb.data() + c0;
          DOPS_SIMD
          for (int64_t i = 0; i < n; ++i) {
            B.q[i] = ea[i] * fa;
            B.qg[i] = kept_qg[i];
          }
        }
        write_grad(c0, n);
      }
    }
  }

 private:
  // Load a chunk: a = s'/tau and (soft term) b = t'/tau, with s' = softcap(x) of the raw student
  // x. x itself is kept in B.x only where something reads it again (the softcap, the CE term's own
  // normalizer); otherwise the scaling is fused with the load (one pass, no copy). Without
  // `teacher`, b is not loaded.
  DOPS_INLINE void load(int64_t c0, int64_t n, bool teacher = true) {
    using C = Convert<scalar_t, T>;
    const T inv_tau = K.inv_tau;
    const bool keep_x = K.cap_on || K.ce_own_lse || !K.soft;
    if (keep_x) {
      load_chunk(s_row_ + c0, n, B.x);
      sp_ = B.x;
      if (K.cap_on) {
        const T cap = K.cap, inv_cap = K.inv_cap;
        DOPS_SIMD
        for (int64_t i = 0; i < n; ++i) B.sp[i] = softcap(B.x[i], cap, inv_cap);
        sp_ = B.sp;
      }
      if (K.soft) {
        const T* __restrict__ sp = sp_;
        DOPS_SIMD
        for (int64_t i = 0; i < n; ++i) B.a[i] = sp[i] * inv_tau;
      }
    } else {
      const scalar_t* __restrict__ src = s_row_ + c0;
      DOPS_SIMD
      for (int64_t i = 0; i < n; ++i) B.a[i] = C::load(src[i]) * inv_tau;
    }
    if (K.soft && teacher) {
      if (K.cap_on) {
        load_chunk(t_row_ + c0, n, B.b);
        const T cap = K.cap, inv_cap = K.inv_cap;
        DOPS_SIMD
        for (int64_t i = 0; i < n; ++i) B.b[i] = softcap(B.b[i], cap, inv_cap) * inv_tau;
      } else {
        const scalar_t* __restrict__ src = t_row_ + c0;
        DOPS_SIMD
        for (int64_t i = 0; i < n; ++i) B.b[i] = C::load(src[i]) * inv_tau;
      }
    }
  }

  // Fold x[0, n) into the online state; with W, also sum exp(x - m) (x - y) into w. With `keep`,
  // e = exp(x - shift) is stored there too. Returns their shift (kept_shift).
  template <bool W>
  DOPS_INLINE static double accumulate(SoftmaxState<double>& st, double& w_acc,
                                       const T* __restrict__ x, const T* __restrict__ y, int64_t n,
                                       T* __restrict__ keep = nullptr) {
    T cm = math::neg_inf<T>();
    DOPS_SIMD_MAX(cm)
    for (int64_t i = 0; i < n; ++i) cm = x[i] > cm ? x[i] : cm;
    double factor;
    const T shift = static_cast<T>(st.raise(static_cast<double>(cm), factor));
    if (W) w_acc = scaled(w_acc, factor);
    // Sums in double: in float, adding many small terms to a partial sum near 1 loses ~1e-6.
    double z = 0.0;
    if (W) {
      double w = 0.0;
      DOPS_SIMD_SUM(z, w)
      for (int64_t i = 0; i < n; ++i) {
        const T e = math::exp_(x[i] - shift);
        keep[i] = e;  // (W only in the soft term's student pass, which keeps)
        z += static_cast<double>(e);
        // a - b in double: exact, so that R = w / z - (m_a - m_b) - ... cancels exactly
        w += weighted(static_cast<double>(e), static_cast<double>(x[i]) - static_cast<double>(y[i]));
      }
      w_acc += w;
    } else {
      z = sum_exp(x, shift, n, keep);
    }
    st.z += z;
    return kept_shift(st, shift);
  }

  // Per-element divergence terms of the chunk at c0: returns the sum of the loss terms; STORE keeps
  // q and qg for the gradient in B; CSUM adds sum qg to c_sum; KEEP keeps qg in the stash, over the
  // teacher's exponentials (each read before it is overwritten). q and p from the stash (pass 1's
  // exponentials times the chunk's factor).
  template <bool STORE, bool CSUM, bool KEEP>
  DOPS_INLINE double terms(int64_t c0, int64_t n, double& c_sum) {
    const LogNormalizer<T> na = na_, nb = nb_;
    const MixWeights<T> w = K.mix;
    const T* __restrict__ a = B.a;
    const T* __restrict__ b = B.b;
    const T* __restrict__ ea = S.ea.data() + c0;
    T* __restrict__ eb = S.eb.data() + c0;
    const T fa = static_cast<T>(S.fa[c0 / kChunk]);
    const T fb = Terms<DIV, T>::kUsesP ? static_cast<T>(S.fb[c0 / kChunk]) : T(0);
    T* __restrict__ q = B.q;
    T* __restrict__ qg = B.qg;
    double lsum = 0.0, csum = 0.0;
    DOPS_SIMD_SUM(lsum, csum)
    for (int64_t i = 0; i < n; ++i) {
      T term, qgi;
      const T qi = ea[i] * fa;
      const T pi = Terms<DIV, T>::kUsesP ? eb[i] * fb : T(0);
      Terms<DIV, T>::given(na.log_prob(a[i]), nb.log_prob(b[i]), qi, pi, w, term, qgi);
      lsum += static_cast<double>(term);
      if (CSUM) csum += static_cast<double>(qgi);
      if (STORE) {
        q[i] = qi;
        qg[i] = qgi;
      }
      if (KEEP) eb[i] = qgi;
    }
    if (CSUM) c_sum += csum;
    return lsum;
  }

  // grad[c0, c0 + n) from the chunk buffers (q, qg filled by terms<true, *> when soft).
  DOPS_INLINE void write_grad(int64_t c0, int64_t n) {
    T* __restrict__ g = B.g;
    if (K.soft) {
      const T c = c_, soft_scale = K.soft_scale;
      const T* __restrict__ q = B.q;
      const T* __restrict__ qg = B.qg;
      DOPS_SIMD
      for (int64_t i = 0; i < n; ++i) g[i] = soft_grad(qg[i], q[i], c, soft_scale);
    } else {
      for (int64_t i = 0; i < n; ++i) g[i] = T(0);
    }
    if (K.hard) {
      const T hard = K.hard_coef;
      if (K.ce_own_lse) {
        const LogNormalizer<T> n1 = n1_;
        const T* __restrict__ sp = sp_;
        DOPS_SIMD
        for (int64_t i = 0; i < n; ++i) {
          g[i] += hard_grad(math::exp_(n1.log_prob(sp[i])), false, hard);
        }
      } else {
        const T* __restrict__ q = B.q;
        DOPS_SIMD
        for (int64_t i = 0; i < n; ++i) g[i] += hard_grad(q[i], false, hard);
      }
      if (label_ >= c0 && label_ < c0 + n) g[label_ - c0] -= hard;
    }
    if (K.cap_on) {
      const T inv_cap = K.inv_cap;
      const T* __restrict__ x = B.x;
      DOPS_SIMD
      for (int64_t i = 0; i < n; ++i) g[i] *= softcap_grad(x[i], inv_cap);
    }
    const T scale = scale_;
    scalar_t* __restrict__ out = g_row_ + c0;
    DOPS_SIMD
    for (int64_t i = 0; i < n; ++i) out[i] = Convert<scalar_t, T>::store(g[i] * scale);
  }

  const DenseArgs& A;
  const LossConsts<T>& K;
  const T scale_;
  Buffers<T>& B;
  RowStash<T>& S;
  const scalar_t* s_row_ = nullptr;
  const scalar_t* t_row_ = nullptr;
  scalar_t* g_row_ = nullptr;
  const T* sp_ = nullptr;
  int64_t label_ = -1;
  LogNormalizer<T> na_{}, nb_{}, n1_{};
  T c_ = 0;
};

template <typename scalar_t, typename T, int DIV>
DOPS_INLINE void run_rows_div(const DenseArgs& A, const LossConsts<T>& K, T scale, int64_t begin,
                              int64_t end) {
  Buffers<T> buf;
  RowStash<T> stash(K.soft ? A.v : 0);
  RowKernel<scalar_t, T, DIV> kernel(A, K, scale, buf, stash);
  for (int64_t row = begin; row < end; ++row) kernel.run(row);
}

template <typename scalar_t, typename T>
DOPS_INLINE void run_rows(const DenseArgs& A, int64_t begin, int64_t end) {
  const LossConsts<T> K = loss_consts<T>(A);
  const T scale = grad_scale_of<T>(A);
  switch (A.divergence) {
    case kForwardKL: run_rows_div<scalar_t, T, kForwardKL>(A, K, scale, begin, end); break;
    case kReverseKL: run_rows_div<scalar_t, T, kReverseKL>(A, K, scale, begin, end); break;
    case kJSD: run_rows_div<scalar_t, T, kJSD>(A, K, scale, begin, end); break;
    case kSkewForwardKL: run_rows_div<scalar_t, T, kSkewForwardKL>(A, K, scale, begin, end); break;
    default: run_rows_div<scalar_t, T, kSkewReverseKL>(A, K, scale, begin, end); break;
  }
}

DOPS_CPU_ROW_ENTRY_POINTS(dense_rows, DenseArgs, run_rows);

at::Tensor dense_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                             const std::optional<at::Tensor>& labels,
                             const std::optional<at::Tensor>& grad,
                             const std::optional<at::Tensor>& grad_scale, int64_t divergence,
                             double mix, double temperature, double softcap, double soft_coef,
                             double hard_coef, int64_t ignore_index) {
  DenseCall call = prepare_dense_call(student, teacher, labels, grad, grad_scale, divergence, mix,
                                      temperature, softcap, soft_coef, hard_coef, ignore_index,
                                      c10::DeviceType::CPU);
  const DenseArgs& A = call.args;
  if (A.n == 0) return call.loss;
  check_labels("distill_ops_native::dense_forward: ", A.labels, A.n, A.v, A.ignore_index);
  advise_huge_pages(grad, student);
  parallel_rows(dense_rows, call.dtype, A, A.v);
  return call.loss;
}

}  // namespace cpu
}  // namespace distill_ops

TORCH_LIBRARY_IMPL(distill_ops_native, CPU, m) {
  m.impl("dense_forward", &distill_ops::cpu::dense_forward_cpu);
}
