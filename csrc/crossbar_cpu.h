// Torch-free entry point of the crossbar emulator's CPU epilogue (raw pointers, sizes).
#pragma once
#include <cstdint>

namespace far {

// ADC code of a partial sum p (fp32), the same fp32 operations as far_kernels' torch backend:
//   kCodeIdentity  code = p                                (no ADC, or a granular ADC finer than p_max; p integer)
//   kCodeMaxExact  code = round_half_even((p * L) / p_max)  (max ADC, integer p, p_max * L < 2^24: exact)
//   kCodeDivide    code = clamp(round_half_even(p / step[g, s]), -L, L)  (every other ADC, integer or noisy p)
enum CrossbarCode { kCodeIdentity = 0, kCodeMaxExact = 1, kCodeDivide = 2 };

// From the reduced codes C_s (per weight slice s) to the output, in fp32 as the torch backend does:
//   kEpilogueInteger     v = float(sum_s C_s 2^(s cell_bits) - off)
//   kEpilogueMax         v = float(sum_s C_s 2^(s cell_bits)) * step - float(off)
//   kEpilogueCalibrated  v = sum_s float(C_s) * mults[g, s] - float(off)   (summed in order s = 0, 1, ...)
// then y = v * (s_x[g, m] * w_scale[g, n]) (+ bias[g, n]).
enum CrossbarEpilogue { kEpilogueInteger = 0, kEpilogueMax = 1, kEpilogueCalibrated = 2 };

struct CrossbarAdcArgs {
  const float* p;          // [G, T, J, M, SN] partial sums of one call (rows m0 .. m0 + M - 1 of M_total)
  const float* weights;    // [G, T, J] shift-and-add weight of each (tile, input slice): 2^(j dac_bits), 0 = absent tile
  const float* steps;      // [G, S] ADC step per member and weight slice (kCodeDivide), else unused
  const float* s_x;        // [G, M_total] input scales
  const float* w_scale;    // [G, N] weight scales
  const int64_t* offsets;  // [G, M_total] offset-encoding correction (offset * sum of the row's x_q), or null
  const float* bias;       // [G, N] or null
  const float* mults;      // [G, S] kEpilogueCalibrated, else unused
  float* y;                // [G, M_total, N] output (rows m0 .. m0 + M - 1 written)
  int epilogue;            // CrossbarEpilogue
  int cell_bits;
  float step;              // kEpilogueMax: p_max / L
  int64_t G, T, J, M, S, N;
  int64_t m0, M_total;     // row offset of this chunk and the call's row count (the noise counter spans the call)
  int code;                // CrossbarCode
  float L, p_max;          // ADC levels, largest partial sum
  float sigma;             // read-noise std in partial-sum units (0 = none): p + sigma * z before the ADC
  uint64_t key;            // the call's read-noise key
  bool exact_f32;          // every partial total is an integer below 2^24: accumulate in fp32, else in fp64
};

// Fused read noise + ADC + shift-and-add + output scaling. Deterministic for any thread count.
void crossbar_adc_reduce_cpu(const CrossbarAdcArgs& a, int num_threads);

}  // namespace far
