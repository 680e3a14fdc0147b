// Raw-pointer interface between the layer driver (csrc/cpu/layer*.cpp, baseline flags, ATen tensors) and the
// vectorised kernels (csrc/cpu/kernels_impl.h, compiled once per CPU capability). Nothing here touches at::Tensor,
// so the AVX2 translation unit pulls in as little shared inline code as possible.
//
// Dimension letters: b rows alive at this step (b <= B), H hidden size, P size of h (proj or H), G gates,
// R reserve row width (LSTM 5H, GRU 4H), K inner dimension of a product, NR rows of a weight slice.
// Columns [k0, k1) are hidden units, always all gates of them (gate g of unit k is column g*H + k).
#pragma once
#include <cstdint>

namespace fusedrnn::cpu {

enum Mode : int { kLSTM = 0, kGRU = 1, kRNNTanh = 2, kRNNRelu = 3, kNumModes = 4 };

// Row j of a matrix that is stitched from two sources: rows j < na come from a (row stride lda), the others from b.
// Used for h_prev / c_prev, which are the previous step's rows of y / reserve for sequences that are still running,
// and hx / cx for sequences that start at this step (reverse direction, variable lengths).
template <typename T>
struct RowSrc {
  const T* a = nullptr;
  int64_t lda = 0;
  int64_t na = 0;
  const T* b = nullptr;
  int64_t ldb = 0;
  const T* row(int64_t j) const { return j < na ? a + j * lda : b + j * ldb; }
};

// One step's forward gate pass. Every pointer is the start of row 0 of this step; ld* are row strides.
template <typename T>
struct FwdArgs {
  int64_t H = 0;
  T* pre = nullptr; int64_t ld_pre = 0;        // [b, G*H] pre-activations without biases (GRU: input side)
  const T* bias = nullptr;                     // [G*H] biases added to pre (LSTM/RNN b_ih + b_hh; GRU b_ih +
                                               // (b_hr, b_hz, 0)), or nullptr
  const T* hg = nullptr; int64_t ld_hg = 0;    // GRU [b, 3H]: h_prev W_hh^T (no bias)
  const T* b_hn = nullptr;                     // GRU [H] or nullptr (no biases)
  RowSrc<T> hprev;                             // GRU: h_prev rows [b, H]
  T* c = nullptr; int64_t ld_c = 0;            // LSTM [b, H]: c_prev in, c out (in place)
  T* out = nullptr; int64_t ld_out = 0;        // [b, H] new h (LSTM with projection: unprojected h)
  T* out2 = nullptr; int64_t ld_out2 = 0;      // optional second copy of out (the h state), or nullptr
  T* res = nullptr; int64_t ld_res = 0;        // [b, R] reserve rows, nullptr when not training
};

// One step's backward gate pass.
template <typename T>
struct BwdArgs {
  int64_t H = 0;
  const T* dh = nullptr; int64_t ld_dh = 0;    // [b, H] gradient w.r.t. h (LSTM with projection: unprojected h)
  const T* dh2 = nullptr; int64_t ld_dh2 = 0;  // optional addend to dh (grad_y rows), or nullptr
  const T* res = nullptr; int64_t ld_res = 0;  // [b, R] reserve rows of this step
  RowSrc<T> prev;                              // LSTM: c_prev rows; GRU: h_prev rows
  const T* y = nullptr; int64_t ld_y = 0;      // RNN [b, H]: h of this step (activation derivative)
  T* dc = nullptr; int64_t ld_dc = 0;          // LSTM [b, H]: dc in, dc_prev out (in place)
  T* dg = nullptr; int64_t ld_dg = 0;          // [b, G*H] gradient w.r.t. pre-activations (GRU: input side)
  T* dgh = nullptr; int64_t ld_dgh = 0;        // GRU [b, H]: gradient w.r.t. h_prev W_hn^T + b_hn (r * dn; the
                                               // r and z parts equal dg's)
  T* dhp = nullptr; int64_t ld_dhp = 0;        // GRU [b, H]: receives z * dh (may alias dh)
};

template <typename T>
struct KernelTable {
  // Gate passes over rows [j0, j1) and hidden units [k0, k1), indexed by Mode.
  void (*fwd[kNumModes])(const FwdArgs<T>&, int64_t j0, int64_t j1, int64_t k0, int64_t k1);
  void (*bwd[kNumModes])(const BwdArgs<T>&, int64_t j0, int64_t j1, int64_t k0, int64_t k1);
  // out[j, r] (+)= sum_k h_j[k] W[r, k] for j < b, r < NR (b taken in register blocks of 8).  W: [NR, K] row stride ldw; out row stride ldo.
  void (*matvec)(const T* W, int64_t ldw, int64_t NR, int64_t K, const RowSrc<T>& h, int64_t b, T* out,
                 int64_t ldo, bool accumulate);
  // out[j, c] (+)= sum_r g[j, r] W[r, c] for j < b, c in [c0, c1), r < R (b in blocks of 8).  W: [R, *]; g: [b, R].
  void (*vecmat)(const T* W, int64_t ldw, int64_t R, int64_t c0, int64_t c1, const T* g, int64_t ldg, int64_t b,
                 T* out, int64_t ldo, bool accumulate);
  // Columns of one packed weight panel (two vectors). A panel is [K, panel] k-major: element (k, c) at k*panel + c.
  int64_t panel;
  // out[j, c] (+)= sum_k h_j[k] Wp[k, c] for j < b, c < n (n <= panel) from one packed panel; rows of h are taken
  // in register blocks of up to kPanelRows (6 with 16 vector registers, 12 with AVX-512's 32: 2 accumulators a
  // row), split evenly, so each weight vector loaded feeds up to 12 (24) FMAs.
  void (*panel_gemm)(const T* Wp, int64_t K, int64_t n, const RowSrc<T>& h, int64_t b, T* out, int64_t ldo,
                     bool accumulate);
  // One packed panel from n <= panel rows of W (row stride ldw): dst[k * panel + c] = W[c * ldw + k] for c < n,
  // 0 for n <= c < panel, k < K. A transpose: vector blocks where the build has them.
  void (*pack_panel)(const T* W, int64_t ldw, int64_t n, int64_t K, T* dst);
};

// Batch rows a matrix-vector micro-kernel holds in registers.
constexpr int64_t kSmallBatch = 8;

namespace DEFAULT {
const KernelTable<float>* kernels_float();
const KernelTable<double>* kernels_double();
}  // namespace DEFAULT
namespace AVX2 {
// nullptr where the AVX2 build is not compiled (non-x86 hosts).
const KernelTable<float>* kernels_float();
const KernelTable<double>* kernels_double();
}  // namespace AVX2
namespace AVX512 {
// nullptr where the AVX-512 build is not compiled (non-x86 hosts).
const KernelTable<float>* kernels_float();
const KernelTable<double>* kernels_double();
}  // namespace AVX512

}  // namespace fusedrnn::cpu
