// Row algebra of the sparse-target loss (backends/reference_sparse.py is the contract and spells out
// the closed forms), shared by the CPU and CUDA kernels. The per-bucket divergence terms are the
// dense ones (divergence.h: Terms<DIV, T>): a sparse row is a dense divergence over k (+ 1 tail)
// buckets, so no formula is written twice.
//
// Per row, with a = s / tau, lse_a = logsumexp(a) over the vocabulary and a_K the student's tempered
// logits at the valid target ids:
//   teacher   lp_i = w_i * target_scale - z  (z: teacher_norm), and lp_tail for MODE_TAIL;
//   student   lq_i = a_i - lse_a (MODE_FULL, MODE_TAIL) or a_i - lse_K (MODE_SUPPORT);
//   slots     (term_i, qg_i, q_i) = Terms<DIV>(lq_i, lp_i); soft = sum term, C = sum qg;
//   finish    the tail bucket (MODE_TAIL: log(1 - Q_K) = lse_out - lse_a, lse_out the caller's
//             logsumexp of a over the columns outside K, never 1 - Q_K by subtraction, which
//             cancels to 0 when the student is sure of K) and the dense coefficient outside K:
//             grad_j = soft_scale * c_out * exp(a_j - lse_out) for j not in K,
//             grad_i = soft_scale * (qg_i - q_i * C) for i in K.
// The algebra runs in double (k values per row: cheap); the caller streams the vocabulary.
#pragma once

#include <cmath>

#include "divergence.h"
#include "macros.h"
#include "primitives.h"

namespace distill_ops {

enum SparseMode : int {
  kModeFull = 0,     // tail="renorm", forward KL: q over the full vocabulary
  kModeSupport = 1,  // tail="renorm", other divergences: q renormalised to the support
  kModeTail = 2,     // tail="tail": k buckets + one for the mass outside them
};

namespace sparse {

DOPS_HD DOPS_INLINE double neg_inf() { return -INFINITY; }

// log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (0 -> -inf, -inf -> 0).
DOPS_HD DOPS_INLINE double log1mexp(double x) {
  x = x > 0.0 ? 0.0 : x;  // NaN stays NaN
  return x > -0.693147180559945309 ? ::log(-::expm1(x)) : ::log1p(-::exp(x));
}

// Running logsumexp over a few values (the k slots), in double.
struct LseAcc {
  double m = -INFINITY, z = 0.0;

  DOPS_HD DOPS_INLINE void add(double x) {
    if (x > m) {
      z = z * ::exp(m - x) + 1.0;  // m = -inf: z = 0 * 0 + 1
      m = x;
    } else if (x == x && x != -INFINITY) {
      z += ::exp(x - m);
    } else if (x != x) {
      m = x;  // NaN poisons the result
    }
  }
  DOPS_HD DOPS_INLINE void merge(const LseAcc& o) {
    const double mm = m > o.m ? m : o.m;
    if (mm == -INFINITY) return;
    if (mm != mm) { m = mm; return; }
    z = z * ::exp(m - mm) + o.z * ::exp(o.m - mm);
    m = mm;
  }
  DOPS_HD DOPS_INLINE double lse() const { return m == -INFINITY ? m : m + ::log(z); }
};

// The teacher's log normaliser z (lp_i = w_i * target_scale - z) and its tail bucket lp_tail.
//   MODE_FULL, MODE_SUPPORT: lse_w = logsumexp of the scaled weights; z = lse_w; no tail bucket.
//   MODE_TAIL: lse_w = logsumexp of the raw weights P_i; the tail T = tail_in when given, else
//   1 - sum P (log1mexp); none when the targets cover the vocabulary; z = log(P_K + T).
struct TeacherNorm {
  double z;
  double lp_tail;  // -inf when there is no tail bucket
};

DOPS_HD DOPS_INLINE TeacherNorm teacher_norm(int mode, double lse_w, bool has_tail, double tail_in,
                                             bool covers_vocab) {
  if (mode != kModeTail) return TeacherNorm{lse_w, neg_inf()};
  double lt = has_tail ? tail_in : log1mexp(lse_w);
  if (covers_vocab) lt = neg_inf();
  const double mz = lse_w > lt ? lse_w : lt;
  double z;
  if (mz == -INFINITY) {
    z = mz;
  } else {
    z = mz + ::log(::exp(lse_w - mz) + ::exp(lt - mz));
  }
  return TeacherNorm{z, lt - z};
}

// One slot's student log-probability.
DOPS_HD DOPS_INLINE double student_logprob(int mode, double a_i, double lse_a, double lse_k) {
  return a_i - (mode == kModeSupport ? lse_k : lse_a);
}

// What the row needs after the slot sums: soft loss, C, and the dense part outside the support.
struct RowFinish {
  double soft;     // the divergence (0 for a dead row)
  double c;        // C = sum over buckets of qg (tail included)
  double c_out;    // dense coefficient outside the support (0: none)
  double lse_out;  // grad_j (j not in K) = soft_scale * c_out * exp(a_j - lse_out)
};

// `live`: the row has a valid target and non-zero teacher mass (z > -inf); otherwise its soft loss
// and soft gradient are 0.
// `lse_tail` (MODE_TAIL only): the logsumexp of a over the columns outside K.
template <int DIV>
DOPS_HD DOPS_INLINE RowFinish finish_row(int mode, double soft_slots, double c_slots, double lse_a,
                                         double lse_tail, double lp_tail,
                                         const MixWeights<double>& w, bool live) {
  RowFinish r{soft_slots, c_slots, 0.0, lse_a};
  if (mode == kModeTail) {
    const double lq_tail = lse_tail - lse_a;
    double tq, tterm, tqg;
    Terms<DIV, double>::eval(lq_tail, lp_tail, w, tq, tterm, tqg);
    r.soft += tterm;
    r.c += tqg;
    r.c_out = tqg - tq * r.c;
    r.lse_out = lse_tail;
  } else if (mode == kModeFull) {
    r.c_out = -r.c;
  }
  if (!live) {
    r.soft = 0.0;
    r.c_out = 0.0;
  }
  return r;
}

// The soft gradient of one slot, d D / d a_i = qg_i - q_i C (0 for a dead row).
DOPS_HD DOPS_INLINE double slot_grad(double qg, double q, double c, bool live) {
  return live ? qg - q * c : 0.0;
}

}  // namespace sparse
}  // namespace distill_ops
