// Multi-head bidirectional LSTM scan on the CPU (fp32). Torch-free: raw pointers in.
// One work item = (head, direction, batch tile of <= 8 rows); items run in parallel (OpenMP). Each walks its T
// steps: acc = gx[t] + h @ W_hh^T (register-blocked product, W packed in column panels kept hot in L1/L2),
// then the LSTM cells of all its rows. The fused variant computes the input gates in the same pass instead of
// reading them from memory: acc = bias + x[t] @ W_ih^T + h @ W_hh^T, W_ih packed in the same panels. On AVX2 the product runs at the FMA peak; the cells (five exponentials
// per unit) are the other large cost, so they are written to need few vector ops and to interleave chains.
#include "bilstm_cpu.h"

#include <algorithm>
#include <vector>

#include "lstm_cell.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FAR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define FAR_HAS_CLONES 1
#else
#define FAR_CLONES
#endif
#define FAR_INLINE inline __attribute__((always_inline))

namespace far {
namespace {

constexpr int64_t kBatchTile = 8;  // max batch rows per work item
constexpr int kCellChains = 4;     // groups of 8 units whose cells are computed side by side

typedef VecF8 v8;
typedef float v8u __attribute__((vector_size(32), aligned(4)));  // unaligned access

// ---- cell math ----------------------------------------------------------------------------------------------
// M independent 8-lane vectors processed op by op: M dependency chains of the cell sit side by side in the
// instruction stream, which the out-of-order window alone does not achieve for 256-bit code on Zen.
template <int M>
struct Lanes {
  v8 v[M];
};
#define FAR_LANES_OP(op)                                                    \
  template <int M> FAR_INLINE Lanes<M> operator op(Lanes<M> a, Lanes<M> b) { \
    for (int m = 0; m < M; ++m) a.v[m] = a.v[m] op b.v[m];                  \
    return a;                                                               \
  }                                                                         \
  template <int M> FAR_INLINE Lanes<M> operator op(Lanes<M> a, float b) {  \
    for (int m = 0; m < M; ++m) a.v[m] = a.v[m] op b;                       \
    return a;                                                               \
  }                                                                         \
  template <int M> FAR_INLINE Lanes<M> operator op(float a, Lanes<M> b) {  \
    for (int m = 0; m < M; ++m) b.v[m] = a op b.v[m];                       \
    return b;                                                               \
  }
FAR_LANES_OP(+)
FAR_LANES_OP(-)
FAR_LANES_OP(*)
FAR_LANES_OP(/)
#undef FAR_LANES_OP

// A constant the optimizer cannot see through: GCC turns `x < lo ? lo : x` into one vmaxps (NaN kept) only when
// lo is not a literal constant; with a constant it emits compare + blend.
FAR_INLINE float opaque(float x) {
  asm("" : "+x"(x));
  return x;
}
FAR_INLINE v8 vclamp(v8 x, float lo, float hi) {
  const v8 l = splat(opaque(lo)), h = splat(opaque(hi));
  x = x < l ? l : x;  // NaN lanes compare false and stay NaN
  return x > h ? h : x;
}
// p * 2^k for t holding k in its low mantissa bits (see exp2s): k added to the exponent field of p.
FAR_INLINE v8 add_exponent(v8 p, v8 t) { return (v8)((VecI8)p + ((VecI8)t << 23)); }
template <int M> FAR_INLINE Lanes<M> vclamp(Lanes<M> x, float lo, float hi) {
  for (int m = 0; m < M; ++m) x.v[m] = vclamp(x.v[m], lo, hi);
  return x;
}
template <int M> FAR_INLINE Lanes<M> add_exponent(Lanes<M> p, Lanes<M> t) {
  for (int m = 0; m < M; ++m) p.v[m] = add_exponent(p.v[m], t.v[m]);
  return p;
}

// 2^(s x) with x clamped to [lo, hi] (chosen by the caller so that s x lies in [-126, 40]). s x = k + r with
// k = round(s x), |r| <= 1/2: adding 1.5 * 2^23 rounds s x to an integer and leaves k in the low mantissa bits
// of t; 2^r by a degree-5 polynomial, minimax in relative error (9.2e-8) among those with p(0) = 1 exactly, so
// that e^0 = 1: a zero gate then gives tanh 0 and adds nothing to c (the unconstrained fit's 1.00000007 is
// 1 + 2^-23 in fp32 and drifted c by -6e-8 per step); s x is only formed inside the FMAs (exact product).
// 12 vector ops, no division, no int<->float conversion.
template <class V>
FAR_INLINE V exp2s(V x, float s, float lo, float hi) {
  x = vclamp(x, lo, hi);
  const V t = x * s + 12582912.0f;
  const V r = x * s - (t - 12582912.0f);
  V p = r * 1.326472731e-03f + 9.671512991e-03f;
  p = p * r + 5.550733581e-02f;
  p = p * r + 2.402224243e-01f;
  p = p * r + 6.931470037e-01f;
  p = p * r + 1.0f;
  return add_exponent(p, t);
}
constexpr float kLog2e = 1.44269504088896341f;
// e^-x and e^-2x, saturated at 2^40 (so that products of three (1 + e) factors stay finite; sigmoid(-27.7) =
// 9e-13, tanh(-13.9) = -1 + 2e-12: invisible at fp32 accuracy) and at 2^-126 (sigmoid(87) = 1 - 2^-126).
template <class V> FAR_INLINE V exp_neg(V x) { return exp2s(x, -kLog2e, -40.0f / kLog2e, 126.0f / kLog2e); }
template <class V> FAR_INLINE V exp_neg2(V x) { return exp2s(x, -2.0f * kLog2e, -20.0f / kLog2e, 63.0f / kLog2e); }

// LSTM cell with two divisions instead of five: with a = e^-i, f = e^-f, g = e^-2g, o = e^-o, e = e^-2c',
//   c' = c/(1+f) + (1-g)/((1+a)(1+g)) = (c (1+a)(1+g) + (1-g)(1+f)) / ((1+f)(1+a)(1+g))
//   h  = (1-e) / ((1+o)(1+e))
// c is updated in place; returns h. About 72 vector ops per 8 units (the products below are written to
// contract into FMAs); |h| <= 1 and NaN propagates.
template <class V>
FAR_INLINE V cell(V gi, V gf, V gg, V go, V& c) {
  const V a1 = exp_neg(gi) + 1.0f, f1 = exp_neg(gf) + 1.0f, g = exp_neg2(gg), o1 = exp_neg(go) + 1.0f;
  const V ag = a1 * g + a1;  // (1+a)(1+g)
  c = (c * ag + (f1 - g * f1)) / (f1 * ag);
  const V e = exp_neg2(c);
  return (1.0f - e) / (o1 * e + o1);
}

// Cells of M groups j..j+M-1 of one row. Working layout (below): gates at a + 32 j + 8 q, state at c/h + 8 j.
template <int M>
FAR_INLINE void cells(const float* a, float* c, float* h, int64_t j) {
  Lanes<M> gate[4], cu;
  for (int m = 0; m < M; ++m) {
    for (int q = 0; q < 4; ++q) gate[q].v[m] = *(const v8u*)(a + 32 * (j + m) + 8 * q);
    cu.v[m] = *(const v8u*)(c + 8 * (j + m));
  }
  const Lanes<M> hu = cell(gate[0], gate[1], gate[2], gate[3], cu);
  for (int m = 0; m < M; ++m) {
    *(v8u*)(c + 8 * (j + m)) = cu.v[m];
    *(v8u*)(h + 8 * (j + m)) = hu.v[m];
  }
}

// ---- recurrent product --------------------------------------------------------------------------------------
// Software prefetch of the gx and out rows of a later step (they stream from DRAM for large B), issued a few
// cache lines at a time between the W panels of the product so that the misses overlap with compute.
struct Prefetch {
  const float* g[kBatchTile];  // gx rows of the target step
  float* o[kBatchTile];        // out rows of the target step
  int64_t rows = 0, glines = 0, olines = 0;
  int64_t r = 0, l = 0;  // next line to fetch: row r, line l of [gx lines, out lines]
  FAR_INLINE void issue(int64_t count) {
    for (; count > 0 && r < rows; --count) {
      if (l < glines) __builtin_prefetch(g[r] + 16 * l, 0, 2);
      else __builtin_prefetch(o[r] + 16 * (l - glines), 1, 2);
      if (++l == glines + olines) l = 0, ++r;
    }
  }
};

// s[r, :] += a[r, :k] @ W for R rows and one panel of 8 NV columns (rows of the panel contiguous in wp):
// R x NV accumulators in registers, each W vector loaded once for R rows, a[r, kk] broadcast once for NV.
template <int R, int NV>
FAR_INLINE void accumulate(v8 (&s)[R][NV], const float* wp, int64_t k, const float* a, int64_t as) {
#pragma GCC unroll 2
  for (int64_t kk = 0; kk < k; ++kk) {
    v8 w[NV];
    for (int v = 0; v < NV; ++v) w[v] = *(const v8u*)(wp + kk * 8 * NV + 8 * v);
    for (int r = 0; r < R; ++r) {
      const float b = a[r * as + kk];  // scalar * vector: one vbroadcastss (a v8{b, ...} literal is not)
      for (int v = 0; v < NV; ++v) s[r][v] += b * w[v];
    }
  }
}

// One operand of the product: packed panels of W (k rows each) and the rows a (row stride as) they multiply.
struct Operand {
  const float* wp;
  int64_t k;
  const float* a;
  int64_t as;
};

// acc[r, :] = init[r, :] + x[r, :k1] @ W1 + h[r, :k2] @ W2 for R rows and one panel (W1, W2 at this panel),
// init rows at stride init_ld (0: one row broadcast, e.g. the bias). k1 or k2 may be 0.
template <int R, int NV>
FAR_INLINE void panel_product(const float* init, int64_t init_ld, const Operand& o1, const Operand& o2,
                              int64_t p, int64_t r0, float* acc, int64_t ld) {
  v8 s[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) s[r][v] = *(const v8u*)(init + r * init_ld + 8 * v);
  if (o1.k) accumulate<R, NV>(s, o1.wp + p * o1.k * 8 * NV, o1.k, o1.a + r0 * o1.as, o1.as);
  if (o2.k) accumulate<R, NV>(s, o2.wp + p * o2.k * 8 * NV, o2.k, o2.a + r0 * o2.as, o2.as);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) *(v8u*)(acc + r * ld + 8 * v) = s[r][v];
}

// acc[:rows, :] = init + a1 @ W1 + a2 @ W2 over all panels, R rows at a time (fewer for the last rows). init is
// acc itself (init_ld = ld: precomputed gates) or a bias row (init_ld = 0). The panel order alternates with the
// step so that the panels read last in one step are still in L1 at the start of the next one.
template <int R, int NV>
FAR_INLINE void product(int64_t rows, const float* init, int64_t init_ld, const Operand& o1, const Operand& o2,
                        int64_t panels, float* acc, int64_t ld, bool reverse, Prefetch& pf) {
  const int64_t pf_per_panel = (pf.rows * (pf.glines + pf.olines) + panels - 1) / panels;
  for (int64_t pi = 0; pi < panels; ++pi) {
    pf.issue(pf_per_panel);
    const int64_t p = reverse ? panels - 1 - pi : pi;
    const float* in = init + p * 8 * NV;
    float* a = acc + p * 8 * NV;
    int64_t r = 0;
    for (; r + R <= rows; r += R) panel_product<R, NV>(in + r * init_ld, init_ld, o1, o2, p, r, a + r * ld, ld);
    const int64_t left = rows - r;
    if constexpr (R > 3) {
      if (left == 3) panel_product<3, NV>(in + r * init_ld, init_ld, o1, o2, p, r, a + r * ld, ld);
    }
    if constexpr (R > 2) {
      if (left == 2) panel_product<2, NV>(in + r * init_ld, init_ld, o1, o2, p, r, a + r * ld, ld);
    }
    if (left == 1) panel_product<1, NV>(in + r * init_ld, init_ld, o1, o2, p, r, a + r * ld, ld);
  }
}

// True where this code runs with 256-bit registers: the x86-64-v3 clone, or any build for AVX. Without them
// (the default clone) 8-lane vectors are emulated in register pairs and multi-row product blocks spill.
FAR_INLINE bool wide_registers() {
#if defined(__AVX__) || !defined(__x86_64__)
  return true;
#elif defined(FAR_HAS_CLONES)
  return __builtin_cpu_supports("x86-64-v3");  // the feature bit the clone resolver tests
#else
  return false;
#endif
}

// ---- one work item ------------------------------------------------------------------------------------------
struct ScanArgs {
  const float* gx;     // [H, B, T, 2, 4n] precomputed gates, or nullptr (fused: the input product below)
  const float* w_hh;   // [H, 2, 4n, n]
  const int64_t* hid;  // [2, H]
  float* out;          // [H, B, T, 2, n]
  int64_t H, B, T, n;
  // fused input product (gx == nullptr): gates = bias + x_t W_ih^T + h W_hh^T
  const float* x = nullptr;     // [B, T, *] rows of stride xs; head h reads columns h d .. h d + d - 1
  const float* w_ih = nullptr;  // [H, 2, 4n, d]
  const float* bias = nullptr;  // [H, 2, 4n]
  int64_t d = 0, xs = 0;
};

// Per-thread scratch, reused across work items.
struct Scratch {
  std::vector<float> buf;
  float* get(size_t count) {
    if (buf.size() < count) buf.resize(count);
    std::fill_n(buf.data(), count, 0.0f);
    return buf.data();
  }
};

// Packs W [4n, kin] (rows q n + u, torch.nn.LSTM layout, of one (head, direction)) for the kept units u < k:
// wp[(pp kin + kk) 8 NV + col % 8 NV] = W[q n + u, kk] with col = 32 (u / 8) + 8 q + u % 8 and pp = col / 8 NV:
// each panel is a contiguous [kin, 8 NV] block, its rows read in order by the product (wp zeroed before).
void pack_panels(const float* w, int64_t n, int64_t kin, int64_t w_ld, int64_t k, int64_t NV, float* wp) {
  for (int64_t u = 0; u < k; ++u)
    for (int64_t q = 0; q < 4; ++q) {
      const int64_t col = 32 * (u / 8) + 8 * q + u % 8, pp = col / (8 * NV), cc = col % (8 * NV);
      for (int64_t kk = 0; kk < kin; ++kk) wp[(pp * kin + kk) * 8 * NV + cc] = w[(q * n + u) * w_ld + kk];
    }
}

FAR_CLONES void scan_item(const ScanArgs& p, Scratch& scratch, int64_t head, int64_t dir, int64_t b0,
                          int64_t rows) {
  const int64_t n = p.n, T = p.T, k = p.hid[dir * p.H + head];
  const bool fused = p.gx == nullptr;
  const int64_t din = fused ? p.d : 0;  // input width of the fused input product
  const int64_t g_row = 8 * n;  // stride of one time step in gx ([2, 4n])
  const int64_t o_row = 2 * n;  // stride of one time step in out ([2, n])
  const int64_t x_b = T * p.xs;  // stride of one batch row in x
  const auto gx_at = [&](int64_t r, int64_t t) { return p.gx + ((head * p.B + b0 + r) * T + t) * g_row + dir * 4 * n; };
  const auto x_at = [&](int64_t r, int64_t t) { return p.x + (b0 + r) * x_b + t * p.xs + head * p.d; };
  const auto out_at = [&](int64_t r, int64_t t) { return p.out + ((head * p.B + b0 + r) * T + t) * o_row + dir * n; };
  if (k == 0) {  // fully pruned direction: h = 0 everywhere
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t t = 0; t < T; ++t) std::fill_n(out_at(r, t), n, 0.0f);
    return;
  }
  // Working layout: units in groups of 8; group j of a row holds the gates [i f g o] of units 8j..8j+7 at columns
  // 32j..32j+31, so one group's cells read four whole vectors. Units k <= u < 8G have zero weights and gates:
  // their c and h stay exactly 0 (up to NaN inputs, which is why out is written only for u < k).
  const int64_t G = (k + 7) / 8;
  // Product blocking R x NV (rows x vectors of 8 columns): 8 accumulators, W in panels of 8 NV columns.
  const int64_t NV = rows == 1 || !wide_registers() ? 8 : rows <= 3 ? 4 : 2;
  const int64_t panels = (32 * G + 8 * NV - 1) / (8 * NV);
  const int64_t hs = 8 * G, ld = panels * 8 * NV;  // row strides of h and c, of acc
  const int64_t wsize = panels * k * 8 * NV, wisize = panels * din * 8 * NV, bsize = fused ? ld : 0;
  float* wp = scratch.get(wsize + wisize + bsize + rows * (2 * hs + ld));
  float* wip = wp + wsize;     // packed W_ih (fused)
  float* bp = wip + wisize;    // bias in the working layout (fused)
  float* h = bp + bsize;
  float* c = h + rows * hs;
  float* acc = c + rows * hs;
  pack_panels(p.w_hh + (head * 2 + dir) * 4 * n * n, n, k, n, k, NV, wp);
  if (fused) {
    pack_panels(p.w_ih + (head * 2 + dir) * 4 * n * din, n, din, din, k, NV, wip);
    const float* bias = p.bias + (head * 2 + dir) * 4 * n;
    for (int64_t u = 0; u < k; ++u)
      for (int64_t q = 0; q < 4; ++q) bp[32 * (u / 8) + 8 * q + u % 8] = bias[q * n + u];
  }
  constexpr int64_t kPrefetchSteps = 2;
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = dir == 0 ? s : T - 1 - s;
    if (!fused) {  // acc = gx[t] in the working layout
      for (int64_t r = 0; r < rows; ++r) {
        const float* g = gx_at(r, t);
        float* a = acc + r * ld;
        int64_t u = 0;
        for (; u + 8 <= k; u += 8)
          for (int64_t q = 0; q < 4; ++q) *(v8u*)(a + 4 * u + 8 * q) = *(const v8u*)(g + q * n + u);
        for (int64_t q = 0; q < 4; ++q)
          for (int64_t l = u; l < k; ++l) a[4 * u + 8 * q + l - u] = g[q * n + l];
      }
    }
    Prefetch pf;
    if (s + kPrefetchSteps < T) {
      const int64_t tp = dir == 0 ? s + kPrefetchSteps : T - 1 - s - kPrefetchSteps;
      pf.rows = rows;
      pf.glines = ((fused ? din : 4 * n) + 15) / 16;
      pf.olines = (n + 15) / 16;
      for (int64_t r = 0; r < rows; ++r) pf.g[r] = fused ? x_at(r, tp) : gx_at(r, tp), pf.o[r] = out_at(r, tp);
    }
    // acc = (bias + x[t] @ W_ih | gx[t]) + h @ W_hh. h = 0 at the first step, but the product still runs, as the
    // reference's does: a NaN or inf in W_hh makes that step NaN (0 * NaN), not a finite output (1/T of the work)
    const Operand oh{wp, k, h, hs};
    {
      const bool rev = s & 1;
      const Operand ox{wip, din, fused ? x_at(0, t) : nullptr, x_b};
      const float* init = fused ? bp : acc;
      const int64_t init_ld = fused ? 0 : ld;
      if (NV == 8) product<1, 8>(rows, init, init_ld, ox, oh, panels, acc, ld, rev, pf);
      else if (NV == 4) product<3, 4>(rows, init, init_ld, ox, oh, panels, acc, ld, rev, pf);
      else product<4, 2>(rows, init, init_ld, ox, oh, panels, acc, ld, rev, pf);
    }
    // cells: h, c, out[t]
    for (int64_t r = 0; r < rows; ++r) {
      const float* a = acc + r * ld;
      float* hr = h + r * hs;
      float* cr = c + r * hs;
      int64_t j = 0;
      for (; j + kCellChains <= G; j += kCellChains) cells<kCellChains>(a, cr, hr, j);
      for (; j < G; ++j) cells<1>(a, cr, hr, j);
      float* o = out_at(r, t);
      std::copy_n(hr, k, o);
      std::fill(o + k, o + n, 0.0f);
    }
  }
}

void run_items(const ScanArgs& p, int num_threads) {
  const int64_t tiles = (p.B + kBatchTile - 1) / kBatchTile;
  const int64_t items = p.H * 2 * tiles;
  if (items == 0 || p.T == 0 || p.n == 0) return;
#pragma omp parallel num_threads(std::max(1, num_threads))
  {
    Scratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t tile = it % tiles, hd = it / tiles;  // hd = head * 2 + dir
      const int64_t b0 = tile * kBatchTile;
      scan_item(p, scratch, hd / 2, hd % 2, b0, std::min(kBatchTile, p.B - b0));
    }
  }
}

}  // namespace

void bilstm_scan_cpu(const float* gx, const float* w_hh, const int64_t* hidden, float* out,
                     int64_t H, int64_t B, int64_t T, int64_t n, int num_threads) {
  ScanArgs p{gx, w_hh, hidden, out, H, B, T, n};
  run_items(p, num_threads);
}

void bilstm_fused_scan_cpu(const float* x, const float* w_ih, const float* bias, const float* w_hh,
                           const int64_t* hidden, float* out, int64_t H, int64_t B, int64_t T, int64_t d, int64_t n,
                           int64_t x_row_stride, int num_threads) {
  ScanArgs p{nullptr, w_hh, hidden, out, H, B, T, n};
  p.x = x;
  p.w_ih = w_ih;
  p.bias = bias;
  p.d = d;
  p.xs = x_row_stride;
  run_items(p, num_threads);
}

}  // namespace far
