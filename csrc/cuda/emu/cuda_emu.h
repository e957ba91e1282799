// A host emulation of the CUDA features bilstm_cuda.cu uses, so that its kernels run, unchanged, on a CPU:
// compiled by g++ with FAR_CUDA_EMU defined (emu_entry.cpp), driven by far_kernels/cuda_emu.py.
//
// Why: no GPU has run these kernels yet. The Triton kernels run under Triton's interpreter; the CUDA ones had only
// nvcc's compile check. This header makes their index arithmetic, fragment layouts, shuffles, barriers, persistent
// item loop and pruned-unit stores execute against the float64 reference, on every CI run.
//
// Model (deliberately strict where the hardware is lenient):
// - A block's threads are cooperative fibers (ucontext) in one OS thread. A fiber runs until it reaches
//   __syncthreads or a warp collective (shuffle, mma), then the next runnable one runs. Blocks run one after
//   another; a grid's blocks and a block's fibers may be visited in a seeded random order per round
//   (`schedule_seed`), which exposes a missing barrier as a wrong result.
// - __syncthreads releases when every thread of the block that has not exited waits at it. A warp collective
//   releases when all 32 lanes of the warp wait at the same collective (same source line); anything else (lanes of
//   one warp at different collectives, a barrier that can never release) is reported as a deadlock, not hung on.
// - Shared memory (static and dynamic) is fresh and filled with 0xFF bytes (NaN as float, fp16 and bf16) for every
//   block: a read of shared memory the kernel never wrote poisons its result. Real shared memory holds whatever
//   the previous block left.
// - Launch checks: at most 1024 threads per block, dynamic shared memory above 48 KiB only after
//   cudaFuncSetAttribute(MaxDynamicSharedMemorySize), and never above the emulated opt-in limit; static shared
//   memory at most 48 KiB.
// - Numerics: fmaf is the host's fused multiply-add (correctly rounded, as on the GPU); __expf/__fdividef are
//   not used (lstm_cell.h takes its host branch); tanh.approx.f32 is emulated by std::tanh, optionally biased by a
//   chosen relative error (Config::tanh_bias, e.g. the ISA's worst case on every call);
//   mma.sync m16n8k16 multiplies the 16-bit operands exactly in fp32 and adds them to the accumulator in k order
//   (tensor cores may order and round the sum differently: tests compare with derived tolerances, not bits).
// What it cannot show: timing, occupancy, register spills, bank conflicts, real memory-model races between
// warps (fibers interleave only at barriers), and anything the hardware does differently from the PTX ISA text.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_types.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <type_traits>
#include <vector>

// ---- CUDA qualifiers: plain C++ on the host ----
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __grid_constant__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) alignas(n)

namespace far_emu {

constexpr int kWarp = 32;
constexpr size_t kStaticSharedMax = 48 * 1024;
constexpr size_t kDefaultDynamicMax = 48 * 1024;

struct Config {
  int sms = 132;             // cudaDevAttrMultiProcessorCount
  int blocks_per_sm = 1;     // what cudaOccupancyMaxActiveBlocksPerMultiprocessor answers, for every kernel
  int optin_smem = 232448;   // cudaDevAttrMaxSharedMemoryPerBlockOptin (H100: 227 KiB)
  unsigned schedule_seed = 0;  // 0: blocks and fibers in index order; else a random order per round
  // tanh.approx.f32 stand-in: std::tanh times (1 + tanh_bias * r), r = +1 (0), -1 (1), or +-1 by a hash of x (2);
  // tanh_bias 0 is std::tanh. Lets a test put the ISA's worst relative error (2^-11) on every activation.
  float tanh_bias = 0.f;
  int tanh_bias_mode = 0;
};

struct Launch {
  std::string kernel;  // __PRETTY_FUNCTION__ of the kernel (template arguments included)
  unsigned grid = 0, block = 0;
  size_t shmem = 0;
};

struct Slot {
  uint32_t w[12];  // a lane's contribution to a warp collective (mma: A 4, B 2, C 4 words)
};

struct Fiber {
  enum State { kReady, kAtSync, kAtWarp, kDone };
  ucontext_t ctx;
  uint3 tid;
  State state = kReady;
  const char* op = nullptr;  // which collective, while kAtWarp
  int line = 0;              // and the source line that called it
};

struct WarpState {
  uint64_t gen = 0;
  Slot slot[2][kWarp];
};

struct BlockRun {
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  std::map<const void*, std::unique_ptr<unsigned char[]>> shared;
  size_t static_shared = 0;
  std::unique_ptr<unsigned char[]> dynamic;
  ucontext_t sched;
  int cur = -1;
  uint3 block_idx;
  dim3 block_dim, grid_dim;
};

struct State {
  Config cfg;
  // Every distinct (sms, blocks_per_sm, optin_smem) is another device number, so the host side's per-device
  // caches (SM count, occupancy) answer for the device a call describes.
  std::vector<Config> devices;
  int device = 0;
  std::vector<Launch> launches;
  // cudaFuncAttributeMaxDynamicSharedMemorySize per (device, kernel)
  std::map<std::pair<int, const void*>, int> max_dynamic;
  cudaError_t last = cudaSuccess;
  std::string message;  // the detail of an emulation failure
  BlockRun* block = nullptr;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::function<void()> body;
};

inline State& st() {
  static State s;
  return s;
}
inline Fiber& me() { return st().block->fibers[st().block->cur]; }
inline void yield() { swapcontext(&me().ctx, &st().block->sched); }

inline void fail(const std::string& what) {
  State& s = st();
  if (s.last == cudaSuccess) {
    s.last = cudaErrorLaunchFailure;
    s.message = "emulated launch failed: " + what;
  }
}

}  // namespace far_emu

// ---- built-in variables ----
#define threadIdx (::far_emu::me().tid)
#define blockIdx (::far_emu::st().block->block_idx)
#define blockDim (::far_emu::st().block->block_dim)
#define gridDim (::far_emu::st().block->grid_dim)

namespace far_emu {

// ---- barriers and warp collectives ----
inline void syncthreads() {
  me().state = Fiber::kAtSync;
  yield();
}

// Every lane of the warp publishes `mine` and waits; returns the slots of this collective's generation.
inline const Slot* warp_exchange(const char* op, int line, const Slot& mine) {
  BlockRun& b = *st().block;
  Fiber& f = me();
  const unsigned linear = f.tid.x + b.block_dim.x * (f.tid.y + b.block_dim.y * f.tid.z);
  WarpState& w = b.warps[linear / kWarp];
  const uint64_t gen = w.gen;
  w.slot[gen & 1][linear % kWarp] = mine;
  f.state = Fiber::kAtWarp;
  f.op = op;
  f.line = line;
  yield();
  return w.slot[gen & 1];
}
inline unsigned lane_id() {
  BlockRun& b = *st().block;
  const uint3 t = me().tid;
  return (t.x + b.block_dim.x * (t.y + b.block_dim.y * t.z)) % kWarp;
}

template <typename V>
inline V shfl_xor(unsigned mask, V v, int lane_mask, int line) {
  static_assert(sizeof(V) <= sizeof(Slot::w), "shuffle of a type wider than a slot");
  if (mask != 0xffffffffu) fail("__shfl_xor_sync with a partial mask is not emulated");
  Slot s{};
  std::memcpy(s.w, &v, sizeof(V));
  const Slot* all = warp_exchange("__shfl_xor_sync", line, s);
  V out;
  std::memcpy(&out, all[(lane_id() ^ static_cast<unsigned>(lane_mask)) % kWarp].w, sizeof(V));
  return out;
}

inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// The 16-bit element `hi` (0: low half, 1: high half) of a packed register.
template <typename T>
inline float unpack(uint32_t r, int hi) {
  const uint16_t bits = static_cast<uint16_t>(hi ? r >> 16 : r & 0xffffu);
  T v;
  std::memcpy(static_cast<void*>(&v), &bits, 2);
  return to_float(v);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A B + C. Fragment layouts from the PTX ISA
// ("Matrix Fragments for mma.m16n8k16 with floating point type"), group g = lane / 4, thread-in-group tg = lane % 4:
//   A 16x16, registers r0..r3: r0 (row g, cols 2tg, 2tg+1), r1 (row g+8, same cols), r2 (row g, cols 2tg+8, +9),
//            r3 (row g+8, cols 2tg+8, +9)
//   B 16x8, registers r0, r1: r0 (rows 2tg, 2tg+1; col g), r1 (rows 2tg+8, +9; col g)
//   C/D 16x8: c0, c1 (row g, cols 2tg, 2tg+1), c2, c3 (row g+8, same cols)
// (the lower element index sits in the lower 16 bits). The whole warp's fragments are gathered and each lane
// computes its own four outputs.
template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, int line = __builtin_LINE()) {
  Slot s{};
  for (int i = 0; i < 4; ++i) s.w[i] = a[i];
  s.w[4] = b0;
  s.w[5] = b1;
  const Slot* all =
      warp_exchange(std::is_same<T, __half>::value ? "mma.m16n8k16.f16" : "mma.m16n8k16.bf16", line, s);
  float A[16][16], B[16][8];
  for (int lane = 0; lane < kWarp; ++lane) {
    const int g = lane / 4, tg = lane % 4;
    const uint32_t* r = all[lane].w;
    for (int e = 0; e < 2; ++e) {
      A[g][2 * tg + e] = unpack<T>(r[0], e);
      A[g + 8][2 * tg + e] = unpack<T>(r[1], e);
      A[g][2 * tg + 8 + e] = unpack<T>(r[2], e);
      A[g + 8][2 * tg + 8 + e] = unpack<T>(r[3], e);
      B[2 * tg + e][g] = unpack<T>(r[4], e);
      B[2 * tg + 8 + e][g] = unpack<T>(r[5], e);
    }
  }
  const unsigned lane = lane_id();
  const int g = lane / 4, tg = lane % 4;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * tg, 2 * tg + 1, 2 * tg, 2 * tg + 1};
  for (int i = 0; i < 4; ++i) {
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A[rows[i]][k] * B[k][cols[i]];  // 16-bit products are exact in fp32
    d[i] = acc;
  }
}

inline float tanh_approx(float x) {
  const Config& c = st().cfg;
  const float y = std::tanh(x);
  if (c.tanh_bias == 0.f) return y;
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits *= 2654435761u;  // Knuth's multiplicative hash: a sign that changes with x but not between runs
  const float r = c.tanh_bias_mode == 0 ? 1.f : c.tanh_bias_mode == 1 ? -1.f : ((bits >> 31) ? 1.f : -1.f);
  return std::fmax(-1.f, std::fmin(1.f, y * (1.f + c.tanh_bias * r)));
}

// ---- shared memory ----
// A block's copy of the shared array declared at `key` (FAR_SHARED), created 0xFF-filled on first use.
inline void* block_shared(const void* key, size_t bytes) {
  BlockRun& b = *st().block;
  auto it = b.shared.find(key);
  if (it != b.shared.end()) return it->second.get();
  b.static_shared += bytes;
  if (b.static_shared > kStaticSharedMax)
    fail("static shared memory of " + std::to_string(b.static_shared) + " bytes, above 48 KiB");
  std::unique_ptr<unsigned char[]> mem(new (std::align_val_t(128)) unsigned char[bytes]);
  std::memset(mem.get(), 0xff, bytes);
  void* p = mem.get();
  b.shared.emplace(key, std::move(mem));
  return p;
}
inline void* dynamic_shared() { return st().block->dynamic.get(); }

inline void note_kernel(const char* name) {
  State& s = st();
  if (!s.launches.empty() && s.launches.back().kernel.empty()) s.launches.back().kernel = name;
}

// ---- the scheduler ----
inline void fiber_main() {
  st().body();
  me().state = Fiber::kDone;
  // returning resumes uc_link: the scheduler
}

constexpr size_t kStack = 128 * 1024;

inline std::string describe_states(const BlockRun& b) {
  int ready = 0, sync = 0, warp = 0, done = 0;
  for (const Fiber& f : b.fibers)
    (f.state == Fiber::kReady ? ready : f.state == Fiber::kAtSync ? sync : f.state == Fiber::kAtWarp ? warp : done)++;
  return std::to_string(sync) + " threads at __syncthreads, " + std::to_string(warp) + " at warp collectives, " +
         std::to_string(done) + " exited";
}

// Runs one block to completion; false on a deadlock (reported through fail()).
inline bool run_block(BlockRun& b, std::mt19937& rng) {
  State& s = st();
  const int n = static_cast<int>(b.fibers.size());
  while (s.stacks.size() < static_cast<size_t>(n)) s.stacks.emplace_back(new char[kStack]);
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = s.stacks[i].get();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, fiber_main, 0);
  }
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  for (;;) {
    if (s.cfg.schedule_seed) std::shuffle(order.begin(), order.end(), rng);
    for (int i : order) {
      if (b.fibers[i].state != Fiber::kReady) continue;
      b.cur = i;
      swapcontext(&b.sched, &b.fibers[i].ctx);
    }
    bool released = false, alive = false;
    // warp collectives: every live lane of a warp at the same one
    for (size_t w = 0; w < b.warps.size(); ++w) {
      const int lo = static_cast<int>(w) * kWarp, hi = std::min(n, lo + kWarp);
      int at = 0, live = 0;
      const char* op = nullptr;
      int line = 0;
      bool same = true;
      for (int i = lo; i < hi; ++i) {
        const Fiber& f = b.fibers[i];
        if (f.state == Fiber::kDone) continue;
        ++live;
        if (f.state == Fiber::kAtWarp) {
          ++at;
          if (op && (std::strcmp(op, f.op) != 0 || line != f.line)) same = false;
          op = f.op;
          line = f.line;
        }
      }
      if (live && at == live) {
        if (!same) {
          fail("lanes of warp " + std::to_string(w) + " wait at different collectives (divergent " + op + ")");
          return false;
        }
        if (hi - lo != kWarp || live != kWarp) {
          fail(std::string(op) + " reached by " + std::to_string(live) + " of 32 lanes of warp " + std::to_string(w));
          return false;
        }
        for (int i = lo; i < hi; ++i) b.fibers[i].state = Fiber::kReady;
        ++b.warps[w].gen;
        released = true;
      }
    }
    int live = 0, at_sync = 0;
    for (const Fiber& f : b.fibers) {
      if (f.state == Fiber::kDone) continue;
      ++live;
      at_sync += f.state == Fiber::kAtSync;
    }
    alive = live > 0;
    if (!alive) return true;
    if (!released && at_sync == live) {
      for (Fiber& f : b.fibers)
        if (f.state == Fiber::kAtSync) f.state = Fiber::kReady;
      released = true;
    }
    if (!released) {
      fail("deadlock in block " + std::to_string(b.block_idx.x) + ": " + describe_states(b));
      return false;
    }
  }
}

template <typename P>
inline void launch(void (*kernel)(P), dim3 grid, dim3 block, size_t shmem, const P& params) {
  State& s = st();
  s.launches.push_back(Launch{"", grid.x * grid.y * grid.z, block.x * block.y * block.z, shmem});
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0) {
    fail("invalid configuration: " + std::to_string(threads) + " threads per block, " + std::to_string(grid.x) +
         " blocks");
    return;
  }
  auto it = s.max_dynamic.find({s.device, reinterpret_cast<const void*>(kernel)});
  const size_t dyn_max = it == s.max_dynamic.end() ? kDefaultDynamicMax : static_cast<size_t>(it->second);
  if (shmem > dyn_max) {
    fail(std::to_string(shmem) + " bytes of dynamic shared memory, above the kernel's limit of " +
         std::to_string(dyn_max) + " (cudaFuncSetAttribute MaxDynamicSharedMemorySize)");
    return;
  }
  std::mt19937 rng(s.cfg.schedule_seed);
  std::vector<unsigned> blocks(grid.x * grid.y * grid.z);
  for (unsigned i = 0; i < blocks.size(); ++i) blocks[i] = i;
  if (s.cfg.schedule_seed) std::shuffle(blocks.begin(), blocks.end(), rng);
  P copy = params;
  s.body = [&] { kernel(copy); };
  for (unsigned lin : blocks) {
    BlockRun b;
    b.block_dim = block;
    b.grid_dim = grid;
    b.block_idx = uint3{lin % grid.x, (lin / grid.x) % grid.y, lin / (grid.x * grid.y)};
    b.fibers.resize(threads);
    for (unsigned i = 0; i < threads; ++i)
      b.fibers[i].tid = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
    b.warps.resize((threads + kWarp - 1) / kWarp);
    if (shmem) {
      b.dynamic.reset(new (std::align_val_t(128)) unsigned char[shmem]);
      std::memset(b.dynamic.get(), 0xff, shmem);
    }
    s.block = &b;
    const bool ok = run_block(b, rng);
    s.block = nullptr;
    if (!ok || s.last != cudaSuccess) return;
  }
}

// FAR_LAUNCH(kernel, grid, block, shmem, stream)(params)
template <typename P>
struct Launcher {
  void (*kernel)(P);
  dim3 grid, block;
  size_t shmem;
  void operator()(const P& params) const { launch(kernel, grid, block, shmem, params); }
};
template <typename P>
inline Launcher<P> launcher(void (*kernel)(P), dim3 grid, dim3 block, size_t shmem) {
  return Launcher<P>{kernel, grid, block, shmem};
}

}  // namespace far_emu

// ---- device functions the kernels call ----
inline void __syncthreads() { far_emu::syncthreads(); }
template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int line = __builtin_LINE()) {
  return far_emu::shfl_xor(mask, v, lane_mask, line);
}
template <typename V>
inline V __ldg(const V* p) {
  return *p;
}
using std::min;
using std::max;

// ---- the runtime API calls the host side makes ----
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = far_emu::st().device;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  const far_emu::State& s = far_emu::st();
  if (device < 0 || device >= static_cast<int>(s.devices.size())) return cudaErrorInvalidDevice;
  const far_emu::Config& c = s.devices[device];
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = c.sms; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = c.optin_smem; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}
template <typename K>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K /*kernel*/, int /*threads*/, size_t) {
  const far_emu::State& s = far_emu::st();
  *n = s.devices.at(s.device).blocks_per_sm;
  return cudaSuccess;
}
template <typename K>
inline cudaError_t cudaFuncSetAttribute(K kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value > far_emu::st().devices.at(far_emu::st().device).optin_smem) return cudaErrorInvalidValue;
  far_emu::st().max_dynamic[{far_emu::st().device, reinterpret_cast<const void*>(kernel)}] = value;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  far_emu::State& s = far_emu::st();
  const cudaError_t e = s.last;
  s.last = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  if (e == cudaErrorLaunchFailure && !far_emu::st().message.empty()) return far_emu::st().message.c_str();
  if (e == cudaErrorInvalidValue) return "invalid argument";
  return "emulated CUDA error";
}

// ---- what bilstm_cuda.cu spells differently for the two builds ----
#define FAR_SHARED(type, name, dims)                                                                         \
  using far_emu_##name##_t = type dims;                                                                     \
  static const char far_emu_##name##_key = 0;                                                               \
  far_emu_##name##_t& name =                                                                                 \
      *reinterpret_cast<far_emu_##name##_t*>(::far_emu::block_shared(&far_emu_##name##_key, sizeof(far_emu_##name##_t)))
#define FAR_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::far_emu::dynamic_shared())
#define FAR_LAUNCH(kernel, grid, block, shmem, stream) ::far_emu::launcher(kernel, dim3(grid), dim3(block), shmem)
#define FAR_EMU_KERNEL() ::far_emu::note_kernel(__PRETTY_FUNCTION__)
