// The harness scheduler: runs a launch block by block, each thread of a block a fiber with its own
// stack, switching only at synchronisation points (__syncthreads, warp primitives, kernel exit).
//
// Schedules (chosen by the seed): seed % 2 == 0 "warp-greedy": warps get a random priority (redrawn
// at each barrier) and the most urgent warp with a runnable thread runs, so one warp races as far
// ahead of the others as the code allows; seed % 2 == 1 "uniform": any runnable thread, uniformly at
// random. Within a warp the order is random in both. A missing barrier then shows as a stale or
// poisoned read for some seeds, and a result that differs between seeds.
#include <sys/mman.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "cuda_harness.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define BALCONY_HARNESS_ASAN 1
#endif

#if !defined(__x86_64__) && !defined(BALCONY_HARNESS_UCONTEXT)
#define BALCONY_HARNESS_UCONTEXT 1
#endif
#if defined(BALCONY_HARNESS_UCONTEXT)
#include <ucontext.h>
#endif

namespace balcony_harness {

Coords g_coords;

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr int kMaxThreads = 1024;

#if !defined(BALCONY_HARNESS_UCONTEXT)
// switch_stack(&save_sp, next_sp): saves the callee-saved registers and the FP control words on the
// current stack, stores its stack pointer in *save_sp, loads next_sp and restores from there.
extern "C" void balcony_harness_switch(void** save_sp, void* next_sp);
asm(R"(
  .text
  .globl balcony_harness_switch
  .type balcony_harness_switch,@function
balcony_harness_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size balcony_harness_switch,.-balcony_harness_switch
)");
#endif

enum class State : unsigned char { Ready, Barrier, Warp, Done };

struct Thread {
  State state = State::Done;
  uint3 idx{};
  // pending warp primitive
  WarpOp op{};
  unsigned mask = 0;
  unsigned long long in = 0, out = 0;
  int arg = 0, width = 32;
  int pred = 0, barrier_kind = 0;
  char* stack = nullptr;
#if defined(BALCONY_HARNESS_UCONTEXT)
  ucontext_t ctx;
#else
  void* sp = nullptr;
#endif
  void* fake_stack = nullptr;
};

struct SharedAlloc {
  char* base;  // what was allocated
  char* user;  // what the kernel sees
  size_t bytes;
  const char* name;
};

struct Launch {
  const char* name = "";
  KernelBody body{};
  dim3 grid, block;
  size_t smem = 0;
  int nthreads = 0, nwarps = 0;
  uint3 block_idx{};
};

// ----- global state (one launch at a time, one host thread) -----
Thread g_threads[kMaxThreads];
Launch g_launch;
int g_current = -1;  // running thread, -1 = scheduler
#if defined(BALCONY_HARNESS_UCONTEXT)
ucontext_t g_sched_ctx;
#else
void* g_sched_sp = nullptr;
#endif
void* g_sched_fake_stack = nullptr;
const void* g_sched_stack_bottom = nullptr;
size_t g_sched_stack_size = 0;
bool g_block_failed = false;
bool g_dirty_stacks = false;  // a block was abandoned: its stacks may hold sanitizer poison

std::string g_message;          // first failure of the process
cudaError_t g_last_error = cudaSuccess;
bool g_failed = false;
unsigned long long g_seed = 0;
std::mt19937_64 g_rng;
std::map<const void*, size_t> g_max_dynamic;
std::map<const void*, SharedAlloc> g_shared;
size_t g_static_bytes = 0;
SharedAlloc g_dynamic{};

// ready threads per warp, and warp priorities for the warp-greedy schedule
std::vector<int> g_ready[kMaxThreads / 32];
int g_priority[kMaxThreads / 32];
int g_ready_count = 0;
int g_barrier_count = 0;
int g_done_count = 0;

std::string fmt_v(const char* fmt, va_list ap) {
  char buf[2048];
  vsnprintf(buf, sizeof buf, fmt, ap);
  return buf;
}

std::string where() {
  char buf[256];
  snprintf(buf, sizeof buf, "kernel %s, block (%u,%u,%u)", g_launch.name, g_launch.block_idx.x, g_launch.block_idx.y,
           g_launch.block_idx.z);
  return buf;
}

void record_failure(const std::string& what, cudaError_t code) {
  std::string msg = "BALCONY CUDA HARNESS ERROR [seed " + std::to_string(g_seed) + "]: " + what;
  fprintf(stderr, "%s\n", msg.c_str());
  fflush(stderr);
  if (!g_failed) g_message = msg;
  g_failed = true;
  g_last_error = code;
}

char* new_stack() {
  void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) {
    perror("balcony cuda harness: mmap of a fiber stack");
    abort();
  }
  mprotect(p, kGuardBytes, PROT_NONE);  // overflowing a fiber's stack faults instead of corrupting
  return static_cast<char*>(p) + kGuardBytes;
}

// ----- switching -----
void start_switch(void** fake_save, const void* bottom, size_t size) {
#if defined(BALCONY_HARNESS_ASAN)
  __sanitizer_start_switch_fiber(fake_save, bottom, size);
#else
  (void)fake_save, (void)bottom, (void)size;
#endif
}
void finish_switch(void* fake, const void** old_bottom, size_t* old_size) {
#if defined(BALCONY_HARNESS_ASAN)
  __sanitizer_finish_switch_fiber(fake, old_bottom, old_size);
#else
  (void)fake, (void)old_bottom, (void)old_size;
#endif
}

// From a thread back to the scheduler. `dying`: the thread will never run again.
void to_scheduler(bool dying) {
  Thread& t = g_threads[g_current];
  start_switch(dying ? nullptr : &t.fake_stack, g_sched_stack_bottom, g_sched_stack_size);
#if defined(BALCONY_HARNESS_UCONTEXT)
  swapcontext(&t.ctx, &g_sched_ctx);
#else
  balcony_harness_switch(&t.sp, g_sched_sp);
#endif
  finish_switch(t.fake_stack, &g_sched_stack_bottom, &g_sched_stack_size);
}

void resume(int i) {
  Thread& t = g_threads[i];
  g_current = i;
  g_coords.thread = t.idx;
  start_switch(&g_sched_fake_stack, t.stack, kStackBytes);
#if defined(BALCONY_HARNESS_UCONTEXT)
  swapcontext(&g_sched_ctx, &t.ctx);
#else
  balcony_harness_switch(&g_sched_sp, t.sp);
#endif
  finish_switch(g_sched_fake_stack, nullptr, nullptr);
  g_current = -1;
}

void thread_main() {
  finish_switch(nullptr, &g_sched_stack_bottom, &g_sched_stack_size);
  g_launch.body.call(g_launch.body.obj);
  Thread& t = g_threads[g_current];
  t.state = State::Done;
  ++g_done_count;
  to_scheduler(true);
  __builtin_unreachable();
}

void init_thread(int i) {
  Thread& t = g_threads[i];
  if (!t.stack) t.stack = new_stack();
#if defined(BALCONY_HARNESS_ASAN)
  // A normally finished thread leaves only thread_main's frame poisoned (at the top); an abandoned
  // block leaves whole frames.
  if (g_dirty_stacks)
    __asan_unpoison_memory_region(t.stack, kStackBytes);
  else
    __asan_unpoison_memory_region(t.stack + kStackBytes - 16384, 16384);
#endif
  t.fake_stack = nullptr;
#if defined(BALCONY_HARNESS_UCONTEXT)
  getcontext(&t.ctx);
  t.ctx.uc_stack.ss_sp = t.stack;
  t.ctx.uc_stack.ss_size = kStackBytes;
  t.ctx.uc_link = nullptr;
  makecontext(&t.ctx, thread_main, 0);
#else
  // Initial frame, popped by balcony_harness_switch: FP control words, six registers, then `ret` into
  // thread_main with the stack aligned as after a call.
  uintptr_t top = (reinterpret_cast<uintptr_t>(t.stack) + kStackBytes) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                     // thread_main's (never used) return address
  *--sp = reinterpret_cast<void*>(&thread_main);       // popped by ret
  for (int r = 0; r < 6; ++r) *--sp = nullptr;         // rbp rbx r12..r15
  --sp;
  const uint32_t mxcsr = 0x1f80u, fpucw = 0x037fu;
  std::memcpy(reinterpret_cast<char*>(sp), &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpucw, 4);
  t.sp = sp;
#endif
}

// ----- kernel-side failure -----
[[noreturn]] void fail_in_kernel(const std::string& what) {
  record_failure(what, cudaErrorLaunchFailure);
  g_block_failed = true;
  g_threads[g_current].state = State::Done;
  to_scheduler(true);
  __builtin_unreachable();
}

std::string thread_name(int i) {
  const uint3 t = g_threads[i].idx;
  char buf[96];
  snprintf(buf, sizeof buf, "thread (%u,%u,%u) [warp %d lane %d]", t.x, t.y, t.z, i / 32, i % 32);
  return buf;
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::Sync: return "__syncwarp";
    case WarpOp::ShflIdx: return "__shfl_sync";
    case WarpOp::ShflUp: return "__shfl_up_sync";
    case WarpOp::ShflDown: return "__shfl_down_sync";
    case WarpOp::ShflXor: return "__shfl_xor_sync";
    case WarpOp::Ballot: return "__ballot_sync";
    case WarpOp::Any: return "__any_sync";
    case WarpOp::All: return "__all_sync";
  }
  return "?";
}

// ----- scheduling -----
void make_ready(int i) {
  g_threads[i].state = State::Ready;
  g_ready[i / 32].push_back(i);
  ++g_ready_count;
}

int pick_next() {
  int w = -1;
  if (g_seed % 2 == 0) {  // warp-greedy
    for (int k = 0; k < g_launch.nwarps; ++k)
      if (!g_ready[k].empty() && (w < 0 || g_priority[k] < g_priority[w])) w = k;
  } else {  // uniform over runnable threads
    long r = long(g_rng() % unsigned(g_ready_count));
    for (w = 0; r >= long(g_ready[w].size()); ++w) r -= long(g_ready[w].size());
  }
  std::vector<int>& q = g_ready[w];
  const size_t j = g_rng() % q.size();
  const int i = q[j];
  q[j] = q.back();
  q.pop_back();
  --g_ready_count;
  return i;
}

void draw_priorities() {
  for (int k = 0; k < g_launch.nwarps; ++k) g_priority[k] = k;
  for (int k = g_launch.nwarps - 1; k > 0; --k) std::swap(g_priority[k], g_priority[g_rng() % unsigned(k + 1)]);
}

int lanes_in_warp(int w) {
  const int n = g_launch.nthreads - w * 32;
  return n < 32 ? n : 32;
}

// Completes the warp primitive a group of lanes waits in, when every lane its mask names has arrived.
// Returns false when an error was recorded.
bool try_resolve_warp(int w) {
  const int nl = lanes_in_warp(w);
  const unsigned existing = nl == 32 ? 0xffffffffu : ((1u << nl) - 1u);
  for (int l = 0; l < nl; ++l) {
    Thread& t = g_threads[w * 32 + l];
    if (t.state != State::Warp) continue;
    const unsigned m = t.mask;
    // Messages are built only on failure: this runs at every warp-primitive arrival.
    auto who = [&] { return where() + ", " + thread_name(w * 32 + l) + ": " + op_name(t.op); };
    auto mb = [&] {
      char buf[64];
      snprintf(buf, sizeof buf, " with mask 0x%08x", m);
      return std::string(buf);
    };
    if (!(m >> l & 1u)) {
      record_failure(who() + mb() + " does not include the calling lane", cudaErrorLaunchFailure);
      return false;
    }
    if (m & ~existing) {
      record_failure(who() + mb() + " names lanes that do not exist (the block has " + std::to_string(g_launch.nthreads) +
                         " threads)", cudaErrorLaunchFailure);
      return false;
    }
    bool all_here = true;
    for (int j = 0; j < nl; ++j) {
      if (!(m >> j & 1u)) continue;
      const Thread& u = g_threads[w * 32 + j];
      if (u.state == State::Done) {
        record_failure(who() + mb() + " waits for lane " + std::to_string(j) + ", which has exited",
                       cudaErrorLaunchFailure);
        return false;
      }
      if (u.state != State::Warp) all_here = false;
    }
    if (!all_here) continue;
    for (int j = 0; j < nl; ++j) {
      if (!(m >> j & 1u)) continue;
      const Thread& u = g_threads[w * 32 + j];
      if (u.mask != m || u.op != t.op || u.width != t.width) {
        char buf[160];
        snprintf(buf, sizeof buf, " meets lane %d in %s with mask 0x%08x width %d", j, op_name(u.op), u.mask, u.width);
        record_failure(who() + mb() + " width " + std::to_string(t.width) + buf, cudaErrorLaunchFailure);
        return false;
      }
    }
    // Every lane of the mask is here, in the same primitive: compute each lane's result.
    unsigned ballot = 0;
    for (int j = 0; j < nl; ++j)
      if ((m >> j & 1u) && g_threads[w * 32 + j].in) ballot |= 1u << j;
    for (int j = 0; j < nl; ++j) {
      if (!(m >> j & 1u)) continue;
      Thread& u = g_threads[w * 32 + j];
      const int width = u.width, seg = j & ~(width - 1);
      int src = j;
      switch (u.op) {
        case WarpOp::Sync: break;
        case WarpOp::Ballot: u.out = ballot; break;
        case WarpOp::Any: u.out = ballot != 0; break;
        case WarpOp::All: u.out = ballot == m; break;
        case WarpOp::ShflIdx: src = seg + (u.arg & (width - 1)); break;
        case WarpOp::ShflUp: src = j - u.arg >= seg ? j - u.arg : j; break;
        case WarpOp::ShflDown: src = j + u.arg < seg + width ? j + u.arg : j; break;
        case WarpOp::ShflXor: src = (j ^ u.arg) < seg + width ? (j ^ u.arg) : j; break;
      }
      if (u.op >= WarpOp::ShflIdx && u.op <= WarpOp::ShflXor) {
        if (src < 0 || src >= 32 || !(m >> src & 1u)) {
          char buf[128];
          snprintf(buf, sizeof buf, " with mask 0x%08x: lane %d reads lane %d, which is not in the mask (undefined)",
                   m, j, src);
          record_failure(where() + ", warp " + std::to_string(w) + ": " + op_name(u.op) + buf, cudaErrorLaunchFailure);
          return false;
        }
        u.out = g_threads[w * 32 + src].in;
      }
    }
    for (int j = 0; j < nl; ++j)
      if (m >> j & 1u) make_ready(w * 32 + j);
  }
  return true;
}

void release_barrier() {
  int count = 0;
  for (int i = 0; i < g_launch.nthreads; ++i) count += g_threads[i].pred != 0;
  for (int i = 0; i < g_launch.nthreads; ++i) {
    Thread& t = g_threads[i];
    switch (t.barrier_kind) {
      case 1: t.out = unsigned(count); break;
      case 2: t.out = count == g_launch.nthreads; break;
      case 3: t.out = count != 0; break;
      default: t.out = 0;
    }
    make_ready(i);
  }
  g_barrier_count = 0;
  draw_priorities();
}

void report_stuck() {
  std::string msg = where() + ": threads stuck: ";
  if (g_barrier_count > 0) {
    msg += "__syncthreads reached by " + std::to_string(g_barrier_count) + " of " + std::to_string(g_launch.nthreads) +
           " threads (" + std::to_string(g_done_count) + " exited without it); a barrier every thread of the block "
           "must reach";
  }
  int shown = 0;
  for (int i = 0; i < g_launch.nthreads && shown < 4; ++i) {
    const Thread& t = g_threads[i];
    if (t.state != State::Warp) continue;
    unsigned missing = 0;
    for (int j = 0; j < 32; ++j)
      if ((t.mask >> j & 1u) && (i / 32) * 32 + j < g_launch.nthreads && g_threads[(i / 32) * 32 + j].state != State::Warp)
        missing |= 1u << j;
    char buf[200];
    snprintf(buf, sizeof buf, "%s%s waits in %s with mask 0x%08x for lanes 0x%08x that never arrive", shown ? "; " : "",
             thread_name(i).c_str(), op_name(t.op), t.mask, missing);
    msg += (g_barrier_count > 0 && !shown ? "; " : "") + std::string(buf);
    ++shown;
  }
  record_failure(msg, cudaErrorLaunchFailure);
}

void free_shared() {
  for (auto& [key, a] : g_shared) std::free(a.base);
  g_shared.clear();
  g_static_bytes = 0;
  std::free(g_dynamic.base);
  g_dynamic = {};
}

// Without AddressSanitizer, shared arrays get guard bytes on both sides, checked at block end.
#if defined(BALCONY_HARNESS_ASAN)
constexpr size_t kSharedGuard = 0;
#else
constexpr size_t kSharedGuard = 64;
#endif
constexpr unsigned char kGuardByte = 0xA5;

SharedAlloc shared_alloc(size_t bytes, size_t align, const char* name) {
  // Each array its own heap block, so AddressSanitizer's redzones sit right at its ends. Contents start
  // as 0xFF bytes: NaN as float/half/bfloat16, -1 as an integer.
  if (align < 16) align = 16;
  void* p = nullptr;
  if (posix_memalign(&p, align, bytes + 2 * kSharedGuard) != 0) {
    perror("balcony cuda harness: shared memory allocation");
    abort();
  }
  char* base = static_cast<char*>(p);
  std::memset(base, kGuardByte, kSharedGuard);
  std::memset(base + kSharedGuard, 0xFF, bytes);
  std::memset(base + kSharedGuard + bytes, kGuardByte, kSharedGuard);
  return {base, base + kSharedGuard, bytes, name};
}

bool guards_intact(const SharedAlloc& a) {
  for (size_t k = 0; k < kSharedGuard; ++k)
    if (static_cast<unsigned char>(a.base[k]) != kGuardByte ||
        static_cast<unsigned char>(a.user[a.bytes + k]) != kGuardByte)
      return false;
  return true;
}

void check_shared_guards() {
  if (kSharedGuard == 0 || g_block_failed) return;
  for (auto& [key, a] : g_shared)
    if (!guards_intact(a))
      record_failure(where() + ": write out of bounds of shared array '" + a.name + "'", cudaErrorIllegalAddress);
  if (g_dynamic.base && !guards_intact(g_dynamic))
    record_failure(where() + ": write out of bounds of dynamic shared memory (" + std::to_string(g_dynamic.bytes) +
                       " bytes)", cudaErrorIllegalAddress);
}

void run_block(uint3 bidx) {
  g_launch.block_idx = bidx;
  g_coords.block = bidx;
  g_block_failed = false;
  free_shared();
  g_dynamic = shared_alloc(g_launch.smem, 16, "dynamic");
  g_ready_count = g_barrier_count = g_done_count = 0;
  for (int w = 0; w < g_launch.nwarps; ++w) g_ready[w].clear();
  draw_priorities();
  const dim3 b = g_launch.block;
  for (int i = 0; i < g_launch.nthreads; ++i) {
    Thread& t = g_threads[i];
    t.idx = {i % b.x, (i / b.x) % b.y, i / (b.x * b.y)};
    t.pred = 0;
    t.barrier_kind = 0;
    init_thread(i);
    make_ready(i);
  }
  while (g_done_count < g_launch.nthreads) {
    if (g_ready_count == 0) {
      report_stuck();
      g_block_failed = true;
      break;
    }
    const int i = pick_next();
    resume(i);
    if (g_block_failed) break;
    const State s = g_threads[i].state;
    if (s == State::Warp) {
      if (!try_resolve_warp(i / 32)) {
        g_block_failed = true;
        break;
      }
    } else if (s == State::Barrier) {
      if (g_barrier_count + g_done_count == g_launch.nthreads && g_done_count == 0) release_barrier();
    }
  }
  if (g_block_failed) g_dirty_stacks = true;
  check_shared_guards();
}

}  // namespace

// ----- kernel side -----
void kernel_error(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string what = fmt_v(fmt, ap);
  va_end(ap);
  if (g_current < 0) {
    record_failure(what, cudaErrorLaunchFailure);
    abort();
  }
  fail_in_kernel(where() + ", " + thread_name(g_current) + ": " + what);
}

unsigned long long warp_exchange(WarpOp op, unsigned mask, unsigned long long bits, int arg, int width) {
  if (g_current < 0) kernel_error("%s called outside a kernel", op_name(op));
  if (width <= 0 || width > 32 || (width & (width - 1)))
    kernel_error("%s with width %d (must be a power of two up to 32)", op_name(op), width);
  Thread& t = g_threads[g_current];
  t.op = op;
  t.mask = mask;
  t.in = bits;
  t.arg = arg;
  t.width = width;
  t.state = State::Warp;
  to_scheduler(false);
  return g_threads[g_current].out;
}

int barrier(int kind, int pred) {
  if (g_current < 0) kernel_error("__syncthreads called outside a kernel");
  Thread& t = g_threads[g_current];
  t.state = State::Barrier;
  t.barrier_kind = kind;
  t.pred = pred;
  ++g_barrier_count;
  to_scheduler(false);
  return int(g_threads[g_current].out);
}

unsigned active_mask() {
  // Lanes of the warp that have not exited (the harness does not model divergence itself).
  const int w = g_current / 32;
  unsigned m = 0;
  for (int j = 0; j < lanes_in_warp(w); ++j)
    if (g_threads[w * 32 + j].state != State::Done) m |= 1u << j;
  return m;
}

void* static_shared(const void* key, size_t bytes, size_t align, const char* name) {
  auto it = g_shared.find(key);
  if (it != g_shared.end()) return it->second.user;
  g_static_bytes += bytes;
  if (g_static_bytes > kStaticSharedLimit)
    kernel_error("static shared memory %zu bytes exceeds the %zu-byte limit", g_static_bytes, kStaticSharedLimit);
  if (g_static_bytes + g_launch.smem > kSharedOptinLimit)
    kernel_error("static + dynamic shared memory %zu bytes exceeds the %zu-byte limit", g_static_bytes + g_launch.smem,
                 kSharedOptinLimit);
  SharedAlloc a = shared_alloc(bytes, align, name);
  g_shared.emplace(key, a);
  return a.user;
}

void* dynamic_shared() { return g_dynamic.user; }

// ----- host side -----
cudaError_t launch_impl(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem, KernelBody body) {
  const unsigned long long nthreads = 1ull * block.x * block.y * block.z;
  char cfg[200];
  snprintf(cfg, sizeof cfg, "launch of %s with grid (%u,%u,%u), block (%u,%u,%u), %zu bytes dynamic shared memory",
           name, grid.x, grid.y, grid.z, block.x, block.y, block.z, smem);
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      nthreads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 ||
      grid.z > 65535) {
    record_failure(std::string("invalid configuration: ") + cfg, cudaErrorInvalidConfiguration);
    return g_last_error;
  }
  auto it = g_max_dynamic.find(kernel);
  const size_t limit = it == g_max_dynamic.end() ? kDefaultDynamicSharedLimit : it->second;
  if (smem > limit) {
    record_failure(std::string(cfg) + ": more than the kernel's " + std::to_string(limit) +
                       "-byte dynamic shared memory limit (cudaFuncSetAttribute raises it)",
                   cudaErrorInvalidValue);
    return g_last_error;
  }
  g_launch.name = name;
  g_launch.body = body;
  g_launch.grid = grid;
  g_launch.block = block;
  g_launch.smem = smem;
  g_launch.nthreads = int(nthreads);
  g_launch.nwarps = int((nthreads + 31) / 32);
  g_coords.block_dim = block;
  g_coords.grid_dim = grid;
  // Blocks run one after another, in a seeded random order (real blocks run in any order).
  std::vector<uint3> blocks;
  blocks.reserve(size_t(grid.x) * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back({x, y, z});
  std::shuffle(blocks.begin(), blocks.end(), g_rng);
  bool ok = true;
  for (const uint3& b : blocks) {
    run_block(b);
    if (g_block_failed) {
      ok = false;
      break;
    }
  }
  free_shared();
  g_launch.name = "";
  if (!ok && g_last_error == cudaSuccess) g_last_error = cudaErrorLaunchFailure;
  return ok ? cudaSuccess : g_last_error;
}

cudaError_t get_last_error(bool reset) {
  const cudaError_t e = g_last_error;
  if (reset) g_last_error = cudaSuccess;
  return e;
}

bool failed() { return g_failed; }
const char* failure_message() { return g_message.c_str(); }

void set_seed(unsigned long long seed) {
  g_seed = seed;
  g_rng.seed(seed * 0x9E3779B97F4A7C15ull + 12345);
}

void set_max_dynamic_shared(const void* kernel, size_t bytes) { g_max_dynamic[kernel] = bytes; }

}  // namespace balcony_harness
