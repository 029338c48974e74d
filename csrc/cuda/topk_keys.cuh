// Ranking keys of teacher top-k on the GPU (both CUDA top-k kernels): a logit's bits mapped so
// that unsigned order is the ranking order of topk_rank.h (values descending, NaN as +inf, -0.0 as
// +0.0). The CPU kernel and the reference compare the values themselves, where those are equal.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "distill_ops/topk_rank.h"

namespace distill_ops {
namespace cuda {

template <typename T>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
};

__device__ __forceinline__ uint32_t bits_of(float x) { return __float_as_uint(x); }
__device__ __forceinline__ uint64_t bits_of(double x) {
  return static_cast<uint64_t>(__double_as_longlong(x));
}

// Unsigned keys in the order of the ranking values (NaN as +inf, -0.0 as +0.0).
template <typename T>
__device__ __forceinline__ typename KeyOf<T>::type rank_key(T x) {
  using K = typename KeyOf<T>::type;
  constexpr K sign = K(1) << (sizeof(K) * 8 - 1);
  const T r = rank_value(x);
  const K b = bits_of(r == T(0) ? T(0) : r);  // -0.0 ranks as +0.0: one key for equal values
  return (b & sign) ? ~b : (b | sign);
}

// The ranking value of a float key (rank_key's inverse: a NaN comes back as +inf, -0.0 as +0.0).
__device__ __forceinline__ float value_of_key(uint32_t key) {
  constexpr uint32_t sign = 0x80000000u;
  return __uint_as_float((key & sign) ? (key & ~sign) : ~key);
}

// How many high bits of the ranking key can differ between two values of the input dtype: a
// bfloat16 widened to float leaves the low 16 bits zero, a half the low 13. Below them a key's
// bits are constant given its sign (zeros, or ones where the mapping complements a negative), so
// comparing keys masked to these bits orders values as the full keys do, and a radix select
// stops there.
template <typename scalar_t, typename K>
constexpr int key_bits() {
  if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {
    return 16;
  } else if constexpr (std::is_same<scalar_t, c10::Half>::value) {
    return 19;
  } else {
    return static_cast<int>(sizeof(K)) * 8;
  }
}

}  // namespace cuda
}  // namespace distill_ops
