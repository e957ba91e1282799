// Multi-head bidirectional LSTM scan on CUDA. Torch-free (raw pointers, sizes and a stream in),
// so that nvcc compiles it quickly; csrc/bindings.cpp does the torch side.
// This is the straightforward correct kernel: one block per (head, direction, batch row),
// threads over the 4k gate rows, h and c in shared memory, block-level sync only.
// The persistent tensor-core kernel of the CUDA-extension issue replaces its body.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../lstm_cell.h"
#include "bilstm_cuda.h"

namespace far {
namespace {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// gx [H, B, T, 2, 4n], w_hh [H, 2, 4n, n] fp32, hidden [2, H] (device), out [H, B, T, 2, n]
template <typename T>
__global__ void bilstm_scan_kernel(const T* __restrict__ gx, const float* __restrict__ w_hh,
                                   const int64_t* __restrict__ hidden, T* __restrict__ out,
                                   int64_t H, int64_t B, int64_t Tn, int64_t n) {
  const int64_t item = blockIdx.x;  // ((head * 2 + dir) * B + b)
  const int64_t b = item % B, hd = item / B, head = hd / 2, dir = hd % 2;
  const int64_t k = hidden[dir * H + head];
  extern __shared__ float smem[];
  float* hs = smem;         // [n]
  float* cs = smem + n;     // [n]
  float* gs = smem + 2 * n; // [4n]
  for (int64_t u = threadIdx.x; u < n; u += blockDim.x) { hs[u] = 0.f; cs[u] = 0.f; }
  const float* w = w_hh + hd * 4 * n * n;
  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t t = dir == 0 ? s : Tn - 1 - s;
    const T* g = gx + ((head * B + b) * Tn + t) * 8 * n + dir * 4 * n;
    T* o = out + ((head * B + b) * Tn + t) * 2 * n + dir * n;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < 4 * k; j += blockDim.x) {
      const int64_t row = (j / k) * n + j % k;
      float acc = to_f32(g[row]);
      const float* wr = w + row * n;
      for (int64_t kk = 0; kk < k; ++kk) acc = fmaf(wr[kk], hs[kk], acc);
      gs[j] = acc;
    }
    __syncthreads();
    for (int64_t u = threadIdx.x; u < n; u += blockDim.x) {
      if (u < k) {
        float c = cs[u];
        const float h = lstm_cell(gs[u], gs[k + u], gs[2 * k + u], gs[3 * k + u], c);
        cs[u] = c;
        hs[u] = h;
        o[u] = from_f32<T>(h);
      } else {
        o[u] = from_f32<T>(0.f);
      }
    }
  }
}

template <typename T>
cudaError_t launch(const void* gx, const float* w_hh, const int64_t* hidden, void* out,
                   int64_t H, int64_t B, int64_t Tn, int64_t n, cudaStream_t stream) {
  const int64_t blocks = H * 2 * B;
  if (blocks == 0 || Tn == 0 || n == 0) return cudaSuccess;
  const int threads = 4 * n >= 256 ? 256 : static_cast<int>((4 * n + 31) / 32 * 32);
  const size_t shmem = static_cast<size_t>(6 * n) * sizeof(float);
  bilstm_scan_kernel<T><<<static_cast<unsigned>(blocks), threads, shmem, stream>>>(
      static_cast<const T*>(gx), w_hh, hidden, static_cast<T*>(out), H, B, Tn, n);
  return cudaGetLastError();
}

}  // namespace

const char* bilstm_scan_cuda(int dtype, const void* gx, const float* w_hh, const int64_t* hidden,
                             void* out, int64_t H, int64_t B, int64_t T, int64_t n, void* stream) {
  cudaError_t err;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kF32: err = launch<float>(gx, w_hh, hidden, out, H, B, T, n, s); break;
    case kF16: err = launch<__half>(gx, w_hh, hidden, out, H, B, T, n, s); break;
    case kBF16: err = launch<__nv_bfloat16>(gx, w_hh, hidden, out, H, B, T, n, s); break;
    default: return "bilstm_scan_cuda: unsupported dtype code";
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace far
