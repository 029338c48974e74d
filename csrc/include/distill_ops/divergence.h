// Per-element math of the dense distillation losses (backends/base.py is the contract,
// backends/reference.py the oracle). One definition, compiled for the CPU and CUDA kernels.
//
// With lq = log q_j, lp = log p_j (log-probabilities of student and teacher at temperature tau),
// each divergence D = sum_j term_j, and its gradient with respect to the student's tempered logits
// a_j is  dD/da_j = qg_j - q_j * C,  C = sum_i qg_i,  qg_i = q_i * dD/dq_i:
//
//   0 forward KL       term = p (lp - lq)                        qg = -p            C = -1
//   1 reverse KL       term = q (lq - lp)                        qg = term          C = D
//   2 JSD(beta)        term = beta p (lp - lM) + (1-beta) q (lq - lM)
//                      qg = (1-beta) q (lq - lM)                 M = beta p + (1-beta) q
//   3 skew fwd KL(a)   term = p (lp - lM)                        M = a p + (1-a) q
//                      qg = -(1-a) p q / M = -(1-a) exp(lp + lq - lM)
//   4 skew rev KL(a)   term = q (lq - lM)                        M = (1-a) p + a q
//                      qg = q (lq - lM) - a q^2 / M = term - a exp(2 lq - lM)
//
// (For skew reverse KL, q dD/dq also has a "+ q" part; it contributes q_j - q_j sum_i q_i = 0 to
// the gradient and is left out, as in the reference.) log M is a log-add-exp of
// (lp + log w_p, lq + log w_q): no underflow of M where p and q are tiny. A term whose weight
// (p, q, or a mixture coefficient) is exactly 0 contributes exactly 0, never NaN (0 log 0 = 0),
// even where the other side's log-probability is -inf. NaN inputs stay NaN.
#pragma once

#include <cmath>

#include "macros.h"
#include "primitives.h"

namespace distill_ops {

enum Divergence : int {
  kForwardKL = 0,
  kReverseKL = 1,
  kJSD = 2,
  kSkewForwardKL = 3,
  kSkewReverseKL = 4,
};

// Whether C = sum qg needs its own pass over the row (the mixtures).
DOPS_HD constexpr bool needs_c_pass(int div) { return div >= kJSD; }

// ------------------------------------------------------------------------------------------------
// softcap: x -> c tanh(x / c), applied to raw logits before the temperature (c > 0).

template <typename T>
DOPS_HD DOPS_INLINE T softcap(T x, T cap, T inv_cap) {
  return cap * math::tanh_(x * inv_cap);
}

// d softcap / dx = 1 - tanh(x / c)^2, as (1 - t)(1 + t): no cancellation where |t| -> 1.
template <typename T>
DOPS_HD DOPS_INLINE T softcap_grad(T x, T inv_cap) {
  const T t = math::tanh_(x * inv_cap);
  return (T(1) - t) * (T(1) + t);
}

// ------------------------------------------------------------------------------------------------
// Mixture weights: M = w_p p + w_q q, with their logs (log 0 = -inf). Computed once per launch.

template <typename T>
struct MixWeights {
  T wp, wq, log_wp, log_wq;
  // Upper bound of log(q / M) = -log w_q (M >= w_q q); 0 when w_q = 0. The skew-KL qg exponents are
  // clamped to it: exact where w_q > 0, and where w_q = 0 it keeps w_q * exp(...) = 0, not 0 * inf.
  T log_ratio_cap;
};

template <typename T>
inline MixWeights<T> mix_weights(int div, double mix) {
  double wp = 0.0, wq = 0.0;
  if (div == kJSD || div == kSkewForwardKL) {
    wp = mix;
    wq = 1.0 - mix;
  } else if (div == kSkewReverseKL) {
    wp = 1.0 - mix;
    wq = mix;
  }
  const double lwp = wp > 0.0 ? std::log(wp) : -INFINITY;
  const double lwq = wq > 0.0 ? std::log(wq) : -INFINITY;
  return MixWeights<T>{static_cast<T>(wp), static_cast<T>(wq), static_cast<T>(lwp),
                       static_cast<T>(lwq), static_cast<T>(wq > 0.0 ? -lwq : 0.0)};
}

// w * d, and exactly 0 when the weight w is 0 (whatever d is: -inf, +inf or NaN).
template <typename T>
DOPS_HD DOPS_INLINE T weighted(T w, T d) {
  const T v = w * d;
  return w == T(0) ? T(0) : v;
}

// log(exp(x) + exp(y)); -inf when both are -inf, NaN when either is NaN. (Written with one
// comparison per select, so that the CPU loops using it vectorise.)
template <typename T>
DOPS_HD DOPS_INLINE T log_add_exp(T x, T y) {
  const T m = x > y ? x : y;
  const T d = x - y;                          // NaN when x == y == -inf, or either is NaN
  const T e = math::exp_(d < T(0) ? d : -d);  // exp(-|x - y|), in [0, 1]
  const T r = m + math::log1p_unit(e);
  return x == y ? x + T(0.693147180559945309) : r;  // log(2 e^x); -inf + log 2 = -inf
}

// max(x, lowest finite): -inf -> lowest, so that differences with it are -inf, not NaN.
template <typename T>
DOPS_HD DOPS_INLINE T floor_finite(T x) {
  const T lowest = static_cast<T>(sizeof(T) == 4 ? -3.4028234663852886e38 : -1.7976931348623157e308);
  return x > lowest ? x : lowest;
}

template <typename T>
DOPS_HD DOPS_INLINE T min_(T x, T cap) {
  return x > cap ? cap : x;  // NaN stays NaN
}

// ------------------------------------------------------------------------------------------------
// The per-element terms. `Terms<DIV, T>::given(lq, lp, q, p, w, term, qg)` is the definition: the
// loss term and qg from the log-probabilities and q = exp(lq), p = exp(lp) (p is read only where
// kUsesP). `Terms<DIV, T>::eval(lq, lp, w, q, term, qg)` computes q and p from the logs first; a
// caller that has q and p already (the CPU kernel keeps the exponentials of its first pass) calls
// `given`. Everything a caller does not use is dead code after inlining.

template <int DIV, typename T>
struct Terms;

// eval() of every Terms<DIV, T>, from its given() and kUsesP.
template <typename Self, typename T>
struct TermsFromLogs {
  DOPS_HD DOPS_INLINE static void eval(T lq, T lp, const MixWeights<T>& w, T& q, T& term, T& qg) {
    q = math::exp_(lq);
    const T p = Self::kUsesP ? math::exp_(lp) : T(0);
    Self::given(lq, lp, q, p, w, term, qg);
  }
};

template <typename T>
struct Terms<kForwardKL, T> : TermsFromLogs<Terms<kForwardKL, T>, T> {
  static constexpr bool kUsesP = true;
  DOPS_HD DOPS_INLINE static void given(T lq, T lp, T, T p, const MixWeights<T>&, T& term, T& qg) {
    term = weighted(p, lp - lq);
    qg = -p;
  }
};

template <typename T>
struct Terms<kReverseKL, T> : TermsFromLogs<Terms<kReverseKL, T>, T> {
  static constexpr bool kUsesP = false;
  DOPS_HD DOPS_INLINE static void given(T lq, T lp, T q, T, const MixWeights<T>&, T& term, T& qg) {
    term = weighted(q, lq - lp);
    qg = term;
  }
};

template <typename T>
struct Terms<kJSD, T> : TermsFromLogs<Terms<kJSD, T>, T> {
  static constexpr bool kUsesP = true;
  DOPS_HD DOPS_INLINE static void given(T lq, T lp, T q, T p, const MixWeights<T>& w, T& term,
                                        T& qg) {
    const T lm = log_add_exp(lp + w.log_wp, lq + w.log_wq);
    const T tq = weighted(q, lq - lm);
    const T tp = weighted(p, lp - lm);
    qg = weighted(w.wq, tq);
    term = weighted(w.wp, tp) + qg;
  }
};

template <typename T>
struct Terms<kSkewForwardKL, T> : TermsFromLogs<Terms<kSkewForwardKL, T>, T> {
  static constexpr bool kUsesP = true;
  DOPS_HD DOPS_INLINE static void given(T lq, T lp, T, T p, const MixWeights<T>& w, T& term,
                                        T& qg) {
    const T lm = log_add_exp(lp + w.log_wp, lq + w.log_wq);
    term = weighted(p, lp - lm);
    // -(1 - a) p q / M; 0 where p or q is 0 (the exponent is -inf there)
    qg = -w.wq * math::exp_(min_(lp + lq - floor_finite(lm), w.log_ratio_cap));
  }
};

template <typename T>
struct Terms<kSkewReverseKL, T> : TermsFromLogs<Terms<kSkewReverseKL, T>, T> {
  static constexpr bool kUsesP = false;
  DOPS_HD DOPS_INLINE static void given(T lq, T lp, T q, T, const MixWeights<T>& w, T& term,
                                        T& qg) {
    const T lm = log_add_exp(lp + w.log_wp, lq + w.log_wq);
    term = weighted(q, lq - lm);
    // a q^2 / M; 0 where q is 0 (the exponent is -inf there)
    qg = term - w.wq * math::exp_(min_(lq + lq - floor_finite(lm), w.log_ratio_cap));
  }
};

// ------------------------------------------------------------------------------------------------
// The gradient of one element (backends/base.py):
//   grad_j = scale * softcap'(x_j) * (soft_coef / tau * (qg_j - q_j C)
//                                     + hard_coef * (softmax(s')_j - [j == label]))
// The CPU kernels apply the same parts in separate vectorised loops; the CUDA kernels call this.

template <typename T>
DOPS_HD DOPS_INLINE T soft_grad(T qg, T q, T c, T soft_scale) {
  return soft_scale * (qg - q * c);
}

template <typename T>
DOPS_HD DOPS_INLINE T hard_grad(T softmax_j, bool is_label, T hard_coef) {
  return hard_coef * (softmax_j - (is_label ? T(1) : T(0)));
}

}  // namespace distill_ops
