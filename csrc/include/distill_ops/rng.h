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

// u = ((bits >> 9) + 0.5) / 2^23, in (0, 1), exact in float.
DOPS_HD DOPS_INLINE float uniform(uint32_t sample_key, uint32_t vocab_key) {
  const uint32_t bits = fmix32(sample_key ^ vocab_key);
  return (static_cast<float>(bits >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

// The Gumbel noise of (sample, column) in the compute dtype T (float, or double for float64
// logits): -log(-log(u)) with u in T, the precise library logs, as the reference computes it.
template <typename T>
DOPS_HD DOPS_INLINE T gumbel(uint32_t sample_key, uint32_t vocab_key) {
  const T u = static_cast<T>(uniform(sample_key, vocab_key));
  return -math::log_(-math::log_(u));
}

// An upper bound of every gumbel() value: u <= 1 - 2^-24 gives -log(-log(u)) = 16.6355...; the
// margin covers any ulp-level non-monotonicity of a log implementation. A column j whose
// a_j + kGumbelMax is below a sample's best score so far cannot win that sample's race (its score
// a_j + gumbel <= a_j + kGumbelMax, rounding is monotone), so the kernels skip it: exact pruning.
constexpr float kGumbelMax = 16.7f;

}  // namespace rng
}  // namespace distill_ops
