// Device helpers shared by the kernel files: storage-type conversion, activations, launch geometry.
// Dimension letters: n elements of a step's index space (b rows times H or P columns).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace fusedrnn {
namespace cuda {

__host__ __device__ __forceinline__ float to_f(float v) { return v; }
__host__ __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __host__ __device__ __forceinline__ T from_f(float v);
template <> __host__ __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __host__ __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __host__ __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Bias term k of an optional bias vector.
template <typename T>
__host__ __device__ __forceinline__ float bias_at(const T* bias, int64_t k) { return bias ? to_f(bias[k]) : 0.f; }

// Accurate expf/tanhf (the build does not use --use_fast_math): the recurrence feeds these back every step, and the
// kernels are memory-bound, so the fast approximations would buy nothing but error.
__host__ __device__ __forceinline__ float sigmoid_f(float v) { return 1.f / (1.f + expf(-v)); }
__host__ __device__ __forceinline__ float tanh_f(float v) { return tanhf(v); }

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n elements: enough to fill any current GPU, few enough to stay one wave.
inline unsigned int blocks_for(int64_t n) {
  int64_t blocks = (n + kThreads - 1) / kThreads;
  const int64_t cap = 65535;
  return static_cast<unsigned int>(blocks < cap ? blocks : cap);
}

// For an element function `NAME##_elem(const ARGS<T>&, int64_t e)` over n = a.b * a.COLS elements, defines the
// grid-stride kernel, the stream launcher NAME(a, stream) and the host loop NAME##_host(a) of kernels.h.
#define FUSEDRNN_DEFINE_STEP(NAME, ARGS, COLS)                                                          \
  template <typename T>                                                                                 \
  __global__ void NAME##_kernel(const ARGS<T> a) {                                                      \
    const int64_t n = a.b * a.COLS;                                                                     \
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n;                             \
         e += (int64_t)gridDim.x * blockDim.x)                                                          \
      NAME##_elem(a, e);                                                                                \
  }                                                                                                     \
  template <typename T>                                                                                 \
  cudaError_t NAME(const ARGS<T>& a, cudaStream_t stream) {                                             \
    const int64_t n = a.b * a.COLS;                                                                     \
    if (n <= 0) return cudaSuccess;                                                                     \
    NAME##_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(a);                                        \
    return cudaGetLastError();                                                                          \
  }                                                                                                     \
  template <typename T>                                                                                 \
  void NAME##_host(const ARGS<T>& a) {                                                                  \
    const int64_t n = a.b * a.COLS;                                                                     \
    for (int64_t e = 0; e < n; ++e) NAME##_elem(a, e);                                                  \
  }                                                                                                     \
  template cudaError_t NAME<float>(const ARGS<float>&, cudaStream_t);                                   \
  template cudaError_t NAME<__half>(const ARGS<__half>&, cudaStream_t);                                 \
  template cudaError_t NAME<__nv_bfloat16>(const ARGS<__nv_bfloat16>&, cudaStream_t);                   \
  template void NAME##_host<float>(const ARGS<float>&);                                                 \
  template void NAME##_host<__half>(const ARGS<__half>&);                                               \
  template void NAME##_host<__nv_bfloat16>(const ARGS<__nv_bfloat16>&);

}  // namespace cuda
}  // namespace fusedrnn
