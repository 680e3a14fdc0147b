// LSTM per-step pointwise kernels (forward, backward, and the projected-h gradient prologue).
//
// Dimension letters: B batch (carried-state rows), b rows alive at the step, H hidden size, P size of the projected h,
// j a row (0 .. b-1), k a hidden unit (0 .. H-1, or 0 .. P-1 in proj_grad). Gate order i, f, g, o (torch.nn).
// One thread per (j, k) computes all four gates of unit k, so every carried value it updates in place (c, dc, h) is
// read and written by that thread alone: no two threads touch one element.
#include "kernels.h"
#include "device_utils.cuh"

namespace fusedrnn {
namespace cuda {

template <typename T>
__host__ __device__ __forceinline__ void lstm_forward_step_elem(const LstmForwardStep<T>& a, int64_t e) {
  const int64_t H = a.H;
  const int64_t j = e / H, k = e - j * H;
  const float* gx = a.gx + j * a.ld_gx;
  const float* gh = a.gh + j * 4 * H;
  const float pi = gx[k] + gh[k] + bias_at(a.b_ih, k) + bias_at(a.b_hh, k);
  const float pf = gx[H + k] + gh[H + k] + bias_at(a.b_ih, H + k) + bias_at(a.b_hh, H + k);
  const float pg = gx[2 * H + k] + gh[2 * H + k] + bias_at(a.b_ih, 2 * H + k) + bias_at(a.b_hh, 2 * H + k);
  const float po = gx[3 * H + k] + gh[3 * H + k] + bias_at(a.b_ih, 3 * H + k) + bias_at(a.b_hh, 3 * H + k);
  const float i = sigmoid_f(pi), f = sigmoid_f(pf), g = tanh_f(pg), o = sigmoid_f(po);
  const float c = f * a.c[j * H + k] + i * g;
  a.c[j * H + k] = c;
  const T h = from_f<T>(o * tanh_f(c));
  a.h_out[j * a.ld_h_out + k] = h;
  if (a.h_carry) a.h_carry[j * H + k] = h;
  if (a.reserve) {
    T* r = a.reserve + j * 5 * H;
    r[k] = from_f<T>(i);
    r[H + k] = from_f<T>(f);
    r[2 * H + k] = from_f<T>(g);
    r[3 * H + k] = from_f<T>(o);
    r[4 * H + k] = from_f<T>(c);
  }
}

template <typename T>
__host__ __device__ __forceinline__ void lstm_backward_step_elem(const LstmBackwardStep<T>& a, int64_t e) {
  const int64_t H = a.H;
  const int64_t j = e / H, k = e - j * H;
  const T* r = a.reserve + j * 5 * H;
  const float i = to_f(r[k]), f = to_f(r[H + k]), g = to_f(r[2 * H + k]), o = to_f(r[3 * H + k]);
  const float c = to_f(r[4 * H + k]);
  float dh;
  if (a.dh_full) {
    dh = a.dh_full[j * H + k];
  } else {
    dh = to_f(a.grad_y[j * a.ld_grad_y + k]) + a.dh_carry[j * H + k];
    if (j < a.n_cont) dh += a.dh_rec[j * H + k];
    a.dh_carry[j * H + k] = 0.f;  // an LSTM's h_{t-1} reaches h_t only through W_hh
  }
  const float c_prev = j < a.n_prev ? to_f(a.c_prev_src[j * 5 * H + 4 * H + k]) : to_f(a.cx[j * H + k]);
  const float tc = tanh_f(c);
  const float dc = a.dc[j * H + k] + dh * o * (1.f - tc * tc);
  a.dc[j * H + k] = dc * f;
  T* dg = a.dg + j * a.ld_dg;
  dg[k] = from_f<T>(dc * g * i * (1.f - i));
  dg[H + k] = from_f<T>(dc * c_prev * f * (1.f - f));
  dg[2 * H + k] = from_f<T>(dc * i * (1.f - g * g));
  dg[3 * H + k] = from_f<T>(dh * tc * o * (1.f - o));
  if (a.h_prev_out) {
    a.h_prev_out[j * H + k] = j < a.n_prev ? a.h_prev_src[j * a.ld_h_prev + k] : a.hx[j * H + k];
  }
  if (a.h_full_out) a.h_full_out[j * H + k] = from_f<T>(o * tc);
}

template <typename T>
__host__ __device__ __forceinline__ void proj_grad_step_elem(const ProjGradStep<T>& a, int64_t e) {
  const int64_t P = a.P;
  const int64_t j = e / P, k = e - j * P;
  float dh = to_f(a.grad_y[j * a.ld_grad_y + k]) + a.dh_carry[j * P + k];
  if (j < a.n_cont) dh += a.dh_rec[j * P + k];
  a.dh_carry[j * P + k] = 0.f;
  a.dh_out[j * P + k] = from_f<T>(dh);
  a.h_prev_out[j * P + k] = j < a.n_prev ? a.h_prev_src[j * a.ld_h_prev + k] : a.hx[j * P + k];
}

FUSEDRNN_DEFINE_STEP(lstm_forward_step, LstmForwardStep, H)
FUSEDRNN_DEFINE_STEP(lstm_backward_step, LstmBackwardStep, H)
FUSEDRNN_DEFINE_STEP(proj_grad_step, ProjGradStep, P)

}  // namespace cuda
}  // namespace fusedrnn
