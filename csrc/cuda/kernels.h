// fusedrnn CUDA kernels: the per-step fused pointwise kernels of the per-step path (framework-free: no torch here).
//
// Dimension letters (as docs/design.md):
//   B  batch (rows of the carried state buffers; rows alive at a step are always the prefix 0 .. b-1)
//   b  rows alive at the step being computed (batch_sizes[t]), b <= B
//   H  hidden size, P  size of h (proj_size if projected, else H), G gates (LSTM 4, GRU 3, RNN 1)
//   D  directions; "ld" arguments are row strides in elements (a y slice has ld = D*P, a gate slice ld = D*G*H)
//
// The torch layer (torch_ops.cpp) runs, per direction and step:
//   forward : gh[0:b] = h_carry[0:b] @ W_hh^T (cuBLAS, float32 out) ; <cell>_forward_step ;
//             (LSTM with projection) h_carry[0:b] = h_full[0:b] @ W_hr^T ; y slice <- h_carry[0:b]
//   backward: (projection) proj_grad_step ; dh_full = dh[0:b] @ W_hr ; <cell>_backward_step ;
//             dh_rec[0:b] = dgh[0:b] @ W_hh (cuBLAS, float32 out)
// Pre-activations and every carried state that is not a GEMM operand are float32; T (the storage type) is float,
// __half or __nv_bfloat16, and all arithmetic is float32.
//
// Every launcher enqueues on `stream`, launches nothing when the step has no elements, and returns the launch's
// cudaGetLastError(). No launcher allocates or synchronises, so a sequence of them can be captured in a CUDA graph.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace fusedrnn {
namespace cuda {

// ---------------------------------------------------------------- forward

// LSTM, one step. Gate order i, f, g, o.
template <typename T>
struct LstmForwardStep {
  int64_t b, H;
  const float* gx;    // [b, 4H], row stride ld_gx: x_t W_ih^T (no bias)
  int64_t ld_gx;
  const float* gh;    // [b, 4H] contiguous: h_{t-1} W_hh^T (no bias)
  const T* b_ih;      // [4H] or nullptr
  const T* b_hh;      // [4H] or nullptr
  float* c;           // [B, H] carried cell state: rows 0..b-1 hold c_{t-1} on entry and c_t on exit
  T* h_out;           // [b, H], row stride ld_h_out: h_full = o * tanh(c_t) (a y slice, or the projection input)
  int64_t ld_h_out;
  T* h_carry;         // [B, H] (unprojected LSTM: the recurrent h, rows 0..b-1 set to h_t) or nullptr
  T* reserve;         // [b, 5H] contiguous: i, f, g, o (activated), c_t; or nullptr (inference)
};

// GRU, one step. Gate order r, z, n.
template <typename T>
struct GruForwardStep {
  int64_t b, H;
  const float* gx;    // [b, 3H], row stride ld_gx: x_t W_ih^T (no bias)
  int64_t ld_gx;
  const float* gh;    // [b, 3H] contiguous: h_{t-1} W_hh^T (no bias)
  const T* b_ih;      // [3H] or nullptr
  const T* b_hh;      // [3H] or nullptr
  T* h_carry;         // [B, H]: rows 0..b-1 hold h_{t-1} on entry and h_t on exit
  T* y;               // [b, H], row stride ld_y: h_t
  int64_t ld_y;
  T* reserve;         // [b, 4H] contiguous: r, z, n (activated), hn = gh_n + b_hn; or nullptr
};

// Elman RNN, one step: h = act(gx + b_ih + gh + b_hh).
template <typename T>
struct RnnForwardStep {
  int64_t b, H;
  bool relu;          // false: tanh
  const float* gx;    // [b, H], row stride ld_gx
  int64_t ld_gx;
  const float* gh;    // [b, H] contiguous
  const T* b_ih;      // [H] or nullptr
  const T* b_hh;      // [H] or nullptr
  T* h_carry;         // [B, H]: rows 0..b-1 set to h_t
  T* y;               // [b, H], row stride ld_y: h_t
  int64_t ld_y;
};

// ---------------------------------------------------------------- backward
//
// Gradient w.r.t. the h a step produced (dh_t), for row j < b, is
//   grad_y[j] + dh_carry[j] + (j < n_cont ? dh_rec[j] : 0)
// where dh_rec[j] = dgh_{prev} @ W_hh from the step processed just before (the one h_t fed), n_cont the rows of that
// step (0 at the first processed step), and dh_carry starts as grad_hy and is then overwritten by each step with the
// part of dh_{t-1} that bypasses W_hh (GRU: z * dh_t; LSTM, RNN: 0). After the last step of a row,
// dh_carry[j] + dh_rec[j] is grad_hx[j].
//
// h_prev / c_prev of row j are taken from the neighbouring step in time (rows j < n_prev, pointed at by h_prev_src /
// c_prev_src) or from the initial state (hx, cx) otherwise.

// LSTM, one step (reverse order of the forward).
template <typename T>
struct LstmBackwardStep {
  int64_t b, H, n_cont, n_prev;
  const T* grad_y;       // [b, H], row stride ld_grad_y (unprojected); unused when dh_full is given
  int64_t ld_grad_y;
  float* dh_carry;       // [B, H] (unprojected) see above; unused when dh_full is given
  const float* dh_rec;   // [B, H] (unprojected); unused when dh_full is given
  const float* dh_full;  // [b, H] contiguous or nullptr: the full d h_full of a projected LSTM (= dh_t @ W_hr)
  float* dc;             // [B, H] carried dc: rows 0..b-1 hold dc_t on entry and dc_{t-1} on exit
  const T* reserve;      // [b, 5H] contiguous: i, f, g, o, c_t of this step
  const T* c_prev_src;   // rows j < n_prev: c_{t-1} at c_prev_src[j * 5H + 4H + k] (the neighbour step's reserve)
  const T* cx;           // [B, H] initial c of this direction
  const T* h_prev_src;   // rows j < n_prev: h_{t-1} at h_prev_src[j * ld_h_prev + k] (unprojected only)
  int64_t ld_h_prev;
  const T* hx;           // [B, H] initial h (unprojected only)
  T* h_prev_out;         // [b, H] contiguous: gathered h_{t-1} for dW_hh (unprojected), or nullptr
  T* h_full_out;         // [b, H] contiguous: o * tanh(c_t) for dW_hr (projected), or nullptr
  T* dg;                 // [b, 4H], row stride ld_dg: gradient w.r.t. the gate pre-activations
  int64_t ld_dg;
};

// Projected-h step prologue (LSTM with proj_size, P-sized): dh_t as above, stored as a GEMM operand, and the
// gather of h_{t-1} for dW_hh.
template <typename T>
struct ProjGradStep {
  int64_t b, P, n_cont, n_prev;
  const T* grad_y;       // [b, P], row stride ld_grad_y
  int64_t ld_grad_y;
  float* dh_carry;       // [B, P] (set to 0 for rows 0..b-1)
  const float* dh_rec;   // [B, P]
  T* dh_out;             // [b, P] contiguous: dh_t
  const T* h_prev_src;   // rows j < n_prev: h_{t-1} at h_prev_src[j * ld_h_prev + k]
  int64_t ld_h_prev;
  const T* hx;           // [B, P]
  T* h_prev_out;         // [b, P] contiguous
};

// GRU, one step.
template <typename T>
struct GruBackwardStep {
  int64_t b, H, n_cont, n_prev;
  const T* grad_y;       // [b, H], row stride ld_grad_y
  int64_t ld_grad_y;
  float* dh_carry;       // [B, H]
  const float* dh_rec;   // [B, H]
  const T* reserve;      // [b, 4H] contiguous: r, z, n, hn
  const T* h_prev_src;   // rows j < n_prev: h_{t-1} at h_prev_src[j * ld_h_prev + k]
  int64_t ld_h_prev;
  const T* hx;           // [B, H]
  T* h_prev_out;         // [b, H] contiguous
  T* dgi;                // [b, 3H], row stride ld_dgi: d(x W_ih^T + b_ih)
  int64_t ld_dgi;
  T* dgh;                // [b, 3H] contiguous: d(h W_hh^T + b_hh) (differs from dgi in the n gate: times r)
};

// Elman RNN, one step. The activation derivative comes from y (tanh' = 1 - y^2, relu' = [y > 0]).
template <typename T>
struct RnnBackwardStep {
  int64_t b, H, n_cont, n_prev;
  bool relu;
  const T* grad_y;       // [b, H], row stride ld_grad_y
  int64_t ld_grad_y;
  float* dh_carry;       // [B, H]
  const float* dh_rec;   // [B, H]
  const T* y;            // [b, H], row stride ld_y: h_t of this step
  int64_t ld_y;
  const T* h_prev_src;   // rows j < n_prev: h_{t-1} at h_prev_src[j * ld_h_prev + k]
  int64_t ld_h_prev;
  const T* hx;           // [B, H]
  T* h_prev_out;         // [b, H] contiguous
  T* dg;                 // [b, H], row stride ld_dg
  int64_t ld_dg;
};

template <typename T> cudaError_t lstm_forward_step(const LstmForwardStep<T>& a, cudaStream_t stream);
template <typename T> cudaError_t gru_forward_step(const GruForwardStep<T>& a, cudaStream_t stream);
template <typename T> cudaError_t rnn_forward_step(const RnnForwardStep<T>& a, cudaStream_t stream);
template <typename T> cudaError_t lstm_backward_step(const LstmBackwardStep<T>& a, cudaStream_t stream);
template <typename T> cudaError_t proj_grad_step(const ProjGradStep<T>& a, cudaStream_t stream);
template <typename T> cudaError_t gru_backward_step(const GruBackwardStep<T>& a, cudaStream_t stream);
template <typename T> cudaError_t rnn_backward_step(const RnnBackwardStep<T>& a, cudaStream_t stream);

// The same element code run by a plain loop on the host, on host pointers: lets the driver (torch_ops.cpp) and these
// kernels' index arithmetic be tested against a float64 oracle on a machine without a GPU. Not a fast path.
template <typename T> void lstm_forward_step_host(const LstmForwardStep<T>& a);
template <typename T> void gru_forward_step_host(const GruForwardStep<T>& a);
template <typename T> void rnn_forward_step_host(const RnnForwardStep<T>& a);
template <typename T> void lstm_backward_step_host(const LstmBackwardStep<T>& a);
template <typename T> void proj_grad_step_host(const ProjGradStep<T>& a);
template <typename T> void gru_backward_step_host(const GruBackwardStep<T>& a);
template <typename T> void rnn_backward_step_host(const RnnBackwardStep<T>& a);

}  // namespace cuda
}  // namespace fusedrnn
