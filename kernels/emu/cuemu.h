// cuemu.h: run CUDA C++ kernel source on the host CPU (lmtrain's CUDA emulator).
//
// A kernel file that includes ../common.cuh compiles with nvcc for the GPU and, with
// `-DCUEMU`, with the host C++ compiler against this header. Execution model:
//   * every CUDA thread of a block is a fiber with its own stack (x86-64: a small
//     assembly context switch; elsewhere ucontext); blocks run one after another on
//     CUEMU_THREADS OS threads (default 1);
//   * __syncthreads() is a barrier over the live fibers of the block, and all fibers
//     must reach it from the same source line (divergent barriers are reported);
//   * warp intrinsics (__shfl_*_sync, __ballot_sync, __any/__all_sync, __syncwarp) meet
//     at a per-warp barrier that waits for the non-exited lanes of the mask (as sm_70+),
//     and values are handed over when the last lane arrives; reading from a lane outside
//     the mask or one that exited without taking part is reported as a bug;
//   * __shared__ variables are per-OS-thread statics, dynamic shared memory is a
//     per-launch buffer poisoned with 0xff bytes (NaN) before every block;
//   * atomics are real atomics; bf16/half come from NVIDIA's own headers in host mode;
//   * nvcuda::wmma fragments hold the whole tile in every lane (the layout is opaque in
//     CUDA, so kernels cannot depend on it).
// CUEMU_SCHED=reverse runs the fibers of a block in reverse order, which exposes races
// that the forward order hides; it is an order permutation, not a race detector.
// Not modelled: timing, occupancy, register pressure, memory coherence subtleties.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <type_traits>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include <cuda_bf16.h>  // host-mode definitions of __nv_bfloat16 and friends
#include <cuda_fp16.h>
#include <vector_types.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUEMU_ASAN 1
#endif

#if !defined(__x86_64__) || defined(CUEMU_UCONTEXT)
#include <ucontext.h>
#define CUEMU_USE_UCONTEXT 1
#endif

// ---- CUDA qualifiers in host mode -------------------------------------------------
// NVIDIA's host_defines.h gives some of these compiler-specific meanings: replace them.
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __constant__
#define __constant__
#undef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))
#undef __noinline__
#define __noinline__ __attribute__((noinline))
#undef __align__
#define __align__(n) __attribute__((aligned(n)))
#undef __launch_bounds__
#define __launch_bounds__(...)
// Static shared memory: one instance per OS thread; blocks on a thread run in sequence.
#undef __shared__
#define __shared__ static thread_local

#ifndef CUEMU_USE_UCONTEXT
// cuemu_swap(save, load): push the callee-saved registers and the FP control words on
// the current stack, store its stack pointer in *save, continue on the stack `load`.
extern "C" void cuemu_swap(void** save, void* load);
__asm__(
    // A COMDAT section: every translation unit that includes this header emits the
    // function, and the linker keeps one copy.
    ".pushsection .text.cuemu_swap,\"axG\",@progbits,cuemu_swap,comdat\n"
    ".p2align 4\n.globl cuemu_swap\n.hidden cuemu_swap\n.type cuemu_swap,@function\n"
    "cuemu_swap:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n.size cuemu_swap, .-cuemu_swap\n.popsection\n");
#endif

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace cuemu {

constexpr int kWarp = 32;
enum class State : uint8_t { Ready, AtBarrier, AtWarpSync, Exited };

struct Fiber {
#ifdef CUEMU_USE_UCONTEXT
  ucontext_t ctx;
#else
  void* sp = nullptr;
#endif
  char* stack = nullptr;  // usable region (above the guard page)
  State state = State::Ready;
  uint3 tid{};
  // Warp-synchronous call in progress: its mask, what the lane wants delivered (a source
  // lane, kWantNone or kWantBallot) and, once the warp has met, the delivered value.
  unsigned sync_mask = 0;
  int want = -1;
  bool inbox_ok = false;
  alignas(16) unsigned char inbox[16];
#ifdef CUEMU_ASAN
  void* fake_stack = nullptr;
#endif
};

constexpr int kWantNone = -1, kWantBallot = -2;

struct WarpSlots {
  unsigned arrived = 0;                      // lanes waiting in a warp-synchronous call
  alignas(16) unsigned char slot[kWarp][16];  // the value each of them published
};

// State of one OS thread that executes blocks of a launch.
struct Worker {
#ifdef CUEMU_USE_UCONTEXT
  ucontext_t sched;
#else
  void* sched_sp = nullptr;
#endif
#ifdef CUEMU_ASAN
  void* sched_fake_stack = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
#endif
  const char* kernel = "?";
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  std::vector<WarpSlots> warps;
  std::vector<unsigned char> dyn_smem;
  size_t stack_bytes = 0;
  int nthreads = 0, live = 0, cur = -1;
  int barrier_arrived = 0, barrier_line = -1;
  uint3 block{};
};

inline thread_local Worker* tls_worker = nullptr;

// Fiber stacks (each behind a guard page) outlive a launch and are reused by the next one on
// the same OS thread: mapping and faulting in a fresh stack per thread per launch cost more
// than the kernels themselves at test shapes.
struct StackCache {
  size_t bytes = 0;
  std::vector<char*> stacks;
  void release() {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    for (char* s : stacks) munmap(s - page, bytes + page);
    stacks.clear();
  }
  ~StackCache() { release(); }
};

inline thread_local StackCache tls_stacks;

[[noreturn]] inline void fail(const char* what) {
  Worker* w = tls_worker;
  fprintf(stderr, "cuemu: %s (kernel %s, block (%u,%u,%u), thread %d)\n", what, w ? w->kernel : "?",
          w ? w->block.x : 0, w ? w->block.y : 0, w ? w->block.z : 0, w ? w->cur : -1);
  fflush(stderr);
  abort();
}

inline Worker& worker() {
  if (!tls_worker) fail("CUDA device function called outside a kernel launch");
  return *tls_worker;
}

inline bool reverse_order() {
  const char* s = getenv("CUEMU_SCHED");
  return s && strcmp(s, "reverse") == 0;
}

inline size_t env_size(const char* name, size_t dflt) {
  const char* s = getenv(name);
  return s && *s ? strtoull(s, nullptr, 0) : dflt;
}

// ---- context switches ---------------------------------------------------------------
inline void to_scheduler() {  // called on a fiber
  Worker& w = *tls_worker;
  Fiber& f = w.fibers[w.cur];
#ifdef CUEMU_ASAN
  __sanitizer_start_switch_fiber(f.state == State::Exited ? nullptr : &f.fake_stack, w.sched_bottom,
                                 w.sched_size);
#endif
#ifdef CUEMU_USE_UCONTEXT
  swapcontext(&f.ctx, &w.sched);
#else
  cuemu_swap(&f.sp, w.sched_sp);
#endif
#ifdef CUEMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &w.sched_bottom, &w.sched_size);
#endif
}

inline void to_fiber(Worker& w, int i) {  // called on the scheduler
  Fiber& f = w.fibers[i];
  w.cur = i;
  threadIdx = f.tid;
#ifdef CUEMU_ASAN
  __sanitizer_start_switch_fiber(&w.sched_fake_stack, f.stack, w.stack_bytes);
#endif
#ifdef CUEMU_USE_UCONTEXT
  swapcontext(&w.sched, &f.ctx);
#else
  cuemu_swap(&w.sched_sp, f.sp);
#endif
#ifdef CUEMU_ASAN
  __sanitizer_finish_switch_fiber(w.sched_fake_stack, nullptr, nullptr);
#endif
}

inline void release(Worker& w, State waiting) {
  for (Fiber& f : w.fibers)
    if (f.state == waiting) f.state = State::Ready;
}

inline bool try_release_warp(Worker& w, int warp, unsigned mask);

// Called when a fiber exits: a barrier or warp sync may now be complete without it
// (sm_70+ semantics: exited threads are not waited for).
inline void on_exit(Worker& w) {
  --w.live;
  if (w.barrier_arrived > 0 && w.barrier_arrived == w.live) {
    w.barrier_arrived = 0;
    w.barrier_line = -1;
    release(w, State::AtBarrier);
  }
  const int warp = w.cur / kWarp;
  for (int l = 0; l < kWarp; ++l) {
    const int t = warp * kWarp + l;
    if (t < w.nthreads && w.fibers[t].state == State::AtWarpSync) try_release_warp(w, warp, w.fibers[t].sync_mask);
  }
}

inline void fiber_main() {
#ifdef CUEMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &tls_worker->sched_bottom, &tls_worker->sched_size);
#endif
  Worker& w = *tls_worker;
  (*w.body)();
  w.fibers[w.cur].state = State::Exited;
  on_exit(w);
  to_scheduler();
  fail("exited fiber resumed");
}

inline void block_barrier(int line) {
  Worker& w = worker();
  if (w.barrier_arrived == 0) {
    w.barrier_line = line;
  } else if (w.barrier_line != line) {
    char msg[160];
    snprintf(msg, sizeof msg, "divergent __syncthreads: threads wait at lines %d and %d", w.barrier_line, line);
    fail(msg);
  }
  if (++w.barrier_arrived == w.live) {  // the last one in lets everybody go
    w.barrier_arrived = 0;
    w.barrier_line = -1;
    release(w, State::AtBarrier);
    return;
  }
  w.fibers[w.cur].state = State::AtBarrier;
  to_scheduler();
}

inline int lane_id() { return worker().cur % kWarp; }

inline unsigned live_lanes(const Worker& w, int warp) {
  unsigned m = 0;
  for (int l = 0; l < kWarp; ++l) {
    int t = warp * kWarp + l;
    if (t < w.nthreads && w.fibers[t].state != State::Exited) m |= 1u << l;
  }
  return m;
}

// Completes a warp-synchronous call once every non-exited lane named in `mask` has arrived
// (CUDA: "all non-exited threads named in mask must execute the same intrinsic"): delivers
// to each participant the value it asked for, then lets them go. Values are delivered at
// this moment, while every participant's slot is fresh, so a lane that runs ahead into its
// next call cannot overwrite what a slower lane has yet to read.
inline bool try_release_warp(Worker& w, int warp, unsigned mask) {
  WarpSlots& ws = w.warps[warp];
  const unsigned need = mask & live_lanes(w, warp);
  if ((ws.arrived & need) != need) return false;
  unsigned ballot = 0;
  for (int l = 0; l < kWarp; ++l) {
    int pred;
    memcpy(&pred, ws.slot[l], sizeof pred);
    if ((need >> l & 1) && pred) ballot |= 1u << l;
  }
  for (int l = 0; l < kWarp; ++l) {
    if (!(need >> l & 1)) continue;
    Fiber& f = w.fibers[warp * kWarp + l];
    if (f.want == kWantBallot) {
      memcpy(f.inbox, &ballot, sizeof ballot);
      f.inbox_ok = true;
    } else if (f.want >= 0) {
      f.inbox_ok = need >> f.want & 1;  // the source took part (it is named and has not exited)
      if (f.inbox_ok) memcpy(f.inbox, ws.slot[f.want], sizeof f.inbox);
    }
    if (f.state == State::AtWarpSync) f.state = State::Ready;
  }
  ws.arrived &= ~need;
  return true;
}

// The calling lane publishes `value` (up to 16 bytes) and waits until the lanes of `mask`
// have met; then its inbox holds what `want` asked for.
inline Fiber& warp_meet(unsigned mask, const void* value, size_t bytes, int want) {
  Worker& w = worker();
  const int t = w.cur, warp = t / kWarp, lane = t % kWarp;
  if (!(mask >> lane & 1)) fail("warp-synchronous call from a lane outside its mask");
  if (want >= 0 && !(mask >> want & 1)) fail("shuffle reads a lane outside the mask");
  Fiber& f = w.fibers[t];
  WarpSlots& ws = w.warps[warp];
  memset(ws.slot[lane], 0, sizeof ws.slot[lane]);
  if (bytes) memcpy(ws.slot[lane], value, bytes);
  f.sync_mask = mask;
  f.want = want;
  f.inbox_ok = false;
  ws.arrived |= 1u << lane;
  if (!try_release_warp(w, warp, mask)) {
    f.state = State::AtWarpSync;
    to_scheduler();
  }
  return f;
}

inline void warp_sync(unsigned mask) { warp_meet(mask, nullptr, 0, kWantNone); }

// Each lane publishes `v`, the warp meets, and the lane gets the value of lane `src`.
template <class T>
inline T warp_exchange(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable<T>::value, "unsupported shuffle type");
  Fiber& f = warp_meet(mask, &v, sizeof(T), src);
  if (src == lane_id()) return v;
  if (!f.inbox_ok) fail("shuffle reads a lane that exited without taking part");
  T r;
  memcpy(&r, f.inbox, sizeof(T));
  return r;
}

inline unsigned warp_ballot(unsigned mask, int pred) {
  const int p = pred != 0;
  Fiber& f = warp_meet(mask, &p, sizeof p, kWantBallot);
  unsigned r;
  memcpy(&r, f.inbox, sizeof r);
  return r;
}

inline void* dynamic_smem() { return worker().dyn_smem.data(); }

inline void init_fiber(Worker& w, Fiber& f) {
#ifdef CUEMU_ASAN
  __asan_unpoison_memory_region(f.stack, w.stack_bytes);  // redzones of frames abandoned by the last block
#endif
#ifdef CUEMU_USE_UCONTEXT
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = w.stack_bytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_main, 0);
#else
  // Build the frame cuemu_swap pops: FP control words, six registers, return address.
  uint64_t* top = reinterpret_cast<uint64_t*>(f.stack + w.stack_bytes);
  *--top = 0;                                            // keeps rsp % 16 == 8 at fiber_main's entry
  *--top = reinterpret_cast<uint64_t>(&fiber_main);      // where 'ret' goes
  for (int r = 0; r < 6; ++r) *--top = 0;                // rbp rbx r12 r13 r14 r15
  uint32_t csr[2];
  __asm__ volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
  memcpy(--top, csr, sizeof csr);
  f.sp = top;
#endif
}

inline void run_block(Worker& w, uint3 bid, dim3 bdim, bool reverse) {
  w.block = bid;
  blockIdx = bid;
  w.nthreads = int(bdim.x * bdim.y * bdim.z);
  w.live = w.nthreads;
  w.barrier_arrived = 0;
  w.barrier_line = -1;
  w.warps.assign((w.nthreads + kWarp - 1) / kWarp, WarpSlots{});
  if (!w.dyn_smem.empty()) memset(w.dyn_smem.data(), 0xff, w.dyn_smem.size());
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  while (int(w.fibers.size()) < w.nthreads) {
    Fiber f;
    if (tls_stacks.bytes == w.stack_bytes && !tls_stacks.stacks.empty()) {
      f.stack = tls_stacks.stacks.back();
      tls_stacks.stacks.pop_back();
    } else {
      void* p = mmap(nullptr, w.stack_bytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) fail("cannot map a fiber stack");
      mprotect(p, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
      f.stack = static_cast<char*>(p) + page;
    }
    w.fibers.push_back(f);
  }
  for (int i = 0; i < w.nthreads; ++i) {
    Fiber& f = w.fibers[i];
    f.state = State::Ready;
    f.tid = uint3{unsigned(i) % bdim.x, unsigned(i) / bdim.x % bdim.y, unsigned(i) / (bdim.x * bdim.y)};
    init_fiber(w, f);
  }
  for (;;) {
    bool ran = false, pending = false;
    for (int k = 0; k < w.nthreads; ++k) {
      int i = reverse ? w.nthreads - 1 - k : k;
      State s = w.fibers[i].state;
      if (s == State::Exited) continue;
      pending = true;
      if (s != State::Ready) continue;
      to_fiber(w, i);
      ran = true;
    }
    if (!pending) break;
    if (!ran) fail("deadlock: threads wait at a barrier or warp sync that can never complete");
  }
  w.cur = -1;
}

// Runs `body` (which calls the kernel with its arguments) over the whole grid.
inline void launch(const char* kernel, dim3 grid, dim3 block, size_t dyn_smem_bytes, const std::function<void()>& body) {
  const size_t nblocks = size_t(grid.x) * grid.y * grid.z;
  const size_t stack = env_size("CUEMU_STACK", size_t(256) << 10);
  const size_t nworkers = std::max<size_t>(1, std::min(env_size("CUEMU_THREADS", 1), nblocks));
  const bool reverse = reverse_order();
  std::atomic<size_t> next{0};
  auto work = [&] {
    Worker w;
    w.kernel = kernel;
    w.body = &body;
    w.stack_bytes = stack;
    w.dyn_smem.assign(dyn_smem_bytes, 0);
    tls_worker = &w;
    blockDim = block;
    gridDim = grid;
    for (size_t b; (b = next.fetch_add(1)) < nblocks;) {
      uint3 bid{unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / (size_t(grid.x) * grid.y))};
      run_block(w, bid, block, reverse);
    }
    if (tls_stacks.bytes != w.stack_bytes) {
      tls_stacks.release();
      tls_stacks.bytes = w.stack_bytes;
    }
    for (Fiber& f : w.fibers) tls_stacks.stacks.push_back(f.stack);
    tls_worker = nullptr;
  };
  if (nworkers == 1) {
    work();
  } else {
    std::vector<std::thread> pool;
    for (size_t i = 0; i < nworkers; ++i) pool.emplace_back(work);
    for (auto& t : pool) t.join();
  }
}

}  // namespace cuemu

// ---- synchronisation and warp intrinsics ------------------------------------------
#define __syncthreads() ::cuemu::block_barrier(__LINE__)
inline void __syncwarp(unsigned mask = 0xffffffffu) { cuemu::warp_sync(mask); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = warpSize) {
  int lane = cuemu::lane_id();
  return cuemu::warp_exchange(mask, v, (lane & ~(width - 1)) | (src & (width - 1)));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  int lane = cuemu::lane_id(), src = lane ^ lane_mask;
  return cuemu::warp_exchange(mask, v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  int lane = cuemu::lane_id(), src = lane + int(delta);
  return cuemu::warp_exchange(mask, v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  int lane = cuemu::lane_id(), src = lane - int(delta);
  return cuemu::warp_exchange(mask, v, src >= (lane & ~(width - 1)) ? src : lane);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return cuemu::warp_ballot(mask, pred); }
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }
inline unsigned __activemask() {
  cuemu::Worker& w = cuemu::worker();
  return cuemu::live_lanes(w, w.cur / cuemu::kWarp);
}

// ---- atomics (real atomics: blocks may run on several OS threads) ------------------
template <class T, class Op>
inline T cuemu_atomic_rmw(T* addr, Op op) {
  T old;
  __atomic_load(addr, &old, __ATOMIC_RELAXED);
  for (;;) {
    T desired = op(old);
    if (__atomic_compare_exchange(addr, &old, &desired, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return old;
  }
}
inline float atomicAdd(float* a, float v) { return cuemu_atomic_rmw(a, [v](float x) { return x + v; }); }
inline double atomicAdd(double* a, double v) { return cuemu_atomic_rmw(a, [v](double x) { return x + v; }); }
inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
inline int atomicMax(int* a, int v) { return cuemu_atomic_rmw(a, [v](int x) { return x > v ? x : v; }); }
inline int atomicMin(int* a, int v) { return cuemu_atomic_rmw(a, [v](int x) { return x < v ? x : v; }); }
inline unsigned atomicMax(unsigned* a, unsigned v) { return cuemu_atomic_rmw(a, [v](unsigned x) { return x > v ? x : v; }); }
inline int atomicExch(int* a, int v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicExch(unsigned* a, unsigned v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }
inline float atomicExch(float* a, float v) { return cuemu_atomic_rmw(a, [v](float) { return v; }); }
inline int atomicCAS(int* a, int expect, int v) {
  __atomic_compare_exchange_n(a, &expect, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expect;
}
inline unsigned atomicCAS(unsigned* a, unsigned expect, unsigned v) {
  __atomic_compare_exchange_n(a, &expect, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expect;
}

// ---- math and bit intrinsics (host equivalents) ------------------------------------
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
using std::isfinite;
using std::isinf;
using std::isnan;
// CUDA's integer min/max overloads of device code.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __tanhf(float x) { return tanhf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
template <class T> inline T __ldg(const T* p) { return *p; }

// ---- nvcuda::wmma: every lane holds the whole tile ---------------------------------
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K> struct tile_shape;
template <int M, int N, int K> struct tile_shape<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K> struct tile_shape<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K> struct tile_shape<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = tile_shape<Use, M, N, K>::rows, cols = tile_shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];  // row-major rows x cols
};

template <class U, int M, int N, int K, class T, class L>
inline void fill_fragment(fragment<U, M, N, K, T, L>& f, T v) {
  for (auto& e : f.x) e = v;
}
template <class U, int M, int N, int K, class T, class L>
inline void load_matrix_sync(fragment<U, M, N, K, T, L>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<U, accumulator>::value, "accumulator loads need a layout_t");
  __syncwarp();
  constexpr bool col = std::is_same<L, col_major>::value;
  for (int r = 0; r < f.rows; ++r)
    for (int c = 0; c < f.cols; ++c) f.x[r * f.cols + c] = col ? p[c * ldm + r] : p[r * ldm + c];
}
template <int M, int N, int K, class T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t l) {
  __syncwarp();
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = l == mem_col_major ? p[c * ldm + r] : p[r * ldm + c];
}
template <int M, int N, int K, class T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t l) {
  __syncwarp();
  if (cuemu::lane_id() == 0)  // all lanes hold identical tiles: one writer suffices
    for (int r = 0; r < M; ++r)
      for (int c = 0; c < N; ++c) (l == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[r * N + c];
  __syncwarp();
}
// The product runs on fragments (lane-local copies, not device memory): it is compiled
// optimised and uninstrumented even in the AddressSanitizer build, where it would otherwise
// dominate the run time of tensor-core kernels.
template <int M, int N, int K, class TA, class TC>
#if defined(__SANITIZE_ADDRESS__)
__attribute__((no_sanitize_address))
#endif
__attribute__((optimize("O2"))) inline void mma_tile(TC* d, const TA* a, const TA* b, const TC* c) {
  float fa[M * K], fb[K * N];
  for (int i = 0; i < M * K; ++i) fa[i] = float(a[i]);
  for (int i = 0; i < K * N; ++i) fb[i] = float(b[i]);
  for (int i = 0; i < M; ++i) {
    float acc[N];
    for (int j = 0; j < N; ++j) acc[j] = float(c[i * N + j]);
    for (int k = 0; k < K; ++k)
      for (int j = 0; j < N; ++j) acc[j] += fa[i * K + k] * fb[k * N + j];
    for (int j = 0; j < N; ++j) d[i * N + j] = TC(acc[j]);
  }
}
template <int M, int N, int K, class TA, class LA, class LB, class TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
  __syncwarp();
  fragment<accumulator, M, N, K, TC> out;
  mma_tile<M, N, K>(out.x, a.x, b.x, c.x);
  d = out;
}
}  // namespace wmma
}  // namespace nvcuda
