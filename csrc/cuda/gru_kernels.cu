// GRU per-step pointwise kernels (forward and backward).
//
// Dimension letters: B batch (carried-state rows), b rows alive at the step, H hidden size, j a row (0 .. b-1),
// k a hidden unit (0 .. H-1). Gate order r, z, n (torch.nn); hn = h_{t-1} W_hn^T + b_hn is the term r multiplies.
// One thread per (j, k) owns every in-place update of element (j, k) of the carried buffers.
#include "kernels.h"
#include "device_utils.cuh"

namespace fusedrnn {
namespace cuda {

template <typename T>
__host__ __device__ __forceinline__ void gru_forward_step_elem(const GruForwardStep<T>& a, int64_t e) {
  const int64_t H = a.H;
  const int64_t j = e / H, k = e - j * H;
  const float* gx = a.gx + j * a.ld_gx;
  const float* gh = a.gh + j * 3 * H;
  const float r = sigmoid_f(gx[k] + bias_at(a.b_ih, k) + gh[k] + bias_at(a.b_hh, k));
  const float z = sigmoid_f(gx[H + k] + bias_at(a.b_ih, H + k) + gh[H + k] + bias_at(a.b_hh, H + k));
  const float hn = gh[2 * H + k] + bias_at(a.b_hh, 2 * H + k);
  const float nn = tanh_f(gx[2 * H + k] + bias_at(a.b_ih, 2 * H + k) + r * hn);
  const float h_prev = to_f(a.h_carry[j * H + k]);
  const T h = from_f<T>((1.f - z) * nn + z * h_prev);
  a.h_carry[j * H + k] = h;
  a.y[j * a.ld_y + k] = h;
  if (a.reserve) {
    T* rs = a.reserve + j * 4 * H;
    rs[k] = from_f<T>(r);
    rs[H + k] = from_f<T>(z);
    rs[2 * H + k] = from_f<T>(nn);
    rs[3 * H + k] = from_f<T>(hn);
  }
}

template <typename T>
__host__ __device__ __forceinline__ void gru_backward_step_elem(const GruBackwardStep<T>& a, int64_t e) {
  const int64_t H = a.H;
  const int64_t j = e / H, k = e - j * H;
  const T* rs = a.reserve + j * 4 * H;
  const float r = to_f(rs[k]), z = to_f(rs[H + k]), nn = to_f(rs[2 * H + k]), hn = to_f(rs[3 * H + k]);
  float dh = to_f(a.grad_y[j * a.ld_grad_y + k]) + a.dh_carry[j * H + k];
  if (j < a.n_cont) dh += a.dh_rec[j * H + k];
  const T hp = j < a.n_prev ? a.h_prev_src[j * a.ld_h_prev + k] : a.hx[j * H + k];
  a.h_prev_out[j * H + k] = hp;
  const float h_prev = to_f(hp);
  const float dn = dh * (1.f - z) * (1.f - nn * nn);  // d pre-activation of n
  const float dr = dn * hn * r * (1.f - r);
  const float dz = dh * (h_prev - nn) * z * (1.f - z);
  T* dgi = a.dgi + j * a.ld_dgi;
  dgi[k] = from_f<T>(dr);
  dgi[H + k] = from_f<T>(dz);
  dgi[2 * H + k] = from_f<T>(dn);
  T* dgh = a.dgh + j * 3 * H;
  dgh[k] = from_f<T>(dr);
  dgh[H + k] = from_f<T>(dz);
  dgh[2 * H + k] = from_f<T>(dn * r);
  a.dh_carry[j * H + k] = dh * z;  // the part of dh_{t-1} that bypasses W_hh
}

FUSEDRNN_DEFINE_STEP(gru_forward_step, GruForwardStep, H)
FUSEDRNN_DEFINE_STEP(gru_backward_step, GruBackwardStep, H)

}  // namespace cuda
}  // namespace fusedrnn
