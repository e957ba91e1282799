// Torch-free entry points of the CUDA kernels (raw pointers, sizes and a stream in).
#pragma once
#include <cstdint>

namespace far {

enum DTypeCode : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Which recurrent-product path bilstm_scan_cuda uses.
//   kPathAuto: tensor cores for fp16/bf16 when B >= 16, else FMA (fp32 always FMA)
//   kPathFma:  fp32 FMA, W_hh in registers, exact fp32 math (any dtype)
//   kPathMma:  mma.sync m16n8k16 with h and W_hh rounded to the input dtype, fp32 accumulate (fp16/bf16 only)
enum ScanPath : int { kPathAuto = 0, kPathFma = 1, kPathMma = 2 };

// Limits of the persistent kernels: kept units per (direction, head) <= kFastMaxHidden use them,
// wider ones a simple kernel (W_hh read from L2 every step); at most kMaxHeads heads.
constexpr int kFastMaxHidden = 64;
constexpr int kMaxHeads = 256;

// Same contract as bilstm_scan_cpu (see ../bilstm_cpu.h):
//   gx     [H, B, T, 2, 4n] of `dtype` (device), w_hh [H, 2, 4n, n] fp32 (device),
//   hidden [2, H] int64 on the HOST (read here, passed to the kernel by value),
//   out    [H, B, T, 2, n] of `dtype` (device); units >= hidden are written as 0.
// `path` a ScanPath, `fast_tanh` = use tanh.approx.f32 (one MUFU op per activation, rel. error ~2^-11)
// instead of the ex2/rcp form (rel. error ~1e-7). `stream` is a cudaStream_t.
// Asynchronous; returns nullptr or an error string (bad arguments or the launch error).
const char* bilstm_scan_cuda(int dtype, const void* gx, const float* w_hh, const int64_t* hidden_host, void* out,
                             int64_t H, int64_t B, int64_t T, int64_t n, int path, bool fast_tanh, void* stream);

}  // namespace far
