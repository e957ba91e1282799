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

}  // namespace far
