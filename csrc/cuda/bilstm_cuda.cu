// Multi-head bidirectional LSTM scan on CUDA: one persistent launch for every (direction, head,
// batch tile) work item. Torch-free (raw pointers, sizes and a stream in) so nvcc compiles it
// quickly; csrc/bindings.cpp does the torch side.
//
// Work item = (dh = dir * H + head, batch tile of BT rows). A block runs items [first, last) of the
// dh-major item list, so consecutive items share W_hh and it is loaded once per (dir, head), then
// kept in REGISTERS for all T steps (and all the block's items of that (dir, head)). Per step the
// only exchange is h_{t-1} through a double-buffered shared array: one __syncthreads per step, no
// grid barrier. The two directions and all heads are independent items, so blocks of both directions
// share an SM and hide each other's latency. Warp w owns kept units 8w .. 8w+7 (all four gates).
//   FMA path (any dtype, exact fp32 math): lane = 4 * unit + slice; a thread holds W_hh[q*n + u][slice]
//     (4 gates x KS columns) and sums over its K slice; a 4-lane reduce-scatter leaves every lane
//     the full gates of its own batch rows, so the cell update is spread over all lanes.
//   MMA path (fp16/bf16): gates^T [4k x BT] = W_hh [4k x k] . h^T [k x BT] with mma.sync m16n8k16
//     (fp32 accumulate, gx as the accumulator's initial value). Rows are permuted so that the warp's
//     two m-tiles hold (i, f) and (g, o) of its 8 units: the accumulator fragment of a lane holds
//     all four gates of (unit, 2 batch columns), so the cell update needs no shuffle. W_hh stays in
//     A-fragment registers; h^T is read from shared memory as B fragments (conflict-free padding).
//   Wider heads (kept units > kFastMaxHidden) run a simple kernel (W_hh from L2 every step).
// State c and all accumulation are fp32; activations from one tanh each (lstm_cell.h).
#ifdef FAR_CUDA_EMU
#include "emu/cuda_emu.h"  // the host emulation: tests run these kernels on a CPU (far_kernels/cuda_emu.py)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
// What the emulation spells differently: shared arrays, dynamic shared memory, a launch, a kernel's name.
#define FAR_SHARED(type, name, dims) __shared__ __align__(16) type name dims
#define FAR_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#define FAR_LAUNCH(kernel, grid, block, shmem, stream) kernel<<<grid, block, shmem, stream>>>
#define FAR_EMU_KERNEL()
#endif

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>

#include "../lstm_cell.h"
#include "bilstm_cuda.h"

namespace far {
namespace {

// ---- element conversions ----
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// two fp32 -> one 32-bit register of two 16-bit values (lo = element with the lower index)
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// ---- activations (both saturate to +-1 for huge |x|, NaN propagates) ----
// tanh.approx.f32: one MUFU op, max relative error ~2^-11 (PTX ISA).
__device__ __forceinline__ float tanh_fast(float x) {
#ifdef FAR_CUDA_EMU
  return far_emu::tanh_approx(x);
#else
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}
// 1 - 2 / (1 + e^{2x}) with ex2.approx and rcp.approx (two MUFU ops), absolute error ~1e-7: tanh_via_exp
// in ../lstm_cell.h, where a CPU test (tests/kernels/test_lstm_cell.py) checks it with the cell updates.
__device__ __forceinline__ float tanh_accurate(float x) { return tanh_via_exp(x); }

struct TanhFast {
  __device__ __forceinline__ float operator()(float x) const { return tanh_fast(x); }
};
struct TanhAccurate {
  __device__ __forceinline__ float operator()(float x) const { return tanh_accurate(x); }
};

__device__ __forceinline__ float cell(float gi, float gf, float gg, float go, float& c, bool fast) {
  return fast ? lstm_cell_via_tanh(gi, gf, gg, go, c, TanhFast{}) : lstm_cell_via_tanh(gi, gf, gg, go, c, TanhAccurate{});
}

// ---- kernel parameters (hidden sizes by value: no host-to-device copy per call) ----
struct Params {
  const void* gx;     // [H, B, T, 2, 4n]
  const float* w;     // [H, 2, 4n, n]
  void* out;          // [H, B, T, 2, n]
  int H, B, T, n;
  int ntiles;         // batch tiles per (dir, head)
  int items;          // 2 * H * ntiles, dh-major: item = (dir * H + head) * ntiles + tile
  int per_block;      // items per block (contiguous range)
  int fast;           // tanh.approx activations
  int kmax;           // largest kept size over (dir, head); the wide kernel's shared memory is 6 * kmax floats
  uint16_t hid[2 * kMaxHeads];  // kept units, index dir * H + head
};

__device__ __forceinline__ int64_t gx_row(const Params& p, int head, int b, int t, int dir) {
  return ((static_cast<int64_t>(head) * p.B + b) * p.T + t) * 8 * p.n + static_cast<int64_t>(dir) * 4 * p.n;
}
__device__ __forceinline__ int64_t out_row(const Params& p, int head, int b, int t, int dir) {
  return ((static_cast<int64_t>(head) * p.B + b) * p.T + t) * 2 * p.n + static_cast<int64_t>(dir) * p.n;
}

// Units [k, n) of rows [b0, b0 + nb) at every step are 0 (fire-and-forget stores, off the recurrence;
// a warp per (row, step), no integer division).
template <typename T>
__device__ void write_pruned_zeros(const Params& p, int head, int dir, int b0, int nb, int k) {
  if (k == p.n) return;
  T* out = static_cast<T*>(p.out);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int b = b0; b < b0 + nb; ++b)
    for (int t = warp; t < p.T; t += nwarps) {
      T* o = out + out_row(p, head, b, t, dir);
      for (int u = k + lane; u < p.n; u += 32) o[u] = from_f32<T>(0.f);
    }
}

// ============================== FMA path ==============================
// KS = K-slice width (4 slices cover k <= 4 KS), BT = batch rows per tile.
// Shared h row: slice s at floats [s (KS + 4), s (KS + 4) + KS) (padding: conflict-free LDS.128).
template <int KS>
__device__ __forceinline__ int fma_hpos(int kk) { return (kk / KS) * (KS + 4) + kk % KS; }

template <typename T, int KS, int BT>
__global__ void __launch_bounds__(256) bilstm_fma_kernel(const __grid_constant__ Params p) {
  constexpr int HS = 4 * (KS + 4);                // floats per h row
  constexpr int RO = BT >= 4 ? BT / 4 : 1;        // rows whose cell this lane updates
  FAR_EMU_KERNEL();
  FAR_SHARED(float, hbuf, [2][BT][HS]);
  const int lane = threadIdx.x & 31, u = (threadIdx.x >> 5) * 8 + (lane >> 2), s = lane & 3;
  const T* gx = static_cast<const T*>(p.gx);
  T* out = static_cast<T*>(p.out);
  float w[4][KS];
  int dh_loaded = -1;
  const int first = blockIdx.x * p.per_block, last = min(first + p.per_block, p.items);
  for (int item = first; item < last; ++item) {
    const int dh = item / p.ntiles, tile = item % p.ntiles;
    const int dir = dh / p.H, head = dh % p.H, k = p.hid[dh];
    const int b0 = tile * BT, nb = min(BT, p.B - b0);
    write_pruned_zeros<T>(p, head, dir, b0, nb, k);
    if (k == 0) continue;  // block-uniform
    if (dh != dh_loaded) {
      const float* wd = p.w + (static_cast<int64_t>(head) * 2 + dir) * 4 * p.n * p.n;
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int i = 0; i < KS; ++i) {
          const int col = s * KS + i;
          w[q][i] = (u < k && col < k) ? __ldg(wd + static_cast<int64_t>(q * p.n + u) * p.n + col) : 0.f;
        }
      dh_loaded = dh;
    }
    __syncthreads();  // the previous item's readers of hbuf are done
    for (int i = threadIdx.x; i < 2 * BT * HS; i += blockDim.x) (&hbuf[0][0][0])[i] = 0.f;
    // this lane's cell rows: r = 4j + s (BT >= 4) or r = s (BT < 4)
    float c[RO], g_next[RO][4];
    bool mine[RO];
#pragma unroll
    for (int j = 0; j < RO; ++j) {
      const int r = BT >= 4 ? 4 * j + s : s;
      mine[j] = u < k && r < nb;
      c[j] = 0.f;
    }
    auto load_gx = [&](int t) {
#pragma unroll
      for (int j = 0; j < RO; ++j) {
        const int r = BT >= 4 ? 4 * j + s : s;
#pragma unroll
        for (int q = 0; q < 4; ++q)
          g_next[j][q] = mine[j] ? to_f32(gx[gx_row(p, head, b0 + r, t, dir) + q * p.n + u]) : 0.f;
      }
    };
    load_gx(dir == 0 ? 0 : p.T - 1);
    __syncthreads();
    for (int step = 0; step < p.T; ++step) {
      const int t = dir == 0 ? step : p.T - 1 - step;
      float g_cur[RO][4];
#pragma unroll
      for (int j = 0; j < RO; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) g_cur[j][q] = g_next[j][q];
      if (step + 1 < p.T) load_gx(dir == 0 ? t + 1 : t - 1);  // in flight during the product
      const float(*cur)[HS] = hbuf[step & 1];
      float(*nxt)[HS] = hbuf[(step + 1) & 1];
      // partial gates over this lane's K slice
      float acc[4][BT];
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int r = 0; r < BT; ++r) acc[q][r] = 0.f;
#pragma unroll
      for (int i = 0; i < KS; i += 4) {
#pragma unroll
        for (int r = 0; r < BT; ++r) {
          const float4 hv = *reinterpret_cast<const float4*>(&cur[r][s * (KS + 4) + i]);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            acc[q][r] = fmaf(w[q][i], hv.x, acc[q][r]);
            acc[q][r] = fmaf(w[q][i + 1], hv.y, acc[q][r]);
            acc[q][r] = fmaf(w[q][i + 2], hv.z, acc[q][r]);
            acc[q][r] = fmaf(w[q][i + 3], hv.w, acc[q][r]);
          }
        }
      }
      // sum over the 4 slice lanes; afterwards gate[q][j] is the full gate of row (BT >= 4 ? 4j + s : s)
      float gate[RO][4];
      if constexpr (BT >= 4) {
        const bool b1 = s & 2, b0b = s & 1;
        float pair[4][BT / 2];
#pragma unroll
        for (int q = 0; q < 4; ++q)
#pragma unroll
          for (int j = 0; j < BT / 4; ++j)
#pragma unroll
            for (int lo = 0; lo < 2; ++lo) {
              const float a = acc[q][4 * j + lo], b = acc[q][4 * j + 2 + lo];
              const float keep = b1 ? b : a, give = b1 ? a : b;
              pair[q][2 * j + lo] = keep + __shfl_xor_sync(0xffffffffu, give, 2);
            }
#pragma unroll
        for (int q = 0; q < 4; ++q)
#pragma unroll
          for (int j = 0; j < BT / 4; ++j) {
            const float a = pair[q][2 * j], b = pair[q][2 * j + 1];
            const float keep = b0b ? b : a, give = b0b ? a : b;
            gate[j][q] = keep + __shfl_xor_sync(0xffffffffu, give, 1);
          }
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          float pick = 0.f;
#pragma unroll
          for (int r = 0; r < BT; ++r) {
            float v = acc[q][r];
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            pick = r == s ? v : pick;
          }
          gate[0][q] = pick;
        }
      }
#pragma unroll
      for (int j = 0; j < RO; ++j) {
        if (!mine[j]) continue;
        const int r = BT >= 4 ? 4 * j + s : s;
        const float h = cell(gate[j][0] + g_cur[j][0], gate[j][1] + g_cur[j][1], gate[j][2] + g_cur[j][2],
                             gate[j][3] + g_cur[j][3], c[j], p.fast);
        nxt[r][fma_hpos<KS>(u)] = h;
        out[out_row(p, head, b0 + r, t, dir) + u] = from_f32<T>(h);
      }
      __syncthreads();  // h_t visible to every warp; also frees `cur` for step + 2
    }
  }
}

// ============================== MMA path ==============================
// KT = K / 16 k-steps (K >= kept units), NT = n-tiles of 8 batch columns (BT = 8 NT).
// mma.sync.m16n8k16 fragment layouts (PTX ISA), g = lane / 4, tg = lane % 4:
//   A (16x16, row): reg0 (g, 2tg..2tg+1), reg1 (g+8, same), reg2 (g, 2tg+8..), reg3 (g+8, 2tg+8..)
//   B (16x8, col):  reg0 (k = 2tg..2tg+1, n = g), reg1 (k = 2tg+8.., n = g)
//   C (16x8 fp32):  c0,c1 (g, 2tg..2tg+1), c2,c3 (g+8, same)
// Warp w, m-tile mt: row g = gate 2mt of unit 8w+g, row g+8 = gate 2mt+1 of the same unit.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef FAR_CUDA_EMU
  far_emu::mma_m16n8k16<__half>(d, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
#ifdef FAR_CUDA_EMU
  far_emu::mma_m16n8k16<__nv_bfloat16>(d, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <typename T, int KT, int NT>
__global__ void __launch_bounds__(256) bilstm_mma_kernel(const __grid_constant__ Params p) {
  constexpr int K = 16 * KT, BT = 8 * NT;
  constexpr int S = K + 8;  // halves per h row: S/2 = 4 (mod 8) words -> B-fragment loads conflict-free
  FAR_EMU_KERNEL();
  FAR_SHARED(T, hbuf, [2][BT][S]);
  const int lane = threadIdx.x & 31, g = lane >> 2, tg = lane & 3;
  const int u = (threadIdx.x >> 5) * 8 + g;
  const T* gx = static_cast<const T*>(p.gx);
  T* out = static_cast<T*>(p.out);
  uint32_t a[2][KT][4];
  int dh_loaded = -1;
  const int first = blockIdx.x * p.per_block, last = min(first + p.per_block, p.items);
  for (int item = first; item < last; ++item) {
    const int dh = item / p.ntiles, tile = item % p.ntiles;
    const int dir = dh / p.H, head = dh % p.H, k = p.hid[dh];
    const int b0 = tile * BT, nb = min(BT, p.B - b0);
    write_pruned_zeros<T>(p, head, dir, b0, nb, k);
    if (k == 0) continue;  // block-uniform
    if (dh != dh_loaded) {
      const float* wd = p.w + (static_cast<int64_t>(head) * 2 + dir) * 4 * p.n * p.n;
      auto wv = [&](int q, int col) {
        return (u < k && col < k) ? __ldg(wd + static_cast<int64_t>(q * p.n + u) * p.n + col) : 0.f;
      };
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int ks = 0; ks < KT; ++ks) {
          const int c0 = ks * 16 + 2 * tg;
          a[mt][ks][0] = pack2<T>(wv(2 * mt, c0), wv(2 * mt, c0 + 1));
          a[mt][ks][1] = pack2<T>(wv(2 * mt + 1, c0), wv(2 * mt + 1, c0 + 1));
          a[mt][ks][2] = pack2<T>(wv(2 * mt, c0 + 8), wv(2 * mt, c0 + 9));
          a[mt][ks][3] = pack2<T>(wv(2 * mt + 1, c0 + 8), wv(2 * mt + 1, c0 + 9));
        }
      dh_loaded = dh;
    }
    __syncthreads();  // the previous item's readers of hbuf are done
    for (int i = threadIdx.x; i < 2 * BT * S / 2; i += blockDim.x) reinterpret_cast<uint32_t*>(&hbuf[0][0][0])[i] = 0u;
    // this lane's cells: (unit u, batch column 8nt + 2tg + e); accumulator layout [mt][nt][e + 2 * (gate & 1)]
    float c[NT][2], g_next[2][NT][4];
    bool col_ok[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        c[nt][e] = 0.f;
        col_ok[nt][e] = u < k && 8 * nt + 2 * tg + e < nb;
      }
    auto load_gx = [&](int t) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t row = col_ok[nt][e] ? gx_row(p, head, b0 + 8 * nt + 2 * tg + e, t, dir) + u : 0;
#pragma unroll
          for (int q = 0; q < 4; ++q)
            g_next[q >> 1][nt][e + 2 * (q & 1)] = col_ok[nt][e] ? to_f32(gx[row + q * p.n]) : 0.f;
        }
    };
    load_gx(dir == 0 ? 0 : p.T - 1);
    __syncthreads();
    for (int step = 0; step < p.T; ++step) {
      const int t = dir == 0 ? step : p.T - 1 - step;
      float acc[2][NT][4];  // starts at gx: D = W h + gx
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mt][nt][e] = g_next[mt][nt][e];
      if (step + 1 < p.T) load_gx(dir == 0 ? t + 1 : t - 1);  // in flight during the product
      const uint32_t* cur = reinterpret_cast<const uint32_t*>(&hbuf[step & 1][0][0]);
      T(*nxt)[S] = hbuf[(step + 1) & 1];
#pragma unroll
      for (int ks = 0; ks < KT; ++ks) {
        uint32_t b[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int w0 = (8 * nt + g) * (S / 2) + ks * 8 + tg;
          b[nt][0] = cur[w0];
          b[nt][1] = cur[w0 + 4];
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma16816<T>(acc[mt][nt], a[mt][ks], b[nt][0], b[nt][1]);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (!col_ok[nt][e]) continue;
          const int col = 8 * nt + 2 * tg + e;
          const float h = cell(acc[0][nt][e], acc[0][nt][2 + e], acc[1][nt][e], acc[1][nt][2 + e], c[nt][e], p.fast);
          const T hv = from_f32<T>(h);
          nxt[col][u] = hv;
          out[out_row(p, head, b0 + col, t, dir) + u] = hv;
        }
      __syncthreads();  // h_t visible to every warp; also frees `cur` for step + 2
    }
  }
}

// ============================== wide heads (k > kFastMaxHidden) ==============================
// One block per (dir, head, batch row): threads over the 4k gate rows, W_hh read from L2 every step.
template <typename T>
__global__ void bilstm_wide_kernel(const __grid_constant__ Params p) {
  FAR_EMU_KERNEL();
  const int item = blockIdx.x;  // (dir * H + head) * B + b
  const int b = item % p.B, dh = item / p.B, dir = dh / p.H, head = dh % p.H, k = p.hid[dh];
  const T* gx = static_cast<const T*>(p.gx);
  T* out = static_cast<T*>(p.out);
  write_pruned_zeros<T>(p, head, dir, b, 1, k);
  if (k == 0) return;
  FAR_DYNAMIC_SHARED(float, smem);
  float* hs = smem;             // [k]
  float* gs = smem + p.kmax;     // [4k]
  float* cs = smem + 5 * p.kmax;  // [k]
  for (int i = threadIdx.x; i < k; i += blockDim.x) hs[i] = cs[i] = 0.f;
  const float* w = p.w + (static_cast<int64_t>(head) * 2 + dir) * 4 * p.n * p.n;
  for (int step = 0; step < p.T; ++step) {
    const int t = dir == 0 ? step : p.T - 1 - step;
    const T* gr = gx + gx_row(p, head, b, t, dir);
    __syncthreads();
    for (int j = threadIdx.x; j < 4 * k; j += blockDim.x) {
      const int row = (j / k) * p.n + j % k;
      float acc = to_f32(gr[row]);
      const float* wr = w + static_cast<int64_t>(row) * p.n;
      for (int kk = 0; kk < k; ++kk) acc = fmaf(__ldg(wr + kk), hs[kk], acc);
      gs[j] = acc;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
      float cc = cs[i];
      const float h = cell(gs[i], gs[k + i], gs[2 * k + i], gs[3 * k + i], cc, p.fast);
      cs[i] = cc;
      hs[i] = h;
      out[out_row(p, head, b, t, dir) + i] = from_f32<T>(h);
    }
  }
}

// ============================== launch ==============================
// Occupancy and SM count are queried once per (kernel, threads, device) and cached: the queries cost
// host time on every call otherwise (up to 4 per call in launch_fma), and they do not change.
struct HostCache {
  std::mutex mu;
  std::map<int, int> sms;                                  // device -> SM count
  std::map<std::tuple<const void*, int, int>, int> per_sm;  // (kernel, threads, device) -> resident blocks per SM
};
HostCache& host_cache() {
  static HostCache cache;
  return cache;
}

int current_device() {
  int dev = 0;
  return cudaGetDevice(&dev) == cudaSuccess ? dev : -1;
}

int sm_count() {
  const int dev = current_device();
  HostCache& hc = host_cache();
  std::lock_guard<std::mutex> lock(hc.mu);
  auto it = hc.sms.find(dev);
  if (it != hc.sms.end()) return it->second;
  int sms = 0;
  if (dev < 0 || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 0;
  hc.sms[dev] = sms;
  return sms;
}

// Resident blocks of `kernel` per SM at `threads` (cached); an error is returned, not cached.
template <typename K>
cudaError_t blocks_per_sm(K kernel, int threads, int* out) {
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), threads, current_device());
  HostCache& hc = host_cache();
  {
    std::lock_guard<std::mutex> lock(hc.mu);
    auto it = hc.per_sm.find(key);
    if (it != hc.per_sm.end()) {
      *out = it->second;
      return cudaSuccess;
    }
  }
  int per_sm = 0;
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(hc.mu);
  hc.per_sm[key] = per_sm;
  *out = per_sm;
  return cudaSuccess;
}

// Persistent grid for a kernel: as many blocks as can be resident (at most one per item);
// each takes a contiguous range of the dh-major item list.
template <typename K>
cudaError_t launch_persistent(K kernel, Params& p, int bt, int threads, cudaStream_t stream) {
  p.ntiles = (p.B + bt - 1) / bt;
  p.items = 2 * p.H * p.ntiles;
  int per_sm = 0;
  cudaError_t err = blocks_per_sm(kernel, threads, &per_sm);
  if (err != cudaSuccess) return err;
  const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) * std::max(sm_count(), 1);
  p.per_block = static_cast<int>((p.items + resident - 1) / resident);
  const int blocks = (p.items + p.per_block - 1) / p.per_block;
  FAR_LAUNCH(kernel, blocks, threads, 0, stream)(p);
  return cudaGetLastError();
}

// Resident blocks the GPU holds for `kernel` (0 on error).
template <typename K>
int64_t resident_blocks(K kernel, int threads) {
  int per_sm = 0;
  if (blocks_per_sm(kernel, threads, &per_sm) != cudaSuccess) return 0;
  return static_cast<int64_t>(per_sm) * sm_count();
}

// Smallest batch tile whose items all fit on the GPU at once (latency first), else the largest.
template <typename T, int KS>
cudaError_t launch_fma(Params& p, int threads, cudaStream_t s) {
  const int64_t dh = 2 * p.H;
  if (dh * p.B <= resident_blocks(bilstm_fma_kernel<T, KS, 1>, threads))
    return launch_persistent(bilstm_fma_kernel<T, KS, 1>, p, 1, threads, s);
  if (dh * ((p.B + 1) / 2) <= resident_blocks(bilstm_fma_kernel<T, KS, 2>, threads))
    return launch_persistent(bilstm_fma_kernel<T, KS, 2>, p, 2, threads, s);
  if (dh * ((p.B + 3) / 4) <= resident_blocks(bilstm_fma_kernel<T, KS, 4>, threads))
    return launch_persistent(bilstm_fma_kernel<T, KS, 4>, p, 4, threads, s);
  return launch_persistent(bilstm_fma_kernel<T, KS, 8>, p, 8, threads, s);
}

template <typename T, int KT>
cudaError_t launch_mma(Params& p, int threads, cudaStream_t s) {
  const int64_t dh = 2 * p.H;
  if (dh * ((p.B + 7) / 8) <= resident_blocks(bilstm_mma_kernel<T, KT, 1>, threads))
    return launch_persistent(bilstm_mma_kernel<T, KT, 1>, p, 8, threads, s);
  if (dh * ((p.B + 15) / 16) <= resident_blocks(bilstm_mma_kernel<T, KT, 2>, threads))
    return launch_persistent(bilstm_mma_kernel<T, KT, 2>, p, 16, threads, s);
  return launch_persistent(bilstm_mma_kernel<T, KT, 4>, p, 32, threads, s);
}

// Shared memory of the wide kernel: h, c and the 4 gates of the widest kept (head, direction), not of the
// padded width n (a masked model's n can be far wider than what it keeps).
inline size_t wide_shmem(int kmax) { return static_cast<size_t>(6) * kmax * sizeof(float); }

template <typename T>
cudaError_t launch_wide(Params& p, cudaStream_t s) {
  p.ntiles = p.B;
  p.items = 2 * p.H * p.B;
  p.per_block = 1;
  int kmax = 0;
  for (int i = 0; i < 2 * p.H; ++i) kmax = std::max<int>(kmax, p.hid[i]);
  p.kmax = kmax;
  const int threads = std::min(1024, (4 * kmax + 31) / 32 * 32);
  const size_t shmem = wide_shmem(kmax);
  if (shmem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(bilstm_wide_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(shmem));
    if (err != cudaSuccess) return err;
  }
  FAR_LAUNCH(bilstm_wide_kernel<T>, p.items, threads, shmem, s)(p);
  return cudaGetLastError();
}

template <typename T>
const char* dispatch(Params& p, int kmax, int path, cudaStream_t s) {
  constexpr bool is_half = !std::is_same<T, float>::value;
  if (path == kPathMma && !is_half) return "the mma path needs float16 or bfloat16 inputs (float32 uses the fma path)";
  if (kmax > kFastMaxHidden) {
    if (path != kPathAuto) return "hidden sizes above 64 run only the simple kernel (path auto)";
    int device = 0, optin = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) return cudaGetErrorString(err);
    if (wide_shmem(kmax) > static_cast<size_t>(optin)) {
      static thread_local std::string msg;
      msg = "a kept hidden size of " + std::to_string(kmax) + " needs " + std::to_string(wide_shmem(kmax)) +
            " bytes of shared memory per block, above this GPU's " + std::to_string(optin) +
            "; use backend='torch' for such widths";
      return msg.c_str();
    }
    err = launch_wide<T>(p, s);
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
  }
  const int threads = 32 * ((kmax + 7) / 8);  // one warp per 8 kept units
  const bool mma = is_half && (path == kPathMma || (path == kPathAuto && p.B >= 16));
  cudaError_t err;
  if constexpr (is_half) {
    if (mma) {
      err = kmax <= 32 ? launch_mma<T, 2>(p, threads, s) : launch_mma<T, 4>(p, threads, s);
      return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
    }
  }
  err = kmax <= 32 ? launch_fma<T, 8>(p, threads, s) : launch_fma<T, 16>(p, threads, s);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* bilstm_scan_cuda(int dtype, const void* gx, const float* w_hh, const int64_t* hidden_host, void* out,
                             int64_t H, int64_t B, int64_t T, int64_t n, int path, bool fast_tanh, void* stream) {
  if (H > kMaxHeads) return "at most 256 heads are supported";
  // T < 2^31 - 1024: write_pruned_zeros steps its int t by the block's warps (up to 32) past T - 1
  if (n > 65535 || B > INT32_MAX || T > INT32_MAX - 1024)
    return "sizes out of range (n <= 65535, B < 2^31, T < 2^31 - 1024)";
  if (path != kPathAuto && path != kPathFma && path != kPathMma) return "unknown path (0 auto, 1 fma, 2 mma)";
  if (2 * H * B > INT32_MAX) return "2 * heads * batch must stay below 2^31 (split the batch)";
  if (H == 0 || B == 0 || T == 0 || n == 0) return nullptr;
  Params p{};
  p.gx = gx;
  p.w = w_hh;
  p.out = out;
  p.H = static_cast<int>(H);
  p.B = static_cast<int>(B);
  p.T = static_cast<int>(T);
  p.n = static_cast<int>(n);
  p.fast = fast_tanh ? 1 : 0;
  int kmax = 0;
  for (int64_t dr = 0; dr < 2; ++dr)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t k = hidden_host[dr * H + h];
      if (k < 0 || k > n) return "hidden sizes must lie in [0, n]";
      p.hid[dr * H + h] = static_cast<uint16_t>(k);
      kmax = std::max<int>(kmax, static_cast<int>(k));
    }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (kmax == 0) path = kPathAuto;  // only zeros to write: any kernel will do
  // An error left by earlier work (another library's launch, an earlier failed kernel) would otherwise
  // be read by this call's cudaGetLastError() after the launch and reported as this launch's. Not-ready is
  // a status, not an error: a query of an unfinished event or stream leaves it behind (cleared by this read).
  const cudaError_t earlier = cudaGetLastError();
  if (earlier != cudaSuccess && earlier != cudaErrorNotReady) {
    static thread_local std::string msg;
    msg = std::string("a CUDA error was pending from earlier work, before this launch: ") + cudaGetErrorString(earlier);
    return msg.c_str();
  }
  switch (dtype) {
    case kF32: return dispatch<float>(p, std::max(kmax, 1), path, s);
    case kF16: return dispatch<__half>(p, std::max(kmax, 1), path, s);
    case kBF16: return dispatch<__nv_bfloat16>(p, std::max(kmax, 1), path, s);
    default: return "unsupported dtype code";
  }
}

}  // namespace far
