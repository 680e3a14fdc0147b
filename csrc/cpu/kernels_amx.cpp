// AMX build of the bfloat16 products, the recurrent one (gemm) and the input projection (mm) (csrc/cpu/kernels.h,
// namespace AMX). setup.py compiles this one file
// with -mamx-tile -mamx-bf16 (x86-64 only); the driver calls into it only when available() says the CPU has
// AMX-BF16 and the kernel granted this process the tile state, so a CPU without AMX never executes a tile
// instruction. Built without those flags it provides nothing (available() is false).
//
// The recurrent product: out[j, c] (+)= sum_k (a[j, k] + a[j, lo + k]) w[c, k] for j < rows, c < n, where a holds two
// bfloat16 parts of each row (row stride lda: a high part at 0 and a low part at lo, Kp each) and w is packed by
// pack(): column blocks of 16 (zero-padded), each as Kp / 32 consecutive B tiles in the VNNI layout that TDPBF16PS
// reads (tile row r, column c: the pair w[c, 2r], w[c, 2r + 1] of its 32 k). Sums in float32.
#include "kernels.h"

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace fusedrnn::cpu::AMX {
namespace {

constexpr int kArchReqXcompPerm = 0x1023;  // arch_prctl: request permission for a dynamically enabled state
constexpr int kXfeatureXtiledata = 18;

bool detect() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool amx_bf16 = (d >> 22) & 1, amx_tile = (d >> 24) & 1;
  if (!amx_bf16 || !amx_tile) return false;
  // Linux 5.16+: the tile data state is off until a process asks for it (torch's oneDNN asks the same way).
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// Palette 1: tiles 0-2 accumulators (16 rows x 16 float), 3 and 4 the A tiles (the high and the low part of h, 16
// rows x 32 bfloat16 each), 5-7 B tiles.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

TileConfig make_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  return cfg;
}

// NT accumulator tiles (NT * 16 columns) of one 16-row block over all Kp: each B tile, loaded once, multiplies the
// high part and then the low part of h into the same accumulator, so W streams once for both (W is the operand
// that comes from L2; the A tiles are a few KiB, in L1). Between two products into one accumulator come NT - 1
// others. Measured (one core, a step's 4 gates, 16-row blocks, time per step, against the earlier kernel that
// multiplied [hi, lo] by a duplicated [W, W] over K = 2P with four accumulators): 32 rows x 128 columns x K 256:
// 21 against 32-54 us; 64 x 256 x K 512: 165-172 against 265-457 us (about 800 GFLOP/s counting both parts; the
// same kernel on W in L1 reaches 1.1-1.25 TFLOP/s and a bare TDPBF16PS loop 2.8; prefetching B tiles into L1 1-8
// k ahead changed nothing).
template <int NT>
inline void block(const uint16_t* a, int64_t lda, int64_t lo, const uint16_t* wp, int64_t kc, float* scratch) {
  _tile_zero(0);
  if constexpr (NT > 1) _tile_zero(1);
  if constexpr (NT > 2) _tile_zero(2);
  const int64_t tile = 512, cb = kc * tile;  // elements of a B tile, of a column block
  for (int64_t k = 0; k < kc; ++k) {
    _tile_loadd(3, a + k * 32, lda * 2);
    _tile_loadd(5, wp + k * tile, 64);
    _tile_dpbf16ps(0, 3, 5);
    if constexpr (NT > 1) {
      _tile_loadd(6, wp + cb + k * tile, 64);
      _tile_dpbf16ps(1, 3, 6);
    }
    if constexpr (NT > 2) {
      _tile_loadd(7, wp + 2 * cb + k * tile, 64);
      _tile_dpbf16ps(2, 3, 7);
    }
    _tile_loadd(4, a + lo + k * 32, lda * 2);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (NT > 1) _tile_dpbf16ps(1, 4, 6);
    if constexpr (NT > 2) _tile_dpbf16ps(2, 4, 7);
  }
  _tile_stored(0, scratch, 64);
  if constexpr (NT > 1) _tile_stored(1, scratch + 256, 64);
  if constexpr (NT > 2) _tile_stored(2, scratch + 512, 64);
}

// The input projection's 32 x (NB * 16) block over all Kp: accumulators 0, 1 (rows 0-15 of column blocks 0, 1)
// and 2, 3 (rows 16-31), A tiles 4 and 5 (the two 16-row halves), B tiles 6 and 7; every tile loaded feeds two
// products.
template <int NB>
inline void mm_block(const uint16_t* a, int64_t lda, const uint16_t* wp, int64_t kc) {
  _tile_zero(0);
  _tile_zero(2);
  if constexpr (NB > 1) {
    _tile_zero(1);
    _tile_zero(3);
  }
  const int64_t tile = 512, cb = kc * tile;
  for (int64_t k = 0; k < kc; ++k) {
    _tile_loadd(4, a + k * 32, lda * 2);
    _tile_loadd(6, wp + k * tile, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB > 1) {
      _tile_loadd(7, wp + cb + k * tile, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    _tile_loadd(5, a + 16 * lda + k * 32, lda * 2);
    _tile_dpbf16ps(2, 5, 6);
    if constexpr (NB > 1) _tile_dpbf16ps(3, 5, 7);
  }
}

template <int NB>
inline void mm_store(float* out, int64_t ldo, int64_t rows, int64_t cols, float* scratch) {
  if (rows == 32 && cols == NB * 16) {
    _tile_stored(0, out, ldo * 4);
    _tile_stored(2, out + 16 * ldo, ldo * 4);
    if constexpr (NB > 1) {
      _tile_stored(1, out + 16, ldo * 4);
      _tile_stored(3, out + 16 * ldo + 16, ldo * 4);
    }
    return;
  }
  // scratch: [32 rows, 32 columns]
  _tile_stored(0, scratch, 128);
  _tile_stored(2, scratch + 16 * 32, 128);
  if constexpr (NB > 1) {
    _tile_stored(1, scratch + 16, 128);
    _tile_stored(3, scratch + 16 * 32 + 16, 128);
  }
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t c = 0; c < cols; c += 16) {
      const int64_t nc = std::min<int64_t>(16, cols - c);
      _mm512_mask_storeu_ps(out + j * ldo + c, static_cast<__mmask16>((1u << nc) - 1),
                            _mm512_load_ps(scratch + j * 32 + c));
    }
  }
}

}  // namespace

bool available() {
  static const bool ok = detect();
  return ok;
}

void tile_config() {
  static const TileConfig cfg = make_config();
  _tile_loadconfig(&cfg);
}

void tile_release() { _tile_release(); }

int64_t packed_elems(int64_t n, int64_t Kp) { return (n + 15) / 16 * 16 * Kp; }

void pack(const uint16_t* w, int64_t ldw, int64_t n, int64_t K, int64_t Kp, uint16_t* dst) {
  const int64_t kc = Kp / 32;
  for (int64_t c0 = 0; c0 < n; c0 += 16) {
    uint16_t* blk = dst + c0 * Kp;  // column block c0 / 16: kc tiles of 512 elements
    for (int64_t t = 0; t < kc; ++t) {
      uint16_t* tile = blk + t * 512;
      if (c0 + 16 <= n && 32 * (t + 1) <= K) {
        // A whole tile: row r, column c holds the k pair (2r, 2r + 1) of column c, so as 32-bit pairs the tile is
        // the transpose of the 16 x 16 pairs w[c0 + c, 32t + 2r ...]: four rounds of unpack / shuffle.
        __m512i v[16], u[16];
        for (int c = 0; c < 16; ++c) v[c] = _mm512_loadu_si512(w + (c0 + c) * ldw + 32 * t);
        for (int c = 0; c < 16; c += 2) {
          u[c] = _mm512_unpacklo_epi32(v[c], v[c + 1]);
          u[c + 1] = _mm512_unpackhi_epi32(v[c], v[c + 1]);
        }
        for (int c = 0; c < 16; c += 4) {
          v[c] = _mm512_unpacklo_epi64(u[c], u[c + 2]);
          v[c + 1] = _mm512_unpackhi_epi64(u[c], u[c + 2]);
          v[c + 2] = _mm512_unpacklo_epi64(u[c + 1], u[c + 3]);
          v[c + 3] = _mm512_unpackhi_epi64(u[c + 1], u[c + 3]);
        }
        for (int c = 0; c < 4; ++c) {  // 128-bit lanes
          u[c] = _mm512_shuffle_i32x4(v[c], v[c + 4], 0x88);
          u[c + 4] = _mm512_shuffle_i32x4(v[c], v[c + 4], 0xdd);
          u[c + 8] = _mm512_shuffle_i32x4(v[c + 8], v[c + 12], 0x88);
          u[c + 12] = _mm512_shuffle_i32x4(v[c + 8], v[c + 12], 0xdd);
        }
        for (int c = 0; c < 4; ++c) {
          v[c] = _mm512_shuffle_i32x4(u[c], u[c + 8], 0x88);
          v[c + 8] = _mm512_shuffle_i32x4(u[c], u[c + 8], 0xdd);
          v[c + 4] = _mm512_shuffle_i32x4(u[c + 4], u[c + 12], 0x88);
          v[c + 12] = _mm512_shuffle_i32x4(u[c + 4], u[c + 12], 0xdd);
        }
        for (int r = 0; r < 16; ++r) _mm512_storeu_si512(tile + r * 32, v[r]);
        continue;
      }
      for (int64_t r = 0; r < 16; ++r) {
        for (int64_t c = 0; c < 16; ++c) {
          for (int64_t e = 0; e < 2; ++e) {
            const int64_t k = 32 * t + 2 * r + e;
            tile[r * 32 + 2 * c + e] = c0 + c < n && k < K ? w[(c0 + c) * ldw + k] : uint16_t(0);
          }
        }
      }
    }
  }
}

void gemm(const uint16_t* a, int64_t lda, int64_t lo, int64_t rows, const uint16_t* wp, int64_t n, int64_t Kp,
          float* out, int64_t ldo, bool accumulate) {
  alignas(64) float scratch[3 * 256];
  const int64_t kc = Kp / 32, nb = (n + 15) / 16;
  for (int64_t j0 = 0; j0 < rows; j0 += 16) {
    const int64_t rj = std::min<int64_t>(16, rows - j0);
    const uint16_t* aj = a + j0 * lda;
    for (int64_t b0 = 0; b0 < nb; b0 += 3) {
      const int64_t nt = std::min<int64_t>(3, nb - b0);
      const uint16_t* w = wp + b0 * 16 * Kp;
      switch (nt) {
        case 1: block<1>(aj, lda, lo, w, kc, scratch); break;
        case 2: block<2>(aj, lda, lo, w, kc, scratch); break;
        default: block<3>(aj, lda, lo, w, kc, scratch); break;
      }
      for (int64_t t = 0; t < nt; ++t) {
        const int64_t c0 = (b0 + t) * 16, nc = std::min<int64_t>(16, n - c0);
        const __mmask16 m = static_cast<__mmask16>((1u << nc) - 1);
        for (int64_t j = 0; j < rj; ++j) {
          float* o = out + (j0 + j) * ldo + c0;
          __m512 v = _mm512_load_ps(scratch + t * 256 + j * 16);
          if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, o));
          _mm512_mask_storeu_ps(o, m, v);
        }
      }
    }
  }
}

void mm(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, const uint16_t* wp, int64_t n, int64_t Kp, float* out,
        int64_t ldo) {
  alignas(64) float scratch[32 * 32];
  const int64_t kc = Kp / 32, nb = (n + 15) / 16;
  // A tile reads 32 k of 16 rows: rows past M, or k past K, are read from a zeroed copy of the block instead (past K
  // they would be the next row's numbers, and an inf there times the zero padding of W is a NaN).
  std::vector<uint16_t> pad;
  constexpr int64_t kChunk = 16;  // column blocks (256 columns) whose packed W stays in L2 while the rows pass
  for (int64_t b0 = 0; b0 < nb; b0 += kChunk) {
    const int64_t b1 = std::min(nb, b0 + kChunk);
    for (int64_t m0 = 0; m0 < M; m0 += 32) {
      const int64_t rows = std::min<int64_t>(32, M - m0);
      const uint16_t* a = x + m0 * ldx;
      int64_t lda = ldx;
      if (rows < 32 || K != Kp) {
        pad.assign(32 * Kp, 0);
        for (int64_t j = 0; j < rows; ++j) std::memcpy(pad.data() + j * Kp, a + j * ldx, K * 2);
        a = pad.data();
        lda = Kp;
      }
      for (int64_t b = b0; b < b1; b += 2) {
        const uint16_t* w = wp + b * 16 * Kp;
        const int64_t cols = std::min<int64_t>(32, n - b * 16);
        float* o = out + m0 * ldo + b * 16;
        if (b + 1 < b1) {
          mm_block<2>(a, lda, w, kc);
          mm_store<2>(o, ldo, rows, cols, scratch);
        } else {
          mm_block<1>(a, lda, w, kc);
          mm_store<1>(o, ldo, rows, cols, scratch);
        }
      }
    }
  }
}

}  // namespace fusedrnn::cpu::AMX

#else
namespace fusedrnn::cpu::AMX {
bool available() { return false; }
void tile_config() {}
void tile_release() {}
int64_t packed_elems(int64_t n, int64_t Kp) { return (n + 15) / 16 * 16 * Kp; }
void pack(const uint16_t*, int64_t, int64_t, int64_t, int64_t, uint16_t*) {}
void gemm(const uint16_t*, int64_t, int64_t, int64_t, const uint16_t*, int64_t, int64_t, float*, int64_t, bool) {}
void mm(const uint16_t*, int64_t, int64_t, int64_t, const uint16_t*, int64_t, int64_t, float*, int64_t) {}
}  // namespace fusedrnn::cpu::AMX
#endif
