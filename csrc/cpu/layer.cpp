// One RNN layer over the whole sequence on the CPU: the forward and the public entry points (the shared
// pieces and the overview: layer_loops.h; the backward: layer_backward.cpp).

#include "block_cache.h"
#include "layer_loops.h"

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <mutex>

namespace fusedrnn::cpu {
namespace {

using namespace loops;

// ---- forward ----------------------------------------------------------------------------------------------------

// Per-direction scratch of the forward loops: hg GRU [B, G*H] (h_prev W_hh^T), hf proj [B, H] (unprojected h).
template <typename T>
struct FwdScratch {
  Tensor hg_t, hf_t;
  T* hg = nullptr;
  T* hf = nullptr;
  explicit FwdScratch(const Layout& L) {
    const auto dtype = c10::CppTypeToScalarType<T>::value;
    if (L.mode == kGRU) hg = (hg_t = alloc_cached({L.B, L.G * L.H}, at::TensorOptions(dtype))).template data_ptr<T>();
    if (L.proj) hf = (hf_t = alloc_cached({L.B, L.H}, at::TensorOptions(dtype))).template data_ptr<T>();
  }
};

// Gate-pass arguments of step t. pre: this step's rows of XG (row stride ldxg); h: [B, P] h state (hy); c: [B, H]
// c state (cy); new h goes to y and h, or to hf when projected (the projection then writes y and h).
template <typename T>
FwdArgs<T> fwd_args(const Dir<T>& dir, int64_t t, T* pre, int64_t ldxg, const T* hg, const RowSrc<T>& hprev, T* c,
                    T* h, T* hf) {
  const Layout& L = *dir.L;
  FwdArgs<T> a;
  a.H = L.H;
  a.pre = pre; a.ld_pre = ldxg;
  a.hg = hg; a.ld_hg = dir.GH();
  a.b_hn = dir.b_hn;
  a.bias = dir.bias;
  a.hprev = hprev;
  a.c = c; a.ld_c = L.H;
  a.out = L.proj ? hf : dir.y_row(t); a.ld_out = L.proj ? L.H : dir.ldy;
  a.out2 = L.proj ? nullptr : h; a.ld_out2 = L.P;
  a.res = dir.res_row(t); a.ld_res = L.R;
  return a;
}

// MKL's GEMM of bfloat16 / float16 operands with float32 products, sums and output (cblas_gemm_bf16bf16f32,
// cblas_gemm_f16f16f32: row-major layout 101, no transpose 111, transpose 112), as torch's MKL exports it.
// FUSEDRNN_CPU_HALF_GEMM=0 takes the float32 copies instead (tests run both).
using half_gemm_fn = void (*)(int, int, int, int, int, int, float, const void*, int, const void*, int, float, float*,
                              int);

half_gemm_fn half_gemm(at::ScalarType t) {
  if (const char* e = std::getenv("FUSEDRNN_CPU_HALF_GEMM"); e && std::strcmp(e, "0") == 0) return nullptr;
  static void* const bf16 = dlsym(RTLD_DEFAULT, "cblas_gemm_bf16bf16f32");
  static void* const f16 = dlsym(RTLD_DEFAULT, "cblas_gemm_f16f16f32");
  return reinterpret_cast<half_gemm_fn>(t == at::kBFloat16 ? bf16 : t == at::kHalf ? f16 : nullptr);
}

// Loop positions [s0, s1). xg: the input projections (+ biases) of this direction, [rows, G*H]; h: [B, P] and
// c: [B, H] states, in: hx / cx (first chunk) or the previous chunk's, out: hy / cy.
template <typename T>
void forward_large(const Dir<T>& dir, const KernelTable<T>& K, const RowBuf<T>& xg, int64_t s0, int64_t s1, T* h,
                   T* c, const FwdScratch<T>& scratch) {
  const Layout& L = *dir.L;
  const int64_t H = L.H, P = L.P, GH = dir.GH();
  T* hg = scratch.hg;
  T* hf = scratch.hf;
  TORCH_INTERNAL_ASSERT(dir.j0 == 0 && dir.nrows == L.B, "the GEMM loop runs the whole batch");
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t t = dir.step(s), b = dir.rows(t);
    T* pre = xg.row(dir.row0(t));
    if (L.mode == kGRU) gemm<T>(false, true, b, GH, P, h, P, dir.w_hh, P, T(0), hg, GH);
    else gemm<T>(false, true, b, GH, P, h, P, dir.w_hh, P, T(1), pre, xg.ld);
    const FwdArgs<T> a = fwd_args(dir, t, pre, xg.ld, hg, RowSrc<T>{h, P, L.B, nullptr, 0}, c, h, hf);
    for_rows(b, GH, [&](int64_t j0, int64_t j1) { K.fwd[L.mode](a, j0, j1, 0, H); });
    if (L.proj) {
      gemm<T>(false, true, b, P, H, hf, H, dir.w_hr, H, T(0), h, P);
      for (int64_t j = 0; j < b; ++j) std::memcpy(dir.y_row(t) + j * dir.ldy, h + j * P, P * sizeof(T));
    }
  }
}

// Gate g of W_hh for one thread's slice of hidden units [k0, k1), repacked k-major for KernelTable::panel_gemm:
// columns g*H + k0 + [0, k1 - k0) cut by KernelTable::panels, the panel of columns g*H + k0 + [c, c + w) at
// dst + (g*gw + c)*K (gw: the columns a gate's panels take in every slice).
template <typename T>
void pack_slice_gate(const KernelTable<T>& Kt, const T* W, int64_t H, int64_t g, int64_t K, int64_t k0, int64_t k1,
                     int64_t gw, int64_t vecs, T* dst) {
  Kt.panels(k1 - k0, vecs, [&](int64_t c, int64_t w) {
    Kt.pack_panel(W + (g * H + k0 + c) * K, K, w, K, dst + (g * gw + c) * K);
  });
}

// The gate-interleaved panel of hidden units [k, k + n), n <= vec (Packed::fused): dst[kk * 4vec + g * vec + c] =
// W[g*H + k + c, kk] for kk < K, zero for c >= n. tmp: K * vec elements.
template <typename T>
void pack_lstm_group(const KernelTable<T>& Kt, const T* W, int64_t H, int64_t K, int64_t k, int64_t n, T* tmp, T* dst) {
  const int64_t V = Kt.vec;
  for (int64_t g = 0; g < 4; ++g) {
    Kt.pack_panel(W + (g * H + k) * K, K, n, K, tmp);
    for (int64_t kk = 0; kk < K; ++kk) std::memcpy(dst + kk * 4 * V + g * V, tmp + kk * V, V * sizeof(T));
  }
}

template <typename T>
Packed<T> pack_forward(const Dir<T>& dir, const KernelTable<T>& K, int64_t S, int64_t rows) {
  const Layout& L = *dir.L;
  Packed<T> pk;
  pk.S = S;
  if (!pack_weights(L, true)) return pk;
  pk.vecs = K.panel_vecs_for(rows);
  pk.gw = panel_width(slice_chunk(L.H, pk.S), K.vec);
  pk.pstride = L.G * pk.gw * L.P;
  if (L.proj) pk.prstride = panel_width(slice_chunk(L.P, pk.S), K.vec) * L.H;
  pk.buf = alloc_cached({pk.S * (pk.pstride + pk.prstride)}, at::TensorOptions(c10::CppTypeToScalarType<T>::value));
  pk.p = pk.buf.template data_ptr<T>();
  pk.pr = L.proj ? pk.p + pk.S * pk.pstride : nullptr;
  // (slice, gate) pairs over the threads, then the projection's slices: with one slice (a split batch) the gates
  // are still packed in parallel. With a slice a thread, thread s packs slice s (the pairs are cut in equal
  // contiguous ranges). Fused LSTM panels: (slice, group of units) pairs likewise.
  pk.fused = fused_lstm(L, S, rows, K.fused_rows);
  if (pk.fused) {
    const int64_t groups = pk.gw / K.vec;
    at::parallel_for(0, pk.S * groups, 1, [&](int64_t i0, int64_t i1) {
      std::vector<T> tmp(L.P * K.vec);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t sl = i / groups, u = i % groups;
        const auto [k0, k1] = slice_range(L.H, sl, pk.S);
        const int64_t k = k0 + u * K.vec;
        if (k < k1)
          pack_lstm_group(K, dir.w_hh, L.H, L.P, k, std::min(K.vec, k1 - k), tmp.data(),
                          pk.p + sl * pk.pstride + u * 4 * K.vec * L.P);
      }
    });
  }
  const int64_t n_hh = pk.fused ? 0 : pk.S * L.G;
  at::parallel_for(0, n_hh + (L.proj ? pk.S : 0), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (i >= n_hh) {
        const int64_t sl = i - n_hh;
        const auto [p0, p1] = slice_range(L.P, sl, pk.S);
        pack_slice_gate(K, dir.w_hr, L.P, 0, L.H, p0, p1, 0, pk.vecs, pk.pr + sl * pk.prstride);
        continue;
      }
      const int64_t sl = i / L.G, g = i % L.G;
      const auto [k0, k1] = slice_range(L.H, sl, pk.S);
      pack_slice_gate(K, dir.w_hh, L.H, g, L.P, k0, k1, pk.gw, pk.vecs, pk.p + sl * pk.pstride);
    }
  });
  return pk;
}

// The recurrent product of a bfloat16 layer on AMX, in the persistent loop (kernels_amx.cpp): W_hh as it is
// (bfloat16, exact) times h_prev split into two bfloat16 parts, hi = round(h) and lo = round(h - hi) (h to 16 bits,
// against the 8 of the bfloat16 h torch.nn's layer carries); each B tile of W multiplies both parts, float32 sums
// into the float32 pre-activations. Gates, states and outputs stay float32.
// hb: two buffers of the split h state (step s reads hb[s % 2] and its slices write hb[(s + 1) % 2], so no thread
// overwrites what another still reads), B + 16 rows of [hi (Kp), lo (Kp)] each (gemm() reads rows in blocks of 16;
// with a split batch the rows past a block's own may be another block's, read while that thread writes them: each
// row of a product depends on its own row of hb alone, and those rows' products are discarded).
// Used by LSTM and GRU from kAmxBatch rows, and from kAmxBatchLarge where W_hh is large (H P >= 512 * 512: its float32
// panels no longer fit the threads' L2), where it measured faster than the float32 panels. 2 threads, forward,
// torch.nn's time / ours, three processes each, panels -> AMX: LSTM T100 B16 H512 0.44-0.56 -> 0.72-0.89, B16 H256
// 0.50-0.57 -> 0.49-0.61, B16 H128 0.76-0.94 -> 0.83-1.03, B8 H512 0.65-0.80 -> 0.82-0.97, B8 H256 0.56-0.61 ->
// 0.57-0.69, B4 H512 0.93-1.00 -> 0.92-1.03; GRU B16 H256 1.53-2.13 -> 1.83-2.24, B8 H512 1.26-1.60 -> 1.27-1.55;
// forward+backward LSTM B16 H512 0.81-0.93 -> 0.88-0.97. A plain RNN (one gate: a small product and a short gate pass a
// step) from kAmxBatchRNN: B64 H256 1.64-1.70 -> 1.82-1.87, B32 H256 1.82-2.26 -> 2.10-2.46, but B16 H512 1.28-1.55 ->
// 1.23-1.42, B16 H128 4.17-5.34 -> 3.84-4.15. Earlier, with the kernel that streamed a duplicated [W, W], from batch
// 32: LSTM B32 H256 1.18, B64 H256 1.25, B32 H512 1.27, B64 H512 1.41, T500 B32 H128 1.09 (time panels / AMX); batch 1
// stays on the panels (0.44 then; a tile takes 16 rows however few are alive).
// FUSEDRNN_CPU_AMX=0 turns it off, =1 on at any batch (tests run both).
constexpr int64_t kAmxBatch = 16, kAmxBatchLarge = 8, kAmxBatchRNN = 32;

struct AmxRec {
  Tensor wp_t, hb_t;
  const uint16_t* wp = nullptr;  // slice sl, gate g: wp + (sl * G + g) * gstride
  int64_t gstride = 0, Kp = 0, P = 0;  // Kp: P rounded up to a tile's 32 k; an hb row is 2 * Kp
  uint16_t* hb[2] = {nullptr, nullptr};
  const uint16_t* w(int64_t sl, int64_t g, int64_t G) const { return wp + (sl * G + g) * gstride; }
  // Rows [j0, j0 + rows) of hb[which], columns [c0, c1) of h, from h rows (row stride ld).
  void split(const float* h, int64_t ld, int64_t j0, int64_t rows, int64_t c0, int64_t c1, int which) const {
    for (int64_t j = 0; j < rows; ++j) {
      uint16_t* o = hb[which] + (j0 + j) * 2 * Kp;
      const float* r = h + j * ld;
      for (int64_t c = c0; c < c1; ++c) {
        const c10::BFloat16 hi(r[c]);
        const c10::BFloat16 lo(r[c] - static_cast<float>(hi));
        o[c] = hi.x;
        o[Kp + c] = lo.x;
      }
    }
  }
};

// Whether the AMX kernels may run: the CPU has AMX-BF16 and the tile state, and the capability is AVX-512 (AMX's
// CPUs have it, and the kernels' epilogues use it: a lowered capability, ATEN_CPU_CAPABILITY or
// fusedrnn.cpu.set_capability, turns AMX off as well). FUSEDRNN_CPU_AMX=0 turns it off, =1 on at any size (tests run
// both); unset, each product has its own rule (use_amx, kAmxRows).
int amx_setting() {
  if (current() != kCapAVX512 || !AMX::available()) return 0;
  if (const char* e = std::getenv("FUSEDRNN_CPU_AMX")) {
    if (std::strcmp(e, "0") == 0) return 0;
    if (std::strcmp(e, "1") == 0) return 2;
  }
  return 1;
}

bool use_amx(const Layout& L, bool small) {
  if (!small || L.T == 0) return false;
  const int s = amx_setting();
  const int64_t from = L.G == 1 ? kAmxBatchRNN : L.H * L.P >= 512 * 512 ? kAmxBatchLarge : kAmxBatch;
  return s == 2 || (s == 1 && L.B >= from);
}

// w_hh: the layer's bfloat16 W_hh of this direction [G*H, P]; S thread slices of hidden units as forward_small's.
AmxRec make_amx(const Layout& L, const Tensor& w_hh, const float* hx, int64_t S) {
  AmxRec a;
  a.P = L.P;
  a.Kp = (L.P + 31) / 32 * 32;
  a.gstride = AMX::packed_elems(slice_chunk(L.H, S), a.Kp);
  const auto opts = w_hh.options();
  a.wp_t = at::empty({S * L.G * a.gstride}, opts);
  a.wp = reinterpret_cast<const uint16_t*>(a.wp_t.data_ptr());
  const Tensor w = w_hh.contiguous();  // [G*H, P]
  const auto* src = reinterpret_cast<const uint16_t*>(w.data_ptr());
  auto* dst = reinterpret_cast<uint16_t*>(a.wp_t.data_ptr());
  at::parallel_for(0, S * L.G, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t sl = i / L.G, g = i % L.G;
      const auto [k0, k1] = slice_range(L.H, sl, S);
      AMX::pack(src + (g * L.H + k0) * L.P, L.P, k1 - k0, L.P, a.Kp, dst + i * a.gstride);
    }
  });
  a.hb_t = at::zeros({2, L.B + 16, 2 * a.Kp}, opts);
  for (int w = 0; w < 2; ++w) {
    a.hb[w] = reinterpret_cast<uint16_t*>(a.hb_t[w].data_ptr());
    a.split(hx, L.P, 0, L.B, 0, L.P, w);  // the initial state; rows that start later keep it
  }
  return a;
}

// amx: the bfloat16 layer's AMX product (AmxRec), or nullptr.
template <typename T>
void forward_small(const Dir<T>& dir, const KernelTable<T>& K, const Packed<T>& pk, const RowBuf<T>& xg, int64_t s0,
                   int64_t s1, T* h, T* c, const FwdScratch<T>& scratch, const AmxRec* amx) {
  const Layout& L = *dir.L;
  const int64_t H = L.H, P = L.P, GH = dir.GH(), S = pk.S;
  // States and scratch of this loop's rows (all, or one thread's block).
  h += dir.j0 * P;
  if (c) c += dir.j0 * H;
  T* hg = scratch.hg ? scratch.hg + dir.j0 * GH : nullptr;
  T* hf = scratch.hf ? scratch.hf + dir.j0 * H : nullptr;
  T* rec_out = L.mode == kGRU ? hg : nullptr;  // GRU: h_prev W_hh^T apart; else accumulated into the XG rows
  const auto mv = short_matvec_blocks() ? K.matvec_short : K.matvec;
  SpinBarrier barrier(S);
  at::parallel_for(0, S, 1, [&](int64_t sl0, int64_t sl1) {
    if (amx) AMX::tile_config();
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t t = dir.step(s), b = dir.rows(t);
      if (b == 0) continue;  // a block whose sequences have ended (or, reversed, not yet begun): every slice skips
      const int cur = static_cast<int>(s % 2), next = 1 - cur;
      T* pre = xg.row(dir.row0(t));
      const RowSrc<T> hp = dir.h_prev(t);
      T* out = rec_out ? rec_out : pre;
      const int64_t ldo = rec_out ? GH : xg.ld;
      for (int64_t sl = sl0; sl < sl1; ++sl) {
        const auto [k0, k1] = slice_range(H, sl, S);
        if (pk.fused) {  // the product with the gates, a vector of units at a time
          const FwdArgs<T> a = fwd_args(dir, t, pre, xg.ld, hg, hp, c, h, hf);
          const T* wp = pk.p + sl * pk.pstride;
          for (int64_t k = k0; k < k1; k += K.vec)
            K.lstm_panel_fwd(wp + (k - k0) * 4 * P, P, hp, b, a, k, std::min(K.vec, k1 - k));
          continue;
        }
        for (int64_t g = 0; g < L.G; ++g) {
          if constexpr (std::is_same_v<T, float>) {
            if (amx) {
              AMX::gemm(amx->hb[cur] + dir.j0 * 2 * amx->Kp, 2 * amx->Kp, amx->Kp, b, amx->w(sl, g, L.G), k1 - k0,
                        amx->Kp, out + g * H + k0, ldo, !rec_out);
              continue;
            }
          }
          if (!pk.p) {
            mv(dir.w_hh + (g * H + k0) * P, P, k1 - k0, P, hp, b, out + g * H + k0, ldo, !rec_out);
            continue;
          }
          const T* wp = pk.p + sl * pk.pstride + g * pk.gw * P;
          K.panels(k1 - k0, pk.vecs, [&](int64_t c, int64_t w) {
            K.panel_gemm(wp + c * P, P, w, hp, b, out + g * H + k0 + c, ldo, !rec_out);
          });
        }
        const FwdArgs<T> a = fwd_args(dir, t, pre, xg.ld, hg, hp, c, h, hf);
        K.fwd[L.mode](a, 0, b, k0, k1);
        if constexpr (std::is_same_v<T, float>) {
          if (amx && !L.proj) amx->split(dir.y_row(t), dir.ldy, dir.j0, b, k0, k1, next);
        }
      }
      barrier.wait(sl1 - sl0);
      if (!L.proj) continue;
      for (int64_t sl = sl0; sl < sl1; ++sl) {
        const auto [p0, p1] = slice_range(P, sl, S);
        const RowSrc<T> hfs{hf, H, b, nullptr, 0};
        if (pk.pr) {
          K.panels(p1 - p0, pk.vecs, [&](int64_t c, int64_t w) {
            K.panel_gemm(pk.pr + sl * pk.prstride + c * H, H, w, hfs, b, dir.y_row(t) + p0 + c, dir.ldy, false);
          });
        } else {
          mv(dir.w_hr + p0 * H, H, p1 - p0, H, hfs, b, dir.y_row(t) + p0, dir.ldy, false);
        }
        for (int64_t j = 0; j < b; ++j)
          std::memcpy(h + j * P + p0, dir.y_row(t) + j * dir.ldy + p0, (p1 - p0) * sizeof(T));
        if constexpr (std::is_same_v<T, float>) {
          if (amx) amx->split(dir.y_row(t), dir.ldy, dir.j0, b, p0, p1, next);
        }
      }
      barrier.wait(sl1 - sl0);
    }
    if (amx) AMX::tile_release();
  });
}

// Per-direction input-side biases, added in the gate pass: LSTM/RNN b_ih + b_hh; GRU b_ih + (b_hr, b_hz, 0) (b_hn
// stays apart because r multiplies it). Returns [D*G*H]. (Added there, not by the input GEMM: addmm's bias is a
// broadcast copy over the whole [rows, G*H] output before the GEMM, a pass of memory traffic per call.)
template <typename T>
Tensor input_bias(const Layout& L, const std::vector<Tensor>& ws) {
  // One buffer filled by plain loops, not clone / add_ / cat: with hy and cy copied by memcpy, pointers for hx[d]
  // and the reserve's rows, and no narrow of a whole tensor, the op for an RNNCell step at B1 H64 went 15.6 -> 10.3
  // us (2 threads; the profiler's nested ATen ops a call from 24 to 6, the allocations).
  const int64_t GH = L.G * L.H, n_hh = L.mode == kGRU ? 2 * L.H : GH;
  Tensor out = at::empty({L.D * GH}, L.b_ih(ws, 0).options());
  T* o = out.data_ptr<T>();
  for (int64_t d = 0; d < L.D; ++d, o += GH) {
    const T* bi = L.b_ih(ws, d).data_ptr<T>();
    const T* bh = L.b_hh(ws, d).data_ptr<T>();
    for (int64_t i = 0; i < n_hh; ++i) o[i] = bi[i] + bh[i];
    for (int64_t i = n_hh; i < GH; ++i) o[i] = bi[i];
  }
  return out;
}

// The bfloat16 input projection on AMX (AMX::mm, kernels_amx.cpp): W_ih packed into tiles, then tasks of 256
// columns by 256 rows, a column block's tasks consecutive so a thread keeps its part of the packed W in L2. Sums
// in float32 like the mixed GEMM's (the order differs). Used from kAmxRows rows. MKL's cblas_gemm_bf16bf16f32 ran
// at 200-250 GFLOP/s on one thread here (340-1270 on two), AMX::mm at 290-660 on one (oneDNN's bfloat16 matmul,
// whose output is bfloat16, at about 1400). Modules, bfloat16 forward, torch.nn time / ours with MKL's -> with
// this (three processes each, alternating): LSTM T100 B64 H512 0.65-0.70 -> 0.79-0.81, B32 H256 0.72-0.73 ->
// 0.85-0.92, B16 H256 0.49-0.61 -> 0.59-0.64, T500 B32 H128 0.83-0.85 -> 0.94-0.99, GRU B64 H256 1.63-2.25 ->
// 2.10-2.44; forward+backward LSTM B16 0.62-0.67 -> 0.69-0.73.
constexpr int64_t kAmxRows = 128;

void amx_projection(const Tensor& out, const Tensor& x, const Tensor& w_ih) {
  const int64_t m = x.size(0), n = w_ih.size(0), k = x.size(1), Kp = (k + 31) / 32 * 32, ldo = out.stride(0);
  const int64_t nb = (n + 15) / 16;
  Tensor wp_t = at::empty({AMX::packed_elems(n, Kp)}, w_ih.options());
  auto* wp = reinterpret_cast<uint16_t*>(wp_t.data_ptr());
  const auto* w = reinterpret_cast<const uint16_t*>(w_ih.data_ptr());
  at::parallel_for(0, nb, 16, [&](int64_t b0, int64_t b1) {
    AMX::pack(w + b0 * 16 * k, k, std::min(n, b1 * 16) - b0 * 16, k, Kp, wp + b0 * 16 * Kp);
  });
  const auto* xs = reinterpret_cast<const uint16_t*>(x.data_ptr());
  float* o = out.data_ptr<float>();
  constexpr int64_t kCols = 256, kRows = 256;
  const int64_t nc = (n + kCols - 1) / kCols, nm = (m + kRows - 1) / kRows;
  at::parallel_for(0, nc * nm, 1, [&](int64_t i0, int64_t i1) {
    AMX::tile_config();
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t c0 = i / nm * kCols, m0 = i % nm * kRows;
      AMX::mm(xs + m0 * k, k, std::min(kRows, m - m0), k, wp + c0 * Kp, std::min(kCols, n - c0), Kp,
              o + m0 * ldo + c0, ldo);
    }
    AMX::tile_release();
  });
}

// out = x W_ih^T: the input projections of one direction for the rows of x (biases: FwdArgs::bias). A half-precision
// layer passes its bfloat16 / float16 x and W_ih as they are and a float32 out: the mixed GEMM computes what the
// float32 GEMM of their float32 copies does (every product of two half-precision numbers is exact in float32), on
// AMX where the CPU has it (bfloat16: amx_projection; else MKL's); without the mixed GEMM, the copies. Same dtype
// (float32, float64): dense_mm, oneDNN or BLAS.
// Up to kSmallProjRows rows of input projections (a cell's step, a short sequence at a small batch): the
// matrix-vector kernel of the recurrence (KernelTable::matvec, 8 rows of x a pass over W_ih) on W_ih as it is, its
// rows split over the threads, instead of a GEMM call, whose fixed cost (oneDNN's memory descriptors and primitive
// lookup) is most of so small a product. Modules, forward, AMD EPYC Zen 5, 2 threads, time with / without
// (FUSEDRNN_CPU_SMALL_PROJ=64 or more / 0, alternated call by call, median of 40 rounds): LSTMCell H256 B1 0.70, B2 0.64, B4 0.64, B8 0.72,
// B16 0.86, B32 0.96, B64 1.08; H512 B1 0.80, B8 0.75; GRUCell B1 0.67, B8 0.72; RNNCell B1 0.64; LSTM H256 B1 T2
// 0.66, T8 0.80, T16 0.86, T32 0.94, T64 0.94, T100 1.26; GRU T100 B1 1.07. Up to kSmallProjMaxRows rows too
// while the product is under kSmallProjFlops, where the GEMM call's fixed cost is still most of it (cells in
// loops of 30 steps, forward, time with / without, alternating call by call, median of 14 rounds, by the
// projection's flops): RNNCell B64 H64 (0.5 M) 0.77, B32 H128 (1.0 M) 0.64, B64 H128 (2.1 M) 0.72; GRUCell B32 H128
// (3.1 M) 0.97; LSTMCell B32 H128 (4.2 M) 0.91; above it within the spread (LSTMCell B48 H128, 6.3 M, 1.01; B64
// H128 1.06; B32 H256, 17 M, 1.00; GRUCell B64 H128 0.95; RNNCell B64 H256, 8.4 M, 0.91). FUSEDRNN_CPU_SMALL_PROJ=rows
// overrides both (rows up to that many, any flops; 0: the GEMM always).
constexpr int64_t kSmallProjRows = 16, kSmallProjMaxRows = 64;
constexpr double kSmallProjFlops = 5e6;

// Whether the input projection of m rows (x [m, k], W_ih [n, k]) runs on the matrix-vector kernel.
inline bool small_proj(int64_t m, int64_t n, int64_t k) {
  if (const char* e = std::getenv("FUSEDRNN_CPU_SMALL_PROJ")) return m <= std::atol(e);
  return m <= kSmallProjRows || (m <= kSmallProjMaxRows && 2.0 * m * n * k <= kSmallProjFlops);
}

template <typename T>
void small_projection(Tensor& out, const Tensor& x_, const Tensor& w_) {
  const KernelTable<T>& K = table<T>();
  const Tensor x = x_.contiguous(), w = w_.contiguous();
  const int64_t m = x.size(0), n = w.size(0), k = x.size(1), ldo = out.stride(0);
  const RowSrc<T> rows{x.data_ptr<T>(), k, m, nullptr, 0};
  T* o = out.data_ptr<T>();
  const T* W = w.data_ptr<T>();
  const auto mv = short_matvec_blocks() ? K.matvec_short : K.matvec;
  // At most 8 rows of x: a thread's share is at least kOneSliceWeights of W_ih, as the recurrence's slices (a
  // smaller product runs on the calling thread, without a fork and join).
  const int64_t grain = std::max<int64_t>(64, m <= kSmallBatch ? kOneSliceWeights / k : 0);
  at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
    mv(W + r0 * k, k, r1 - r0, k, rows, m, o + r0, ldo, false);
  });
}

void input_projection(Tensor out, const Tensor& x, const Tensor& w_ih) {
  if (x.scalar_type() == out.scalar_type()) {
    const bool small =
        x.size(0) > 0 && x.size(1) > 0 && out.stride(1) == 1 && small_proj(x.size(0), w_ih.size(0), x.size(1));
    if (small && x.scalar_type() == at::kFloat) return small_projection<float>(out, x, w_ih);
    if (small && x.scalar_type() == at::kDouble) return small_projection<double>(out, x, w_ih);
    return dense_mm(out, x, w_ih.t());
  }
  const int64_t m = x.size(0), n = w_ih.size(0), k = x.size(1);
  const bool dense = k > 0 && x.is_contiguous() && w_ih.is_contiguous() && out.stride(1) == 1;
  if (dense && x.scalar_type() == at::kBFloat16 && m > 0 && n > 0) {
    const int s = amx_setting();
    if (s == 2 || (s == 1 && m >= kAmxRows)) return amx_projection(out, x, w_ih);
  }
  const half_gemm_fn fn = half_gemm(x.scalar_type());
  if (fn && dense && std::max({m, n, k, out.stride(0)}) < (int64_t(1) << 31)) {
    if (m > 0 && n > 0)
      fn(101, 111, 112, m, n, k, 1.f, x.data_ptr(), k, w_ih.data_ptr(), k, 0.f, out.data_ptr<float>(), out.stride(0));
    return;
  }
  at::mm_out(out, x.to(out.scalar_type()), w_ih.to(out.scalar_type()).t());
}

// Copies rows [r, r + n) of a window of y (row stride ldy, columns [c, c + P)) from where they sit with the window
// starting at row from_lo to where they sit with it starting at row to_lo, in the order that never overwrites a
// row before it is copied.
template <typename T>
void shift_rows(T* win, int64_t ldy, int64_t c, int64_t P, int64_t r, int64_t n, int64_t from_lo, int64_t to_lo) {
  if (from_lo == to_lo) return;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = from_lo < to_lo ? r + i : r + n - 1 - i;  // window moving up: rows shift down, first first
    std::memmove(win + (row - to_lo) * ldy + c, win + (row - from_lo) * ldy + c, P * sizeof(T));
  }
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_typed(const Layout& L, const Tensor& x_, const Tensor& hx_,
                                                        const std::optional<Tensor>& cx_, at::TensorList weights,
                                                        bool train, at::TensorList bf16_w_hh = {}) {
  // bf16_w_hh: a bfloat16 layer's W_hh per direction, as they are (for the AMX product, AmxRec), or empty.
  // A half-precision x (T float): y and the reserve are returned in x's dtype, each time chunk's rows computed in
  // float32 windows of them (the chunk's rows and the step before them, for h_prev) and then cast, so the forward
  // never holds float32 copies of the whole (the values are those of whole copies cast once).
  const KernelTable<T>& K = table<T>();
  const bool half = half_precision(x_.scalar_type());
  const auto ws = contiguous_all(weights);
  const Tensor x = x_.contiguous(), hx = hx_.contiguous();
  const Tensor cx = L.mode == kLSTM ? cx_->contiguous() : Tensor();
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<T>::value);  // x may be half precision (see above)
  const int64_t GH = L.G * L.H;
  const auto out_opts = half ? x.options() : opts;
  Tensor reserve = train ? alloc_cached({L.D, L.N, L.R}, out_opts) : at::empty({0}, out_opts);
  const Tensor bias = L.bias ? input_bias<T>(L, ws) : Tensor();
  // The input projections. Training LSTM / GRU: for the whole sequence straight into the first G*H columns of each
  // direction's reserve rows, where the gate pass overwrites them in place with the activated gates (the reserve
  // row holds the gates at the same columns): no buffer of their own. Else chunk by chunk into one chunk-sized
  // buffer, just before the loop reaches them.
  const bool in_reserve = train && L.R >= GH;
  if (in_reserve && !half)
    for (int64_t d = 0; d < L.D; ++d) input_projection(reserve[d].narrow(1, 0, GH), x, L.w_ih(ws, d));
  std::vector<Tensor> b_hn;
  if (L.mode == kGRU && L.bias)
    for (int64_t d = 0; d < L.D; ++d) b_hn.push_back(L.b_hh(ws, d));  // (make_dir points at its n part)

  // half: y is allocated at its first chunk's cast, after a one-chunk inference call has let go of its projection
  // buffer (else the buffer, the float32 window and y would all be held at once; GRU T100 B16 H256 bfloat16
  // inference peak 8.7 -> 7.9 MiB, as when y was cast whole at the end).
  Tensor y = half ? Tensor() : alloc_cached({L.N, L.D * L.P}, out_opts);
  std::once_flag y_once;  // directions on their own threads: the first to get there allocates y
  auto y_out = [&]() -> Tensor& {
    std::call_once(y_once, [&] { y = alloc_cached({L.N, L.D * L.P}, out_opts); });
    return y;
  };
  Tensor no_y, no_res;  // half: Dir's y and res are the windows
  if (half) no_y = at::empty({0}, opts), no_res = at::empty({0}, opts);
  // (hx and cx are contiguous: copied by memcpy, not clone's dispatch of empty_like and copy_)
  auto copy_of = [](const Tensor& t) {
    Tensor r = at::empty(t.sizes(), t.options());
    if (t.numel()) std::memcpy(r.data_ptr(), t.data_ptr(), t.numel() * t.element_size());
    return r;
  };
  Tensor hy = copy_of(hx);
  Tensor cy = L.mode == kLSTM ? copy_of(cx) : at::empty({0}, opts);
  const bool small = small_batch(L, true) && !forward_steps_on_gemm(L, half);
  const bool parallel_dirs = directions_in_parallel(L, small, sizeof(T));
  const std::vector<int64_t> blocks =
      parallel_dirs ? std::vector<int64_t>{0, L.B} : batch_blocks(L, small, sizeof(T));
  const int64_t nblk = static_cast<int64_t>(blocks.size()) - 1;
  auto run_direction = [&](int64_t d) {
    const Dir<T> dir = half ? make_dir<T>(L, d, ws, b_hn, bias, hx, cx, no_y, no_res)
                            : make_dir<T>(L, d, ws, b_hn, bias, hx, cx, y, reserve);
    T* c = L.mode == kLSTM ? cy.data_ptr<T>() + d * L.B * L.H : nullptr;
    T* h = hy.data_ptr<T>() + d * L.B * L.P;
    const FwdScratch<T> scratch(L);
    // Split batch: every block's thread multiplies by all of W_hh (one slice); else each thread its own slice.
    const int64_t S = nblk > 1 ? 1 : small_slices(L);
    const bool with_amx = small && !bf16_w_hh.empty() && use_amx(L, small);
    AmxRec amx;
    if constexpr (std::is_same_v<T, float>) {
      if (with_amx) amx = make_amx(L, bf16_w_hh[d], dir.hx, S);
    }
    const AmxRec* am = with_amx ? &amx : nullptr;
    Packed<T> pk;
    if (small && !with_amx) pk = pack_forward(dir, K, S, max_block_rows(blocks));
    pk.S = S;
    auto loop = [&](const Dir<T>& dr, const RowBuf<T>& buf, int64_t s0, int64_t s1) {
      if (!small) return forward_large(dr, K, buf, s0, s1, h, c, scratch);
      if (nblk == 1) return forward_small(dr, K, pk, buf, s0, s1, h, c, scratch, am);
      in_threads(nblk, [&](int64_t i) {
        forward_small(dr.block(blocks[i], blocks[i + 1] - blocks[i]), K, pk, buf, s0, s1, h, c, scratch, am);
      });
    };
    if (in_reserve && !half) return loop(dir, RowBuf<T>{reserve.data_ptr<T>() + d * L.N * L.R, L.R, 0}, 0, L.T);
    // Training chunks as the backward's (the input projections, or a half-precision layer's windows of the
    // reserve, are the large workspace); inference chunks of about kInferChunkBytes of input projections.
    const std::vector<Chunk> chunks =
        time_chunks(L, dir.reverse, train ? train_chunk_rows(L) : chunk_rows(GH * sizeof(T)));
    int64_t max_rows = 0;
    for (const Chunk& ch : chunks) max_rows = std::max(max_rows, ch.r1 - ch.r0);
    Tensor xg = in_reserve ? Tensor() : alloc_cached({max_rows, GH}, opts);
    // half: float32 windows (window_rows) of y (all D*P columns, this direction's written) and of this
    // direction's reserve.
    const int64_t wrows = std::min(L.N, max_rows + 2 * L.B);
    Tensor y_win = half ? alloc_cached({wrows, L.D * L.P}, opts) : Tensor();
    Tensor res_win = half && train && L.R ? alloc_cached({wrows, L.R}, opts) : Tensor();
    int64_t prev_lo = 0;
    for (size_t i = 0; i < chunks.size(); ++i) {
      const Chunk& ch = chunks[i];
      const int64_t rows = ch.r1 - ch.r0;
      Dir<T> dw = dir;
      int64_t lo = 0;
      if (half) {
        lo = window_rows(L, ch).first;
        dw.y = y_win.data_ptr<T>();
        if (res_win.defined()) dw.res = res_win.data_ptr<T>();
        dw.base = lo;
        // h_prev of the chunk's first step: the previous chunk's last step, moved to its place in this window.
        const int64_t p = i > 0 ? dir.prev_step(dir.step(ch.s0)) : -1;
        if (p >= 0) shift_rows(dw.y, dw.ldy, d * L.P, L.P, L.offs[p], L.bs[p], prev_lo, lo);
        prev_lo = lo;
      }
      RowBuf<T> buf;
      if (in_reserve) {  // half training: the projections go into the window's reserve rows, as above
        Tensor part = res_win.narrow(0, ch.r0 - lo, rows);
        input_projection(part.narrow(1, 0, GH), x.narrow(0, ch.r0, rows), L.w_ih(ws, d));
        buf = RowBuf<T>{part.data_ptr<T>(), L.R, ch.r0};
      } else {
        // (one chunk, as a cell's step: the tensors themselves, not narrow's dispatch)
        Tensor part = rows == xg.size(0) ? xg : xg.narrow(0, 0, rows);
        input_projection(part, ch.r0 == 0 && rows == L.N ? x : x.narrow(0, ch.r0, rows), L.w_ih(ws, d));
        buf = RowBuf<T>{part.data_ptr<T>(), GH, ch.r0};
      }
      loop(dw, buf, ch.s0, ch.s1);
      if (half) {
        const auto cols = [&](const Tensor& t, int64_t r) { return t.narrow(0, r, rows).narrow(1, d * L.P, L.P); };
        if (i + 1 == chunks.size()) xg = Tensor();  // the last chunk's projections are spent
        cols(y_out(), ch.r0).copy_(cols(y_win, ch.r0 - lo));
        if (res_win.defined()) reserve[d].narrow(0, ch.r0, rows).copy_(res_win.narrow(0, ch.r0 - lo, rows));
      }
    }
  };
  if (parallel_dirs) {
    in_threads(L.D, run_direction);
  } else {
    for (int64_t d = 0; d < L.D; ++d) run_direction(d);
  }
  if (!y.defined()) y_out();  // half with no chunks (T == 0): still an output
  return {y, hy, cy, reserve};
}

}  // namespace

bool capability_available(Capability c) { return c <= cpu_best(); }

std::string gemm_library() { return onednn_matmul() ? "onednn" : "blas"; }

int64_t loop_thread_count() { return loops::loop_threads(); }

int64_t empty_block_cache() { return static_cast<int64_t>(BlockCache::instance().clear()); }

std::pair<int64_t, int64_t> block_cache_idle() {
  const auto [bytes, blocks] = BlockCache::instance().idle();
  return {static_cast<int64_t>(bytes), static_cast<int64_t>(blocks)};
}

int64_t block_cache_limit() { return static_cast<int64_t>(cache_limit()); }

std::pair<int64_t, int64_t> block_cache_bounds() {
  return {static_cast<int64_t>(kCacheMinBytes), static_cast<int64_t>(kCacheBlocks)};
}

double cache_read_bandwidth(int64_t bytes_per_thread) {
  const int64_t threads = loops::loop_threads();
  // whole cache lines (aligned_alloc takes a multiple of the alignment)
  const int64_t n = std::max<int64_t>(16, bytes_per_thread / 64 * 16);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(float));
  const int64_t reps = std::max<int64_t>(1, (int64_t(64) << 20) / bytes);
  const KernelTable<float>& K = loops::table<float>();
  std::vector<double> rate(threads, 0.0);
  std::atomic<float> sink{0.f};
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      // Cache-line aligned (as the packed weights are: a vector load that straddles two lines halved the rate),
      // first touched here, by the thread that reads it.
      std::unique_ptr<float, decltype(&std::free)> buf(
          static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(bytes))), &std::free);
      TORCH_CHECK(buf, "fusedrnn: read_bandwidth could not allocate ", bytes, " bytes");
      float* p = buf.get();
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(i % 7);
      float s = K.read_sum(p, n, 1);  // warm: the buffer where it will stay
      for (int trial = 0; trial < 5; ++trial) {
        const auto start = std::chrono::steady_clock::now();
        s += K.read_sum(p, n, reps);
        const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (sec > 0) rate[t] = std::max(rate[t], static_cast<double>(bytes) * reps / sec);
      }
      sink.store(s, std::memory_order_relaxed);  // (the sums are kept, so the reads are)
    }
  });
  double total = 0.0;
  for (double r : rate) total += r;
  return total;
}

void force_capability(int which) {
  TORCH_CHECK(which < 0 || capability_available(static_cast<Capability>(which)),
              "fusedrnn: that kernel build is not compiled in or this CPU cannot run it");
  g_forced.store(which);
}

std::string active_capability() {
  const Capability c = current();
  return c == kCapAVX512 ? "AVX512" : c == kCapAVX2 ? "AVX2" : "DEFAULT";
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rnn_forward(const std::string& mode, const Tensor& x,
                                                      const Tensor& batch_sizes, const Tensor& hx,
                                                      const std::optional<Tensor>& cx, at::TensorList weights,
                                                      bool has_biases, int64_t num_directions, bool train) {
  const Layout L = check_inputs(mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions);
  check_dtype(x);
  if (half_precision(x.scalar_type())) {
    // x and W_ih stay as they are for the input projections' mixed GEMM (input_projection).
    std::vector<Tensor> ws = to_float(weights), bf16_w_hh;
    for (int64_t d = 0; d < L.D; ++d) {
      ws[d * L.group] = weights[d * L.group];
      if (x.scalar_type() == at::kBFloat16) bf16_w_hh.push_back(weights[d * L.group + 1].contiguous());
    }
    auto [y, hy, cy, reserve] = forward_typed<float>(L, x, to_float(hx), to_float(cx), ws, train, bf16_w_hh);
    const at::ScalarType t = x.scalar_type();  // y and the reserve have it already (forward_typed's windows)
    return {y, hy.to(t), cy.to(t), reserve};
  }
  if (x.scalar_type() == at::kDouble) return forward_typed<double>(L, x, hx, cx, weights, train);
  return forward_typed<float>(L, x, hx, cx, weights, train);
}

}  // namespace fusedrnn::cpu
