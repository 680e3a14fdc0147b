// The torch layer of the CUDA backend: op schemas, argument checks, buffers, and the per-step loop that drives cuBLAS
// (through at::mm_out) and the framework-free kernels of kernels.h.
//
// Dimension letters (docs/design.md): T steps, B batch, N = sum(batch_sizes) packed rows, I input size, H hidden size,
// P size of h (proj_size or H), G gates (LSTM 4, GRU 3, RNN 1), D directions, R reserve width (LSTM 5H, GRU 4H, RNN 0).
//
// Ops (CUDA dispatch key; the fakes are in fusedrnn/cuda.py; see the end of the file for the CPU key):
//   fusedrnn::cuda_rnn_forward(mode, x [N, I], batch_sizes [T] int64 CPU, hx [D, B, P], cx [D, B, H] or None,
//       weights, has_biases, num_directions, train) -> (y [N, D*P], hy [D, B, P], cy [D, B, H] or [0],
//       reserve [D, N, R] or [0])
//   fusedrnn::cuda_rnn_backward(mode, grad_y [N, D*P], grad_hy [D, B, P], grad_cy [D, B, H] or [0], x, batch_sizes,
//       hx, cx, weights, has_biases, num_directions, y, reserve) -> (grad_x [N, I], grad_hx [D, B, P],
//       grad_cx [D, B, H] or [0], grad_weights shaped as weights)
//
// Per-step path. Forward: gx = x @ [W_ih_0; W_ih_1]^T for all steps and both directions (one GEMM, float32 out), then
// per step and direction a recurrent GEMM into a preallocated float32 buffer and one fused pointwise kernel. The two
// directions run on two streams (fork/join with events), their steps issued interleaved. Backward: the same loop in
// reverse time order with the fused gradient kernels; the weight gradients are large GEMMs after the loop.
// Inside the loops nothing allocates (every GEMM writes a preallocated buffer) and nothing waits on the host, so both
// ops can be captured in a CUDA graph. Carried states that are not GEMM operands (c, dh, dc) are float32.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../common.h"  // alloc(): NaN-filled outputs and workspaces under FUSEDRNN_DEBUG_NAN=1
#include "kernels.h"

namespace fusedrnn {
namespace cuda {
namespace {

using at::Tensor;

enum class Cell { kLstm, kGru, kRnnTanh, kRnnRelu };

Cell parse_mode(c10::string_view mode) {
  if (mode == "lstm") return Cell::kLstm;
  if (mode == "gru") return Cell::kGru;
  if (mode == "rnn_tanh") return Cell::kRnnTanh;
  if (mode == "rnn_relu") return Cell::kRnnRelu;
  TORCH_CHECK(false, "fusedrnn cuda: unknown mode '", std::string(mode), "'");
}

// Sizes, packed-sequence offsets and per-direction weights of one layer call, checked once.
struct Layer {
  Cell cell;
  int64_t G, T, N, B, I, H, P, D, R;
  bool has_biases, has_proj;
  std::vector<int64_t> bs, offs;                     // batch_sizes[t], first packed row of step t
  std::vector<Tensor> w_ih, w_hh, b_ih, b_hh, w_hr;  // per direction, contiguous; b_*, w_hr undefined when absent
  bool lstm() const { return cell == Cell::kLstm; }
  bool gru() const { return cell == Cell::kGru; }
  bool relu() const { return cell == Cell::kRnnRelu; }
};

void check_tensor(const Tensor& t, const Tensor& x, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == x.device(), "fusedrnn cuda: ", name, " is on ", t.device(), ", x on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fusedrnn cuda: ", name, " has dtype ", t.scalar_type(),
              ", x has ", x.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "fusedrnn cuda: ", name, " has shape ", t.sizes(), ", expected ", shape);
}

Layer parse_layer(c10::string_view mode, const Tensor& x, const Tensor& batch_sizes, const Tensor& hx,
                  const std::optional<Tensor>& cx, at::TensorList weights, bool has_biases, int64_t num_directions) {
  Layer L;
  L.cell = parse_mode(mode);
  L.G = L.lstm() ? 4 : (L.gru() ? 3 : 1);
  L.has_biases = has_biases;
  TORCH_CHECK(num_directions == 1 || num_directions == 2, "fusedrnn cuda: num_directions must be 1 or 2");
  L.D = num_directions;
  TORCH_CHECK(x.is_cuda() || x.is_cpu(), "fusedrnn cuda: x must be a CUDA (or, for the host check, CPU) tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "fusedrnn cuda: dtype ", x.scalar_type(), " is not supported (float32, float16, bfloat16)");
  TORCH_CHECK(x.dim() == 2, "fusedrnn cuda: x must be [N, I], got ", x.sizes());
  TORCH_CHECK(batch_sizes.device().is_cpu() && batch_sizes.scalar_type() == at::kLong && batch_sizes.dim() == 1,
              "fusedrnn cuda: batch_sizes must be a 1-D int64 CPU tensor");
  const int64_t base = 2 + (has_biases ? 2 : 0);
  const int64_t n_w = static_cast<int64_t>(weights.size());
  TORCH_CHECK(n_w % L.D == 0, "fusedrnn cuda: ", n_w, " weights for ", L.D, " directions");
  const int64_t per = n_w / L.D;
  TORCH_CHECK(per == base || (per == base + 1 && L.lstm()), "fusedrnn cuda: ", per,
              " weights per direction for mode ", std::string(mode), " with has_biases=", has_biases);
  L.has_proj = per == base + 1;
  TORCH_CHECK(weights[1].dim() == 2 && weights[1].size(0) % L.G == 0, "fusedrnn cuda: bad w_hh shape ",
              weights[1].sizes());
  L.H = weights[1].size(0) / L.G;
  L.P = L.has_proj ? weights[base].size(0) : L.H;
  L.I = x.size(1);
  L.R = L.lstm() ? 5 * L.H : (L.gru() ? 4 * L.H : 0);
  const int64_t GH = L.G * L.H;
  for (int64_t d = 0; d < L.D; ++d) {
    const int64_t o = d * per;
    check_tensor(weights[o], x, "w_ih", {GH, L.I});
    check_tensor(weights[o + 1], x, "w_hh", {GH, L.P});
    L.w_ih.push_back(weights[o].contiguous());
    L.w_hh.push_back(weights[o + 1].contiguous());
    if (has_biases) {
      check_tensor(weights[o + 2], x, "b_ih", {GH});
      check_tensor(weights[o + 3], x, "b_hh", {GH});
      L.b_ih.push_back(weights[o + 2].contiguous());
      L.b_hh.push_back(weights[o + 3].contiguous());
    } else {
      L.b_ih.emplace_back();
      L.b_hh.emplace_back();
    }
    if (L.has_proj) {
      check_tensor(weights[o + base], x, "w_hr", {L.P, L.H});
      L.w_hr.push_back(weights[o + base].contiguous());
    } else {
      L.w_hr.emplace_back();
    }
  }
  TORCH_CHECK(hx.dim() == 3, "fusedrnn cuda: hx must be [D, B, P], got ", hx.sizes());
  L.B = hx.size(1);
  check_tensor(hx, x, "hx", {L.D, L.B, L.P});
  if (L.lstm()) {
    TORCH_CHECK(cx.has_value() && cx->defined(), "fusedrnn cuda: an LSTM needs cx");
    check_tensor(*cx, x, "cx", {L.D, L.B, L.H});
  }
  const Tensor bsc = batch_sizes.contiguous();
  const int64_t* bp = bsc.data_ptr<int64_t>();
  L.T = bsc.numel();
  L.N = 0;
  for (int64_t t = 0; t < L.T; ++t) {
    TORCH_CHECK(bp[t] >= 0 && bp[t] <= (t == 0 ? L.B : bp[t - 1]),
                "fusedrnn cuda: batch_sizes must be non-increasing and at most B = ", L.B);
    L.bs.push_back(bp[t]);
    L.offs.push_back(L.N);
    L.N += bp[t];
  }
  TORCH_CHECK(L.T == 0 || L.bs[0] == L.B, "fusedrnn cuda: batch_sizes[0] must equal B = hx.shape[1]");
  TORCH_CHECK(x.size(0) == L.N, "fusedrnn cuda: x has ", x.size(0), " rows, sum(batch_sizes) = ", L.N);
  return L;
}

template <typename T>
T* ptr(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

// out (float32, preallocated) = a @ b, with float32 accumulation for every storage type.
void mm_f32(Tensor out, const Tensor& a, const Tensor& b) {
  if (a.scalar_type() == at::kFloat) {
    at::mm_out(out, a, b);
  } else if (a.is_cpu()) {  // host check only: float32 products of 16-bit values are exact, so this is the same sum
    out.copy_(at::mm(a.to(at::kFloat), b.to(at::kFloat)));
  } else {
    at::mm_out(out, a, b, at::kFloat);
  }
}

// out (storage type, preallocated) = a @ b, accumulated in float32 and rounded once. May allocate a float32
// temporary on the current stream: call it outside the step loops only.
void mm_rounded(Tensor out, const Tensor& a, const Tensor& b) {
  if (out.scalar_type() == at::kFloat) {
    at::mm_out(out, a, b);
  } else if (a.is_cpu()) {
    out.copy_(at::mm(a.to(at::kFloat), b.to(at::kFloat)));
  } else {
    out.copy_(at::mm(a, b, at::kFloat));
  }
}

// Where the steps run. CUDA: one stream per direction, direction 0 on the caller's stream, direction 1 on a pool
// stream forked from it. Everything a side stream touches is allocated on the caller's stream before the fork, and
// the caller's stream waits for the side stream (join) before anything is returned or freed, so no record_stream is
// needed. CPU tensors (host check): the kernels' element code in a host loop, directions one after the other.
struct Exec {
  bool host;
  std::vector<c10::cuda::CUDAStream> s;
  Exec(int64_t D, const at::Device& device) : host(device.is_cpu()) {
    if (host) return;
    s.push_back(c10::cuda::getCurrentCUDAStream(device.index()));
    if (D == 2) {
      s.push_back(c10::cuda::getStreamFromPool(false, device.index()));
      at::cuda::CUDAEvent fork;
      fork.record(s[0]);
      fork.block(s[1]);
    }
  }
  // Makes direction d's stream current (for at::mm and copies) while `guard` lives.
  void enter(c10::cuda::OptionalCUDAStreamGuard& guard, int64_t d) const {
    if (!host) guard.reset_stream(s[d]);
  }
  template <typename A>
  void step(int64_t d, cudaError_t (*device_fn)(const A&, cudaStream_t), void (*host_fn)(const A&),
            const A& a) const {
    if (host) {
      host_fn(a);
    } else {
      C10_CUDA_CHECK(device_fn(a, s[d].stream()));
    }
  }
  void join() {
    if (s.size() == 2) {
      at::cuda::CUDAEvent done;
      done.record(s[1]);
      done.block(s[0]);
    }
  }
};

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_impl(const Layer& L, const Tensor& x, const Tensor& hx,
                                                        const std::optional<Tensor>& cx, bool train) {
  const int64_t D = L.D, B = L.B, N = L.N, H = L.H, P = L.P, GH = L.G * L.H, R = L.R;
  const auto opts = x.options();
  const auto f32 = opts.dtype(at::kFloat);
  Tensor y = alloc({N, D * P}, opts);
  Tensor hy = alloc({D, B, P}, opts);
  hy.copy_(hx);
  Tensor c32;  // [D, B, H] float32 carried cell state, ends as cy
  if (L.lstm()) {
    c32 = alloc({D, B, H}, f32);
    c32.copy_(*cx);
  }
  Tensor reserve = train ? alloc({D, N, R}, opts) : at::empty({0}, opts);
  if (N > 0) {
    const Tensor w_ih_cat = D == 1 ? L.w_ih[0] : at::cat({L.w_ih[0], L.w_ih[1]}, 0);  // [D*GH, I]
    Tensor gx = alloc({N, D * GH}, f32);
    mm_f32(gx, x, w_ih_cat.t());
    std::vector<Tensor> gh(D), h_full(D), w_hh_t(D), w_hr_t(D);
    for (int64_t d = 0; d < D; ++d) {
      gh[d] = alloc({B, GH}, f32);
      w_hh_t[d] = L.w_hh[d].t();  // [P, GH] views, made once rather than per step
      if (L.has_proj) {
        h_full[d] = alloc({B, H}, opts);
        w_hr_t[d] = L.w_hr[d].t();  // [H, P]
      }
    }
    Exec ex(D, x.device());
    for (int64_t s = 0; s < L.T; ++s) {
      for (int64_t d = 0; d < D; ++d) {
        const int64_t t = d == 0 ? s : L.T - 1 - s;
        const int64_t b = L.bs[t], off = L.offs[t];
        if (b == 0) continue;
        c10::cuda::OptionalCUDAStreamGuard guard;
        ex.enter(guard, d);
        Tensor h_carry = hy.select(0, d);  // [B, P]: row j holds the h that row j's next step reads
        mm_f32(gh[d].narrow(0, 0, b), h_carry.narrow(0, 0, b), w_hh_t[d]);
        const float* gx_t = gx.data_ptr<float>() + off * D * GH + d * GH;
        T* y_t = ptr<T>(y) + off * D * P + d * P;
        T* res_t = train && R > 0 ? ptr<T>(reserve) + (d * N + off) * R : nullptr;
        if (L.lstm()) {
          LstmForwardStep<T> a{};
          a.b = b;
          a.H = H;
          a.gx = gx_t;
          a.ld_gx = D * GH;
          a.gh = gh[d].data_ptr<float>();
          a.b_ih = ptr<T>(L.b_ih[d]);
          a.b_hh = ptr<T>(L.b_hh[d]);
          a.c = c32.data_ptr<float>() + d * B * H;
          if (L.has_proj) {
            a.h_out = ptr<T>(h_full[d]);
            a.ld_h_out = H;
            a.h_carry = nullptr;
          } else {
            a.h_out = y_t;
            a.ld_h_out = D * P;
            a.h_carry = ptr<T>(hy) + d * B * P;
          }
          a.reserve = res_t;
          ex.step<LstmForwardStep<T>>(d, &lstm_forward_step<T>, &lstm_forward_step_host<T>, a);
          if (L.has_proj) {
            Tensor h_t = h_carry.narrow(0, 0, b);
            at::mm_out(h_t, h_full[d].narrow(0, 0, b), w_hr_t[d]);
            y.narrow(0, off, b).narrow(1, d * P, P).copy_(h_t);
          }
        } else if (L.gru()) {
          GruForwardStep<T> a{};
          a.b = b;
          a.H = H;
          a.gx = gx_t;
          a.ld_gx = D * GH;
          a.gh = gh[d].data_ptr<float>();
          a.b_ih = ptr<T>(L.b_ih[d]);
          a.b_hh = ptr<T>(L.b_hh[d]);
          a.h_carry = ptr<T>(hy) + d * B * P;
          a.y = y_t;
          a.ld_y = D * P;
          a.reserve = res_t;
          ex.step<GruForwardStep<T>>(d, &gru_forward_step<T>, &gru_forward_step_host<T>, a);
        } else {
          RnnForwardStep<T> a{};
          a.b = b;
          a.H = H;
          a.relu = L.relu();
          a.gx = gx_t;
          a.ld_gx = D * GH;
          a.gh = gh[d].data_ptr<float>();
          a.b_ih = ptr<T>(L.b_ih[d]);
          a.b_hh = ptr<T>(L.b_hh[d]);
          a.h_carry = ptr<T>(hy) + d * B * P;
          a.y = y_t;
          a.ld_y = D * P;
          ex.step<RnnForwardStep<T>>(d, &rnn_forward_step<T>, &rnn_forward_step_host<T>, a);
        }
      }
    }
    ex.join();
  }
  Tensor cy = L.lstm() ? c32.to(x.scalar_type()) : at::empty({0}, opts);
  return {y, hy, cy, reserve};
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> backward_impl(
    const Layer& L, const Tensor& grad_y, const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& x,
    const Tensor& hx, const std::optional<Tensor>& cx, const Tensor& y, const Tensor& reserve) {
  const int64_t D = L.D, B = L.B, N = L.N, H = L.H, P = L.P, GH = L.G * L.H, R = L.R;
  const auto opts = x.options();
  const auto f32 = opts.dtype(at::kFloat);

  // Outputs, all allocated on the caller's stream before the fork.
  Tensor grad_x = alloc({N, L.I}, opts);
  Tensor grad_hx = alloc({D, B, P}, opts);
  Tensor grad_cx = L.lstm() ? alloc({D, B, H}, opts) : at::empty({0}, opts);
  std::vector<Tensor> grad_w;
  for (int64_t d = 0; d < D; ++d) {
    grad_w.push_back(alloc({GH, L.I}, opts));
    grad_w.push_back(alloc({GH, P}, opts));
    if (L.has_biases) {
      grad_w.push_back(alloc({GH}, opts));
      grad_w.push_back(alloc({GH}, opts));
    }
    if (L.has_proj) grad_w.push_back(alloc({P, H}, opts));
  }
  const int64_t per = static_cast<int64_t>(grad_w.size()) / D;

  // Carried gradients (float32). dh_carry/dh_rec: see kernels.h.
  Tensor dh_carry = alloc({D, B, P}, f32);
  dh_carry.copy_(grad_hy);
  Tensor dh_rec = at::zeros({D, B, P}, f32);
  Tensor dc;
  if (L.lstm()) {
    dc = alloc({D, B, H}, f32);
    if (grad_cy.numel() > 0) {
      dc.copy_(grad_cy);
    } else {
      dc.zero_();
    }
  }
  const Tensor hx_c = hx.contiguous();
  const Tensor cx_c = L.lstm() ? cx->contiguous() : Tensor();

  // Per-row buffers for the weight-gradient GEMMs after the loop.
  Tensor dgi = alloc({N, D * GH}, opts);  // d(gate pre-activations), input side, both directions
  std::vector<Tensor> dgh(D), h_prev(D), dh_p(D), h_full(D), dh_full(D);
  for (int64_t d = 0; d < D; ++d) {
    dgh[d] = L.gru() ? alloc({N, GH}, opts) : dgi.narrow(1, d * GH, GH);  // recurrent side
    h_prev[d] = alloc({N, P}, opts);  // h_{t-1} of every row
    if (L.has_proj) {
      dh_p[d] = alloc({N, P}, opts);     // dh_t (projected h) of every row
      h_full[d] = alloc({N, H}, opts);   // o * tanh(c_t) of every row
      dh_full[d] = alloc({B, H}, f32);   // dh_t @ W_hr of the current step
    }
  }

  Exec ex(D, x.device());
  for (int64_t s = 0; s < L.T; ++s) {
    for (int64_t d = 0; d < D; ++d) {
      // Reverse of the forward order: direction 0 from the last step down, direction 1 from step 0 up.
      const int64_t t = d == 0 ? L.T - 1 - s : s;
      const int64_t b = L.bs[t], off = L.offs[t];
      if (b == 0) continue;
      // n_cont: rows of this step whose h fed the step processed just before (whose dh_rec is waiting);
      // n_prev / prev_off: rows whose h_{t-1}, c_{t-1} come from the neighbouring step, and where it starts.
      int64_t n_cont, n_prev, prev_off;
      if (d == 0) {
        n_cont = t == L.T - 1 ? 0 : L.bs[t + 1];
        n_prev = t == 0 ? 0 : b;
        prev_off = t == 0 ? 0 : L.offs[t - 1];
      } else {
        n_cont = t == 0 ? 0 : b;
        n_prev = t == L.T - 1 ? 0 : L.bs[t + 1];
        prev_off = t == L.T - 1 ? 0 : L.offs[t + 1];
      }
      c10::cuda::OptionalCUDAStreamGuard guard;
      ex.enter(guard, d);
      const T* gy_t = ptr<T>(grad_y) + off * D * P + d * P;
      float* dhc = dh_carry.data_ptr<float>() + d * B * P;
      const float* dhr = dh_rec.data_ptr<float>() + d * B * P;
      const T* h_prev_src = ptr<T>(y) + prev_off * D * P + d * P;
      const T* hx_d = ptr<T>(hx_c) + d * B * P;
      T* h_prev_t = ptr<T>(h_prev[d]) + off * P;
      T* dg_t = ptr<T>(dgi) + off * D * GH + d * GH;
      if (L.lstm()) {
        const T* res = ptr<T>(reserve) + d * N * R;
        LstmBackwardStep<T> a{};
        a.b = b;
        a.H = H;
        a.n_cont = n_cont;
        a.n_prev = n_prev;
        if (L.has_proj) {
          ProjGradStep<T> p{};
          p.b = b;
          p.P = P;
          p.n_cont = n_cont;
          p.n_prev = n_prev;
          p.grad_y = gy_t;
          p.ld_grad_y = D * P;
          p.dh_carry = dhc;
          p.dh_rec = dhr;
          p.dh_out = ptr<T>(dh_p[d]) + off * P;
          p.h_prev_src = h_prev_src;
          p.ld_h_prev = D * P;
          p.hx = hx_d;
          p.h_prev_out = h_prev_t;
          ex.step<ProjGradStep<T>>(d, &proj_grad_step<T>, &proj_grad_step_host<T>, p);
          mm_f32(dh_full[d].narrow(0, 0, b), dh_p[d].narrow(0, off, b), L.w_hr[d]);
          a.dh_full = dh_full[d].data_ptr<float>();
          a.h_full_out = ptr<T>(h_full[d]) + off * H;
        } else {
          a.grad_y = gy_t;
          a.ld_grad_y = D * P;
          a.dh_carry = dhc;
          a.dh_rec = dhr;
          a.h_prev_src = h_prev_src;
          a.ld_h_prev = D * P;
          a.hx = hx_d;
          a.h_prev_out = h_prev_t;
        }
        a.dc = dc.data_ptr<float>() + d * B * H;
        a.reserve = res + off * R;
        a.c_prev_src = res + prev_off * R;
        a.cx = ptr<T>(cx_c) + d * B * H;
        a.dg = dg_t;
        a.ld_dg = D * GH;
        ex.step<LstmBackwardStep<T>>(d, &lstm_backward_step<T>, &lstm_backward_step_host<T>, a);
      } else if (L.gru()) {
        GruBackwardStep<T> a{};
        a.b = b;
        a.H = H;
        a.n_cont = n_cont;
        a.n_prev = n_prev;
        a.grad_y = gy_t;
        a.ld_grad_y = D * P;
        a.dh_carry = dhc;
        a.dh_rec = dhr;
        a.reserve = ptr<T>(reserve) + (d * N + off) * R;
        a.h_prev_src = h_prev_src;
        a.ld_h_prev = D * P;
        a.hx = hx_d;
        a.h_prev_out = h_prev_t;
        a.dgi = dg_t;
        a.ld_dgi = D * GH;
        a.dgh = ptr<T>(dgh[d]) + off * GH;
        ex.step<GruBackwardStep<T>>(d, &gru_backward_step<T>, &gru_backward_step_host<T>, a);
      } else {
        RnnBackwardStep<T> a{};
        a.b = b;
        a.H = H;
        a.n_cont = n_cont;
        a.n_prev = n_prev;
        a.relu = L.relu();
        a.grad_y = gy_t;
        a.ld_grad_y = D * P;
        a.dh_carry = dhc;
        a.dh_rec = dhr;
        a.y = ptr<T>(y) + off * D * P + d * P;
        a.ld_y = D * P;
        a.h_prev_src = h_prev_src;
        a.ld_h_prev = D * P;
        a.hx = hx_d;
        a.h_prev_out = h_prev_t;
        a.dg = dg_t;
        a.ld_dg = D * GH;
        ex.step<RnnBackwardStep<T>>(d, &rnn_backward_step<T>, &rnn_backward_step_host<T>, a);
      }
      // dh_rec[0:b] = dgh_t @ W_hh: the gradient reaching h_{t-1} through the recurrent weights.
      mm_f32(dh_rec.select(0, d).narrow(0, 0, b), dgh[d].narrow(0, off, b), L.w_hh[d]);
    }
  }

  // After the loop, still one stream per direction: states' gradients and this direction's weight gradients.
  for (int64_t d = 0; d < D; ++d) {
    c10::cuda::OptionalCUDAStreamGuard guard;
    ex.enter(guard, d);
    grad_hx.select(0, d).copy_(dh_carry.select(0, d) + dh_rec.select(0, d));
    if (L.lstm()) grad_cx.select(0, d).copy_(dc.select(0, d));
    Tensor* gw = grad_w.data() + d * per;
    if (N == 0) {
      for (int64_t k = 0; k < per; ++k) gw[k].zero_();
      continue;
    }
    const Tensor dgi_d = dgi.narrow(1, d * GH, GH);
    mm_rounded(gw[0], dgi_d.t(), x);           // dW_ih [GH, I]
    mm_rounded(gw[1], dgh[d].t(), h_prev[d]);  // dW_hh [GH, P]
    if (L.has_biases) {
      gw[2].copy_(at::sum(dgi_d, {0}, false, at::kFloat));
      gw[3].copy_(L.gru() ? at::sum(dgh[d], {0}, false, at::kFloat) : gw[2]);
    }
    if (L.has_proj) mm_rounded(gw[per - 1], dh_p[d].t(), h_full[d]);  // dW_hr [P, H]
  }
  ex.join();
  if (N > 0) {
    const Tensor w_ih_cat = D == 1 ? L.w_ih[0] : at::cat({L.w_ih[0], L.w_ih[1]}, 0);  // [D*GH, I]
    mm_rounded(grad_x, dgi, w_ih_cat);
  }
  return {grad_x, grad_hx, grad_cx, grad_w};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cuda_rnn_forward(c10::string_view mode, const Tensor& x,
                                                            const Tensor& batch_sizes, const Tensor& hx,
                                                            const std::optional<Tensor>& cx, at::TensorList weights,
                                                            bool has_biases, int64_t num_directions, bool train) {
  const Layer L = parse_layer(mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions);
  const at::OptionalDeviceGuard device_guard(at::device_of(x));
  const Tensor xc = x.contiguous();
  switch (x.scalar_type()) {
    case at::kFloat: return forward_impl<float>(L, xc, hx, cx, train);
    case at::kHalf: return forward_impl<__half>(L, xc, hx, cx, train);
    default: return forward_impl<__nv_bfloat16>(L, xc, hx, cx, train);
  }
}

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> cuda_rnn_backward(
    c10::string_view mode, const Tensor& grad_y, const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& x,
    const Tensor& batch_sizes, const Tensor& hx, const std::optional<Tensor>& cx, at::TensorList weights,
    bool has_biases, int64_t num_directions, const Tensor& y, const Tensor& reserve) {
  const Layer L = parse_layer(mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions);
  const at::OptionalDeviceGuard device_guard(at::device_of(x));
  check_tensor(grad_y, x, "grad_y", {L.N, L.D * L.P});
  check_tensor(grad_hy, x, "grad_hy", {L.D, L.B, L.P});
  check_tensor(y, x, "y", {L.N, L.D * L.P});
  if (L.lstm() && grad_cy.numel() > 0) check_tensor(grad_cy, x, "grad_cy", {L.D, L.B, L.H});
  if (L.R > 0) {
    check_tensor(reserve, x, "reserve", {L.D, L.N, L.R});
  }
  const Tensor xc = x.contiguous(), gyc = grad_y.contiguous(), yc = y.contiguous();
  const Tensor rc = L.R > 0 ? reserve.contiguous() : reserve;
  switch (x.scalar_type()) {
    case at::kFloat: return backward_impl<float>(L, gyc, grad_hy, grad_cy, xc, hx, cx, yc, rc);
    case at::kHalf: return backward_impl<__half>(L, gyc, grad_hy, grad_cy, xc, hx, cx, yc, rc);
    default: return backward_impl<__nv_bfloat16>(L, gyc, grad_hy, grad_cy, xc, hx, cx, yc, rc);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedrnn, m) {
  m.def(
      "cuda_rnn_forward(str mode, Tensor x, Tensor batch_sizes, Tensor hx, Tensor? cx, Tensor[] weights, "
      "bool has_biases, int num_directions, bool train) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cuda_rnn_backward(str mode, Tensor grad_y, Tensor grad_hy, Tensor grad_cy, Tensor x, Tensor batch_sizes, "
      "Tensor hx, Tensor? cx, Tensor[] weights, bool has_biases, int num_directions, Tensor y, Tensor reserve) "
      "-> (Tensor, Tensor, Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(fusedrnn, CUDA, m) {
  m.impl("cuda_rnn_forward", &cuda_rnn_forward);
  m.impl("cuda_rnn_backward", &cuda_rnn_backward);
}

// CPU tensors run the same driver with the kernels' element code in host loops (kernels.h, *_host): a check of this
// file's indexing, carries and GEMM shapes on machines without a GPU (tests/test_cuda.py). Not a backend: the cuda
// backend's supports() is False on the CPU, and the cpu backend is csrc/cpu.
TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) {
  m.impl("cuda_rnn_forward", &cuda_rnn_forward);
  m.impl("cuda_rnn_backward", &cuda_rnn_backward);
}

}  // namespace cuda
}  // namespace fusedrnn

// An empty Python module: importing fusedrnn._C_cuda runs the registrations above.
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                      "fusedrnn CUDA kernels (ops under torch.ops.fusedrnn.cuda_*)", -1, nullptr};
  return PyModule_Create(&module);
}
