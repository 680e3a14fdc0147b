// Elman RNN (tanh / relu) per-step pointwise kernels (forward and backward).
//
// Dimension letters: B batch (carried-state rows), b rows alive at the step, H hidden size, j a row (0 .. b-1),
// k a hidden unit (0 .. H-1). The activation derivative is taken from y, so the forward keeps no reserve.
#include "kernels.h"
#include "device_utils.cuh"

namespace fusedrnn {
namespace cuda {

template <typename T>
__host__ __device__ __forceinline__ void rnn_forward_step_elem(const RnnForwardStep<T>& a, int64_t e) {
  const int64_t H = a.H;
  const int64_t j = e / H, k = e - j * H;
  const float pre = a.gx[j * a.ld_gx + k] + bias_at(a.b_ih, k) + a.gh[j * H + k] + bias_at(a.b_hh, k);
  const T h = from_f<T>(a.relu ? fmaxf(pre, 0.f) : tanh_f(pre));
  a.h_carry[j * H + k] = h;
  a.y[j * a.ld_y + k] = h;
}

template <typename T>
__host__ __device__ __forceinline__ void rnn_backward_step_elem(const RnnBackwardStep<T>& a, int64_t e) {
  const int64_t H = a.H;
  const int64_t j = e / H, k = e - j * H;
  float dh = to_f(a.grad_y[j * a.ld_grad_y + k]) + a.dh_carry[j * H + k];
  if (j < a.n_cont) dh += a.dh_rec[j * H + k];
  a.dh_carry[j * H + k] = 0.f;  // h_{t-1} reaches h_t only through W_hh
  const float y = to_f(a.y[j * a.ld_y + k]);
  const float dpre = a.relu ? (y > 0.f ? dh : 0.f) : dh * (1.f - y * y);
  a.dg[j * a.ld_dg + k] = from_f<T>(dpre);
  a.h_prev_out[j * H + k] = j < a.n_prev ? a.h_prev_src[j * a.ld_h_prev + k] : a.hx[j * H + k];
}

FUSEDRNN_DEFINE_STEP(rnn_forward_step, RnnForwardStep, H)
FUSEDRNN_DEFINE_STEP(rnn_backward_step, RnnBackwardStep, H)

}  // namespace cuda
}  // namespace fusedrnn
