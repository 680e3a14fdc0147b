// Raw-pointer interface between the layer driver (csrc/cpu/layer*.cpp, baseline flags, ATen tensors) and the
// vectorised kernels (csrc/cpu/kernels_impl.h, compiled once per CPU capability). Nothing here touches at::Tensor,
// so the AVX2 translation unit pulls in as little shared inline code as possible.
//
// Dimension letters: b rows alive at this step (b <= B), H hidden size, P size of h (proj or H), G gates,
// R reserve row width (LSTM 5H, GRU 4H), K inner dimension of a product, NR rows of a weight slice.
// Columns [k0, k1) are hidden units, always all gates of them (gate g of unit k is column g*H + k).
#pragma once
#include <algorithm>
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

// [0, n) cut into the fewest parts of at most max_part, as even as possible (16 by 12: 8 + 8, not 12 + 4); calls
// f(start, size) for each part in order.
template <typename F>
inline void even_parts(int64_t n, int64_t max_part, const F& f) {
  if (n <= 0) return;
  const int64_t parts = (n + max_part - 1) / max_part, base = n / parts, extra = n % parts;
  for (int64_t i = 0, start = 0; i < parts; ++i) {
    const int64_t size = base + (i < extra ? 1 : 0);
    f(start, size);
    start += size;
  }
}

// Rows from which the packed products take the widest panels (KernelTable::panel_vecs_for).
constexpr int64_t kWidePanelRows = 6;

template <typename T>
struct KernelTable {
  // Gate passes over rows [j0, j1) and hidden units [k0, k1), indexed by Mode.
  void (*fwd[kNumModes])(const FwdArgs<T>&, int64_t j0, int64_t j1, int64_t k0, int64_t k1);
  void (*bwd[kNumModes])(const BwdArgs<T>&, int64_t j0, int64_t j1, int64_t k0, int64_t k1);
  // out[j, r] (+)= sum_k h_j[k] W[r, k] for j < b, r < NR (b taken in register blocks of 8).  W: [NR, K] row stride ldw; out row stride ldo.
  void (*matvec)(const T* W, int64_t ldw, int64_t NR, int64_t K, const RowSrc<T>& h, int64_t b, T* out,
                 int64_t ldo, bool accumulate);
  // The same with 8 weight rows a block at batch 1 (16 in matvec with AVX-512 float): see short_matvec_blocks().
  void (*matvec_short)(const T* W, int64_t ldw, int64_t NR, int64_t K, const RowSrc<T>& h, int64_t b, T* out,
                       int64_t ldo, bool accumulate);
  // out[j, c] (+)= sum_r g[j, r] W[r, c] for j < b, c in [c0, c1), r < R (b in blocks of 8).  W: [R, *]; g: [b, R].
  void (*vecmat)(const T* W, int64_t ldw, int64_t R, int64_t c0, int64_t c1, const T* g, int64_t ldg, int64_t b,
                 T* out, int64_t ldo, bool accumulate);
  // Packed weight panels: a panel holds up to panel_vecs vectors of vec columns each (3 with AVX-512's 32
  // registers for float, else 2), stored [K, width] k-major, width = its columns rounded up to whole vectors:
  // element (k, c) at k*width + c. panels() says how a run of columns is cut into panels.
  int64_t vec, panel_vecs;
  // out[j, c] (+)= sum_k h_j[k] Wp[k, c] for j < b, c < n (n <= panel_vecs * vec) from one packed panel of width
  // panel_width(n, vec); rows of h are taken in register blocks (up to 12 rows of 2 vectors or 8 of 3 with
  // AVX-512's 32 registers, 6 of 2 with 16), split evenly, so each weight vector loaded feeds up to 12 FMAs.
  void (*panel_gemm)(const T* Wp, int64_t K, int64_t n, const RowSrc<T>& h, int64_t b, T* out, int64_t ldo,
                     bool accumulate);
  // An LSTM step over rows [0, b) for one vector of hidden units [k, k + n), n <= vec: the recurrent product from
  // a gate-interleaved panel Wp [K, 4 * vec] (element (kk, g * vec + c) = W_hh[g * H + k + c, kk], zero past n;
  // see pack_lstm_group in layer.cpp), its sums kept in L1 for the cell that follows, which gives bitwise what
  // panel_gemm into a.pre followed by fwd[kLSTM] gives.
  void (*lstm_panel_fwd)(const T* Wp, int64_t K, const RowSrc<T>& h, int64_t b, const FwdArgs<T>& a, int64_t k,
                         int64_t n);
  // Rows of lstm_panel_fwd's register blocks (6 with AVX-512's 32 registers, 2 with 16).
  int64_t fused_rows;
  // One packed panel from n <= panel_vecs * vec rows of W (row stride ldw): dst[k * width + c] = W[c * ldw + k]
  // for c < n, 0 for n <= c < width = panel_width(n, vec), k < K. A transpose: vector blocks where the build has
  // them.
  void (*pack_panel)(const T* W, int64_t ldw, int64_t n, int64_t K, T* dst);
  // The sum of p[0, n), read reps times over (the cache read-bandwidth probe, cache_read_bandwidth in layer.cpp):
  // eight vector accumulators, so the loads, not the adds, set the pace.
  T (*read_sum)(const T* p, int64_t n, int64_t reps);
  // Cuts n columns into panels of at most vecs (<= panel_vecs) vectors by even_parts (16 vectors by 3:
  // 3 3 3 3 2 2, not 3 3 3 3 3 1, whose last panel would keep too few accumulators busy), and calls f(c, w) for
  // each: columns [c, c + w). c is a multiple of vec, so panels packed one after another for K rows start at c * K.
  template <typename F>
  void panels(int64_t n, int64_t vecs, const F& f) const {
    even_parts((n + vec - 1) / vec, vecs,
               [&](int64_t v0, int64_t nv) { f(v0 * vec, std::min(nv * vec, n - v0 * vec)); });
  }
  // Vectors a panel holds for products of up to `rows` batch rows at a time: panel_vecs from kWidePanelRows rows,
  // else at most 2 (see kernels_products.h, kPanelVecs).
  int64_t panel_vecs_for(int64_t rows) const {
    return rows >= kWidePanelRows ? panel_vecs : std::min<int64_t>(2, panel_vecs);
  }
};

// Columns a packed panel of n columns takes in memory (whole vectors).
inline int64_t panel_width(int64_t n, int64_t vec) { return (n + vec - 1) / vec * vec; }

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

// The bfloat16 recurrent product on AMX (kernels_amx.cpp). Elements are bfloat16 bit patterns (uint16_t).
namespace AMX {
// Whether the CPU has AMX-BF16 and this process may use the tile state (asked of the kernel once); false where the
// AMX build is not compiled.
bool available();
// Tile configuration of the calling thread: before its first gemm(), and tile_release() when it is done.
void tile_config();
void tile_release();
// Elements pack() writes for n columns and Kp (a multiple of 32) k.
int64_t packed_elems(int64_t n, int64_t Kp);
// w [n, K] (row stride ldw) packed for gemm(), zero past n columns and K k.
void pack(const uint16_t* w, int64_t ldw, int64_t n, int64_t K, int64_t Kp, uint16_t* dst);
// out[j, c] (+)= sum_k (a[j, k] + a[j, lo + k]) w[c, k] for j < rows, c < n: each row of a (row stride lda) holds
// a high and a low part of Kp each, at 0 and at lo; rows are read in blocks of 16, so 16 - rows % 16 rows past the
// last must be readable; wp from pack(); float32 sums.
void gemm(const uint16_t* a, int64_t lda, int64_t lo, int64_t rows, const uint16_t* wp, int64_t n, int64_t Kp,
          float* out, int64_t ldo, bool accumulate);
// out[m, c] = sum_k x[m, k] w[c, k] for m < M, c < n (the input projection): x bfloat16 [M, K] (row stride ldx), wp
// from pack() with Kp = K rounded up to 32; float32 out (row stride ldo). On the calling thread, which has called
// tile_config().
void mm(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, const uint16_t* wp, int64_t n, int64_t Kp, float* out,
        int64_t ldo);
}  // namespace AMX

}  // namespace fusedrnn::cpu
