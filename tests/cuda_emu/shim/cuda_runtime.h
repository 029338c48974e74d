// cuda_runtime.h of the CPU emulator (tests/cuda_emu/runtime.h): the few runtime calls the kernels'
// host code makes. The SM count is DISTILL_OPS_EMU_SMS (default 4), so that small test shapes
// take the paths a GPU takes for few rows; the compute capability is 9.0 (thread-block clusters)
// unless DISTILL_OPS_EMU_CC_MAJOR says otherwise; the grid's y dimension goes up to
// DISTILL_OPS_EMU_MAX_GRID_Y (default 65535, as a GPU's), so that a test can make a kernel loop
// over rows.
#pragma once

#include <cstdlib>

#include "../runtime.h"

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr {
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75
};

inline int emu_env_int(const char* name, int fallback) {
  const char* env = std::getenv(name);
  return env != nullptr && std::atoi(env) > 0 ? std::atoi(env) : fallback;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  if (attr == cudaDevAttrMultiProcessorCount) {
    *value = emu_env_int("DISTILL_OPS_EMU_SMS", 4);
  } else if (attr == cudaDevAttrComputeCapabilityMajor) {
    *value = emu_env_int("DISTILL_OPS_EMU_CC_MAJOR", 9);
  } else if (attr == cudaDevAttrMaxGridDimY) {
    *value = emu_env_int("DISTILL_OPS_EMU_MAX_GRID_Y", 65535);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "invalid value";
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }

// Launches with attributes: only the cluster dimension is emulated.
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
union cudaLaunchAttributeValue {
  struct {
    unsigned x, y, z;
  } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes = 0;
  cudaStream_t stream = nullptr;
  cudaLaunchAttribute* attrs = nullptr;
  unsigned numAttrs = 0;
};

inline dim3 emu_cluster_of(const cudaLaunchConfig_t* cfg) {
  dim3 c(1, 1, 1);
  for (unsigned i = 0; i < cfg->numAttrs; ++i) {
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension) {
      const auto& d = cfg->attrs[i].val.clusterDim;
      c = dim3(d.x, d.y, d.z);
    }
  }
  return c;
}

template <typename... P, typename... A>
inline cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(P...),
                                      A&&... args) {
  ::emu::Launch<P...> l{kernel, cfg->gridDim, cfg->blockDim, emu_cluster_of(cfg)};
  l(std::forward<A>(args)...);
  return cudaSuccess;
}

// The emulator runs every kernel as built for sm_90. DISTILL_OPS_EMU_PTX_VERSION=80 plays a build
// for sm_80 only, whose PTX the driver compiled for this sm_90 device when it loaded: the binary
// is sm_90, the code in it sm_80's.
struct cudaFuncAttributes {
  int binaryVersion = 90, ptxVersion = 90;
};

template <typename K>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, K*) {
  *attr = cudaFuncAttributes{};
  attr->ptxVersion = emu_env_int("DISTILL_OPS_EMU_PTX_VERSION", 90);
  return cudaSuccess;
}

enum cudaFuncAttribute { cudaFuncAttributeNonPortableClusterSizeAllowed = 11 };

template <typename K>
inline cudaError_t cudaFuncSetAttribute(K*, cudaFuncAttribute, int) {
  return cudaSuccess;
}

// Any cluster of at most 16 blocks fits (the emulator runs one cluster at a time).
template <typename K>
inline cudaError_t cudaOccupancyMaxActiveClusters(int* n, K*, const cudaLaunchConfig_t* cfg) {
  const dim3 c = emu_cluster_of(cfg);
  *n = c.x * c.y * c.z <= 16 ? 1 : 0;
  return cudaSuccess;
}
