// What the CPU kernels share: function multi-versioning, OpenMP SIMD pragmas, the chunk size, and
// branch-free dtype conversions (so that the loops that load and store vectorise).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "distill_ops/online_softmax.h"
#include "distill_ops/primitives.h"

// The row kernels are compiled three times, for AVX-512 (x86-64-v4), AVX2+FMA (x86-64-v3) and the
// baseline, and the right one is picked when the library loads (GCC function multi-versioning; no
// -march=native).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define DOPS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=haswell", "default")))
#else
#define DOPS_CPU_CLONES
#endif

#if defined(_OPENMP)
#define DOPS_SIMD _Pragma("omp simd")
#define DOPS_SIMD_SUM(...) _Pragma(DOPS_STR(omp simd reduction(+ : __VA_ARGS__)))
#define DOPS_SIMD_MAX(...) _Pragma(DOPS_STR(omp simd reduction(max : __VA_ARGS__)))
#define DOPS_STR(x) #x
#else
#define DOPS_SIMD
#define DOPS_SIMD_SUM(...)
#define DOPS_SIMD_MAX(...)
#endif

namespace distill_ops {
namespace cpu {

constexpr int64_t kChunk = 512;

// ------------------------------------------------------------------------------------------------
// dtype conversions (branch-free, so that they vectorise)

template <typename scalar_t, typename T>
struct Convert {
  DOPS_INLINE static T load(scalar_t x) { return static_cast<T>(x); }
  DOPS_INLINE static scalar_t store(T x) { return static_cast<scalar_t>(x); }
};

template <>
struct Convert<c10::BFloat16, float> {
  DOPS_INLINE static float load(c10::BFloat16 x) {
    return math::host::from_bits(static_cast<uint32_t>(x.x) << 16);
  }
  // Round to nearest even; NaN stays a (quiet) NaN.
  DOPS_INLINE static c10::BFloat16 store(float f) {
    const uint32_t u = math::host::to_bits(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const uint32_t bits = f != f ? 0x7FC0u : rounded;
    return c10::BFloat16(static_cast<uint16_t>(bits), c10::BFloat16::from_bits());
  }
};

template <>
struct Convert<c10::Half, float> {
  DOPS_INLINE static float load(c10::Half x) { return static_cast<float>(x); }
  DOPS_INLINE static c10::Half store(float f) { return c10::Half(f); }
};

template <typename scalar_t, typename T>
DOPS_INLINE void load_chunk(const scalar_t* __restrict__ src, int64_t n, T* __restrict__ dst) {
  DOPS_SIMD
  for (int64_t i = 0; i < n; ++i) dst[i] = Convert<scalar_t, T>::load(src[i]);
}

// A chunk of a row as T: the row itself when it is stored as T (no copy), else converted into buf.
// `copy` forces the copy into buf: for a kernel about to overwrite the chunk (an in-place gradient).
template <typename scalar_t, typename T>
DOPS_INLINE const T* chunk_as(const scalar_t* __restrict__ src, int64_t n, T* __restrict__ buf,
                              bool copy = false) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    if (!copy) return src;
  }
  load_chunk(src, n, buf);
  return buf;
}

// ------------------------------------------------------------------------------------------------
// Online-softmax folds of a chunk, keeping the exponentials for a later pass

// x[0, n) * scale, each product rounded on its own (stored, then read by the caller's next loop):
// in one expression with the subtraction of the max, x * scale - shift, the compiler contracts
// the two into an FMA, whose exponent is not the rounded value the max and the target slots are
// formed from (the top term became exp(its rounding error), not 1). x itself for scale 1.
template <typename T>
DOPS_INLINE const T* scaled_chunk(const T* __restrict__ x, T scale, int64_t n, T* __restrict__ buf) {
  if (scale == T(1)) return x;
  DOPS_SIMD
  for (int64_t i = 0; i < n; ++i) buf[i] = x[i] * scale;
  return buf;
}

// sum exp(x_i - shift) over x[0, n) (x already scaled: scaled_chunk), in double (in float, adding
// many small terms to a partial sum near 1 loses ~1e-6); with `keep`, each exponential is stored
// there too.
template <typename T>
DOPS_INLINE double sum_exp(const T* __restrict__ x, T shift, int64_t n, T* __restrict__ keep) {
  double z = 0.0;
  if (keep != nullptr) {
    DOPS_SIMD_SUM(z)
    for (int64_t i = 0; i < n; ++i) {
      const T e = math::exp_(x[i] - shift);
      keep[i] = e;
      z += static_cast<double>(e);
    }
  } else {
    DOPS_SIMD_SUM(z)
    for (int64_t i = 0; i < n; ++i) z += static_cast<double>(math::exp_(x[i] - shift));
  }
  return z;
}

// Fold the elements i of a[0, n) (already scaled) with counts(i) into the online state, relative
// to their own max in the chunk: the tails summed again when their streamed sums underflowed
// (tail_refit.h; not vectorised: only such rows take it). A NaN counted poisons z.
template <typename T, typename Counts>
DOPS_INLINE void fold_where(SoftmaxState<double>& st, const T* __restrict__ a, int64_t n,
                            Counts counts) {
  T cm = math::neg_inf<T>();
  for (int64_t i = 0; i < n; ++i) {
    if (counts(i) && !(a[i] <= cm)) cm = a[i];
  }
  const T shift = static_cast<T>(st.raise(static_cast<double>(cm)));
  for (int64_t i = 0; i < n; ++i) {
    if (counts(i)) st.z += static_cast<double>(math::exp_(a[i] - shift));
  }
}

// The shift a chunk's kept exponentials are relative to, as a later pass needs it: -inf while the
// state is still empty (raise() returns 0 then, and the chunk's exponentials are all 0), so that
// the factor exp(shift - lse) is 0, where exp(0 - lse) could overflow and give 0 * inf = NaN.
template <typename T>
DOPS_INLINE double kept_shift(const SoftmaxState<double>& st, T shift) {
  return st.m == -INFINITY ? -INFINITY : static_cast<double>(shift);
}

// ------------------------------------------------------------------------------------------------
// Row entry points and the parallel loop over rows

// An op's row loop rows<scalar_t, T>(A, begin, end) compiled once per logits dtype. Each entry point
// is a plain function so that it can be multi-versioned (DOPS_CPU_CLONES); a function template
// cannot be.
template <typename Args>
struct RowEntryPoints {
  using Fn = void (*)(const Args&, int64_t, int64_t);
  Fn f32, bf16, f16, f64;

  Fn of(at::ScalarType dtype) const {
    switch (dtype) {
      case at::kFloat: return f32;
      case at::kBFloat16: return bf16;
      case at::kHalf: return f16;
      default: return f64;  // the call checks have let only the four kernel dtypes through
    }
  }
};

// Defines name_f32 ... name_f64 running rows<scalar_t, T> (fp32 math for 16-bit logits, fp64 for
// fp64) and the RowEntryPoints<Args> `name` that holds them.
#define DOPS_CPU_ROW_ENTRY_POINTS(name, Args, rows)                                             \
  DOPS_CPU_CLONES void name##_f32(const Args& A, int64_t b, int64_t e) {                        \
    rows<float, float>(A, b, e);                                                                \
  }                                                                                             \
  DOPS_CPU_CLONES void name##_bf16(const Args& A, int64_t b, int64_t e) {                       \
    rows<c10::BFloat16, float>(A, b, e);                                                        \
  }                                                                                             \
  DOPS_CPU_CLONES void name##_f16(const Args& A, int64_t b, int64_t e) {                        \
    rows<c10::Half, float>(A, b, e);                                                            \
  }                                                                                             \
  DOPS_CPU_CLONES void name##_f64(const Args& A, int64_t b, int64_t e) {                        \
    rows<double, double>(A, b, e);                                                              \
  }                                                                                             \
  const RowEntryPoints<Args> name{name##_f32, name##_bf16, name##_f16, name##_f64}

// Rows [0, A.n) over at::parallel_for, in tasks of about 32K elements (row_cost per row): fewer
// and the pool's overhead shows on short rows; more and two cores go unbalanced on few rows.
template <typename Args>
void parallel_rows(const RowEntryPoints<Args>& entry, at::ScalarType dtype, const Args& A,
                   int64_t row_cost) {
  const auto rows = entry.of(dtype);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, row_cost));
  at::parallel_for(0, A.n, grain, [&](int64_t begin, int64_t end) { rows(A, begin, end); });
}

// Every label is ignore_index or in [0, v): the kernels index the row with it.
inline void check_labels(const char* op, const int64_t* labels, int64_t n, int64_t v,
                         int64_t ignore_index) {
  if (labels == nullptr) return;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t l = labels[r];
    TORCH_CHECK(l == ignore_index || (l >= 0 && l < v), op, "labels[", r, "] = ", l,
                " is neither ignore_index (", ignore_index, ") nor in [0, ", v, ")");
  }
}

// The gradient buffer the op was handed is usually fresh from the allocator (torch.empty_like), so
// the kernel's first write to each 4 KiB page is a page fault, and the kernel zeroes the page: on
// the 2-core CI-class machine that was 40% of a forward-KL loss+gradient call at 512 x 128256 fp32
// (139 ms, against 84 ms writing into the already-touched logits). Transparent huge pages make one
// fault of each 2 MiB (bench/NOTES.md: 105 ms). PyTorch asks for them on every allocation under
// THP_MEM_ALLOC_ENABLE=1; this asks only for the 2 MiB-aligned interior of this buffer, which is
// ours for the call. A hint: where THP is off nothing changes, and its error is not one.
// DISTILL_OPS_CPU_HUGEPAGES=0 turns it off.
inline void advise_huge_pages(const std::optional<at::Tensor>& grad, const at::Tensor& student) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* env = std::getenv("DISTILL_OPS_CPU_HUGEPAGES");
    return env == nullptr || std::string(env) != "0";
  }();
  if (!enabled || !grad.has_value() || grad->data_ptr() == student.data_ptr()) return;
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(grad->data_ptr());
  const uintptr_t bytes = static_cast<uintptr_t>(grad->nbytes());
  if (bytes < 4 * kHuge) return;  // at most a few small pages to gain
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (begin + bytes) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)grad;
  (void)student;
#endif
}

}  // namespace cpu
}  // namespace distill_ops
