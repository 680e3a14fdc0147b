// One RNN layer over the whole sequence on the CPU: the backward (overview: layer_loops.h).

#include "block_cache.h"
#include "layer_loops.h"

namespace fusedrnn::cpu {
namespace {

using namespace loops;

// ---- backward ---------------------------------------------------------------------------------------------------

// Buffers of one direction's backward loop. Chunk-sized, row r at (r - r0): dg [rows, ldg] the gate gradients,
// input side in columns [0, G*H); GRU: ldg = 4H and dgh = dg + 3H, the recurrent side's n part r * dn (its r and z
// parts equal the input side's, so they are not stored twice); dht proj [rows, P] total gradient w.r.t. h per
// step. State: dhf proj [B, H]; dh [B, P] and dc [B, H] running state gradients (in: grad_hy / grad_cy, out:
// grad_hx / grad_cx). gy: rows of grad_y [N, D*P] (in place at its row stride, one row at stride 0, or a
// contiguous copy of the chunk's). no_dh0: the loop's first step (position 0) skips its recurrent product, whose
// result would be grad_hx (hx needs no gradient).
template <typename T>
struct BwdBufs {
  T* dg;
  T* dgh;
  int64_t ldg;
  T* dht;
  int64_t r0;
  T* dhf;
  T* dh;
  T* dc;
  RowBuf<const T> gy;
  bool no_dh0 = false;
  // Row 0 of step t in dg.
  T* row(const Dir<T>& dir, int64_t t) const { return dg + (dir.row0(t) - r0) * ldg; }
  // The same buffers with the states moved to the rows of a block of the batch.
  BwdBufs block(const Dir<T>& dir) const {
    const Layout& L = *dir.L;
    BwdBufs r = *this;
    r.dh = dh + dir.j0 * L.P;
    if (dc) r.dc = dc + dir.j0 * L.H;
    if (dhf) r.dhf = dhf + dir.j0 * L.H;
    return r;
  }
};

// dht rows of step t = dh state + grad_y rows, for hidden columns [p0, p1) (projection only).
template <typename T>
void total_dh(const Dir<T>& dir, const BwdBufs<T>& bb, int64_t t, int64_t p0, int64_t p1) {
  const Layout& L = *dir.L;
  T* out = bb.dht + (dir.row0(t) - bb.r0) * L.P;
  const T* gy = bb.gy.row(dir.row0(t)) + dir.d * L.P;
  for (int64_t j = 0; j < dir.rows(t); ++j)
    for (int64_t p = p0; p < p1; ++p) out[j * L.P + p] = bb.dh[j * L.P + p] + gy[j * bb.gy.ld + p];
}

template <typename T>
BwdArgs<T> bwd_args(const Dir<T>& dir, const BwdBufs<T>& bb, int64_t t) {
  const Layout& L = *dir.L;
  const int64_t o = dir.row0(t);
  BwdArgs<T> a;
  a.H = L.H;
  if (L.proj) {
    a.dh = bb.dhf; a.ld_dh = L.H;
  } else {
    a.dh = bb.dh; a.ld_dh = L.P;
    a.dh2 = bb.gy.row(o) + dir.d * L.P; a.ld_dh2 = bb.gy.ld;
  }
  a.res = dir.res_row(t); a.ld_res = L.R;
  if (L.mode == kLSTM) a.prev = dir.c_prev(t);
  if (L.mode == kGRU) a.prev = dir.h_prev(t);
  a.y = dir.y_row(t); a.ld_y = dir.ldy;
  a.dc = bb.dc; a.ld_dc = L.H;
  a.dg = bb.dg + (o - bb.r0) * bb.ldg; a.ld_dg = bb.ldg;
  a.dgh = bb.dgh ? bb.dgh + (o - bb.r0) * bb.ldg : nullptr; a.ld_dgh = bb.ldg;
  a.dhp = bb.dh; a.ld_dhp = L.P;
  return a;
}

// The recurrent product dh (+)= (recurrent-side gate gradients) W_hh in parts over W_hh's rows: LSTM and RNN all G*H
// rows from dg's G*H columns; GRU rows [0, 2H) from dg's r and z columns, rows [2H, 3H) from its r * dn columns
// (dgh). col: the first column of dg, wrow: the first row of W_hh, R: rows.
struct RecPart {
  int64_t col, wrow, R;
};

inline std::vector<RecPart> rec_parts(const Layout& L) {
  if (L.mode != kGRU) return {{0, 0, L.G * L.H}};
  return {{0, 0, 2 * L.H}, {3 * L.H, 2 * L.H, L.H}};
}

// Loop positions s1-1 down to s0.
template <typename T>
void backward_large(const Dir<T>& dir, const KernelTable<T>& K, const BwdBufs<T>& bb, int64_t s0, int64_t s1) {
  const Layout& L = *dir.L;
  const int64_t H = L.H, P = L.P, GH = dir.GH();
  const std::vector<RecPart> parts = rec_parts(L);
  TORCH_INTERNAL_ASSERT(dir.j0 == 0 && dir.nrows == L.B, "the GEMM loop runs the whole batch");
  for (int64_t s = s1 - 1; s >= s0; --s) {
    const int64_t t = dir.step(s), b = dir.rows(t);
    if (L.proj) {
      total_dh(dir, bb, t, 0, P);
      gemm<T>(false, false, b, H, P, bb.dht + (dir.row0(t) - bb.r0) * P, P, dir.w_hr, H, T(0), bb.dhf, H);
    }
    const BwdArgs<T> a = bwd_args(dir, bb, t);
    for_rows(b, GH, [&](int64_t j0, int64_t j1) { K.bwd[L.mode](a, j0, j1, 0, H); });
    if (s == 0 && bb.no_dh0) break;
    // GRU: dh already holds z * dh from the gate pass
    for (const RecPart& q : parts)
      gemm<T>(false, false, b, P, q.R, bb.row(dir, t) + q.col, bb.ldg, dir.w_hh + q.wrow * P, P,
              T(L.mode == kGRU || q.col > 0 ? 1 : 0), bb.dh, P);
  }
}

// Columns [p0, p1) of W_hh [GH, P] in strips cut by KernelTable::panels, the strip of columns p0 + [c, c + w)
// contiguous at dst + c * R ([R, panel_width(w)], zero past w), for KernelTable::panel_gemm with the gate gradients
// as the rows (dh = dG W_hh).
template <typename T>
void pack_columns(const KernelTable<T>& Kt, const T* W, int64_t R, int64_t ldw, int64_t p0, int64_t p1,
                  int64_t vecs, T* dst) {
  Kt.panels(p1 - p0, vecs, [&](int64_t c, int64_t w) {
    const int64_t width = panel_width(w, Kt.vec);
    T* d = dst + c * R;
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t j = 0; j < w; ++j) d[r * width + j] = W[r * ldw + p0 + c + j];
      for (int64_t j = w; j < width; ++j) d[r * width + j] = T(0);
    }
  });
}

// dh = dG W_hh multiplies by per-thread packed strips of W_hh's columns, as the forward does with its rows.
template <typename T>
Packed<T> pack_backward(const Dir<T>& dir, const KernelTable<T>& K, int64_t S, int64_t rows) {
  const Layout& L = *dir.L;
  Packed<T> pk;
  pk.S = S;
  if (!pack_weights(L, false)) return pk;
  pk.vecs = K.panel_vecs_for(rows);
  pk.pstride = panel_width(slice_chunk(L.P, pk.S), K.vec) * dir.GH();
  pk.buf = alloc_cached({pk.S * pk.pstride}, at::TensorOptions(c10::CppTypeToScalarType<T>::value));
  pk.p = pk.buf.template data_ptr<T>();
  at::parallel_for(0, pk.S, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t sl = s0; sl < s1; ++sl) {
      const auto [p0, p1] = slice_range(L.P, sl, pk.S);
      pack_columns(K, dir.w_hh, dir.GH(), L.P, p0, p1, pk.vecs, pk.p + sl * pk.pstride);
    }
  });
  return pk;
}

template <typename T>
void backward_small(const Dir<T>& dir, const KernelTable<T>& K, const Packed<T>& pk, const BwdBufs<T>& all,
                    int64_t s0, int64_t s1) {
  const Layout& L = *dir.L;
  const BwdBufs<T> bb = all.block(dir);
  const int64_t H = L.H, P = L.P, GH = dir.GH(), S = pk.S;
  const std::vector<RecPart> parts = rec_parts(L);
  if (L.proj) total_dh(dir, bb, dir.step(s1 - 1), 0, P);
  SpinBarrier barrier(S);
  at::parallel_for(0, S, 1, [&](int64_t sl0, int64_t sl1) {
    for (int64_t s = s1 - 1; s >= s0; --s) {
      const int64_t t = dir.step(s), b = dir.rows(t);
      // b == 0: a block whose sequences start later (or, reversed, have ended): nothing to do but the next step's
      // total gradient. Every slice sees the same b, so all skip the same barriers.
      if (b > 0) {
        const BwdArgs<T> a = bwd_args(dir, bb, t);
        for (int64_t sl = sl0; sl < sl1; ++sl) {
          const auto [k0, k1] = slice_range(H, sl, S);
          if (L.proj)
            K.vecmat(dir.w_hr, H, P, k0, k1, bb.dht + (dir.row0(t) - bb.r0) * P, P, b, bb.dhf, H, false);
          K.bwd[L.mode](a, 0, b, k0, k1);
        }
        barrier.wait(sl1 - sl0);
      }
      // Without a projection P == H and the slices match, so each thread next reads only the dh it wrote.
      for (int64_t sl = sl0; sl < sl1; ++sl) {
        const auto [p0, p1] = slice_range(P, sl, S);
        for (const RecPart& part : parts) {
          if (b == 0 || (s == 0 && bb.no_dh0)) continue;
          const T* g = bb.row(dir, t) + part.col;
          const bool acc = L.mode == kGRU || part.col > 0;  // GRU: dh already holds z * dh from the gate pass
          if (!pk.p) K.vecmat(dir.w_hh + part.wrow * P, P, part.R, p0, p1, g, bb.ldg, b, bb.dh, P, acc);
          if (pk.p)
            K.panels(p1 - p0, pk.vecs, [&](int64_t c, int64_t w) {
              K.panel_gemm(pk.p + sl * pk.pstride + c * GH + part.wrow * panel_width(w, K.vec), part.R, w,
                           RowSrc<T>{g, bb.ldg, b, nullptr, 0}, b, bb.dh + p0 + c, P, acc);
            });
        }
        if (L.proj && s > s0) total_dh(dir, bb, dir.step(s - 1), p0, p1);
      }
      if (L.proj) barrier.wait(sl1 - sl0);
    }
  });
}

// h_prev of the rows of a chunk as one matrix [rows, P] (the B operand of dW_hh = dG^T H_prev).
template <typename T>
void gather_h_prev(const Dir<T>& dir, const Chunk& ch, T* out) {
  const Layout& L = *dir.L;
  for (int64_t s = ch.s0; s < ch.s1; ++s) {
    const int64_t t = dir.step(s);
    const RowSrc<T> src = dir.h_prev(t);
    for (int64_t j = 0; j < dir.rows(t); ++j)
      std::memcpy(out + (dir.row0(t) + j - ch.r0) * L.P, src.row(j), L.P * sizeof(T));
  }
}

// Whether the backward's GEMMs (weight gradients, grad_x) run on oneDNN's matmul (dense_mm) rather than BLAS: for
// LSTM where onednn_matmul() is on (AMD CPUs with AVX-512, where MKL's sgemm takes its AVX2 path). Forward+backward
// time, oneDNN / BLAS, AMD EPYC Zen 5 (family 26), 2 threads: LSTM T100 B16 H256 0.69, B64 H512 0.73, B1 0.84,
// T500 B32 H128 0.76, B16 H512 P128 0.69; on a Zen 4, whose AVX-512 is two 256-bit halves, 0.92-0.95. RNN stays on
// BLAS (same case there 0.72): oneDNN copies the right operand (a chunk's [rows, P] of x or h_prev) into its
// blocked layout, which put RNN's forward+backward peak memory above torch.nn's (T100 B4 H512 5.36 against
// 4.59 MiB, T10 B16 H256 1.19 against 1.11) while LSTM's stays far below torch.nn's. GRU's gate gradients are
// 4H wide (the n part's two halves), so its dG_r,z,n columns are not a matrix oneDNN reads in place.
// Small chunks stay on BLAS, though: oneDNN's fixed cost a call (about 10 us; its products' K is the chunk's rows,
// 1 to B for a cell's step) outweighs its speed below kBwdDnnlMinFlops of the chunk's three products. LSTMCell
// loops of 30 steps, forward+backward, time BLAS / oneDNN alternating call by call (median of 14 rounds), by the
// chunk's flops: B1 H64 (0.1 M) 0.69, B1 H128 0.70, B1 H256 (1.6 M) 0.95, B16 H64 0.79, B8 H128 (3.1 M) 0.86, B1
// H512 (6.3 M) 0.70, B4 H256 1.07, B16 H128 0.93, B64 H64 0.94; B32 H128 (12.6 M) 0.93, B16 H256 (25 M) 1.14.
// FUSEDRNN_CPU_GEMM_BWD=onednn|blas overrides (benchmarks, tests).
constexpr double kBwdDnnlMinFlops = 8e6;

bool bwd_onednn(const Layout& L, int64_t rows) {
  if (const char* e = std::getenv("FUSEDRNN_CPU_GEMM_BWD")) {
    if (std::strcmp(e, "onednn") == 0) return true;
    if (std::strcmp(e, "blas") == 0) return false;
  }
  const double flops = 2.0 * rows * L.G * L.H * (2 * L.I + L.P);  // dW_ih, grad_x, dW_hh
  return L.mode == kLSTM && onednn_matmul() != nullptr && flops >= kBwdDnnlMinFlops;
}

// Products of the backward with at most kSmallBwdRows rows on one side and at most kSmallBwdFlops (a cell's step at
// a small batch and hidden size, a decoder's one-step call) run on the recurrence's vector-matrix kernel
// (KernelTable::vecmat) instead of a BLAS call, whose fixed cost (MKL's thread fork and dispatch, 3 calls a chunk)
// was most of such a product: grad_x = dG W_ih with few rows of dG, and the weight gradients dW = dG^T X whose sum
// runs over few rows (dG^T copied into a small [G*H, rows] buffer first, so each of dW's rows reads its coefficients
// in a row). The threads split the output (grad_x by columns, dW by rows) where it is large enough to pay for the
// fork. Measured (2-core Xeon, forward+backward, cells in loops of 50 steps, time with / without, alternating call by
// call, median of 15-21 rounds): LSTMCell B1 H64 0.84, GRUCell B1 H64 0.86, RNNCell B1 H64 0.97; at H256 B1 within
// the spread (LSTMCell 0.98, GRUCell 1.00, RNNCell 0.99: writing the fresh [G*H, H] weight gradients, memory-bound
// either way, is most of it); above the flops bound BLAS stays (LSTMCell B16 H128, 2.1 MFLOP, 1.03; B8 H128 1.02,
// B4 H256 1.03, GRUCell B16 H256 1.01). FUSEDRNN_CPU_SMALL_BWD=0 turns it off (tests run both).
constexpr int64_t kSmallBwdRows = 16;
constexpr double kSmallBwdFlops = 1e6;

inline bool small_bwd_enabled() {
  const char* e = std::getenv("FUSEDRNN_CPU_SMALL_BWD");
  return !(e && std::strcmp(e, "0") == 0);
}

// out (+)= a b on vecmat, or false where it does not apply (then BLAS runs). a [M, K], b [K, N], out [M, N], each
// with unit column stride except a, which may be the transpose of a row-major matrix (the weight gradients' dG^T).
template <typename T>
bool small_bwd_mm(Tensor& out, const Tensor& a, const Tensor& b, bool first) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (M == 0 || N == 0 || K == 0 || out.stride(1) != 1 || b.stride(1) != 1) return false;
  const KernelTable<T>& Kt = table<T>();
  T* o = out.data_ptr<T>();
  const int64_t ldo = out.stride(0);
  const T* B = b.data_ptr<T>();
  const int64_t ldb = b.stride(0);
  if (M <= kSmallBwdRows && a.stride(1) == 1) {  // grad_x: few rows of dG, the columns of W_ih split
    const T* A = a.data_ptr<T>();
    const int64_t lda = a.stride(0);
    const int64_t grain = std::max<int64_t>(64, kOneSliceWeights / K);
    at::parallel_for(0, N, grain, [&](int64_t c0, int64_t c1) {
      Kt.vecmat(B, ldb, K, c0, c1, A, lda, M, o, ldo, !first);
    });
    return true;
  }
  if (K <= kSmallBwdRows && a.stride(0) == 1) {  // dW: a sum over few rows; dG^T gathered row by row
    const T* A = a.data_ptr<T>();
    const int64_t lda = a.stride(1);  // a[i, k] = A[k * lda + i]
    std::vector<T> at_(static_cast<size_t>(M * K));
    for (int64_t k = 0; k < K; ++k)
      for (int64_t i = 0; i < M; ++i) at_[i * K + k] = A[k * lda + i];
    const T* G = at_.data();
    const int64_t grain = std::max<int64_t>(12, kOneSliceWeights / N);
    at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
      Kt.vecmat(B, ldb, K, 0, N, G + r0 * K, K, r1 - r0, o + r0 * ldo, ldo, !first);
    });
    return true;
  }
  return false;
}

// out = a b, or out += a b after the first chunk; dnnl: on oneDNN where it reads the operands in place.
void mm_acc(Tensor out, const Tensor& a, const Tensor& b, bool first, bool dnnl) {
  if (dnnl) return dense_mm(out, a, b, first ? 0.f : 1.f);
  if ((a.size(0) <= kSmallBwdRows || a.size(1) <= kSmallBwdRows) &&
      2.0 * a.size(0) * a.size(1) * b.size(1) <= kSmallBwdFlops && small_bwd_enabled() &&
      out.scalar_type() == a.scalar_type() && out.scalar_type() == b.scalar_type()) {
    if (out.scalar_type() == at::kFloat && small_bwd_mm<float>(out, a, b, first)) return;
    if (out.scalar_type() == at::kDouble && small_bwd_mm<double>(out, a, b, first)) return;
  }
  if (first) at::mm_out(out, a, b);
  else out.addmm_(a, b);
}

// t.narrow(dim, start, length), or t itself where that is all of it: a cell's one step (a single chunk) otherwise
// paid a dozen narrow dispatches a call, a few microseconds of its fixed cost.
inline Tensor part_of(const Tensor& t, int64_t dim, int64_t start, int64_t length) {
  return start == 0 && length == t.size(dim) ? t : t.narrow(dim, start, length);
}

// dW_hh (+)= dG^T H_prev over a chunk's rows when every step has the whole batch (B rows): the h_prev of packed
// row r is then y's row r - B (r + B reversed) in this direction's columns, or hx's for the loop's first step, so
// two GEMMs on views of y and hx do it without a gathered copy of H_prev. dg: the chunk's [rows, G*H] gradients.
template <typename T>
void w_hh_grad_uniform(const Dir<T>& dir, const Chunk& ch, const Tensor& dg, const Tensor& y_d, const Tensor& hx_d,
                       Tensor& g_hh, bool first, bool dnnl) {
  const int64_t B = dir.L->B, N = dir.L->N;
  // rows [lo, hi) whose previous step is in y; [h_lo, h_hi) those of the loop's first step (previous: hx)
  const int64_t lo = dir.reverse ? ch.r0 : std::max(ch.r0, B);
  const int64_t hi = dir.reverse ? std::min(ch.r1, N - B) : ch.r1;
  const int64_t h_lo = dir.reverse ? std::max(ch.r0, N - B) : ch.r0;
  const int64_t h_hi = dir.reverse ? ch.r1 : std::min(ch.r1, B);
  if (lo < hi) {
    mm_acc(g_hh, part_of(dg, 0, lo - ch.r0, hi - lo).t(), part_of(y_d, 0, dir.reverse ? lo + B : lo - B, hi - lo), first,
           dnnl);
    first = false;
  }
  if (h_lo < h_hi)
    mm_acc(g_hh, part_of(dg, 0, h_lo - ch.r0, h_hi - h_lo).t(),
           part_of(hx_d, 0, dir.reverse ? h_lo - (N - B) : h_lo, h_hi - h_lo), first, dnnl);
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> backward_typed(
    const Layout& L, const Tensor& grad_y_, const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& x_,
    const Tensor& hx_, const std::optional<Tensor>& cx_, at::TensorList weights, const Tensor& y_,
    const Tensor& reserve_, GradMask need) {
  const KernelTable<T>& K = table<T>();
  const auto ws = contiguous_all(weights);
  // half: a bfloat16 / float16 layer (T float; hx, cx, the weights and the gradients of hy and cy already float32):
  // x, y, the reserve and grad_y stay as they are, and each chunk converts the rows it reads (its own, and the
  // steps next to it for h_prev and c_prev) into float32 windows, so the backward never holds float32 copies of
  // the whole (the values, and so the results, are those of whole copies).
  const bool half = half_precision(x_.scalar_type());
  const Tensor x = x_.contiguous(), hx = hx_.contiguous(), y = y_.contiguous();
  const Tensor& gy = grad_y_;
  Tensor reserve = reserve_.contiguous();
  const Tensor cx = L.mode == kLSTM ? cx_->contiguous() : Tensor();
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<T>::value);
  const int64_t GH = L.G * L.H;
  TORCH_CHECK(reserve.numel() == L.D * L.N * L.R && (L.R == 0 || reserve.dim() == 3),
              "fusedrnn: reserve has the wrong size; was the forward run with train=True?");
  TORCH_CHECK(gy.sizes() == y.sizes(), "fusedrnn: grad_y should have the shape of y");
  // grad_y as it comes while its columns are contiguous, whatever its row stride; an expanded tensor (the gradient
  // of y.sum() has strides (0, 0)) as one contiguous row read with row stride 0; else a contiguous copy of each
  // chunk's rows, never a copy of the whole.
  const bool gy_whole = !half && (gy.size(1) <= 1 || gy.stride(1) == 1);
  const Tensor gy_row =
      !gy_whole && L.N > 0 && gy.stride(0) == 0 ? gy.narrow(0, 0, 1).to(opts.dtype()).contiguous() : Tensor();

  Tensor grad_hx = grad_hy.numel() ? grad_hy.contiguous().clone() : at::zeros_like(hx);
  Tensor grad_cx = L.mode != kLSTM ? at::empty({0}, opts)
                   : grad_cy.numel() ? grad_cy.contiguous().clone() : at::zeros_like(cx);
  // half, one direction: grad_x in x's dtype, each chunk's rows computed in a float32 buffer and cast (two
  // directions sum into grad_x, so it stays float32 until both have).
  const bool gx_chunks = half && L.D == 1 && need.x;
  // grad_x and the weight gradients are allocated at a direction's first GEMMs (after its first time chunk), not
  // beside the loop's workspaces: a cell's one-step backward otherwise peaked with all of them at once.
  Tensor grad_x = !need.x ? at::empty({0}, opts) : L.T ? Tensor() : at::zeros({L.N, L.I}, opts);
  std::vector<Tensor> gw(ws.size());
  for (size_t i = 0; i < ws.size(); ++i)
    gw[i] = !need.weights ? at::empty({0}, opts) : L.T ? Tensor() : at::zeros_like(ws[i]);
  Tensor gx_buf;
  const bool small = small_batch(L, false);
  const bool parallel_dirs = directions_in_parallel(L, small, sizeof(T));
  const std::vector<int64_t> blocks =
      parallel_dirs ? std::vector<int64_t>{0, L.B} : batch_blocks(L, small, sizeof(T));
  const int64_t nblk = static_cast<int64_t>(blocks.size()) - 1;
  // Directions on their own threads cannot both accumulate into grad_x: the reverse one writes its own copy.
  Tensor grad_x_rev;
  // Dir holds non-const pointers; backward never writes y or the reserve. half: set per chunk (the windows).
  Tensor y_mut = half ? at::empty({0}, opts) : y;
  Tensor res_dir = half ? at::empty({0}, opts) : reserve;
  const bool uniform = L.B > 0 && L.T > 0 && L.bs[L.T - 1] == L.B;  // every step has the whole batch
  int64_t chunk_max = 0;  // rows of the largest time chunk (either direction's chunks have about as many)
  for (const Chunk& ch : time_chunks(L, false, train_chunk_rows(L))) chunk_max = std::max(chunk_max, ch.r1 - ch.r0);
  const bool dnnl = std::is_same_v<T, float> && bwd_onednn(L, chunk_max);
  // dW_hh from views of y and hx where every step has the whole batch; else from H_prev gathered per chunk. Also
  // gathered for two directions on oneDNN: a direction's columns of y are not a matrix it reads in place (BLAS
  // would take them; forward+backward time gathered on oneDNN / views on BLAS, EPYC Zen 5: LSTM bidirectional T100
  // B16 H256 0.87, 2 layers 0.90, B64 H512 0.91).
  const bool hprev_views = uniform && !half && !(dnnl && L.D == 2);
  // Without weight gradients the backward never needs H_prev gathered (it is only dW_hh's operand).
  const bool gather_hprev = need.weights && !hprev_views;
  auto run_direction = [&](int64_t d) {
    const Dir<T> dir_all = make_dir<T>(L, d, ws, {}, Tensor(), hx, cx, y_mut, res_dir);
    const std::vector<Chunk> chunks = time_chunks(L, dir_all.reverse, train_chunk_rows(L));
    int64_t max_rows = 0;
    for (const Chunk& ch : chunks) max_rows = std::max(max_rows, ch.r1 - ch.r0);
    const int64_t ldg = L.mode == kGRU ? GH + L.H : GH;
    Tensor dg = alloc_cached({max_rows, ldg}, opts);
    Tensor dht = L.proj ? alloc_cached({max_rows, L.P}, opts) : Tensor();
    Tensor hprev = gather_hprev ? alloc_cached({max_rows, L.P}, opts) : Tensor();
    Tensor dhf = L.proj ? alloc_cached({L.B, L.H}, opts) : Tensor();
    Packed<T> pk = small && L.T
                             ? pack_backward(dir_all, K, nblk > 1 ? 1 : small_slices(L), max_block_rows(blocks))
                             : Packed<T>{};
    Tensor& g_ih = gw[d * L.group + 0];
    Tensor& g_hh = gw[d * L.group + 1];
    for (size_t i = 0; i < chunks.size(); ++i) {  // the last chunk of the loop first
      const Chunk& ch = chunks[chunks.size() - 1 - i];
      const int64_t rows = ch.r1 - ch.r0;
      const bool first = i == 0;
      Dir<T> dir = dir_all;
      Tensor y_win, res_win;  // half: float32 rows [lo, lo + n) of y and of this direction's reserve
      int64_t lo = 0;
      if (half) {
        const auto [w0, w1] = window_rows(L, ch);
        lo = w0;
        const int64_t n = w1 - w0;
        y_win = y.narrow(0, lo, n).to(opts.dtype());
        dir.y = y_win.data_ptr<T>();
        if (L.R) {
          res_win = reserve[d].narrow(0, lo, n).to(opts.dtype());
          dir.res = res_win.data_ptr<T>();
        }
        dir.base = lo;
      }
      BwdBufs<T> bb{dg.data_ptr<T>(), L.mode == kGRU ? dg.data_ptr<T>() + GH : nullptr, ldg,
                    dht.defined() ? dht.data_ptr<T>() : nullptr, ch.r0,
                    dhf.defined() ? dhf.data_ptr<T>() : nullptr, grad_hx[d].data_ptr<T>(),
                    L.mode == kLSTM ? grad_cx[d].data_ptr<T>() : nullptr, RowBuf<const T>{}, !need.state};
      Tensor gy_chunk;
      if (gy_whole) {
        bb.gy = {gy.data_ptr<T>(), gy.stride(0), 0};
      } else if (gy_row.defined()) {
        bb.gy = {gy_row.data_ptr<T>(), 0, 0};
      } else {
        gy_chunk = gy.narrow(0, ch.r0, rows).to(opts.dtype()).contiguous();
        bb.gy = {gy_chunk.data_ptr<T>(), L.D * L.P, ch.r0};
      }
      if (!small) {
        backward_large(dir, K, bb, ch.s0, ch.s1);
      } else if (nblk == 1) {
        backward_small(dir, K, pk, bb, ch.s0, ch.s1);
      } else {
        in_threads(nblk, [&](int64_t i) {
          backward_small(dir.block(blocks[i], blocks[i + 1] - blocks[i]), K, pk, bb, ch.s0, ch.s1);
        });
      }
      if (i + 1 == chunks.size()) {
        // The time loop is done: its workspaces go before the last chunk's weight-gradient GEMMs, where the
        // backward's memory peaks (every gradient allocated): the packed copy of W_hh, and the running state
        // gradients where they are no result (hx needs no gradient; one direction, or the other's are in use).
        pk.buf = Tensor();
        pk.p = nullptr;
        if (!need.state && L.D == 1) grad_hx = grad_cx = Tensor();
      }
      if (first) {  // (d = 0 first where the directions take turns: d = 1 adds to its grad_x)
        if (need.weights)
          for (int64_t k = 0; k < L.group; ++k) gw[d * L.group + k] = alloc_cached(ws[d * L.group + k].sizes(), opts);
        if (need.x && d == 0) grad_x = alloc_cached({L.N, L.I}, gx_chunks ? x.options() : opts);
        if (need.x && d == 1 && parallel_dirs) grad_x_rev = alloc_cached({L.N, L.I}, opts);
      }
      // This chunk's share of the weight gradients and its rows of grad_x, while its workspaces are in cache.
      const Tensor buf = part_of(dg, 0, 0, rows);
      const Tensor dg_c = part_of(buf, 1, 0, GH);
      if (need.weights) {
        mm_acc(g_ih, dg_c.t(), part_of(x, 0, ch.r0, rows).to(opts.dtype()), first, dnnl);
        if (gather_hprev) gather_h_prev(dir, ch, hprev.data_ptr<T>());
        for (const RecPart& part : rec_parts(L)) {  // dW_hh's rows as the recurrent product's parts
          Tensor g_part = part_of(g_hh, 0, part.wrow, part.R);
          const Tensor d_part = part_of(buf, 1, part.col, part.R);
          if (hprev_views)
            w_hh_grad_uniform(dir, ch, d_part, part_of(y, 1, d * L.P, L.P), hx[d], g_part, first, dnnl);
          else
            mm_acc(g_part, d_part.t(), part_of(hprev, 0, 0, rows), first, dnnl);
        }
      }
      if (gx_chunks) {  // (gx_chunks implies need.x)
        if (!gx_buf.defined()) gx_buf = alloc_cached({max_rows, L.I}, opts);
        Tensor gx = gx_buf.narrow(0, 0, rows);
        mm_acc(gx, dg_c, L.w_ih(ws, d), true, dnnl);
        grad_x.narrow(0, ch.r0, rows).copy_(gx);
      } else if (need.x) {
        Tensor gx = part_of(d == 0 || !parallel_dirs ? grad_x : grad_x_rev, 0, ch.r0, rows);
        mm_acc(gx, dg_c, L.w_ih(ws, d), d == 0 || parallel_dirs, dnnl);
      }
      if (L.bias && need.weights) {
        Tensor& g_b = gw[d * L.group + 2];
        if (first) at::sum_out(g_b, dg_c, at::IntArrayRef{0});
        else g_b.add_(dg_c.sum(0));
        if (L.mode == kGRU) {  // b_hh's n part; its r and z parts are b_ih's (copied below)
          Tensor g_bn = gw[d * L.group + 3].narrow(0, 2 * L.H, L.H);
          const Tensor dn = buf.narrow(1, GH, L.H);
          if (first) at::sum_out(g_bn, dn, at::IntArrayRef{0});
          else g_bn.add_(dn.sum(0));
        }
      }
      if (L.proj && need.weights) {
        const Tensor r = half ? res_win.narrow(0, ch.r0 - lo, rows) : reserve[d].narrow(0, ch.r0, rows);
        const Tensor h_full = r.narrow(1, 3 * L.H, L.H) * r.narrow(1, 4 * L.H, L.H).tanh();
        mm_acc(gw[d * L.group + L.group - 1], dht.narrow(0, 0, rows).t(), h_full, first, dnnl);
      }
    }
    // LSTM and RNN: both biases get the same gradient (one pass over dG, not two); GRU: the r and z parts.
    if (L.bias && L.T && need.weights) {
      const int64_t n = L.mode == kGRU ? 2 * L.H : GH;
      gw[d * L.group + 3].narrow(0, 0, n).copy_(gw[d * L.group + 2].narrow(0, 0, n));
    }
  };
  if (parallel_dirs) {
    in_threads(L.D, run_direction);
    if (grad_x_rev.defined()) grad_x.add_(grad_x_rev);
  } else {
    for (int64_t d = 0; d < L.D; ++d) run_direction(d);
  }
  // (a direction without time chunks, as no rows would leave it, allocated nothing: zeros, as at T = 0)
  for (size_t i = 0; i < ws.size(); ++i)
    if (!gw[i].defined()) gw[i] = at::zeros_like(ws[i]);
  if (!grad_x.defined()) grad_x = at::zeros({L.N, L.I}, opts);
  if (!need.state) {
    grad_hx = at::empty({0}, opts);
    grad_cx = at::empty({0}, opts);
  }
  return {grad_x, grad_hx, grad_cx, gw};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> rnn_backward(
    const std::string& mode, const Tensor& grad_y, const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& x,
    const Tensor& batch_sizes, const Tensor& hx, const std::optional<Tensor>& cx, at::TensorList weights,
    bool has_biases, int64_t num_directions, const Tensor& y, const Tensor& reserve, GradMask mask) {
  const Layout L = check_inputs(mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions);
  for (const Tensor* g : {&grad_y, &grad_hy, &grad_cy, &y, &reserve})
    TORCH_CHECK(g->scalar_type() == x.scalar_type() && g->device().is_cpu(),
                "fusedrnn: backward tensors should be CPU tensors of x's dtype");
  check_dtype(x);
  if (half_precision(x.scalar_type())) {
    auto [gx, ghx, gcx, gw] = backward_typed<float>(L, grad_y, to_float(grad_hy), to_float(grad_cy), x,
                                                    to_float(hx), to_float(cx), to_float(weights), y, reserve, mask);
    const at::ScalarType t = x.scalar_type();
    for (Tensor& g : gw) g = g.to(t);
    return {gx.to(t), ghx.to(t), gcx.to(t), gw};
  }
  if (x.scalar_type() == at::kDouble)
    return backward_typed<double>(L, grad_y, grad_hy, grad_cy, x, hx, cx, weights, y, reserve, mask);
  return backward_typed<float>(L, grad_y, grad_hy, grad_cy, x, hx, cx, weights, y, reserve, mask);
}

}  // namespace fusedrnn::cpu
