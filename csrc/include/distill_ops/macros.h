// Portability macros of the header-only math: the same inline functions compile for the host
// (C++ CPU kernels, and the host side of .cu files) and for the device (CUDA kernels).
#pragma once

#if defined(__CUDACC__)
#define DOPS_HD __host__ __device__
#define DOPS_INLINE __forceinline__
#else
#define DOPS_HD
#if defined(__GNUC__) || defined(__clang__)
#define DOPS_INLINE inline __attribute__((always_inline))
#else
#define DOPS_INLINE inline
#endif
#endif

// True while compiling device code (nvcc's device pass).
#if defined(__CUDA_ARCH__)
#define DOPS_DEVICE_PASS 1
#else
#define DOPS_DEVICE_PASS 0
#endif
