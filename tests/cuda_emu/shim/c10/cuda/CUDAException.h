// c10/cuda/CUDAException.h of the CPU emulator: launches fail by throwing, so there is nothing to
// check after one.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(expr)                                                              \
  do {                                                                                    \
    const cudaError_t emu_err_ = (expr);                                                  \
    TORCH_CHECK(emu_err_ == cudaSuccess, "CUDA error: ", cudaGetErrorString(emu_err_)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
