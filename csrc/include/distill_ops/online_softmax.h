// Online softmax normalizer: a running (max m, sum z = sum exp(x - m)) over a stream of values.
//
// m has the values' type M (it is one of them, so it is exact); z has type Z, which may be wider
// (double): adding many small terms to a partial sum near 1 loses ~1e-6 relative in float.
// The empty state is (m = -inf, z = 0). Values of -inf contribute exactly 0, and merging two empty
// states (or an empty one with anything) never produces NaN. A NaN value makes z NaN, so it reaches
// the log-sum-exp and from there the loss. Companion sums kept relative to the same max (reverse
// KL's sum exp(a - m) (a - b)) are rescaled with the factors `raise` and `merge` report.
#pragma once

#include "macros.h"
#include "primitives.h"

namespace distill_ops {

template <typename M, typename Z = M>
struct SoftmaxState {
  M m;
  Z z;

  DOPS_HD DOPS_INLINE static SoftmaxState empty() { return SoftmaxState{math::neg_inf<M>(), Z(0)}; }

  // Raise the running max to cover a block whose max is `block_max`: z is multiplied by `factor`
  // (1 when the max does not change). Returns the shift to subtract from the block's values before
  // exponentiating: m, or 0 while the state is empty (so that exp(-inf - shift) = 0, not NaN).
  DOPS_HD DOPS_INLINE M raise(M block_max, Z& factor) {
    factor = Z(1);
    if (block_max > m) {
      factor = math::exp_(static_cast<Z>(m) - static_cast<Z>(block_max));  // m = -inf: 0
      z *= factor;
      m = block_max;
    }
    return m == math::neg_inf<M>() ? M(0) : m;
  }

  DOPS_HD DOPS_INLINE M raise(M block_max) {
    Z factor;
    return raise(block_max, factor);
  }

  // Fold one value (a thread's strided stream, the few target slots).
  DOPS_HD DOPS_INLINE void add(M x) {
    const M shift = raise(x);
    z += static_cast<Z>(math::exp_(x - shift));
  }

  // log sum exp of the values seen (-inf for none).
  DOPS_HD DOPS_INLINE Z lse() const { return static_cast<Z>(m) + math::log_(z); }
};

// s * f, and 0 when f == 0 (s may be +inf where f underflowed: no inf * 0 = NaN).
template <typename Z>
DOPS_HD DOPS_INLINE Z scaled(Z s, Z f) {
  return f == Z(0) ? Z(0) : s * f;
}

// The state of the concatenation of two streams; fx, fy receive the factors applied to x.z, y.z.
template <typename M, typename Z>
DOPS_HD DOPS_INLINE SoftmaxState<M, Z> merge(const SoftmaxState<M, Z>& x,
                                             const SoftmaxState<M, Z>& y, Z& fx, Z& fy) {
  const M m = math::max_nan(x.m, y.m);
  const Z shift = m == math::neg_inf<M>() ? Z(0) : static_cast<Z>(m);
  fx = math::exp_(static_cast<Z>(x.m) - shift);
  fy = math::exp_(static_cast<Z>(y.m) - shift);
  return SoftmaxState<M, Z>{m, x.z * fx + y.z * fy};
}

template <typename M, typename Z>
DOPS_HD DOPS_INLINE SoftmaxState<M, Z> merge(const SoftmaxState<M, Z>& x,
                                             const SoftmaxState<M, Z>& y) {
  Z fx, fy;
  return merge(x, y, fx, fy);
}

// The log-softmax of the values a state has seen: log softmax(x)_i = (x_i - m) - log z, evaluated in
// that order (x_i - m is exact near the max and log z is at most log V), which is more accurate
// than x_i - lse when |x| is large.
template <typename T>
struct LogNormalizer {
  T m;
  T log_z;

  DOPS_HD DOPS_INLINE T log_prob(T x) const { return (x - m) - log_z; }
};

template <typename T, typename M, typename Z>
DOPS_HD DOPS_INLINE LogNormalizer<T> normalizer(const SoftmaxState<M, Z>& s) {
  return LogNormalizer<T>{static_cast<T>(s.m), static_cast<T>(math::log_(s.z))};
}

// Reverse KL R = sum_i q_i (a_i - b_i) - lse(a) + lse(b), from the state of a, w = sum exp(a - m_a)
// (a - b) relative to the same max, and the state of b, grouped so that the max shifts cancel.
template <typename M, typename Z>
DOPS_HD DOPS_INLINE Z reverse_kl_from_states(const SoftmaxState<M, Z>& a, Z w,
                                             const SoftmaxState<M, Z>& b) {
  return w / a.z - (static_cast<Z>(a.m) - static_cast<Z>(b.m)) - math::log_(a.z) +
         math::log_(b.z);
}

}  // namespace distill_ops
