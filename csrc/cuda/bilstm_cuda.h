// Torch-free entry points of the CUDA kernels.
#pragma once
#include <cstdint>

namespace far {

enum DTypeCode : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Same contract as bilstm_scan_cpu (see ../bilstm_cpu.h); gx/out of `dtype`, w_hh fp32,
// every pointer on the device, `stream` a cudaStream_t. Returns nullptr or an error string.
const char* bilstm_scan_cuda(int dtype, const void* gx, const float* w_hh, const int64_t* hidden,
                             void* out, int64_t H, int64_t B, int64_t T, int64_t n, void* stream);

}  // namespace far
