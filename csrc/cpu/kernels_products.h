// The small-batch products (matrix-vector, vector-matrix, packed panels) and the panel packing of the CPU kernels.
// A part of kernels_impl.h, included by it after the gate passes: it uses that file's helpers (Vec, ld, st, UNROLL)
// and lands in the same fusedrnn::cpu::CPU_CAPABILITY namespace. Not for inclusion anywhere else.
#pragma once
#ifndef CPU_CAPABILITY
#error "kernels_products.h is a part of kernels_impl.h"
#endif

namespace fusedrnn::cpu::CPU_CAPABILITY {
namespace {
// ---- small-batch products ---------------------------------------------------------------------------------------

template <typename T>
inline T hsum(const Vec<T>& v) {
  alignas(64) T tmp[Vec<T>::size()];
  v.store(tmp);
  T s = T(0);
  for (int64_t i = 0; i < Vec<T>::size(); ++i) s += tmp[i];
  return s;
}

// sums[i] = the sum of the lanes of a[i], for i < N (N <= V): float in the AVX-512 and AVX2 builds reduces all N
// vectors at once by a tree of shuffles and adds (N - 1 vector adds and twice that in shuffles, against N stores
// and N * V scalar adds one at a time), else lane by lane. Rows past N are zero.
template <typename T, int N>
inline void hsums(const Vec<T>* a, T* sums) {
  constexpr int V = Vec<T>::size();
  static_assert(N >= 1 && N <= V, "one vector of sums at most");
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    __m512 x[16];
    UNROLL
    for (int i = 0; i < 16; ++i) x[i] = i < N ? __m512(a[i]) : _mm512_setzero_ps();
    // The halves of pairs: lanes 0-1 hold row 2i's 256-bit halves summed, lanes 2-3 row 2i+1's.
    UNROLL
    for (int i = 0; i < 8; ++i)
      x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x44),
                           _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xEE));
    // 128-bit lane L of x[i] now holds 4 partial sums of row 4i + L.
    UNROLL
    for (int i = 0; i < 4; ++i)
      x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x88),
                           _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xDD));
    UNROLL
    for (int i = 0; i < 2; ++i)
      x[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0x44),
                           _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0xEE));
    // Element 4L + m: the sum of row 4m + L.
    alignas(64) float t[16];
    _mm512_store_ps(t, _mm512_add_ps(_mm512_shuffle_ps(x[0], x[1], 0x88), _mm512_shuffle_ps(x[0], x[1], 0xDD)));
    UNROLL
    for (int i = 0; i < N; ++i) sums[i] = t[4 * (i % 4) + i / 4];
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    __m256 x[8];
    UNROLL
    for (int i = 0; i < 8; ++i) x[i] = i < N ? __m256(a[i]) : _mm256_setzero_ps();
    // 128-bit lane L of x[i]: 4 partial sums of row 2i + L.
    UNROLL
    for (int i = 0; i < 4; ++i)
      x[i] = _mm256_add_ps(_mm256_permute2f128_ps(x[2 * i], x[2 * i + 1], 0x20),
                           _mm256_permute2f128_ps(x[2 * i], x[2 * i + 1], 0x31));
    UNROLL
    for (int i = 0; i < 2; ++i)
      x[i] = _mm256_add_ps(_mm256_shuffle_ps(x[2 * i], x[2 * i + 1], 0x44),
                           _mm256_shuffle_ps(x[2 * i], x[2 * i + 1], 0xEE));
    // Element 4L + m: the sum of row 2m + L.
    alignas(32) float t[8];
    _mm256_store_ps(t, _mm256_add_ps(_mm256_shuffle_ps(x[0], x[1], 0x88), _mm256_shuffle_ps(x[0], x[1], 0xDD)));
    UNROLL
    for (int i = 0; i < N; ++i) sums[i] = t[4 * (i % 2) + i / 2];
    return;
  }
#endif
  UNROLL
  for (int i = 0; i < N; ++i) sums[i] = hsum(a[i]);
}

// NR weight rows x NB batch rows of out[j, r] = sum_k h_j[k] W[r, k]; NR * NB accumulators stay in registers.
template <typename T, int NB, int NR>
inline void matvec_block(const T* W, int64_t ldw, int64_t K, const T* const* h, T* out, int64_t ldo,
                         bool accumulate) {
  constexpr int64_t V = Vec<T>::size();
  Vec<T> acc[NR * NB];
  UNROLL
  for (int i = 0; i < NR * NB; ++i) acc[i] = Vec<T>(T(0));
  const int64_t Kv = K - K % V;
  for (int64_t k = 0; k < Kv; k += V) {
    Vec<T> hv[NB];
    UNROLL
    for (int jb = 0; jb < NB; ++jb) hv[jb] = Vec<T>::loadu(h[jb] + k);
    UNROLL
    for (int i = 0; i < NR; ++i) {
      const Vec<T> w = Vec<T>::loadu(W + i * ldw + k);
      UNROLL
      for (int jb = 0; jb < NB; ++jb) acc[i * NB + jb] = at::vec::fmadd(w, hv[jb], acc[i * NB + jb]);
    }
  }
  constexpr int NA = NR * NB, G = std::min<int>(NA, V), FULL = NA / G * G;  // reduced G accumulators at a time
  T sums[NA];
  UNROLL
  for (int g = 0; g < FULL; g += G) hsums<T, G>(acc + g, sums + g);
  if constexpr (NA > FULL) hsums<T, NA - FULL>(acc + FULL, sums + FULL);
  UNROLL
  for (int i = 0; i < NR; ++i) {
    UNROLL
    for (int jb = 0; jb < NB; ++jb) {
      T s = sums[i * NB + jb];
      for (int64_t k = Kv; k < K; ++k) s += W[i * ldw + k] * h[jb][k];
      T* o = out + jb * ldo + i;
      *o = accumulate ? *o + s : s;
    }
  }
}

// Weight rows a block: with the vector reductions, NR * NB fills one vector of sums (16 float lanes with AVX-512,
// 8 with AVX2) within the registers (NR * NB accumulators + NB rows of h + a weight vector); elsewhere as before.
template <typename T, int NB>
constexpr int matvec_rows() {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return NB == 1 ? 16 : NB == 2 ? 8 : NB <= 4 ? 4 : 2;
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return NB == 1 ? 8 : NB == 2 ? 4 : NB <= 4 ? 2 : 1;
#endif
  return NB == 1 ? 8 : NB == 2 ? 4 : NB <= 4 ? 2 : 1;
}

template <typename T, int NB, int NR = matvec_rows<T, NB>()>
void matvec_nb(const T* W, int64_t ldw, int64_t NRows, int64_t K, const T* const* h, T* out, int64_t ldo,
               bool accumulate) {
  int64_t r = 0;
  for (; r + NR <= NRows; r += NR) matvec_block<T, NB, NR>(W + r * ldw, ldw, K, h, out + r, ldo, accumulate);
  for (; r < NRows; ++r) matvec_block<T, NB, 1>(W + r * ldw, ldw, K, h, out + r, ldo, accumulate);
}

// kShortBlocks: batch-1 products take 8 weight rows a block (KernelTable::matvec_short) instead of
// matvec_rows' choice (16 with AVX-512 float; elsewhere already 8).
template <typename T, bool kShortBlocks = false>
void matvec(const T* W, int64_t ldw, int64_t NRows, int64_t K, const RowSrc<T>& hs, int64_t b, T* out,
            int64_t ldo, bool accumulate) {
  for (int64_t j0 = 0; j0 < b; j0 += kSmallBatch) {  // batch rows in register blocks of up to 8
    const T* h[kSmallBatch];
    const int64_t nb = std::min(kSmallBatch, b - j0);
    for (int64_t j = 0; j < nb; ++j) h[j] = hs.row(j0 + j);
    T* o = out + j0 * ldo;
    switch (nb) {
      case 1:
        if constexpr (kShortBlocks) matvec_nb<T, 1, 8>(W, ldw, NRows, K, h, o, ldo, accumulate);
        else matvec_nb<T, 1>(W, ldw, NRows, K, h, o, ldo, accumulate);
        break;
      case 2: matvec_nb<T, 2>(W, ldw, NRows, K, h, o, ldo, accumulate); break;
      case 3: matvec_nb<T, 3>(W, ldw, NRows, K, h, o, ldo, accumulate); break;
      case 4: matvec_nb<T, 4>(W, ldw, NRows, K, h, o, ldo, accumulate); break;
      case 5: matvec_nb<T, 5>(W, ldw, NRows, K, h, o, ldo, accumulate); break;
      case 6: matvec_nb<T, 6>(W, ldw, NRows, K, h, o, ldo, accumulate); break;
      case 7: matvec_nb<T, 7>(W, ldw, NRows, K, h, o, ldo, accumulate); break;
      default: matvec_nb<T, 8>(W, ldw, NRows, K, h, o, ldo, accumulate); break;
    }
  }
}

// Batch rows the vector-matrix kernel and the two-vector panels hold in registers (two accumulators a row): 6 with
// the 16 vector registers of the baseline and AVX2 builds, 12 with AVX-512's 32 (three-vector panels: 8). And a
// register block of lstm_panel_block (4 accumulators a row, one vector of units of each gate): 6 rows, 24
// accumulators beside the 4 weight vectors and a broadcast, with 32 registers; 2 rows with 16.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kPanelRows = 12, kFusedRows = 6;
#else
constexpr int kPanelRows = 6, kFusedRows = 2;
#endif

// Calls f(std::integral_constant<int, nb>) for a run-time nb in [1, N], so each block size gets its own unrolled
// kernel.
template <int N, typename F>
inline void with_rows(int64_t nb, const F& f) {
  if constexpr (N > 1) {
    if (nb < N) return with_rows<N - 1>(nb, f);
  }
  f(std::integral_constant<int, N>{});
}

// Rows [0, b) in register blocks of at most max_rows, as even as possible (16 rows: 8 + 8, not 12 + 4), so no
// block is left with too few accumulators to hide the FMA latency. Calls f(j0, nb) per block.
template <typename F>
inline void row_blocks(int64_t b, int64_t max_rows, const F& f) {
  even_parts(b, max_rows, f);
}

// Vectors of columns a packed panel holds at most: 3 where 32 vector registers hold 8 rows x 3 accumulators, the
// 3 weight vectors and a broadcast, else 2 (kernels.h, KernelTable::panel_vecs; below kWidePanelRows rows a block
// the layer takes 2). Measured, one core streaming the panels from L2 (AVX-512, float, time at 2 vectors / time at
// 3, both with the prefetch below): 8 rows x K 256 x 768-1024 columns 1.12-1.13, 16 rows x K 128 1.04-1.05, 64
// rows x K 512 1.02-1.03, 4 rows x K 256 1.05. In the modules (2 threads, forward, alternating call by call, time
// at 2 vectors / at 3, both prefetching): GRU and LSTM T100 B16 H256 1.036 and 1.034, B12 1.037, B32 1.035, LSTM
// T500 B32 H128 0.988, but LSTM B4 0.965 and GRU B4 0.962, hence 2 vectors under 6 rows. Against the kernel
// before (2 vectors, no prefetch): forward GRU B16 1.04-1.08, LSTM B16 1.054, B8 1.084-1.092, T500 B32 H128 1.047,
// B64 H512 1.023, proj (H512 P128 B16) 1.067, 2-layer bidirectional B16 1.078, B4 1.022, GRU B4 1.010, RNN T200
// B16 1.003; forward+backward GRU B16 1.044, LSTM B16 1.016, T500 1.023, proj 1.030.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kPanelVecs = 3;
#else
constexpr int kPanelVecs = 2;
#endif

// Batch rows a register block of the panel kernel takes with NV vectors of columns (NV accumulators a row).
template <int NV>
constexpr int panel_rows() {
  return NV == 3 ? 8 : kPanelRows;
}

// Weight rows (k) ahead of the one being multiplied that the panel kernels prefetch into L1: the panels stream
// from L2 at one row per NV * MR FMAs, which the hardware prefetchers alone did not keep up with (AVX-512, 8 rows
// x 2 vectors x K 256, one core: 1.01-1.15x faster with it; the AVX2 build in the modules, forward, time without /
// with: GRU and LSTM T100 B16 H256 1.033 and 1.056, LSTM B4 1.026).
constexpr int64_t kPanelPrefetch = 8;

template <typename T, int NV>
inline void prefetch_row(const T* p) {
  constexpr int64_t bytes = NV * Vec<T>::size() * sizeof(T);
  UNROLL
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(reinterpret_cast<const char*>(p) + off, 0, 3);
}

// NB batch rows x NC column vectors of out[j, c] = sum_r g[j, r] W[r, c]; n valid lanes in the last vector.
template <typename T, int NB, int NC, bool PF = false>
inline void vecmat_block(const T* W, int64_t ldw, int64_t R, const T* g, int64_t ldg, T* out, int64_t ldo,
                         int64_t n, bool accumulate) {
  constexpr int64_t V = Vec<T>::size();
  Vec<T> acc[NB][NC];
  UNROLL
  for (int jb = 0; jb < NB; ++jb)
    UNROLL
    for (int c = 0; c < NC; ++c) acc[jb][c] = Vec<T>(T(0));
  for (int64_t r = 0; r < R; ++r) {
    if constexpr (PF) prefetch_row<T, NC>(W + (r + kPanelPrefetch) * ldw);
    Vec<T> w[NC];
    UNROLL
    for (int c = 0; c < NC; ++c) w[c] = ld(W + r * ldw + c * V, c == NC - 1 ? n : V);
    UNROLL
    for (int jb = 0; jb < NB; ++jb) {
      const Vec<T> gv(g[jb * ldg + r]);
      UNROLL
      for (int c = 0; c < NC; ++c) acc[jb][c] = at::vec::fmadd(gv, w[c], acc[jb][c]);
    }
  }
  UNROLL
  for (int jb = 0; jb < NB; ++jb) {
    UNROLL
    for (int c = 0; c < NC; ++c) {
      const int64_t m = c == NC - 1 ? n : V;
      T* o = out + jb * ldo + c * V;
      st(accumulate ? acc[jb][c] + ld(o, m) : acc[jb][c], o, m);
    }
  }
}

template <typename T, int NB>
void vecmat_nb(const T* W, int64_t ldw, int64_t R, int64_t c0, int64_t c1, const T* g, int64_t ldg, T* out,
               int64_t ldo, bool accumulate) {
  constexpr int64_t V = Vec<T>::size();
  constexpr int NC = NB <= 2 ? 4 : NB <= 4 ? 3 : 2;  // NB * NC <= 12 accumulators, + NC weights + 1 broadcast
  int64_t c = c0;
  for (; c + NC * V <= c1; c += NC * V) vecmat_block<T, NB, NC>(W + c, ldw, R, g, ldg, out + c, ldo, V, accumulate);
  for (; c < c1; c += V)
    vecmat_block<T, NB, 1>(W + c, ldw, R, g, ldg, out + c, ldo, std::min(V, c1 - c), accumulate);
}

// Long inner dimensions are summed in chunks of kSumChunk terms, each chunk's sums added to the output: the
// rounding error of a sum grows with its length, and single chains over the backward's K = 4H = 2048 terms (dG W_hh)
// ended up with 2.4x torch.nn's (blocked) error on LSTM H512. Costs one load and store of the outputs a chunk.
constexpr int64_t kSumChunk = 256;

template <typename T>
void vecmat_unchunked(const T* W, int64_t ldw, int64_t R, int64_t c0, int64_t c1, const T* g, int64_t ldg,
                      int64_t b, T* out, int64_t ldo, bool accumulate);

template <typename T>
void vecmat(const T* W, int64_t ldw, int64_t R, int64_t c0, int64_t c1, const T* g, int64_t ldg, int64_t b,
            T* out, int64_t ldo, bool accumulate) {
  for (int64_t r0 = 0; r0 < R; r0 += kSumChunk)
    vecmat_unchunked(W + r0 * ldw, ldw, std::min(kSumChunk, R - r0), c0, c1, g + r0, ldg, b, out, ldo,
                     accumulate || r0 > 0);
}

template <typename T>
void vecmat_unchunked(const T* W, int64_t ldw, int64_t R, int64_t c0, int64_t c1, const T* g, int64_t ldg,
                      int64_t b, T* out, int64_t ldo, bool accumulate) {
  constexpr int64_t V = Vec<T>::size();
  // One or two rows: wide column blocks (enough accumulators to hide the FMA latency), the weights streamed once.
  if (b == 1) return vecmat_nb<T, 1>(W, ldw, R, c0, c1, g, ldg, out, ldo, accumulate);
  if (b == 2) return vecmat_nb<T, 2>(W, ldw, R, c0, c1, g, ldg, out, ldo, accumulate);
  // More rows: strips of two vectors of columns, all row blocks of a strip in turn, so the strip of W (R x 2V)
  // stays in L1/L2 while every row block reads it instead of the whole slice streaming once per row block; its rows
  // prefetched ahead as the panels' are. (Strips of three vectors, as the packed panels from 6 rows, were slower
  // here: W_hh as it is has a row stride of P. Forward+backward, GRU/LSTM T100 B16 H256 unpacked, time before /
  // after: three vectors 0.979-0.99 without the prefetch; two vectors with it 1.016 and 1.033.)
  for (int64_t c = c0; c < c1; c += 2 * V) {
    const int64_t n = std::min(2 * V, c1 - c);
    row_blocks(b, kPanelRows, [&](int64_t j0, int64_t nb) {
      const T* gj = g + j0 * ldg;
      T* o = out + j0 * ldo + c;
      with_rows<kPanelRows>(nb, [&](auto rows) {
        constexpr int NB = decltype(rows)::value;
        if (n > V) vecmat_block<T, NB, 2, true>(W + c, ldw, R, gj, ldg, o, ldo, n - V, accumulate);
        else vecmat_block<T, NB, 1, true>(W + c, ldw, R, gj, ldg, o, ldo, n, accumulate);
      });
    });
  }
}

// MR batch rows x one packed panel of NV vectors of columns: out[j, c] (+)= sum_k h_j[k] Wp[k, c], n valid
// columns. Per k: NV weight loads and MR broadcasts feed NV * MR FMAs into NV * MR accumulators.
template <typename T, int MR, int NV>
inline void panel_block(const T* Wp, int64_t K, const T* const* h, T* out, int64_t ldo, int64_t n,
                        bool accumulate) {
  constexpr int64_t V = Vec<T>::size(), W = NV * V;
  Vec<T> acc[MR][NV];
  const T* hr[MR];
  UNROLL
  for (int j = 0; j < MR; ++j) {
    UNROLL
    for (int v = 0; v < NV; ++v) acc[j][v] = Vec<T>(T(0));
    hr[j] = h[j];
  }
  for (int64_t k = 0; k < K; ++k) {
    prefetch_row<T, NV>(Wp + (k + kPanelPrefetch) * W);
    Vec<T> w[NV];
    UNROLL
    for (int v = 0; v < NV; ++v) w[v] = Vec<T>::loadu(Wp + k * W + v * V);
    UNROLL
    for (int j = 0; j < MR; ++j) {
      const Vec<T> hb(hr[j][k]);
      UNROLL
      for (int v = 0; v < NV; ++v) acc[j][v] = at::vec::fmadd(w[v], hb, acc[j][v]);
    }
  }
  UNROLL
  for (int j = 0; j < MR; ++j) {
    T* o = out + j * ldo;
    UNROLL
    for (int v = 0; v < NV; ++v) {
      const int64_t m = std::clamp<int64_t>(n - v * V, 0, V);
      if (m > 0) st(accumulate ? acc[j][v] + ld(o + v * V, m) : acc[j][v], o + v * V, m);
    }
  }
}

// One batch row: the weights stream through once, so the k loop is unrolled by four into 4 * NV accumulator chains
// to keep both FMA ports busy despite their latency; the chains are summed at the end. No software prefetch here:
// at one row a k the loads alone keep the L2 stream busy, and prefetching 8 rows ahead made it slower (one core,
// 480 KiB of panels from L2, K 256, time without / with: 2 vectors 0.95, 3 vectors 0.92). Not inlined: inlined
// into panel_gemm_nv (beside every other row count's block) GCC kept its accumulators on the stack, a store and a
// load around every FMA (one core, 512 rows x K 256 of two-vector panels from L2: 50 GB/s, against 78-88 GB/s
// called as a function).
template <typename T, int NV>
__attribute__((noinline)) void panel_row(const T* Wp, int64_t K, const T* h, T* out, int64_t n, bool accumulate) {
  constexpr int64_t V = Vec<T>::size(), W = NV * V;
  constexpr int U = 4;
  Vec<T> acc[U][NV];
  UNROLL
  for (int u = 0; u < U; ++u)
    UNROLL
    for (int v = 0; v < NV; ++v) acc[u][v] = Vec<T>(T(0));
  int64_t k = 0;
  for (; k + U <= K; k += U) {
    UNROLL
    for (int u = 0; u < U; ++u) {
      const Vec<T> hb(h[k + u]);
      UNROLL
      for (int v = 0; v < NV; ++v) acc[u][v] = at::vec::fmadd(Vec<T>::loadu(Wp + (k + u) * W + v * V), hb, acc[u][v]);
    }
  }
  for (; k < K; ++k) {
    const Vec<T> hb(h[k]);
    UNROLL
    for (int v = 0; v < NV; ++v) acc[0][v] = at::vec::fmadd(Vec<T>::loadu(Wp + k * W + v * V), hb, acc[0][v]);
  }
  UNROLL
  for (int v = 0; v < NV; ++v) {
    const Vec<T> sum = (acc[0][v] + acc[1][v]) + (acc[2][v] + acc[3][v]);
    const int64_t m = std::clamp<int64_t>(n - v * V, 0, V);
    if (m > 0) st(accumulate ? sum + ld(out + v * V, m) : sum, out + v * V, m);
  }
}

template <typename T, int NV>
void panel_gemm_nv(const T* Wp, int64_t K, int64_t n, const RowSrc<T>& hs, int64_t b, T* out, int64_t ldo,
                   bool accumulate) {
  constexpr int64_t W = NV * Vec<T>::size();
  constexpr int MAXR = panel_rows<NV>();
  row_blocks(b, MAXR, [&](int64_t j0, int64_t nb) {
    const T* h[MAXR];
    T* o = out + j0 * ldo;
    for (int64_t k0 = 0; k0 < K; k0 += kSumChunk) {  // see kSumChunk
      const int64_t kc = std::min(kSumChunk, K - k0);
      for (int64_t j = 0; j < nb; ++j) h[j] = hs.row(j0 + j) + k0;
      with_rows<MAXR>(nb, [&](auto rows) {
        constexpr int MR = decltype(rows)::value;
        if constexpr (MR == 1) panel_row<T, NV>(Wp + k0 * W, kc, h[0], o, n, accumulate || k0 > 0);
        else panel_block<T, MR, NV>(Wp + k0 * W, kc, h, o, ldo, n, accumulate || k0 > 0);
      });
    }
  });
}

template <typename T>
void panel_gemm(const T* Wp, int64_t K, int64_t n, const RowSrc<T>& hs, int64_t b, T* out, int64_t ldo,
                bool accumulate) {
  constexpr int64_t V = Vec<T>::size();
  const int64_t nv = (n + V - 1) / V;
  if (nv <= 1) return panel_gemm_nv<T, 1>(Wp, K, n, hs, b, out, ldo, accumulate);
  if (kPanelVecs < 3 || nv == 2) return panel_gemm_nv<T, 2>(Wp, K, n, hs, b, out, ldo, accumulate);
  if constexpr (kPanelVecs >= 3) panel_gemm_nv<T, 3>(Wp, K, n, hs, b, out, ldo, accumulate);
}

// ---- LSTM: the product with the cell fused into it -------------------------------------------------------------

// The cell of U rows [j0, j0 + U) for units [k, k + n) from their recurrent sums sums[u][g] (one vector each):
// pre + sum + bias, then lstm_fwd_core. Not inlined: the gate math gets the registers to itself.
template <typename T, int U>
__attribute__((noinline)) void lstm_sums_cell(const FwdArgs<T>& a, const T (*sums)[4][Vec<T>::size()], int64_t j0,
                                              int64_t k, int64_t n) {
  lstm_fwd_core<T, U>(
      a,
      [&](int g, int u) {
        const int64_t col = g * a.H + k;
        const Vec<T> v = Vec<T>::loadu(sums[u][g]) + ld(a.pre + (j0 + u) * a.ld_pre + col, n);
        return a.bias ? v + ld(a.bias + col, n) : v;
      },
      [&](int u) { return std::array<int64_t, 3>{j0 + u, k, n}; });
}

// MR batch rows [j0, j0 + MR) of an LSTM step for one vector of hidden units [k, k + n): the recurrent product
// from a gate-interleaved panel Wp [K, 4V] (element (kk, g*V + c) = W_hh[g*H + k + c, kk], zero for c >= n), its
// sums to sums[j][g]. The sums are panel_gemm's bitwise: one chain per accumulator over k, in chunks of kSumChunk
// terms, all but the last chunk's added to a.pre here, so the cell's pre + sum + bias is what panel_gemm into the
// pre-activations followed by the gate pass computes. The pre-activations and c rows the cell will read are
// prefetched first, to arrive while the product runs (T500 B32 H128, forward, 2 threads, time against the loop
// without fusion: 1.046 without the prefetch, 0.992 with it).
template <typename T, int MR>
inline void lstm_panel_block(const T* Wp, int64_t K, const T* const* h, const FwdArgs<T>& a, int64_t j0, int64_t k,
                             int64_t n, T (*sums)[4][Vec<T>::size()]) {
  constexpr int64_t V = Vec<T>::size(), W = 4 * V;
  const int64_t H = a.H;
  Vec<T> acc[MR][4];
  const T* hr[MR];
  UNROLL
  for (int j = 0; j < MR; ++j) {
    hr[j] = h[j];
    // what the cell reads after the product: the input projections (in L2 or beyond) and c
    UNROLL
    for (int g = 0; g < 4; ++g) __builtin_prefetch(a.pre + (j0 + j) * a.ld_pre + g * H + k, 0, 3);
    __builtin_prefetch(a.c + (j0 + j) * a.ld_c + k, 0, 3);
  }
  for (int64_t k0 = 0; k0 < K; k0 += kSumChunk) {
    if (k0 > 0) {  // a long K: the chunk's sums go to the pre-activations, as panel_gemm's do
      UNROLL
      for (int j = 0; j < MR; ++j) {
        T* p = a.pre + (j0 + j) * a.ld_pre + k;
        UNROLL
        for (int g = 0; g < 4; ++g) st(acc[j][g] + ld(p + g * H, n), p + g * H, n);
      }
    }
    UNROLL
    for (int j = 0; j < MR; ++j)
      UNROLL
      for (int g = 0; g < 4; ++g) acc[j][g] = Vec<T>(T(0));
    const int64_t k1 = std::min(K, k0 + kSumChunk);
    for (int64_t kk = k0; kk < k1; ++kk) {
      prefetch_row<T, 4>(Wp + (kk + kPanelPrefetch) * W);
      Vec<T> w[4];
      UNROLL
      for (int g = 0; g < 4; ++g) w[g] = Vec<T>::loadu(Wp + kk * W + g * V);
      UNROLL
      for (int j = 0; j < MR; ++j) {
        const Vec<T> hb(hr[j][kk]);
        UNROLL
        for (int g = 0; g < 4; ++g) acc[j][g] = at::vec::fmadd(w[g], hb, acc[j][g]);
      }
    }
  }
  UNROLL
  for (int j = 0; j < MR; ++j)
    UNROLL
    for (int g = 0; g < 4; ++g) acc[j][g].store(sums[j][g]);
}

// Rows a call of lstm_panel_fwd keeps the sums of at once (16 KiB for AVX-512 float): the persistent loop's batch
// at most, unless FUSEDRNN_CPU_LOOP=persistent forces more, which then run 64 at a time.
constexpr int64_t kFusedMaxRows = 64;

// KernelTable::lstm_panel_fwd: the products of rows [0, b) in register blocks of up to kFusedRows (split evenly),
// their sums to a buffer in L1, then the cells in groups of kGateVecs rows. (The cell of each register block on its
// accumulators, with all 4 * MR of them live through the gate math, spilled more than it saved; on the sums of one
// block, in groups of 3 and 2 rows, it ran 50% slower than the gate pass's groups of 4: LSTM T500 B32 H128,
// forward, 2 threads.)
template <typename T>
void lstm_panel_fwd(const T* Wp, int64_t K, const RowSrc<T>& hs, int64_t b, const FwdArgs<T>& a, int64_t k,
                    int64_t n) {
  constexpr int64_t V = Vec<T>::size();
  alignas(64) T sums[kFusedMaxRows][4][V];
  for (int64_t r0 = 0; r0 < b; r0 += kFusedMaxRows) {
    const int64_t rb = std::min(kFusedMaxRows, b - r0);
    row_blocks(rb, kFusedRows, [&](int64_t j0, int64_t nb) {
      const T* h[kFusedRows];
      for (int64_t j = 0; j < nb; ++j) h[j] = hs.row(r0 + j0 + j);
      with_rows<kFusedRows>(nb, [&](auto rows) {
        lstm_panel_block<T, decltype(rows)::value>(Wp, K, h, a, r0 + j0, k, n, sums + j0);
      });
    });
    row_blocks(rb, kGateVecs, [&](int64_t j0, int64_t nb) {
      with_rows<kGateVecs>(nb, [&](auto rows) {
        lstm_sums_cell<T, decltype(rows)::value>(a, sums + j0, r0 + j0, k, n);
      });
    });
  }
}

// ---- packing --------------------------------------------------------------------------------------------------

// Scalar transpose, in blocks of 16 k so each group of destination rows stays in L1 while all columns fill it.
template <typename T>
void pack_panel_scalar(const T* W, int64_t ldw, int64_t n, int64_t K, T* dst, int64_t panel) {
  constexpr int64_t KB = 16;
  for (int64_t kb = 0; kb < K; kb += KB) {
    const int64_t kn = std::min(KB, K - kb);
    for (int64_t c = 0; c < panel; ++c) {
      T* o = dst + kb * panel + c;
      if (c < n) {
        const T* w = W + c * ldw + kb;
        for (int64_t k = 0; k < kn; ++k) o[k * panel] = w[k];
      } else {
        for (int64_t k = 0; k < kn; ++k) o[k * panel] = T(0);
      }
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// r[c] (16 rows of 16) -> r[k]: the 16 x 16 transpose in three shuffle stages (pairs of rows, 4-row groups within
// 128-bit lanes, then the lanes themselves).
inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int m = 0; m < 4; ++m) {
    u[4 * m + 0] = _mm512_shuffle_ps(t[4 * m + 0], t[4 * m + 2], 0x44);
    u[4 * m + 1] = _mm512_shuffle_ps(t[4 * m + 0], t[4 * m + 2], 0xEE);
    u[4 * m + 2] = _mm512_shuffle_ps(t[4 * m + 1], t[4 * m + 3], 0x44);
    u[4 * m + 3] = _mm512_shuffle_ps(t[4 * m + 1], t[4 * m + 3], 0xEE);
  }
  // u[4m + j], lane L: column 4L + j of rows 4m..4m+3; out[4L + j] lane m is u[4m + j] lane L.
  for (int j = 0; j < 4; ++j) {
    const __m512 x0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x44), x1 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xEE);
    const __m512 x2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x44);
    const __m512 x3 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xEE);
    r[j] = _mm512_shuffle_f32x4(x0, x2, 0x88);
    r[4 + j] = _mm512_shuffle_f32x4(x0, x2, 0xDD);
    r[8 + j] = _mm512_shuffle_f32x4(x1, x3, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(x1, x3, 0xDD);
  }
}

template <typename T>
void pack_panel(const T* W, int64_t ldw, int64_t n, int64_t K, T* dst) {
  constexpr int64_t V = Vec<T>::size();
  const int64_t panel = panel_width(n, V);
  if constexpr (!std::is_same_v<T, float>) {
    pack_panel_scalar(W, ldw, n, K, dst, panel);
  } else {
    for (int64_t c0 = 0; c0 < panel; c0 += 16) {
      const int64_t nr = std::clamp<int64_t>(n - c0, 0, 16);
      for (int64_t kb = 0; kb < K; kb += 16) {
        const int64_t kn = std::min<int64_t>(16, K - kb);
        const __mmask16 km = static_cast<__mmask16>((1u << kn) - 1);
        __m512 r[16];
        for (int64_t i = 0; i < 16; ++i)
          r[i] = i < nr ? _mm512_maskz_loadu_ps(km, W + (c0 + i) * ldw + kb) : _mm512_setzero_ps();
        transpose16(r);
        for (int64_t k = 0; k < kn; ++k) _mm512_storeu_ps(dst + (kb + k) * panel + c0, r[k]);
      }
    }
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
// The 8 x 8 transpose: pairs of rows, 4-row groups within 128-bit lanes, then the two lanes.
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int m = 0; m < 2; ++m) {
    u[4 * m + 0] = _mm256_shuffle_ps(t[4 * m + 0], t[4 * m + 2], 0x44);
    u[4 * m + 1] = _mm256_shuffle_ps(t[4 * m + 0], t[4 * m + 2], 0xEE);
    u[4 * m + 2] = _mm256_shuffle_ps(t[4 * m + 1], t[4 * m + 3], 0x44);
    u[4 * m + 3] = _mm256_shuffle_ps(t[4 * m + 1], t[4 * m + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
    r[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
  }
}

template <typename T>
void pack_panel(const T* W, int64_t ldw, int64_t n, int64_t K, T* dst) {
  constexpr int64_t V = Vec<T>::size();
  const int64_t panel = panel_width(n, V);
  if constexpr (!std::is_same_v<T, float>) {
    pack_panel_scalar(W, ldw, n, K, dst, panel);
  } else {
    const int64_t K8 = K - K % 8;
    for (int64_t c0 = 0; c0 < panel; c0 += 8) {
      const int64_t nr = std::clamp<int64_t>(n - c0, 0, 8);
      for (int64_t kb = 0; kb < K8; kb += 8) {
        __m256 r[8];
        for (int64_t i = 0; i < 8; ++i) r[i] = i < nr ? _mm256_loadu_ps(W + (c0 + i) * ldw + kb) : _mm256_setzero_ps();
        transpose8(r);
        for (int64_t k = 0; k < 8; ++k) _mm256_storeu_ps(dst + (kb + k) * panel + c0, r[k]);
      }
    }
    if (K8 < K) {  // the last K % 8 rows of the panel
      for (int64_t c = 0; c < panel; ++c)
        for (int64_t k = K8; k < K; ++k) dst[k * panel + c] = c < n ? W[c * ldw + k] : T(0);
    }
  }
}
#else
template <typename T>
void pack_panel(const T* W, int64_t ldw, int64_t n, int64_t K, T* dst) {
  pack_panel_scalar(W, ldw, n, K, dst, panel_width(n, Vec<T>::size()));
}
#endif

}  // namespace
}  // namespace fusedrnn::cpu::CPU_CAPABILITY
