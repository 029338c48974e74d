// A CPU emulator of the CUDA execution model, just big enough to run csrc/cuda's kernels on CPU
// tensors where there is no GPU (CI): tests/cuda_emu/build.py compiles the .cu files as C++ with
// this header forced in, kernel<<<grid, block>>>(args) rewritten to emu::launch(&kernel, grid,
// block)(args) and each `__shared__ T name;` to a reference into the block's shared memory.
//
// Every CUDA thread of a block is a fiber (ucontext) on the calling OS thread. __syncthreads, the
// warp intrinsics (shuffles, ballot) and cluster.sync() are the only scheduling points: a fiber
// runs until it reaches one, and the scheduler releases a barrier once every thread of the block
// (of the warp, of the cluster) waits at it. Clusters run one after another; the blocks of one
// cluster (thread-block clusters, sm_90: cudaLaunchKernelEx with a cluster dimension) run
// interleaved, each with its own shared memory, which the others reach through
// cooperative_groups' map_shared_rank. Shared memory starts filled with a garbage byte (0xA5), as
// a GPU's is not zeroed; a block's static shared variables may not pass 48 KB.
//
// The order in which the runnable fibers resume is DISTILL_OPS_EMU_ORDER: "shuffle" (the default:
// a permutation per scheduling round, seeded by the block and the round, so runs repeat), "forward"
// or "reverse". Between two barriers each fiber runs alone to its next one, so a thread that reads
// what another writes in the same phase (a race on a GPU) sees it written or not depending on the
// order: under "shuffle" most such races change the result. The blocks of a cluster take turns
// the same way (each runs its fibers to their next scheduling point, in the order's block order).
//
// What it checks: the kernels' indexing and reduction trees against the oracle; that every thread
// reaches every barrier (a __syncthreads, warp op or cluster.sync that some threads skip, or reach
// after others exited, is an error naming the threads, where a GPU would hang or be undefined);
// full-mask warp ops on full warps; map_shared_rank to a block of the cluster that exited (whose
// shared memory is refilled with the garbage byte when it exits); the launch limits (block size, grid dimensions, cluster shape,
// static shared memory). What it cannot: data races and memory ordering (one fiber runs at a
// time), the device's own math functions (the host's run: the kernels' DOPS_DEVICE_PASS branches
// are not compiled), timing and resources.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Every __shared__ declaration is rewritten by build.py; one left over does not compile.
#define __shared__ __shared___declaration_not_rewritten_by_build_py

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
typedef struct CUstream_st* cudaStream_t;

// The built-in variables of the running fiber, set by the scheduler before it resumes one.
// (Variables, not macros: host code may have members of these names, e.g. cudaLaunchConfig_t's.)
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = size_t(256) << 10;

enum class Wait { kRun, kBlock, kWarp, kCluster, kDone };
enum class WarpOp { kShfl, kShflXor, kShflDown, kBallot };
enum class Order { kShuffle, kForward, kReverse };

// The most static shared memory a block may declare (a GPU's limit without dynamic shared memory).
constexpr size_t kSharedBytes = size_t(48) << 10;
constexpr unsigned char kSharedFill = 0xA5;

struct Fiber {
  ucontext_t ctx;
  Wait wait = Wait::kRun;
  WarpOp op = WarpOp::kShflXor;
  unsigned mask = 0, param = 0;
  uint64_t value = 0, result = 0;
  void* asan_fake_stack = nullptr;  // AddressSanitizer's save slot while the fiber is switched out
};

// Where each __shared__ variable of a launch lives in a block's shared memory: offsets handed out
// as the declarations are first reached, the same in every block of the launch.
struct SharedLayout {
  std::vector<std::pair<const void*, size_t>> offsets;
  size_t used = 0;

  size_t offset_of(const void* tag, size_t size, size_t align) {
    for (const auto& e : offsets) {
      if (e.first == tag) return e.second;
    }
    const size_t off = (used + align - 1) / align * align;
    used = off + size;
    offsets.emplace_back(tag, off);
    return off;
  }
};

struct Cluster;

struct Block {
  dim3 grid, block, block_idx;
  std::vector<Fiber> fibers;
  ucontext_t main;
  int current = -1;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
  Order order = Order::kShuffle;
  alignas(16) unsigned char shared[kSharedBytes];
  SharedLayout* layout = nullptr;
  Cluster* cluster = nullptr;
  unsigned rank = 0;         // in the cluster
  size_t first_stack = 0;    // fiber i uses stack(first_stack + i)
  bool exited = false;       // every thread is done: the shared memory is gone (refilled)
};

struct Cluster {
  dim3 dims{1, 1, 1};
  std::vector<Block*> blocks;  // by rank
};

inline thread_local Block* tl_block = nullptr;

// AddressSanitizer must be told of every stack switch (its fiber annotations): without them it
// takes a fiber's stack for the thread's, and an exception thrown in a fiber (a kernel's emulator
// error, e.g. map_shared_rank to an exited block) leaves poisoned shadow that a later call trips
// over as a false stack-use-after-scope, which aborts the process with no Python error.
// switch_to(&save, bottom, size) before a swapcontext to the stack [bottom, bottom + size); the
// side that resumes calls switched(save, ...). A fiber that exits for good passes save = nullptr.
struct StackSpan {
  const void* bottom = nullptr;
  size_t size = 0;
};
inline thread_local StackSpan tl_scheduler_stack;  // the OS thread's stack, that fibers return to

inline void switch_to(void** save, const void* bottom, size_t size) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(save, bottom, size);
#else
  (void)save, (void)bottom, (void)size;
#endif
}

inline void switched(void* save, StackSpan* from = nullptr) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(save, from ? &from->bottom : nullptr, from ? &from->size : nullptr);
#else
  (void)save, (void)from;
#endif
}

[[noreturn]] inline void fail(const std::string& what) {
  const Block* b = tl_block;
  std::string where;
  if (b != nullptr) {
    where = " (block (" + std::to_string(b->block_idx.x) + ", " + std::to_string(b->block_idx.y) +
            ", " + std::to_string(b->block_idx.z) + ") of a block of " +
            std::to_string(b->block.x * b->block.y * b->block.z) + " threads)";
  }
  throw std::runtime_error("cuda_emu: " + what + where);
}

// Fiber stacks, reused from launch to launch (mapped lazily: untouched pages cost nothing).
inline void* stack(size_t i) {
  static thread_local std::vector<void*> pool;
  while (pool.size() <= i) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) fail("cannot map a fiber stack");
    pool.push_back(p);
  }
  return pool[i];
}

// Read at every launch, so that a test can change it.
inline Order order_from_env() {
  const char* env = std::getenv("DISTILL_OPS_EMU_ORDER");
  const std::string v = env == nullptr ? "shuffle" : env;
  if (v == "shuffle") return Order::kShuffle;
  if (v == "forward") return Order::kForward;
  if (v == "reverse") return Order::kReverse;
  fail("DISTILL_OPS_EMU_ORDER must be shuffle, forward or reverse, got " + v);
}

// A permutation of [0, n) for one scheduling round: identity, reversed, or shuffled by splitmix64
// of (seed, round).
inline void round_order(Order order, uint64_t seed, uint64_t round, std::vector<int>& perm) {
  const int n = static_cast<int>(perm.size());
  for (int i = 0; i < n; ++i) perm[i] = order == Order::kReverse ? n - 1 - i : i;
  if (order != Order::kShuffle) return;
  uint64_t x = seed ^ (round * 0x9e3779b97f4a7c15ull);
  for (int i = n - 1; i > 0; --i) {
    x += 0x9e3779b97f4a7c15ull;
    uint64_t z = x;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    std::swap(perm[i], perm[static_cast<int>(z % uint64_t(i + 1))]);
  }
}

inline uint64_t block_seed(const Block& b) {
  return (uint64_t(b.block_idx.x) << 32) ^ (uint64_t(b.block_idx.y) << 16) ^ b.block_idx.z;
}

inline void set_thread(const Block& b, int i) {
  const unsigned t = static_cast<unsigned>(i);
  ::threadIdx = dim3(t % b.block.x, (t / b.block.x) % b.block.y, t / (b.block.x * b.block.y));
}

inline void fiber_entry() {
  switched(nullptr, &tl_scheduler_stack);  // a new fiber: learns the scheduler's stack
  Block* b = tl_block;
  try {
    (*b->body)();
  } catch (...) {
    if (!b->error) b->error = std::current_exception();
  }
  Fiber& f = b->fibers[b->current];
  f.wait = Wait::kDone;
  switch_to(nullptr, tl_scheduler_stack.bottom, tl_scheduler_stack.size);  // exits for good
  swapcontext(&f.ctx, &b->main);  // never resumed
  std::abort();
}

// Suspends the running fiber until the scheduler releases what it waits for.
inline void yield(Wait w) {
  Block* b = tl_block;
  if (b == nullptr) fail("a device intrinsic was called outside a kernel");
  Fiber& f = b->fibers[b->current];
  f.wait = w;
  switch_to(&f.asan_fake_stack, tl_scheduler_stack.bottom, tl_scheduler_stack.size);
  swapcontext(&f.ctx, &b->main);
  switched(f.asan_fake_stack, &tl_scheduler_stack);
}

inline std::string thread_list(const Block& b, Wait w) {
  std::string out;
  int first = -1, n = static_cast<int>(b.fibers.size());
  for (int i = 0; i <= n; ++i) {
    const bool in = i < n && b.fibers[i].wait == w;
    if (in && first < 0) first = i;
    if (!in && first >= 0) {
      out += (out.empty() ? "" : ",") + std::to_string(first) +
             (i - 1 > first ? "-" + std::to_string(i - 1) : "");
      first = -1;
    }
  }
  return out.empty() ? "none" : out;
}

inline int count(const Block& b, Wait w) {
  int c = 0;
  for (const Fiber& f : b.fibers) c += f.wait == w;
  return c;
}

// Releases warp w if all its lanes wait at one warp op: computes every lane's result first (a
// lane resumed early must not see a partner's next operand).
inline bool release_warp(Block& b, int w) {
  const int n = static_cast<int>(b.fibers.size());
  const int lo = w * kWarpSize, hi = lo + kWarpSize;
  int waiting = 0, done = 0;
  for (int i = lo; i < hi && i < n; ++i) {
    waiting += b.fibers[i].wait == Wait::kWarp;
    done += b.fibers[i].wait == Wait::kDone;
  }
  if (waiting == 0) return false;
  if (hi > n) fail("a warp op in a partial warp (the block size is not a multiple of 32)");
  if (done > 0) fail("a full-mask warp op in warp " + std::to_string(w) + " after some of its lanes exited");
  if (waiting < kWarpSize) return false;  // the others are at a barrier: a deadlock, reported by the caller
  const Fiber& f0 = b.fibers[lo];
  for (int i = lo; i < hi; ++i) {
    const Fiber& f = b.fibers[i];
    if (f.op != f0.op) fail("the lanes of warp " + std::to_string(w) + " wait at different warp ops");
    if (f.mask != 0xffffffffu) fail("a warp op with a partial mask (not emulated)");
  }
  uint64_t ballot = 0;
  if (f0.op == WarpOp::kBallot) {
    for (int l = 0; l < kWarpSize; ++l) ballot |= uint64_t(b.fibers[lo + l].value != 0) << l;
  }
  for (int l = 0; l < kWarpSize; ++l) {
    Fiber& f = b.fibers[lo + l];
    if (f.op == WarpOp::kBallot) {
      f.result = ballot;
    } else {
      const unsigned src = f.op == WarpOp::kShfl ? f.param : f.op == WarpOp::kShflXor ? (l ^ f.param) : (l + f.param);
      f.result = src < unsigned(kWarpSize) ? b.fibers[lo + src].value : f.value;
    }
  }
  for (int i = lo; i < hi; ++i) b.fibers[i].wait = Wait::kRun;
  return true;
}

inline void start_block(Block& b) {
  const int n = static_cast<int>(b.block.x * b.block.y * b.block.z);
  b.fibers.assign(n, Fiber{});
  b.exited = false;
  std::memset(b.shared, kSharedFill, sizeof(b.shared));
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack(b.first_stack + i);
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
}

// One scheduling round of block b: every runnable fiber runs to its next scheduling point, then
// the warp ops and the block barrier that can be are released. Returns false when the block can
// go no further on its own: every thread exited, or waits at cluster.sync.
inline bool advance(Block& b, uint64_t round, std::vector<int>& perm) {
  const int n = static_cast<int>(b.fibers.size());
  perm.resize(n);
  round_order(b.order, block_seed(b), round, perm);
  tl_block = &b;
  ::blockIdx = b.block_idx;
  for (const int i : perm) {
    if (b.fibers[i].wait != Wait::kRun) continue;
    b.current = i;
    set_thread(b, i);
    void* save = nullptr;
    switch_to(&save, b.fibers[i].ctx.uc_stack.ss_sp, b.fibers[i].ctx.uc_stack.ss_size);
    swapcontext(&b.main, &b.fibers[i].ctx);
    switched(save);
    if (b.error) std::rethrow_exception(b.error);
  }
  bool released = false;
  for (int w = 0; w * kWarpSize < n; ++w) released |= release_warp(b, w);
  if (released) return true;
  const int at_block = count(b, Wait::kBlock), at_cluster = count(b, Wait::kCluster),
            done = count(b, Wait::kDone);
  if (done == n) {
    // On a GPU an exited block's shared memory goes to the next block: a peer that still reads
    // it through a pointer mapped before reads garbage here too.
    if (!b.exited) std::memset(b.shared, kSharedFill, sizeof(b.shared));
    b.exited = true;
    return false;
  }
  if (at_block > 0 && at_block + done + at_cluster == n) {
    if (done > 0) {
      fail("__syncthreads waited for threads that exited (threads " + thread_list(b, Wait::kDone) + ")");
    }
    if (at_cluster == 0) {
      for (Fiber& f : b.fibers) f.wait = Wait::kRun;
      return true;
    }
  }
  if (at_cluster > 0 && at_cluster + done == n) {
    if (done > 0) {
      fail("cluster.sync waited for threads that exited (threads " + thread_list(b, Wait::kDone) + ")");
    }
    return false;
  }
  fail("deadlock: threads " + thread_list(b, Wait::kBlock) + " wait at __syncthreads, " +
       thread_list(b, Wait::kWarp) + " at a warp op, " +
       (at_cluster > 0 ? thread_list(b, Wait::kCluster) + " at cluster.sync, " : std::string()) +
       thread_list(b, Wait::kDone) + " exited");
}

// Runs the blocks of one cluster to completion, taking turns; releases cluster.sync once every
// thread of every block waits at it.
inline void run_cluster(Cluster& c) {
  for (Block* b : c.blocks) start_block(*b);
  std::vector<int> perm, block_perm(c.blocks.size());
  for (uint64_t round = 0;; ++round) {
    round_order(c.blocks[0]->order, block_seed(*c.blocks[0]) ^ 0x5bd1e995u, round, block_perm);
    bool moved = false;
    for (const int r : block_perm) moved |= advance(*c.blocks[r], round, perm);
    if (moved) continue;
    int finished = 0;
    for (const Block* b : c.blocks) finished += count(*b, Wait::kDone) == int(b->fibers.size());
    if (finished == int(c.blocks.size())) return;
    if (finished > 0) {
      for (Block* b : c.blocks) {
        if (count(*b, Wait::kDone) == int(b->fibers.size())) {
          tl_block = b;
          fail("cluster.sync waited for a block of the cluster that exited");
        }
      }
    }
    for (Block* b : c.blocks) {
      for (Fiber& f : b->fibers) f.wait = Wait::kRun;
    }
  }
}

inline void run_grid(dim3 grid, dim3 block, dim3 cluster, const std::function<void()>& body) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64) fail("invalid block size");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
      grid.z > 65535) {
    fail("invalid grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
         std::to_string(grid.z) + ")");
  }
  const unsigned csize = cluster.x * cluster.y * cluster.z;
  if (csize == 0 || csize > 16 || grid.x % cluster.x || grid.y % cluster.y || grid.z % cluster.z) {
    fail("invalid cluster (" + std::to_string(cluster.x) + ", " + std::to_string(cluster.y) + ", " +
         std::to_string(cluster.z) + ") for the grid");
  }
  SharedLayout layout;
  const Order order = order_from_env();
  std::vector<std::unique_ptr<Block>> blocks;
  for (unsigned i = 0; i < csize; ++i) {
    blocks.push_back(std::make_unique<Block>());
    Block& b = *blocks.back();
    b.grid = grid;
    b.block = block;
    b.body = &body;
    b.order = order;
    b.layout = &layout;
    b.rank = i;
    b.first_stack = size_t(i) * threads;
  }
  Cluster c;
  c.dims = cluster;
  for (auto& b : blocks) c.blocks.push_back(b.get());
  for (auto& b : blocks) b->cluster = &c;
  Block* outer = tl_block;
  ::blockDim = block;
  ::gridDim = grid;
  try {
    for (unsigned z = 0; z < grid.z; z += cluster.z) {
      for (unsigned y = 0; y < grid.y; y += cluster.y) {
        for (unsigned x = 0; x < grid.x; x += cluster.x) {
          for (unsigned r = 0; r < csize; ++r) {  // rank = x fastest, as on a GPU
            c.blocks[r]->block_idx = dim3(x + r % cluster.x, y + (r / cluster.x) % cluster.y,
                                          z + r / (cluster.x * cluster.y));
          }
          run_cluster(c);
        }
      }
    }
  } catch (...) {
    tl_block = outer;
    throw;
  }
  tl_block = outer;
}

// kernel<<<grid, block, smem, stream>>>(args...): the arguments are converted to the kernel's
// parameter types once, as a launch copies them, and every thread gets its own copy.
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block, cluster{1, 1, 1};

  template <typename... A>
  void operator()(A&&... args) const {
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    const std::function<void()> body = [&] { std::apply(kernel, params); };
    run_grid(grid, block, cluster, body);
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t = 0, cudaStream_t = nullptr) {
  return Launch<P...>{kernel, grid, block};
}

// `__shared__ T name;` (build.py's rewrite): the running block's instance of the variable whose
// declaration owns `tag`.
template <typename T>
inline T& shared(const void* tag) {
  static_assert(std::is_trivially_default_constructible<T>::value, "a __shared__ type with a constructor");
  Block* b = tl_block;
  if (b == nullptr) fail("a __shared__ variable outside a kernel");
  const size_t off = b->layout->offset_of(tag, sizeof(T), alignof(T));
  if (off + sizeof(T) > kSharedBytes) fail("the block's static shared memory passes 48 KB");
  return *reinterpret_cast<T*>(b->shared + off);
}

// cluster.map_shared_rank(p, rank): the same shared variable in block `rank` of the cluster.
template <typename T>
inline T* map_shared_rank(T* p, unsigned rank) {
  Block* b = tl_block;
  if (b == nullptr) fail("map_shared_rank outside a kernel");
  const unsigned char* q = reinterpret_cast<const unsigned char*>(p);
  if (q < b->shared || q >= b->shared + kSharedBytes) fail("map_shared_rank of an address not in shared memory");
  if (rank >= b->cluster->blocks.size()) fail("map_shared_rank to rank " + std::to_string(rank) + ", past the cluster");
  Block* target = b->cluster->blocks[rank];
  if (target->exited) {
    fail("map_shared_rank to rank " + std::to_string(rank) +
         ", a block that exited (a cluster.sync before it exits keeps its shared memory)");
  }
  return reinterpret_cast<T*>(target->shared + (q - b->shared));
}

inline uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, unsigned param) {
  Block* b = tl_block;
  if (b == nullptr) fail("a warp op outside a kernel");
  Fiber& f = b->fibers[b->current];
  f.op = op;
  f.mask = mask;
  f.value = value;
  f.param = param;
  yield(Wait::kWarp);
  return b->fibers[b->current].result;
}

template <typename T>
inline T shuffle(WarpOp op, unsigned mask, T v, int param, int width) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of this type");
  if (width != kWarpSize) fail("a shuffle with width != 32 (not emulated)");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_op(op, mask, bits, static_cast<unsigned>(param));
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

}  // namespace emu

inline void __syncthreads() { ::emu::yield(::emu::Wait::kBlock); }

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return ::emu::shuffle(::emu::WarpOp::kShfl, mask, v, src_lane, width);
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::emu::shuffle(::emu::WarpOp::kShflXor, mask, v, lane_mask, width);
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::emu::shuffle(::emu::WarpOp::kShflDown, mask, v, static_cast<int>(delta), width);
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(::emu::warp_op(::emu::WarpOp::kBallot, mask, pred != 0, 0));
}

// Atomics: one fiber runs at a time, so a plain read-modify-write is atomic.
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}

template <typename T>
inline T __ldg(const T* p) {
  // A GPU faults on a load not aligned to its size (a 16-byte vector at an address that is not a
  // multiple of 16: "misaligned address"); the host's loads do not, so it is checked here.
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) {
    ::emu::fail("misaligned address: a load of " + std::to_string(sizeof(T)) +
                " bytes at an address that is not a multiple of " + std::to_string(alignof(T)));
  }
  return *p;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }

inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, 4);
  return u;
}

inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

inline long long __double_as_longlong(double x) {
  long long u;
  std::memcpy(&u, &x, 8);
  return u;
}
