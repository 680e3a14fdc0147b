// Elman RNN (tanh / relu) per-step pointwise kernels (forward and backward).
//
// Dimension letters: B batch (carried-state rows), b rows alive at the step, H hidden size, j a row (0 .. b-1),
// k a hidden unit (0 .. H-1). The activation derivative is taken from y, so the forward keeps no reserve.
#include "kernels.h"
#include "device_utils.cuh"

namespace fusedrnn {
namespace cuda {

template <typename T>
__global__ void rnn_forward_kernel(const RnnForwardStep<T> a) {
  const int64_t H = a.H, n = a.b * H;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = e / H, k = e - j * H;
    const float pre = a.gx[j * a.ld_gx + k] + bias_at(a.b_ih, k) + a.gh[j * H + k] + bias_at(a.b_hh, k);
    const T h = from_f<T>(a.relu ? fmaxf(pre, 0.f) : tanh_f(pre));
    a.h_carry[j * H + k] = h;
    a.y[j * a.ld_y + k] = h;
  }
}

template <typename T>
__global__ void rnn_backward_kernel(const RnnBackwardStep<T> a) {
  const int64_t H = a.H, n = a.b * H;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = e / H, k = e - j * H;
    float dh = to_f(a.grad_y[j * a.ld_grad_y + k]) + a.dh_carry[j * H + k];
    if (j < a.n_cont) dh += a.dh_rec[j * H + k];
    a.dh_carry[j * H + k] = 0.f;  // h_{t-1} reaches h_t only through W_hh
    const float y = to_f(a.y[j * a.ld_y + k]);
    const float dpre = a.relu ? (y > 0.f ? dh : 0.f) : dh * (1.f - y * y);
    a.dg[j * a.ld_dg + k] = from_f<T>(dpre);
    a.h_prev_out[j * H + k] = j < a.n_prev ? a.h_prev_src[j * a.ld_h_prev + k] : a.hx[j * H + k];
  }
}

template <typename T>
cudaError_t rnn_forward_step(const RnnForwardStep<T>& a, cudaStream_t stream) {
  const int64_t n = a.b * a.H;
  if (n <= 0) return cudaSuccess;
  rnn_forward_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t rnn_backward_step(const RnnBackwardStep<T>& a, cudaStream_t stream) {
  const int64_t n = a.b * a.H;
  if (n <= 0) return cudaSuccess;
  rnn_backward_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

#define FUSEDRNN_INSTANTIATE(T)                                                         \
  template cudaError_t rnn_forward_step<T>(const RnnForwardStep<T>&, cudaStream_t);    \
  template cudaError_t rnn_backward_step<T>(const RnnBackwardStep<T>&, cudaStream_t);
FUSEDRNN_INSTANTIATE(float)
FUSEDRNN_INSTANTIATE(__half)
FUSEDRNN_INSTANTIATE(__nv_bfloat16)
#undef FUSEDRNN_INSTANTIATE

}  // namespace cuda
}  // namespace fusedrnn
