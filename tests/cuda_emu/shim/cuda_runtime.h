// cuda_runtime.h of the CPU emulator (tests/cuda_emu/runtime.h): the few runtime calls the kernels'
// host code makes. The SM count is DISTILL_OPS_EMU_SMS (default 4), so that small test shapes
// take the paths a GPU takes for few rows.
#pragma once

#include <cstdlib>

#include "../runtime.h"

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  const char* env = std::getenv("DISTILL_OPS_EMU_SMS");
  *value = env != nullptr && std::atoi(env) > 0 ? std::atoi(env) : 4;
  return cudaSuccess;
}

inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "invalid value";
}
