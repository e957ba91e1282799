// Crossbar emulator, CPU epilogue: read noise, ADC, the shift-and-add over tiles, input and weight slices, and the
// output scaling in one pass over the partial sums (far_kernels/ops/crossbar_matmul/batched.py computes those with
// one batched matmul).
//
// The torch backend does this in several full passes (noise draw, add, divide, round, clamp, weighted sum), each
// reading and writing the whole partial-sum tensor; here every partial sum is read once and only the reduced codes
// are written. The ADC arithmetic is the torch backend's fp32 operations in the same order, so without read noise
// the result is bit-identical. Read noise: a counter-based generator (32-bit integer hashes of the partial sums'
// index in the call and the call's key) feeds a branch-free Box-Muller transform; the draws depend only on
// (key, index), never on the thread count or the chunking.
//
// No FP traps: GCC vectorizes the selects of the transform only when it may assume no trapping math. That
// assumption changes no IEEE result (division, rounding, fma stay exact).
#pragma GCC optimize("no-trapping-math")
// Products and sums stay separately rounded (no FMA contraction), as in the torch backend's epilogue.
#pragma GCC optimize("fp-contract=off")
#include "crossbar_cpu.h"

#include <cmath>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FAR_XB_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FAR_XB_CLONES
#endif

namespace far {
namespace {

inline uint32_t hash32(uint32_t x) {  // a bijective 32-bit integer hash with full avalanche
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// ln(y) for a positive normal float: y = 2^e m with m in [sqrt(1/2), sqrt(2)), ln(m) = f - f^2/2 + f^3 P(f),
// f = m - 1, P the degree-8 minimax polynomial of Cephes' logf (max error ~2e-8 on (0, 1]).
inline float log_positive(float y) {
  const uint32_t b = float_to_bits(y);
  int e = static_cast<int>(b >> 23) - 127;
  float m = bits_to_float((b & 0x007FFFFFu) | 0x3F800000u);
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e += big ? 1 : 0;
  const float f = m - 1.0f, z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  return (f * z * p - 0.5f * z + f) + static_cast<float>(e) * 0.693147180559945f;
}

// sin(pi t) and cos(pi t) for t in [-1, 1]: t = k + x with k = round(t), |x| <= 1/2, sign (-1)^k; Taylor
// polynomials of sin(pi x) to x^11 and cos(pi x) to x^12 (truncation error < 4e-8 on |x| <= 1/2).
inline void sincos_pi(float t, float& s, float& c) {
  const float k = std::nearbyint(t);
  const float x = t - k, x2 = x * x;
  const float sign = (static_cast<int>(k) & 1) ? -1.0f : 1.0f;
  s = x * (3.14159265f +
           x2 * (-5.16771278f + x2 * (2.55016404f + x2 * (-0.599264529f + x2 * (0.0821458866f - x2 * 0.00737043094f)))));
  c = 1.0f + x2 * (-4.93480220f +
                   x2 * (4.05871213f +
                         x2 * (-1.33526277f + x2 * (0.235330630f + x2 * (-0.0258068914f + x2 * 0.00192957431f)))));
  s *= sign;
  c *= sign;
}

// Standard normals for the n partial sums whose call-wide indices start at idx0, by Box-Muller: pair q (counter
// idx0 + q) gives u1 in (0, 1) and t in [-1, 1) from two hashes, r = sqrt(-2 ln u1), and z[q] = r cos(pi t),
// z[q + h] = r sin(pi t) (h = ceil(n / 2)). |z| <= 5.89 (u1 >= 2^-25). Branch-free and contiguous, so the loop
// vectorizes.
inline void standard_normals(float* __restrict__ z, int64_t n, uint64_t idx0, uint32_t k1, uint32_t k2) {
  const int64_t h = (n + 1) / 2;
  const uint32_t lo0 = static_cast<uint32_t>(idx0), hi0 = static_cast<uint32_t>(idx0 >> 32);
  for (int64_t q = 0; q < h; ++q) {
    // the 64-bit counter idx0 + q as two 32-bit halves (32-bit lanes vectorize twice as wide)
    const uint32_t lo = lo0 + static_cast<uint32_t>(q);
    const uint32_t hi = hi0 + (lo < lo0 ? 1u : 0u);
    const uint32_t a = hash32(hash32(lo ^ k1) + (hi ^ k2));
    const uint32_t b = hash32(a + 0x9E3779B9u);
    const float u1 = (static_cast<float>(static_cast<int32_t>(a >> 8)) + 0.5f) * (1.0f / 16777216.0f);
    const float t = static_cast<float>(static_cast<int32_t>(b >> 8)) * (2.0f / 16777216.0f) - 1.0f;
    const float r = std::sqrt(-2.0f * log_positive(u1));
    float sn, cs;
    sincos_pi(t, sn, cs);
    z[q] = r * cs;
    z[q + h] = r * sn;  // for odd n the last one is computed into the buffer's spare slot and unused
  }
}

template <typename Acc, int Code, bool Noise>
FAR_XB_CLONES void reduce_rows(const CrossbarAdcArgs& a, int num_threads) {
  const int64_t G = a.G, T = a.T, J = a.J, M = a.M, S = a.S, N = a.N, SN = S * N;
  const float L = a.L, p_max = a.p_max, sigma = a.sigma;
  const uint64_t k = splitmix64(a.key);
  const uint32_t k1 = static_cast<uint32_t>(k), k2 = static_cast<uint32_t>(k >> 32);
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<Acc> acc(SN);
    std::vector<float> step_row(SN);
    std::vector<float> noise(Noise ? SN + 2 : 0);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < G * M; ++row) {
      const int64_t g = row / M, m = row % M;
      for (int64_t i = 0; i < SN; ++i) acc[i] = 0;
      if (Code == kCodeDivide)
        for (int64_t s = 0; s < S; ++s)
          for (int64_t n = 0; n < N; ++n) step_row[s * N + n] = a.steps[g * S + s];
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t j = 0; j < J; ++j) {
          const float w = a.weights[(g * T + t) * J + j];
          if (w == 0.0f) continue;  // a tile this member does not have: no read
          const int64_t base = ((g * T + t) * J + j) * M + m;
          const float* src = a.p + base * SN;
          const uint64_t idx0 = static_cast<uint64_t>(((g * T + t) * J + j) * a.M_total + a.m0 + m) *
                                static_cast<uint64_t>(SN);
          if (Noise) standard_normals(noise.data(), SN, idx0, k1, k2);
          const Acc wa = static_cast<Acc>(w);
          Acc* __restrict__ dst = acc.data();
          const float* __restrict__ stp = step_row.data();
          for (int64_t i = 0; i < SN; ++i) {
            float v = src[i];
            if (Noise) {
              const float zs = noise[i] * sigma;
              v = v + zs;
            }
            float c;
            if (Code == kCodeIdentity) {
              c = v;
            } else if (Code == kCodeMaxExact) {
              c = std::nearbyint((v * L) / p_max);
            } else {
              c = std::nearbyint(v / stp[i]);
              c = c < -L ? -L : (c > L ? L : c);
            }
            dst[i] += wa * static_cast<Acc>(c);
          }
        }
      }
      // epilogue, the torch backend's fp32 operations in its order (no contraction: fp-contract is off here)
      const int64_t gm = g * a.M_total + a.m0 + m;
      const float sx = a.s_x[gm];
      const int64_t off = a.offsets != nullptr ? a.offsets[gm] : 0;
      const float offf = static_cast<float>(off);
      const float* ws = a.w_scale + g * N;
      const float* bias = a.bias != nullptr ? a.bias + g * N : nullptr;
      float* y = a.y + gm * N;
      for (int64_t n = 0; n < N; ++n) {
        float v;
        if (a.epilogue == kEpilogueCalibrated) {
          const float* mults = a.mults + g * S;
          v = static_cast<float>(acc[n]) * mults[0];
          for (int64_t s = 1; s < S; ++s) {
            const float t = static_cast<float>(acc[s * N + n]) * mults[s];
            v = v + t;
          }
          v = v - offf;
        } else {
          int64_t c = static_cast<int64_t>(acc[n]);
          for (int64_t s = 1; s < S; ++s) c += static_cast<int64_t>(acc[s * N + n]) << (s * a.cell_bits);
          if (a.epilogue == kEpilogueMax) {
            const float t = static_cast<float>(c) * a.step;
            v = t - offf;
          } else {
            v = static_cast<float>(c - off);
          }
        }
        const float scale = sx * ws[n];
        float out = v * scale;
        if (bias != nullptr) out = out + bias[n];
        y[n] = out;
      }
    }
  }
}

template <typename Acc>
void dispatch_code(const CrossbarAdcArgs& a, int num_threads) {
  const bool noise = a.sigma > 0.0f;
  switch (a.code) {
    case kCodeIdentity:
      noise ? reduce_rows<Acc, kCodeIdentity, true>(a, num_threads) : reduce_rows<Acc, kCodeIdentity, false>(a, num_threads);
      break;
    case kCodeMaxExact:
      noise ? reduce_rows<Acc, kCodeMaxExact, true>(a, num_threads) : reduce_rows<Acc, kCodeMaxExact, false>(a, num_threads);
      break;
    default:
      noise ? reduce_rows<Acc, kCodeDivide, true>(a, num_threads) : reduce_rows<Acc, kCodeDivide, false>(a, num_threads);
  }
}

}  // namespace

void crossbar_adc_reduce_cpu(const CrossbarAdcArgs& a, int num_threads) {
  if (a.G * a.M == 0 || a.N == 0) return;
  if (a.exact_f32)
    dispatch_code<float>(a, num_threads);
  else
    dispatch_code<double>(a, num_threads);
}

}  // namespace far
