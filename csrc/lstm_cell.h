// LSTM cell math shared by the CPU (C++) and CUDA scan kernels.
// Gate order (i, f, g, o) as torch.nn.LSTM; state and accumulation in fp32.
// Written once as templates over V = float (CUDA threads, scalar CPU code) or V = VecF8
// (8 fp32 lanes, GCC vector extension; AVX2 in the CPU kernel's x86-64-v3 clone), branch-free.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FAR_HD __host__ __device__ __forceinline__
#else
#define FAR_HD inline __attribute__((always_inline))
#endif

namespace far {

// ---- the few operations that differ between a scalar and a vector of lanes ----
FAR_HD float clamp(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }
// 2^k for integral kf in [-126, 127]
FAR_HD float pow2i(float kf) {
#if defined(__CUDA_ARCH__)
  return __int_as_float((static_cast<int32_t>(kf) + 127) << 23);
#else
  return __builtin_bit_cast(float, (static_cast<int32_t>(kf) + 127) << 23);
#endif
}

#if !defined(__CUDACC__)
typedef float VecF8 __attribute__((vector_size(32)));
typedef int32_t VecI8 __attribute__((vector_size(32)));
FAR_HD VecF8 splat(float v) { return VecF8{} + v; }
FAR_HD VecF8 clamp(VecF8 x, float lo, float hi) {
  x = x < lo ? splat(lo) : x;  // NaN lanes compare false and stay NaN
  return x > hi ? splat(hi) : x;
}
FAR_HD VecF8 pow2i(VecF8 kf) { return (VecF8)((__builtin_convertvector(kf, VecI8) + 127) << 23); }
#endif

// exp(x) in fp32, relative error ~1 ulp on the clamped range [-87, 88]; NaN propagates.
// x = k ln2 + r with |r| <= ln2/2 and a degree-7 Taylor polynomial (truncation 0.347^8/8! ~ 5e-9).
template <class V>
FAR_HD V exp_f32(V x) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(V) == sizeof(float)) return __expf(x);
#endif
  x = clamp(x, -87.0f, 88.0f);
  const V kf = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2), 1.5*2^23 trick
  V r = x - kf * 0.693145751953125f;                                     // ln2, high part
  r = r - kf * 1.42860682030941723212e-6f;                               // ln2, low part
  V p = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * pow2i(kf);
}

template <class V>
FAR_HD V sigmoid_f32(V x) { return 1.0f / (1.0f + exp_f32(-x)); }

// tanh(x) = 2 sigmoid(2x) - 1: saturates to +-1 for large |x| (no inf/inf), absolute error ~1e-7.
template <class V>
FAR_HD V tanh_f32(V x) { return 2.0f / (1.0f + exp_f32(x * -2.0f)) - 1.0f; }

// tanh(x) = 1 - 2 / (1 + e^{2x}): the CUDA kernel's accurate tanh (on the GPU __expf and __fdividef, i.e.
// ex2.approx and rcp.approx, absolute error ~1e-7). e^{2x} = inf gives 1 - 0 = 1 (on the host exp_f32
// clamps to e^88 instead: 1 - 1e-38 = 1), e^{2x} = 0 gives -1; NaN propagates.
FAR_HD float tanh_via_exp(float x) {
#if defined(__CUDA_ARCH__)
  return 1.0f - __fdividef(2.0f, 1.0f + __expf(2.0f * x));
#else
  return 1.0f - 2.0f / (1.0f + exp_f32(2.0f * x));
#endif
}

// One LSTM cell update from the four gate pre-activations (W_ih x + W_hh h + b_ih + b_hh).
// c is updated in place; returns the new h.
template <class V>
FAR_HD V lstm_cell(V gi, V gf, V gg, V go, V& c) {
  c = sigmoid_f32(gf) * c + sigmoid_f32(gi) * tanh_f32(gg);
  return sigmoid_f32(go) * tanh_f32(c);
}

// The same update with every activation from one tanh: sigmoid(x) = 0.5 tanh(x/2) + 0.5, so a kernel
// with a cheap hardware tanh (CUDA's tanh.approx) spends one transcendental per gate. `th` must
// saturate to +-1 for huge |x| (no inf/inf), which keeps c and h finite.
template <class V, class Tanh>
FAR_HD V lstm_cell_via_tanh(V gi, V gf, V gg, V go, V& c, Tanh th) {
  const V i = th(gi * 0.5f) * 0.5f + 0.5f;
  const V f = th(gf * 0.5f) * 0.5f + 0.5f;
  const V o = th(go * 0.5f) * 0.5f + 0.5f;
  c = f * c + i * th(gg);
  return o * th(c);
}

}  // namespace far
