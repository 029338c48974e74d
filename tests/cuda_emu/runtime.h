// A CPU emulator of the CUDA execution model, just big enough to run csrc/cuda's kernels on CPU
// tensors where there is no GPU (CI): tests/cuda_emu/build.py compiles the .cu files as C++ with
// this header forced in, kernel<<<grid, block>>>(args) rewritten to emu::launch(&kernel, grid,
// block)(args).
//
// Every CUDA thread of a block is a fiber (ucontext) on the calling OS thread. __syncthreads and
// the warp intrinsics (shuffles, ballot) are the only scheduling points: a fiber runs until it
// reaches one, and the scheduler releases a barrier once every thread of the block (of the warp)
// waits at it. Blocks run one after another, so a __shared__ variable can be a function static.
//
// The order in which the runnable fibers resume is DISTILL_OPS_EMU_ORDER: "shuffle" (the default:
// a permutation per scheduling round, seeded by the block and the round, so runs repeat), "forward"
// or "reverse". Between two barriers each fiber runs alone to its next one, so a thread that reads
// what another writes in the same phase (a race on a GPU) sees it written or not depending on the
// order: under "shuffle" most such races change the result.
//
// What it checks: the kernels' indexing and reduction trees against the oracle; that every thread
// reaches every barrier (a __syncthreads or warp op that some threads skip, or reach after others
// exited, is an error naming the threads, where a GPU would hang or be undefined); full-mask warp
// ops on full warps; the launch limits (block size, grid dimensions). What it cannot: data races
// and memory ordering (one fiber runs at a time), the device's own math functions (the host's
// run: the kernels' DOPS_DEVICE_PASS branches are not compiled), timing and resources.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
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
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
typedef struct CUstream_st* cudaStream_t;

namespace emu {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = size_t(256) << 10;

enum class Wait { kRun, kBlock, kWarp, kDone };
enum class WarpOp { kShflXor, kShflDown, kBallot };
enum class Order { kShuffle, kForward, kReverse };

struct Fiber {
  ucontext_t ctx;
  Wait wait = Wait::kRun;
  WarpOp op = WarpOp::kShflXor;
  unsigned mask = 0, param = 0;
  uint64_t value = 0, result = 0;
};

struct Block {
  dim3 grid, block, block_idx;
  std::vector<Fiber> fibers;
  ucontext_t main;
  int current = -1;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
  Order order = Order::kShuffle;
};

inline thread_local Block* tl_block = nullptr;
inline thread_local dim3 tl_thread_idx, tl_block_idx, tl_block_dim, tl_grid_dim;

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

// The resume order of one scheduling round (splitmix64 of block and round for the shuffle).
inline void round_order(const Block& b, uint64_t round, std::vector<int>& perm) {
  const int n = static_cast<int>(perm.size());
  for (int i = 0; i < n; ++i) perm[i] = b.order == Order::kReverse ? n - 1 - i : i;
  if (b.order != Order::kShuffle) return;
  uint64_t x = (uint64_t(b.block_idx.x) << 32) ^ (uint64_t(b.block_idx.y) << 16) ^ b.block_idx.z ^
               (round * 0x9e3779b97f4a7c15ull);
  for (int i = n - 1; i > 0; --i) {
    x += 0x9e3779b97f4a7c15ull;
    uint64_t z = x;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    std::swap(perm[i], perm[static_cast<int>(z % uint64_t(i + 1))]);
  }
}

inline void set_thread(const Block& b, int i) {
  const unsigned t = static_cast<unsigned>(i);
  tl_thread_idx = dim3(t % b.block.x, (t / b.block.x) % b.block.y, t / (b.block.x * b.block.y));
}

inline void fiber_entry() {
  Block* b = tl_block;
  try {
    (*b->body)();
  } catch (...) {
    if (!b->error) b->error = std::current_exception();
  }
  Fiber& f = b->fibers[b->current];
  f.wait = Wait::kDone;
  swapcontext(&f.ctx, &b->main);  // never resumed
  std::abort();
}

// Suspends the running fiber until the scheduler releases what it waits for.
inline void yield(Wait w) {
  Block* b = tl_block;
  if (b == nullptr) fail("a device intrinsic was called outside a kernel");
  Fiber& f = b->fibers[b->current];
  f.wait = w;
  swapcontext(&f.ctx, &b->main);
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
  if (waiting < kWarpSize) return false;  // the others are at a __syncthreads: a deadlock, reported by the caller
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
      const unsigned src = f.op == WarpOp::kShflXor ? (l ^ f.param) : (l + f.param);
      f.result = src < unsigned(kWarpSize) ? b.fibers[lo + src].value : f.value;
    }
  }
  for (int i = lo; i < hi; ++i) b.fibers[i].wait = Wait::kRun;
  return true;
}

inline void run_block(Block& b) {
  const int n = static_cast<int>(b.block.x * b.block.y * b.block.z);
  b.fibers.assign(n, Fiber{});
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack(i);
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  std::vector<int> perm(n);
  for (uint64_t round = 0;; ++round) {
    round_order(b, round, perm);
    for (const int i : perm) {
      if (b.fibers[i].wait != Wait::kRun) continue;
      b.current = i;
      set_thread(b, i);
      swapcontext(&b.main, &b.fibers[i].ctx);
      if (b.error) std::rethrow_exception(b.error);
    }
    bool released = false;
    for (int w = 0; w * kWarpSize < n; ++w) released |= release_warp(b, w);
    if (released) continue;
    int at_block = 0, done = 0;
    for (const Fiber& f : b.fibers) {
      at_block += f.wait == Wait::kBlock;
      done += f.wait == Wait::kDone;
    }
    if (done == n) return;
    if (at_block + done == n) {
      if (done > 0) {
        fail("__syncthreads waited for threads that exited (threads " +
             thread_list(b, Wait::kDone) + ")");
      }
      for (Fiber& f : b.fibers) f.wait = Wait::kRun;
      continue;
    }
    fail("deadlock: threads " + thread_list(b, Wait::kBlock) + " wait at __syncthreads, " +
         thread_list(b, Wait::kWarp) + " at a warp op, " + thread_list(b, Wait::kDone) +
         " exited");
  }
}

inline void run_grid(dim3 grid, dim3 block, const std::function<void()>& body) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64) fail("invalid block size");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
      grid.z > 65535) {
    fail("invalid grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
         std::to_string(grid.z) + ")");
  }
  Block b;
  b.grid = grid;
  b.block = block;
  b.body = &body;
  b.order = order_from_env();
  Block* outer = tl_block;
  tl_block = &b;
  tl_block_dim = block;
  tl_grid_dim = grid;
  try {
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          b.block_idx = dim3(x, y, z);
          tl_block_idx = b.block_idx;
          run_block(b);
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
  dim3 grid, block;

  template <typename... A>
  void operator()(A&&... args) const {
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    const std::function<void()> body = [&] { std::apply(kernel, params); };
    run_grid(grid, block, body);
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t = 0, cudaStream_t = nullptr) {
  return Launch<P...>{kernel, grid, block};
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

#define threadIdx (::emu::tl_thread_idx)
#define blockIdx (::emu::tl_block_idx)
#define blockDim (::emu::tl_block_dim)
#define gridDim (::emu::tl_grid_dim)

inline void __syncthreads() { ::emu::yield(::emu::Wait::kBlock); }

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
