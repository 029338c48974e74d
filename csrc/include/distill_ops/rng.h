// The counter-based random numbers of sampled targets (targets/rng.py defines them; this is the
// same 32-bit arithmetic, so the compiled kernels draw the ids the reference and Triton draw).
#pragma once

#include <cstdint>

#include "macros.h"
#include "primitives.h"

namespace distill_ops {
namespace rng {

constexpr uint32_t kRowSalt = 0x9E3779B9u;
constexpr uint32_t kSampleSalt = 0x632BE5ABu;
constexpr uint32_t kVocabSalt = 0x2545F491u;

// MurmurHash3's 32-bit finalizer.
DOPS_HD DOPS_INLINE uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x846CA68Bu;
  h ^= h >> 16;
  return h;
}

DOPS_HD DOPS_INLINE uint32_t row_key(uint32_t seed_key, int64_t row) {
  return fmix32(seed_key ^ fmix32(static_cast<uint32_t>(row) + kRowSalt));
}

DOPS_HD DOPS_INLINE uint32_t sample_key(uint32_t row_key, int64_t sample) {
  return fmix32(row_key ^ fmix32(static_cast<uint32_t>(sample) + kSampleSalt));
}

DOPS_HD DOPS_INLINE uint32_t vocab_key(int64_t col) {
  return fmix32(static_cast<uint32_t>(col) ^ kVocabSalt);
}

// The uniform's rank k = bits >> 9 in [0, 2^23), and u = (k + 0.5) / 2^23 in (0, 1), exact in
// float: u is increasing in k, so tests on u can be made on k (losing_rank).
DOPS_HD DOPS_INLINE uint32_t uniform_rank(uint32_t sample_key, uint32_t vocab_key) {
  return fmix32(sample_key ^ vocab_key) >> 9;
}

DOPS_HD DOPS_INLINE float uniform_of_rank(uint32_t k) {
  return (static_cast<float>(k) + 0.5f) * 1.1920928955078125e-07f;
}

DOPS_HD DOPS_INLINE float uniform(uint32_t sample_key, uint32_t vocab_key) {
  return uniform_of_rank(uniform_rank(sample_key, vocab_key));
}

namespace detail {

DOPS_HD DOPS_INLINE uint32_t float_bits(float x) {
#if DOPS_DEVICE_PASS
  return __float_as_uint(x);
#else
  return math::host::to_bits(x);
#endif
}

DOPS_HD DOPS_INLINE float bits_float(uint32_t b) {
#if DOPS_DEVICE_PASS
  return __uint_as_float(b);
#else
  return math::host::from_bits(b);
#endif
}

}  // namespace detail

// The natural log of the noise, defined by its operations so that every backend computes the same
// bits (targets/rng.py noise_log is the definition; library logs differ by an ulp on about one
// input in ten, which would decide near-tied races differently): x = m 2^e, m in [sqrt(1/2),
// sqrt(2)), f = m - 1 exact, log x = f - f^2/2 + f^3 P(f) + e ln 2 in this order, each product
// rounded on its own. For the positive normal floats the noise feeds it.
DOPS_HD DOPS_INLINE float noise_log(float x) {
  using math::mul_rn;
  const uint32_t b = detail::float_bits(x);
  float e = static_cast<float>(static_cast<int32_t>(b >> 23) - 126);
  const float m = detail::bits_float((b & 0x7FFFFFu) | 0x3F000000u);  // in [1/2, 1)
  const bool small = m < 0x1.6a09e6p-1f;                                // sqrt(1/2)
  e = small ? e - 1.0f : e;
  const float f = small ? (m + m) - 1.0f : m - 1.0f;
  const float z = mul_rn(f, f);
  float p = 0x1.204376p-4f;
  p = mul_rn(p, f) + -0x1.d7a370p-4f;
  p = mul_rn(p, f) + 0x1.de4a34p-4f;
  p = mul_rn(p, f) + -0x1.fcba9ep-4f;
  p = mul_rn(p, f) + 0x1.23d37ep-3f;
  p = mul_rn(p, f) + -0x1.555ca0p-3f;
  p = mul_rn(p, f) + 0x1.999d58p-3f;
  p = mul_rn(p, f) + -0x1.fffff8p-3f;
  p = mul_rn(p, f) + 0x1.555554p-2f;
  float y = mul_rn(mul_rn(p, f), z);
  y = y + mul_rn(e, -0x1.bd0106p-13f);  // ln 2, low part
  y = y - mul_rn(z, 0.5f);
  const float r = f + y;
  return r + mul_rn(e, 0x1.63p-1f);  // ln 2, high part
}

// The Gumbel noise of a uniform: -noise_log(-noise_log(u)) in float, then in the compute dtype T
// (float, or double for float64 logits), as the reference computes it.
template <typename T>
DOPS_HD DOPS_INLINE T gumbel_of(float u) {
  return static_cast<T>(-noise_log(-noise_log(u)));
}

template <typename T>
DOPS_HD DOPS_INLINE T gumbel(uint32_t sample_key, uint32_t vocab_key) {
  return gumbel_of<T>(uniform(sample_key, vocab_key));
}

// An upper bound of every gumbel() value: the largest u, 1 - 2^-24, gives 16.63553 (the noise is
// nondecreasing in u: tests/test_sparse_sample.py checks every rank). A column j whose
// a_j + kGumbelMax is below a sample's best score so far cannot win that sample's race (its score
// a_j + gumbel <= a_j + kGumbelMax, rounding is monotone), so the kernels skip it: exact pruning.
constexpr float kGumbelMax = 16.7f;

// The ranks that cannot lift a column to a bound: uniform_rank(s, j) < losing_rank(a, bound)
// implies a + gumbel(s, j) < bound as the kernels compute it (float or double), so a race whose
// best score is at least `bound` skips the (sample, column) pair on the integer hash alone,
// without the two logs: most pairs of a flat row, once its races have good leaders.
// In real arithmetic -log(-log u) < bound - a  <=>  u < L = exp(-exp(a - bound)). L is evaluated
// in float and made safe: the exponent is raised by 2e-3 plus 2e-6 of the magnitudes
// (|a| <= |bound| + |d|), which covers the computed noise's error (under 6e-7 on every rank;
// tests/test_sparse_sample.py), the rounding of a + noise (about 6e-8 of the magnitudes) and
// this evaluation's own (a few ulp per exp, approximate GPU exps included) with 1e-3 to spare,
// and L is scaled by 1 - 1e-5 so that the outer exp's error cannot round it up. Then
// u < L <=> k < ceil(L 2^23 - 0.5) exactly (u = (k + 0.5) / 2^23; L 2^23 - 0.5 is exact in float
// for L <= 1). So the test never skips a pair that could win. d = a - bound = -inf (a = -inf)
// gives 2^23 - 84 (almost every rank is skipped; kGumbelMax skips them all); a NaN, or an
// infinite bound, gives 0: nothing is skipped.
DOPS_HD DOPS_INLINE uint32_t losing_rank(float a, float bound) {
  const float d = a - bound;
  const float raised = d * (d < 0.0f ? 1.0f - 2e-6f : 1.0f + 2e-6f) +
                       (2e-3f + 4e-6f * (bound < 0.0f ? -bound : bound));
  const float lose = math::exp_(-math::exp_(raised)) * 0.99999f;
  const float k = ceilf(lose * 8388608.0f - 0.5f);
  return k > 0.0f ? static_cast<uint32_t>(k) : 0u;  // NaN compares false
}

}  // namespace rng
}  // namespace distill_ops
