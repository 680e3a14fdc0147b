// One step of an LSTMCell / GRUCell / RNNCell on the CPU as one op with its autograd in C++:
//
//   fusedrnn::cpu_cell(mode, x [B, I], hx [B, P], cx [B, H]?, weights, has_biases, train) -> (h [B, H], c, reserve)
//   fusedrnn::cpu_cell_backward(mode, grad_h, grad_c, x, hx, cx?, weights, has_biases, h, reserve, output_mask)
//       -> (grad_x, grad_hx, grad_cx, grad_weights)
//
// The step is the layer kernels' T = 1 (rnn_forward / rnn_backward with batch_sizes [B]); c is [B, H] for LSTM and
// an empty [0] otherwise; reserve as the layer's for one step ([1, B, R]) when train, else [0]; grad_c [B, H] or
// [0] (zeros); output_mask (x, the states, the weights): a gradient not asked for comes back as an empty [0] and
// its products are skipped (fusedrnn::cpu::GradMask: a decoder's first step, whose state is zeros, needs no
// grad_hx, nor an x without grad its grad_x; a step's backward is four products).
// Why an op of its own: a decoder loop pays a cell's fixed cost at every step, and through the layer op
// (fusedrnn/ops.py) that was a Python autograd.Function and a dozen Python-level reshapes, about 20 us of a 30 us
// RNNCell step at B1 H64 against torch.nn's 15 us. Here the graph node is a C++ Function
// (torch::autograd::Function) registered as the op's Autograd kernel: one dispatcher call from Python a step.
// create_graph=True (a gradient penalty): the backward recomputes the step in differentiable ATen ops (float32 for
// a half-precision cell) and differentiates that with a graph, as the layer op's _graph_grads does.
// Forward-mode AD is not supported (torch's C++ Function has no jvp): it raises, as the layer op's path does.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "cpu/layer.h"

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using CellResult = std::tuple<Tensor, Tensor, Tensor>;
using CellGrads = std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>>;

// batch_sizes [B] of the one step, on the stack: neither entry point keeps it past the call.
struct OneStep {
  int64_t b;
  Tensor t;
  explicit OneStep(int64_t B) : b(B), t(at::from_blob(&b, {1}, at::TensorOptions().dtype(at::kLong))) {}
};

std::optional<Tensor> state3(const std::optional<Tensor>& s) {
  if (!s.has_value() || !s->defined()) return std::nullopt;
  return s->unsqueeze(0);
}

CellResult cpu_cell(c10::string_view mode, const Tensor& x, const Tensor& hx, const std::optional<Tensor>& cx,
                    at::TensorList weights, bool has_biases, bool train) {
  TORCH_CHECK(x.dim() == 2 && hx.dim() == 2, "fusedrnn: cpu_cell takes x [B, I] and hx [B, P], got ", x.sizes(),
              " and ", hx.sizes());
  TORCH_CHECK((mode == "lstm") == (cx.has_value() && cx->defined()), "fusedrnn: cpu_cell takes cx for lstm only");
  const OneStep steps(x.size(0));
  auto [y, hy, cy, reserve] =
      fusedrnn::cpu::rnn_forward(std::string(mode), x, steps.t, hx.unsqueeze(0), state3(cx), weights, has_biases, 1,
                                 train);
  // The new h is y (one step: hy's values); hy is dropped, so a decoder loop keeps one copy of h per step.
  if (cy.dim() == 3) cy.squeeze_(0);
  return {y, cy, reserve};
}

CellGrads cpu_cell_backward(c10::string_view mode, const Tensor& grad_h, const Tensor& grad_c, const Tensor& x,
                            const Tensor& hx, const std::optional<Tensor>& cx, at::TensorList weights,
                            bool has_biases, const Tensor& h, const Tensor& reserve,
                            std::array<bool, 3> output_mask) {
  TORCH_CHECK(x.dim() == 2 && hx.dim() == 2, "fusedrnn: cpu_cell_backward takes x [B, I] and hx [B, P]");
  const OneStep steps(x.size(0));
  const Tensor grad_cy = grad_c.numel() ? grad_c.unsqueeze(0) : grad_c;
  auto [gx, ghx, gcx, gws] = fusedrnn::cpu::rnn_backward(std::string(mode), grad_h, grad_h.new_empty({0}), grad_cy,
                                                         x, steps.t, hx.unsqueeze(0), state3(cx), weights,
                                                         has_biases, 1, h, reserve,
                                                         {output_mask[0], output_mask[1], output_mask[2]});
  if (ghx.dim() == 3) ghx.squeeze_(0);
  if (gcx.dim() == 3) gcx.squeeze_(0);
  return {gx, ghx, gcx, gws};
}

// The ops through the dispatcher (from the Autograd kernel, below it): CPU tensors reach the kernels above, fake
// ones (torch.compile, opcheck) their fake functions (fusedrnn/cpu.py).
const c10::TypedOperatorHandle<CellResult(c10::string_view, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                          at::TensorList, bool, bool)>&
cell_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusedrnn::cpu_cell", "")
                             .typed<CellResult(c10::string_view, const Tensor&, const Tensor&,
                                               const std::optional<Tensor>&, at::TensorList, bool, bool)>();
  return op;
}

// ---- autograd ----------------------------------------------------------------------------------------------------

// The step in differentiable ATen ops (docs/design.md, Recurrence): what create_graph=True differentiates.
variable_list cell_math(const std::string& mode, const Tensor& x, const Tensor& h, const Tensor& c,
                        const std::vector<Tensor>& w, bool has_biases) {
  const Tensor gi = at::linear(x, w[0], has_biases ? std::optional<Tensor>(w[2]) : std::nullopt);
  const Tensor gh = at::linear(h, w[1], has_biases ? std::optional<Tensor>(w[3]) : std::nullopt);
  if (mode == "lstm") {
    const auto g = (gi + gh).chunk(4, 1);
    const Tensor c1 = at::sigmoid(g[1]) * c + at::sigmoid(g[0]) * at::tanh(g[2]);
    return {at::sigmoid(g[3]) * at::tanh(c1), c1};
  }
  if (mode == "gru") {
    const auto a = gi.chunk(3, 1), b = gh.chunk(3, 1);
    const Tensor r = at::sigmoid(a[0] + b[0]), z = at::sigmoid(a[1] + b[1]);
    const Tensor n = at::tanh(a[2] + r * b[2]);
    return {n + z * (h - n)};
  }
  const Tensor pre = gi + gh;
  return {mode == "rnn_relu" ? at::relu(pre) : at::tanh(pre)};
}

struct CellFunction : public torch::autograd::Function<CellFunction> {
  static variable_list forward(AutogradContext* ctx, const std::string& mode, const Tensor& x, const Tensor& hx,
                               const std::optional<Tensor>& cx, at::TensorList weights, bool has_biases) {
    TORCH_CHECK(x.device().is_cpu(), "fusedrnn: cpu_cell runs on CPU tensors");
    Tensor h, c, reserve;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(h, c, reserve) = cell_op().call(mode, x, hx, cx, weights, has_biases, true);
    }
    const bool lstm = mode == "lstm";
    variable_list saved = {x, hx, lstm ? *cx : Tensor(), h, reserve};
    saved.insert(saved.end(), weights.begin(), weights.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["has_biases"] = has_biases;
    // Unused outputs' gradients stay undefined (lazy zeros below), never materialised zero tensors.
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable(lstm ? variable_list{reserve} : variable_list{c, reserve});
    return {h, c, reserve};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const std::string mode = ctx->saved_data["mode"].toStringRef();
    const bool has_biases = ctx->saved_data["has_biases"].toBool();
    const bool lstm = mode == "lstm";
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &hx = saved[1], &cx = saved[2], &h = saved[3], &reserve = saved[4];
    const std::vector<Tensor> weights(saved.begin() + 5, saved.end());
    const Tensor& grad_h = grads[0];
    const Tensor grad_c = lstm ? grads[1] : Tensor();
    // One slot per forward argument: mode, x, hx, cx, the weights, has_biases.
    variable_list out(4 + weights.size() + 1);
    if (!grad_h.defined() && !grad_c.defined()) return out;
    // needs_input_grad counts the tensor arguments only: x, hx, (cx,) the weights.
    const size_t w0 = lstm ? 3 : 2;
    // Gradients batched by torch's older vmap (torch.autograd.grad(is_grads_batched=True), vectorize=True in
    // torch.autograd.functional): its fallback cannot batch an op with a list of tensors, but it batches the
    // recomputation's ATen ops.
    auto legacy_batched = [](const Tensor& t) {
      return t.defined() && t.unsafeGetTensorImpl()->key_set().has(c10::DispatchKey::Batched);
    };
    const bool batched = legacy_batched(grad_h) || legacy_batched(grad_c);
    if (torch::autograd::GradMode::is_enabled() || batched) {  // create_graph=True: a differentiable recomputation
      at::AutoGradMode grad_mode(true);
      const bool half = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
      auto up = [&](const Tensor& t) { return half && t.defined() ? t.to(at::kFloat) : t; };
      std::vector<Tensor> wf;
      for (const Tensor& w : weights) wf.push_back(up(w));
      const variable_list outs = cell_math(mode, up(x), up(hx), up(cx), wf, has_biases);
      variable_list ys, gys, wrt;
      std::vector<size_t> slot;
      if (grad_h.defined()) ys.push_back(outs[0]), gys.push_back(grad_h.to(outs[0].scalar_type()));
      if (grad_c.defined()) ys.push_back(outs[1]), gys.push_back(grad_c.to(outs[1].scalar_type()));
      const variable_list inputs = [&] {
        variable_list v = {x, hx};
        if (lstm) v.push_back(cx);
        v.insert(v.end(), weights.begin(), weights.end());
        return v;
      }();
      for (size_t i = 0; i < inputs.size(); ++i)
        if (ctx->needs_input_grad(i) && inputs[i].requires_grad()) wrt.push_back(inputs[i]), slot.push_back(i);
      if (wrt.empty()) return out;
      const variable_list got = torch::autograd::grad(ys, wrt, gys, /*retain_graph=*/true, /*create_graph=*/true,
                                                      /*allow_unused=*/true);
      for (size_t k = 0; k < got.size(); ++k) {
        const size_t i = slot[k];
        out[i < 2 ? 1 + i : (lstm && i == 2) ? 3 : 4 + (i - w0)] = got[k];
      }
      return out;
    }
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fusedrnn::cpu_cell_backward", "")
                         .typed<CellGrads(c10::string_view, const Tensor&, const Tensor&, const Tensor&,
                                          const Tensor&, const std::optional<Tensor>&, at::TensorList, bool,
                                          const Tensor&, const Tensor&, std::array<bool, 3>)>();
    // grad_h of a loss that used only c: one zero expanded to h's shape (the kernels read it as one row).
    const Tensor gy = grad_h.defined() ? grad_h : at::zeros({}, h.options()).expand(h.sizes());
    const Tensor gc = grad_c.defined() ? grad_c : at::empty({0}, h.options());
    bool need_w = false;
    for (size_t k = 0; k < weights.size(); ++k) need_w = need_w || ctx->needs_input_grad(w0 + k);
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0),
                                      ctx->needs_input_grad(1) || (lstm && ctx->needs_input_grad(2)), need_w};
    auto [gx, ghx, gcx, gws] = op.call(mode, gy, gc, x, hx, lstm ? std::optional<Tensor>(cx) : std::nullopt,
                                       weights, has_biases, h, reserve, mask);
    if (ctx->needs_input_grad(0)) out[1] = gx;
    if (ctx->needs_input_grad(1)) out[2] = ghx;
    if (lstm && ctx->needs_input_grad(2)) out[3] = gcx;
    for (size_t k = 0; k < gws.size(); ++k)
      if (ctx->needs_input_grad(w0 + k)) out[4 + k] = gws[k];
    return out;
  }
};

CellResult cpu_cell_autograd(c10::string_view mode, const Tensor& x, const Tensor& hx,
                             const std::optional<Tensor>& cx, at::TensorList weights, bool has_biases, bool train) {
  bool record = torch::autograd::GradMode::is_enabled() && (x.requires_grad() || hx.requires_grad() ||
                                                            (cx.has_value() && cx->requires_grad()));
  for (size_t i = 0; !record && i < weights.size(); ++i)
    record = torch::autograd::GradMode::is_enabled() && weights[i].requires_grad();
  if (!record) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return cell_op().call(mode, x, hx, cx, weights, has_biases, train);
  }
  const variable_list out =
      CellFunction::apply(std::string(mode), x, hx, mode == "lstm" ? cx : std::nullopt, weights, has_biases);
  return {out[0], out[1], out[2]};
}

}  // namespace

namespace fusedrnn::cpu {

std::tuple<Tensor, Tensor> cell_step(const std::string& mode, const Tensor& x, const Tensor& hx,
                                     const std::optional<Tensor>& cx, at::TensorList weights, bool has_biases) {
  auto [h, c, reserve] = cpu_cell_autograd(mode, x, hx, cx, weights, has_biases, false);
  return {h, c};
}

}  // namespace fusedrnn::cpu

TORCH_LIBRARY_FRAGMENT(fusedrnn, m) {
  m.def("cpu_cell(str mode, Tensor x, Tensor hx, Tensor? cx, Tensor[] weights, bool has_biases, bool train) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("cpu_cell_backward(str mode, Tensor grad_h, Tensor grad_c, Tensor x, Tensor hx, Tensor? cx, "
        "Tensor[] weights, bool has_biases, Tensor h, Tensor reserve, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) {
  m.impl("cpu_cell", &cpu_cell);
  m.impl("cpu_cell_backward", &cpu_cell_backward);
}

TORCH_LIBRARY_IMPL(fusedrnn, Autograd, m) { m.impl("cpu_cell", &cpu_cell_autograd); }
