// Shared input checks and helpers for the fusedrnn ops (see docs/design.md for the contract).
//
// Dimension letters: T steps, B batch, N = sum(batch_sizes) packed rows, I input size, H hidden size,
// P size of h (proj_size or H), G gates (LSTM 4, GRU 3, RNN 1), D directions, R reserve row width.
#pragma once
#include <ATen/ATen.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "cpu/kernels.h"

namespace fusedrnn {

// FUSEDRNN_DEBUG_NAN=1 (fusedrnn/debug.py), read at every call: buffers a kernel must fully overwrite start as NaN,
// so an element it forgets to write shows up in the result instead of passing as a stale plausible value.
inline bool debug_nan() {
  const char* v = std::getenv("FUSEDRNN_DEBUG_NAN");
  return v && *v && std::string(v) != "0";
}

// CPU buffers of 32 MiB or more are asked to be backed by transparent huge pages (madvise(MADV_HUGEPAGE) over the
// whole 2 MiB pages inside them, before anything touches them), as torch's allocator does for every buffer of 2 MiB
// or more with THP_MEM_ALLOC_ENABLE=1. glibc maps buffers that large afresh on every call (32 MiB is its highest
// mmap threshold), so the advice ends with the buffer, and faulting one in 4 KiB at a time cost training calls
// ~10% (LSTM T500 B32 H128 forward+backward, its 41 MB reserve: 10,400 page faults a call; 10.8% faster with the
// advice, alternating call by call). Advice only: where THP is off, nothing changes. FUSEDRNN_CPU_HUGEPAGES=0,
// read at every call, turns it off.
constexpr int64_t kHugePage = int64_t(2) << 20;
constexpr int64_t kHugeAdviseMin = int64_t(32) << 20;

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  if (bytes < kHugeAdviseMin || !t.device().is_cpu()) return;
  if (const char* e = std::getenv("FUSEDRNN_CPU_HUGEPAGES"); e && std::string(e) == "0") return;
  const auto p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (p + kHugePage - 1) / kHugePage * kHugePage, hi = (p + bytes) / kHugePage * kHugePage;
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// A new buffer t made ready for use: huge-page advice where it is large, NaN-filled in the debug mode.
inline at::Tensor fresh_buffer(at::Tensor t) {
  advise_huge_pages(t);
  if (debug_nan() && t.is_floating_point()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// at::empty for outputs and workspaces that are written before they are read: NaN-filled in the debug mode.
inline at::Tensor alloc(at::IntArrayRef size, const at::TensorOptions& options) {
  return fresh_buffer(at::empty(size, options));
}

struct Layout {
  cpu::Mode mode;
  int64_t T = 0, B = 0, N = 0, I = 0, H = 0, P = 0, G = 0, D = 0, R = 0;
  bool bias = false, proj = false;
  int64_t group = 0;              // weights per direction
  std::vector<int64_t> bs, offs;  // batch_sizes [T] and their exclusive cumsum [T]

  const at::Tensor& w(const std::vector<at::Tensor>& ws, int64_t d, int64_t i) const { return ws[d * group + i]; }
  const at::Tensor& w_ih(const std::vector<at::Tensor>& ws, int64_t d) const { return w(ws, d, 0); }
  const at::Tensor& w_hh(const std::vector<at::Tensor>& ws, int64_t d) const { return w(ws, d, 1); }
  // b_ih / b_hh exist only when bias; w_hr only when proj.
  const at::Tensor& b_ih(const std::vector<at::Tensor>& ws, int64_t d) const { return w(ws, d, 2); }
  const at::Tensor& b_hh(const std::vector<at::Tensor>& ws, int64_t d) const { return w(ws, d, 3); }
  const at::Tensor& w_hr(const std::vector<at::Tensor>& ws, int64_t d) const { return w(ws, d, group - 1); }
};

inline cpu::Mode parse_mode(const std::string& mode) {
  if (mode == "lstm") return cpu::kLSTM;
  if (mode == "gru") return cpu::kGRU;
  if (mode == "rnn_tanh") return cpu::kRNNTanh;
  if (mode == "rnn_relu") return cpu::kRNNRelu;
  TORCH_CHECK(false, "fusedrnn: unknown mode '", mode, "'; expected lstm, gru, rnn_tanh or rnn_relu");
}

// Validates the forward arguments and returns the sizes. x: [N, I]; batch_sizes: int64 [T] (CPU); hx: [D, B, P];
// cx: [D, B, H] (LSTM); weights: D groups of (w_ih [G*H, I], w_hh [G*H, P], [b_ih [G*H], b_hh [G*H]], [w_hr [P, H]]).
// Every tensor must have x's dtype and device (batch_sizes excepted).
inline Layout check_inputs(const std::string& mode, const at::Tensor& x, const at::Tensor& batch_sizes,
                           const at::Tensor& hx, const std::optional<at::Tensor>& cx, at::TensorList weights,
                           bool has_biases, int64_t num_directions) {
  Layout L;
  L.mode = parse_mode(mode);
  L.G = L.mode == cpu::kLSTM ? 4 : L.mode == cpu::kGRU ? 3 : 1;
  TORCH_CHECK(num_directions == 1 || num_directions == 2, "fusedrnn: num_directions should be 1 or 2, got ",
              num_directions);
  L.D = num_directions;
  L.bias = has_biases;
  TORCH_CHECK(x.dim() == 2, "fusedrnn: x should be [N, I], got ", x.sizes());
  TORCH_CHECK(batch_sizes.dim() == 1 && batch_sizes.scalar_type() == at::kLong && batch_sizes.device().is_cpu(),
              "fusedrnn: batch_sizes should be a 1-D int64 CPU tensor");
  TORCH_CHECK(hx.dim() == 3 && hx.size(0) == L.D, "fusedrnn: hx should be [D, B, P] with D = ", L.D, ", got ",
              hx.sizes());
  L.N = x.size(0);
  L.I = x.size(1);
  L.B = hx.size(1);
  L.P = hx.size(2);
  const int64_t n_w = static_cast<int64_t>(weights.size());
  const int64_t base = 2 + (has_biases ? 2 : 0);
  TORCH_CHECK(n_w == L.D * base || (L.mode == cpu::kLSTM && n_w == L.D * (base + 1)),
              "fusedrnn: expected ", L.D * base, " weights", L.mode == cpu::kLSTM ? " (+1 per direction with proj)" : "",
              ", got ", n_w);
  L.group = n_w / L.D;
  L.proj = L.group == base + 1;
  TORCH_CHECK(weights[0].dim() == 2 && weights[0].size(0) % L.G == 0, "fusedrnn: w_ih should be [G*H, I]");
  L.H = weights[0].size(0) / L.G;
  TORCH_CHECK(L.proj || L.P == L.H, "fusedrnn: hx should be [D, B, H] without projection");
  L.R = L.mode == cpu::kLSTM ? 5 * L.H : L.mode == cpu::kGRU ? 4 * L.H : 0;
  for (int64_t d = 0; d < L.D; ++d) {
    auto expect = [&](int64_t i, at::IntArrayRef shape, const char* name) {
      const at::Tensor& w = weights[d * L.group + i];
      TORCH_CHECK(w.sizes() == shape, "fusedrnn: ", name, " of direction ", d, " should be ", shape, ", got ",
                  w.sizes());
      TORCH_CHECK(w.scalar_type() == x.scalar_type() && w.device() == x.device(), "fusedrnn: ", name,
                  " should have x's dtype and device");
    };
    expect(0, {L.G * L.H, L.I}, "w_ih");
    expect(1, {L.G * L.H, L.P}, "w_hh");
    if (has_biases) {
      expect(2, {L.G * L.H}, "b_ih");
      expect(3, {L.G * L.H}, "b_hh");
    }
    if (L.proj) expect(L.group - 1, {L.P, L.H}, "w_hr");
  }
  TORCH_CHECK(hx.scalar_type() == x.scalar_type() && hx.device() == x.device(),
              "fusedrnn: hx should have x's dtype and device");
  if (L.mode == cpu::kLSTM) {
    TORCH_CHECK(cx.has_value() && cx->sizes() == at::IntArrayRef({L.D, L.B, L.H}), "fusedrnn: cx should be [",
                L.D, ", ", L.B, ", ", L.H, "] for an LSTM");
    TORCH_CHECK(cx->scalar_type() == x.scalar_type() && cx->device() == x.device(),
                "fusedrnn: cx should have x's dtype and device");
  }
  const at::Tensor bs = batch_sizes.contiguous();
  L.T = bs.numel();
  L.bs.assign(bs.data_ptr<int64_t>(), bs.data_ptr<int64_t>() + L.T);
  L.offs.resize(L.T);
  int64_t total = 0;
  for (int64_t t = 0; t < L.T; ++t) {
    TORCH_CHECK(L.bs[t] > 0 && L.bs[t] <= (t ? L.bs[t - 1] : L.B) && (t || L.bs[0] == L.B),
                "fusedrnn: batch_sizes should be non-increasing, positive, with batch_sizes[0] == B = ", L.B);
    L.offs[t] = total;
    total += L.bs[t];
  }
  TORCH_CHECK(total == L.N, "fusedrnn: sum(batch_sizes) = ", total, " but x has ", L.N, " rows");
  return L;
}

}  // namespace fusedrnn
