// Kernels that a GPU would hang on, be undefined in, or race in, and a few that must give exact
// results: tests/test_cuda_emu.py checks that the emulator (runtime.h) reports the first kind and
// computes the second. Built only into the emulator's library (build.py), as
// distill_ops_emu::selftest(case) -> int32 (64,).
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cooperative_groups.h>
#include <cuda_runtime.h>

namespace {

// Threads 0-15 wait at a barrier while the rest of their warp waits at a shuffle: a hang on a GPU.
__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
  }
}

// A full-mask shuffle after lane 5 exited: undefined on a GPU.
__global__ void shuffle_after_exit(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

// A barrier after the second warp exited.
__global__ void barrier_after_exit(int* out) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Thread 0 writes what thread 63 reads in the same phase (no barrier between): a race, whose
// outcome the emulator's thread order decides.
__global__ void racy_read(int* out) {
  __shared__ int x;
  if (threadIdx.x == 0) x = 0;
  __syncthreads();
  if (threadIdx.x == 0) x = 1;
  if (threadIdx.x == 63) out[0] = x;
}

// Exact warp results: an xor butterfly sum, a shfl_down tree sum (lane 0), a ballot, a broadcast
// from lane 5, and a block sum through shared memory and atomics.
__global__ void warp_ops(int* out) {
  const int lane = threadIdx.x % 32;
  int x = lane;
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  int y = lane * lane;
  for (int off = 16; off > 0; off >>= 1) y += __shfl_down_sync(0xffffffffu, y, off);
  const unsigned odd = __ballot_sync(0xffffffffu, lane & 1);
  const int from5 = __shfl_sync(0xffffffffu, lane * 3, 5);  // every lane gets lane 5's value
  __shared__ unsigned total;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  atomicAdd(&total, 1u);
  __syncthreads();
  out[threadIdx.x] = threadIdx.x == 0 ? y : threadIdx.x == 1 ? static_cast<int>(odd)
                   : threadIdx.x == 2 ? static_cast<int>(total) : threadIdx.x == 3 ? from5 : x;
}

// Thread 63 writes one element past the end of the output: AddressSanitizer's report (the
// DISTILL_OPS_EMU_ASAN=1 build), compute-sanitizer memcheck's on a GPU.
__global__ void write_past_the_end(int* out) { out[threadIdx.x + 1] = 1; }

// A cluster of 4 blocks: each puts its rank in its shared memory; after cluster.sync every block
// reads all four through map_shared_rank. out[rank] = 0 + 1 + 2 + 3 = 6 in every block; out[4 +
// rank] is a shared word nobody wrote (0xA5A5A5A5: shared memory is not zeroed).
__global__ void cluster_exchange(int* out) {
  namespace cg = cooperative_groups;
  __shared__ int mine;
  __shared__ int unset;
  const unsigned rank = cg::this_cluster().block_rank();
  if (threadIdx.x == 0) mine = static_cast<int>(rank);
  cg::this_cluster().sync();
  if (threadIdx.x == 0) {
    int sum = 0;
    for (unsigned r = 0; r < cg::this_cluster().num_blocks(); ++r) {
      sum += *cg::this_cluster().map_shared_rank(&mine, r);
    }
    out[rank] = sum;
    out[4 + rank] = unset;
  }
  cg::this_cluster().sync();  // no block exits while another may still read its shared memory
}

// Block 1 of the cluster exits while the others wait at cluster.sync: a hang on a GPU.
__global__ void cluster_sync_after_exit(int* out) {
  namespace cg = cooperative_groups;
  if (cg::this_cluster().block_rank() == 1) return;
  cg::this_cluster().sync();
  out[0] = 1;
}

// Block 0 reads block 1's shared memory after the cluster.sync, but block 1 exits right after it
// (no second cluster.sync): on a GPU its shared memory may already belong to another block. Block
// 0 is kept busy with barriers first, so block 1 has exited in every thread order.
__global__ void cluster_read_after_exit(int* out) {
  namespace cg = cooperative_groups;
  __shared__ int mine;
  const unsigned rank = cg::this_cluster().block_rank();
  if (threadIdx.x == 0) mine = static_cast<int>(rank) + 1;
  cg::this_cluster().sync();
  if (rank == 0) {
    for (int i = 0; i < 3; ++i) __syncthreads();
    if (threadIdx.x == 0) out[0] = *cg::this_cluster().map_shared_rank(&mine, 1);
  }
}

template <typename... P, typename... A>
void launch_cluster(void (*kernel)(P...), unsigned blocks, A... args) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = blocks;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg;
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(64);
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  cudaLaunchKernelEx(&cfg, kernel, args...);
}

__global__ void noop(int*) {}

at::Tensor selftest(int64_t which) {
  at::Tensor out = at::zeros({64}, at::kInt);
  int* p = out.data_ptr<int>();
  switch (which) {
    case 0: divergent_barrier<<<1, 64>>>(p); break;
    case 1: shuffle_after_exit<<<1, 64>>>(p); break;
    case 2: barrier_after_exit<<<1, 64>>>(p); break;
    case 3: racy_read<<<1, 64>>>(p); break;
    case 4: warp_ops<<<1, 64>>>(p); break;
    case 5: noop<<<1, 2048>>>(p); break;
    case 7: write_past_the_end<<<1, 64>>>(p); break;
    case 8: launch_cluster(cluster_exchange, 4, p); break;
    case 9: launch_cluster(cluster_sync_after_exit, 3, p); break;
    case 10: launch_cluster(cluster_read_after_exit, 2, p); break;
    default: noop<<<dim3(1, 70000), 32>>>(p); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(distill_ops_emu, m) {
  m.def("selftest(int which) -> Tensor", &selftest);
}
