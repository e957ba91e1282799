// Multi-head bidirectional LSTM scan on the CPU (fp32). Torch-free: raw pointers in.
// One work item = (head, direction, batch tile); items run in parallel (OpenMP), each walks
// its T steps with the recurrent weights of its (head, direction) transposed, compacted to the
// kept units and kept hot in L1/L2 for the whole time loop.
#include "bilstm_cpu.h"

#include <algorithm>
#include <vector>

#include "lstm_cell.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FAR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FAR_CLONES
#endif

namespace far {
namespace {

constexpr int64_t kBatchTile = 8;  // rows of the batch handled by one work item
constexpr int64_t kColBlock = 64;  // gate columns kept in registers per pass (8 x 8 floats)

typedef VecF8 v8;
typedef float v8u __attribute__((vector_size(32), aligned(4)));

struct ScanArgs {
  const float* gx;     // [H, B, T, 2, 4n]
  const float* w_hh;   // [H, 2, 4n, n]
  const int64_t* hid;  // [2, H]
  float* out;          // [H, B, T, 2, n]
  int64_t H, B, T, n;
};

// acc[r, :] += h[r, :k] @ wt[:k, :] for r < rows; h rows have stride hs; wt is [k, ld], ld % kColBlock == 0.
static inline __attribute__((always_inline)) void recurrent_product(
    float* acc, const float* h, const float* wt, int64_t rows, int64_t k, int64_t hs, int64_t ld) {
  for (int64_t jb = 0; jb < ld; jb += kColBlock) {
    for (int64_t r = 0; r < rows; ++r) {
      float* a = acc + r * ld + jb;
      const float* hr = h + r * hs;
      v8 s0 = *(const v8u*)(a + 0), s1 = *(const v8u*)(a + 8), s2 = *(const v8u*)(a + 16),
         s3 = *(const v8u*)(a + 24), s4 = *(const v8u*)(a + 32), s5 = *(const v8u*)(a + 40),
         s6 = *(const v8u*)(a + 48), s7 = *(const v8u*)(a + 56);
      for (int64_t kk = 0; kk < k; ++kk) {
        const float hv = hr[kk];
        const v8 hb = {hv, hv, hv, hv, hv, hv, hv, hv};
        const float* w = wt + kk * ld + jb;
        s0 += hb * *(const v8u*)(w + 0);
        s1 += hb * *(const v8u*)(w + 8);
        s2 += hb * *(const v8u*)(w + 16);
        s3 += hb * *(const v8u*)(w + 24);
        s4 += hb * *(const v8u*)(w + 32);
        s5 += hb * *(const v8u*)(w + 40);
        s6 += hb * *(const v8u*)(w + 48);
        s7 += hb * *(const v8u*)(w + 56);
      }
      *(v8u*)(a + 0) = s0; *(v8u*)(a + 8) = s1; *(v8u*)(a + 16) = s2; *(v8u*)(a + 24) = s3;
      *(v8u*)(a + 32) = s4; *(v8u*)(a + 40) = s5; *(v8u*)(a + 48) = s6; *(v8u*)(a + 56) = s7;
    }
  }
}

FAR_CLONES void scan_item(const ScanArgs& p, int64_t head, int64_t dir, int64_t b0, int64_t rows) {
  const int64_t n = p.n, T = p.T, k = p.hid[dir * p.H + head];
  const int64_t g_row = 8 * n;  // stride of one time step in gx ([2, 4n])
  const int64_t o_row = 2 * n;  // stride of one time step in out ([2, n])
  if (k == 0) {  // fully pruned direction: h = 0 everywhere
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t t = 0; t < T; ++t)
        std::fill_n(p.out + ((head * p.B + b0 + r) * T + t) * o_row + dir * n, n, 0.0f);
    return;
  }
  // Working layout: gate q of unit u at column q*kp + u, kp = k rounded up to 8 lanes; padded
  // lanes have zero weights and gates, so their h and c stay exactly 0.
  const int64_t kp = (k + 7) / 8 * 8;
  const int64_t ld = (4 * kp + kColBlock - 1) / kColBlock * kColBlock;
  std::vector<float> wt(k * ld, 0.0f), acc(rows * ld, 0.0f), h(rows * kp, 0.0f), c(rows * kp, 0.0f);
  // wt[kk, q*kp + u] = w_hh[head, dir, q*n + u, kk]  (kept units only)
  const float* w = p.w_hh + (head * 2 + dir) * 4 * n * n;
  for (int64_t q = 0; q < 4; ++q)
    for (int64_t u = 0; u < k; ++u)
      for (int64_t kk = 0; kk < k; ++kk) wt[kk * ld + q * kp + u] = w[(q * n + u) * n + kk];

  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = dir == 0 ? s : T - 1 - s;
    for (int64_t r = 0; r < rows; ++r) {
      const float* g = p.gx + ((head * p.B + b0 + r) * T + t) * g_row + dir * 4 * n;
      float* a = acc.data() + r * ld;
      for (int64_t q = 0; q < 4; ++q) std::copy_n(g + q * n, k, a + q * kp);
    }
    if (s > 0) recurrent_product(acc.data(), h.data(), wt.data(), rows, k, kp, ld);
    for (int64_t r = 0; r < rows; ++r) {
      const float* a = acc.data() + r * ld;
      float* hr = h.data() + r * kp;
      float* cr = c.data() + r * kp;
      for (int64_t u = 0; u < kp; u += 8) {
        v8 cu = *(const v8u*)(cr + u);
        const v8 hu = lstm_cell<v8>(*(const v8u*)(a + u), *(const v8u*)(a + kp + u),
                                    *(const v8u*)(a + 2 * kp + u), *(const v8u*)(a + 3 * kp + u), cu);
        *(v8u*)(cr + u) = cu;
        *(v8u*)(hr + u) = hu;
      }
      float* o = p.out + ((head * p.B + b0 + r) * T + t) * o_row + dir * n;
      std::copy_n(hr, k, o);
      std::fill(o + k, o + n, 0.0f);
    }
  }
}

}  // namespace

void bilstm_scan_cpu(const float* gx, const float* w_hh, const int64_t* hidden, float* out,
                     int64_t H, int64_t B, int64_t T, int64_t n, int num_threads) {
  const ScanArgs p{gx, w_hh, hidden, out, H, B, T, n};
  const int64_t tiles = (B + kBatchTile - 1) / kBatchTile;
  const int64_t items = H * 2 * tiles;
  if (items == 0 || T == 0 || n == 0) return;
#pragma omp parallel for schedule(dynamic, 1) num_threads(std::max(1, num_threads))
  for (int64_t it = 0; it < items; ++it) {
    const int64_t tile = it % tiles, hd = it / tiles;  // hd = head * 2 + dir
    const int64_t b0 = tile * kBatchTile;
    scan_item(p, hd / 2, hd % 2, b0, std::min(kBatchTile, B - b0));
  }
}

}  // namespace far
