// Torch-free entry points of the CPU kernels (raw pointers, sizes).
#pragma once
#include <cstdint>

namespace far {

// Multi-head bidirectional LSTM scan, fp32, contiguous tensors, zero initial state.
//   gx     [H, B, T, 2, 4n]  input-gate pre-activations incl. both biases, gates (i, f, g, o)
//   w_hh   [H, 2, 4n, n]     recurrent weights, torch.nn.LSTM layout, padded to n units
//   hidden [2, H]            kept units per (direction, head), 0 <= hidden <= n
//   out    [H, B, T, 2, n]   hidden states; units >= hidden are written as 0
void bilstm_scan_cpu(const float* gx, const float* w_hh, const int64_t* hidden, float* out,
                     int64_t H, int64_t B, int64_t T, int64_t n, int num_threads);

// The same scan with the input product fused in: gates = bias + x_t W_ih^T + h_{t-1} W_hh^T (no gx in memory).
//   x      [B, T, *]         rows of stride x_row_stride floats; head h reads columns h*d .. h*d + d - 1
//   w_ih   [H, 2, 4n, d]     input weights, torch.nn.LSTM layout padded to n units
//   bias   [H, 2, 4n]        b_ih + b_hh
//   w_hh, hidden, out        as bilstm_scan_cpu
void bilstm_fused_scan_cpu(const float* x, const float* w_ih, const float* bias, const float* w_hh,
                           const int64_t* hidden, float* out, int64_t H, int64_t B, int64_t T, int64_t d, int64_t n,
                           int64_t x_row_stride, int num_threads);

}  // namespace far
