// Elementary functions used by the loss math, for float and double, host and device.
//
// Device: the CUDA math library (expf, log1pf, tanhf; full precision, no fast-math).
// Host double: the C library. Host float: branch-free polynomial versions written so that the
// CPU kernels' inner loops vectorise (glibc's expf is a scalar call without -ffast-math). They are
// accurate to about 1-2 ulp, keep IEEE special values (exp(-inf) = 0 exactly, exp(+inf) = inf,
// NaN in -> NaN out) and produce subnormals gradually, like the library functions.
#pragma once

#include <cmath>
#include <cstdint>

#include "macros.h"

namespace distill_ops {
namespace math {

template <typename T>
DOPS_HD DOPS_INLINE T neg_inf() {
  return static_cast<T>(-INFINITY);
}

// max that propagates NaN from either side (plain comparisons drop it).
template <typename T>
DOPS_HD DOPS_INLINE T max_nan(T a, T b) {
  return a > b ? a : (a != a ? a : b);  // nested selects: no branch, vectorises
}

#if !DOPS_DEVICE_PASS
namespace host {

DOPS_INLINE float from_bits(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}

DOPS_INLINE uint32_t to_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  return u;
}

// e^x: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial (truncation
// error < 0.1 ulp), then 2^n applied in two halves so that results down to the subnormal range and
// up to overflow come out right.
DOPS_INLINE float expf(float x) {
  float xc = x < -104.0f ? -104.0f : x;  // NaN compares false and stays NaN
  xc = xc > 88.8f ? 88.8f : xc;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = xc * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  const int32_t ni = static_cast<int32_t>(to_bits(t) - to_bits(shifter));  // n as an integer
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.98412698e-4f;  // 1/5040
  p = p * r + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t n1 = ni / 2;
  const int32_t n2 = ni - n1;  // n1, n2 in [-75, 64]: both scales are normal numbers
  const float s1 = from_bits(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = from_bits(static_cast<uint32_t>(n2 + 127) << 23);
  const float y = (p * s1) * s2;
  return x < -104.0f ? 0.0f : y;
}

// log(1 + x) for x in [0, 1] (the argument of a log-add-exp): log(1 + x) = k ln2 + 2 atanh(s),
// s = f / (2 + f), with f = x (k = 0) or f = (x - 1) / 2 (k = 1), so |s| <= 0.172.
DOPS_INLINE float log1p_unit(float x) {
  const bool big = x > 0.41421356f;
  const float f = big ? (x - 1.0f) * 0.5f : x;
  const float k = big ? 0.693147180559945309f : 0.0f;
  const float s = f / (2.0f + f);
  const float s2 = s * s;
  float p = 9.09090909e-2f;  // 1/11
  p = p * s2 + 1.11111111e-1f;
  p = p * s2 + 1.42857143e-1f;
  p = p * s2 + 2.0e-1f;
  p = p * s2 + 3.33333333e-1f;
  p = p * s2;
  const float two_s = 2.0f * s;
  return k + (two_s + two_s * p);
}

// tanh(x): odd Taylor series below |x| = 0.4 (error < 1e-8), (1 - e) / (1 + e), e = exp(-2|x|),
// above (no overflow, no cancellation there).
DOPS_INLINE float tanhf(float x) {
  const float y = x < 0.0f ? -x : x;
  const float y2 = y * y;
  float p = 3.59212803e-3f;  // 21844/6081075
  p = p * y2 - 8.86323552e-3f;  // 1382/155925
  p = p * y2 + 2.18694885e-2f;  // 62/2835
  p = p * y2 - 5.39682540e-2f;  // 17/315
  p = p * y2 + 1.33333333e-1f;  // 2/15
  p = p * y2 - 3.33333333e-1f;
  const float small = y + y * (y2 * p);
  const float e = expf(-2.0f * y);
  const float large = (1.0f - e) / (1.0f + e);
  const float r = y < 0.4f ? small : large;  // NaN: takes `large`, which is NaN
  return from_bits(to_bits(r) | (to_bits(x) & 0x80000000u));
}

}  // namespace host
#endif  // !DOPS_DEVICE_PASS

DOPS_HD DOPS_INLINE float exp_(float x) {
#if DOPS_DEVICE_PASS
  return ::expf(x);
#else
  return host::expf(x);
#endif
}

DOPS_HD DOPS_INLINE double exp_(double x) { return ::exp(x); }

// log(1 + x) for x in [0, 1].
DOPS_HD DOPS_INLINE float log1p_unit(float x) {
#if DOPS_DEVICE_PASS
  return ::log1pf(x);
#else
  return host::log1p_unit(x);
#endif
}

DOPS_HD DOPS_INLINE double log1p_unit(double x) { return ::log1p(x); }

DOPS_HD DOPS_INLINE float tanh_(float x) {
#if DOPS_DEVICE_PASS
  return ::tanhf(x);
#else
  return host::tanhf(x);
#endif
}

DOPS_HD DOPS_INLINE double tanh_(double x) { return ::tanh(x); }

// a * b rounded on its own: never contracted with a following add into an FMA (which rounds once
// and gives other bits than a separate multiply and add, as torch computes them). Device: the
// _rn intrinsics, which nvcc never contracts. Host: an empty asm makes the product a value that
// must exist, rounded, in a register (GCC contracts a * b + c across statements otherwise, in the
// FMA-capable clones).
#if !DOPS_DEVICE_PASS
template <typename T>
DOPS_INLINE T host_rounded(T r) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(r));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(r));
#else
  volatile T v = r;
  r = v;
#endif
  return r;
}
#endif

DOPS_HD DOPS_INLINE float mul_rn(float a, float b) {
#if DOPS_DEVICE_PASS
  return __fmul_rn(a, b);
#else
  return host_rounded(a * b);
#endif
}

DOPS_HD DOPS_INLINE double mul_rn(double a, double b) {
#if DOPS_DEVICE_PASS
  return __dmul_rn(a, b);
#else
  return host_rounded(a * b);
#endif
}

// Natural log for per-row scalars (not in vectorised loops).
DOPS_HD DOPS_INLINE float log_(float x) { return ::logf(x); }
DOPS_HD DOPS_INLINE double log_(double x) { return ::log(x); }

}  // namespace math
}  // namespace distill_ops
