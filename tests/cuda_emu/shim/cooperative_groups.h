// cooperative_groups.h of the CPU emulator (tests/cuda_emu/runtime.h): the thread-block cluster
// calls the kernels make. cluster.sync() is a scheduling point of the whole cluster;
// map_shared_rank reaches another block's shared memory (distributed shared memory).
#pragma once

#include "../runtime.h"

namespace cooperative_groups {

struct cluster_group {
  static void sync() { ::emu::yield(::emu::Wait::kCluster); }
  static unsigned block_rank() { return ::emu::tl_block->rank; }
  static unsigned num_blocks() {
    return static_cast<unsigned>(::emu::tl_block->cluster->blocks.size());
  }
  template <typename T>
  static T* map_shared_rank(T* addr, unsigned rank) {
    return ::emu::map_shared_rank(addr, rank);
  }
};

inline cluster_group this_cluster() { return cluster_group{}; }

}  // namespace cooperative_groups
