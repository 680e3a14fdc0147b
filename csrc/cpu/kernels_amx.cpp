// AMX build of the bfloat16 recurrent product (csrc/cpu/kernels.h, namespace AMX). setup.py compiles this one file
// with -mamx-tile -mamx-bf16 (x86-64 only); the driver calls into it only when available() says the CPU has
// AMX-BF16 and the kernel granted this process the tile state, so a CPU without AMX never executes a tile
// instruction. Built without those flags it provides nothing (available() is false).
//
// The product: out[j, c] (+)= sum_k a[j, k] w[c, k] for j < rows, c < n, where a is bfloat16 [rows, Kp] (row stride
// lda) and w is packed by pack(): column blocks of 16 (zero-padded), each as Kp / 32 consecutive B tiles in the VNNI
// layout that TDPBF16PS reads (tile row r, column c: the pair w[c, 2r], w[c, 2r + 1] of its 32 k). Sums in float32.
#include "kernels.h"

#include <algorithm>
#include <cstring>

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

// Palette 1: tiles 0-3 accumulators (16 rows x 16 float), 4 the A tile (16 rows x 32 bfloat16), 5-7 B tiles.
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

// NT accumulator tiles (NT * 16 columns) of one 16-row block over all Kp. The B tiles rotate over three tile
// registers, so a load does not wait for the product that read the same register just before (with two of them:
// 1.5-2x slower; one core, 16 rows x 512 columns x K 512 from L2: 12.3 us, 43 GB/s of W, 680 GFLOP/s, about a
// third of AMX's rated 16 cycles a TDPBF16PS on this shared machine; prefetching the next B tiles into L1 did not
// help).
template <int NT>
inline void block(const uint16_t* a, int64_t lda, const uint16_t* wp, int64_t kc, float* scratch) {
  _tile_zero(0);
  if constexpr (NT > 1) _tile_zero(1);
  if constexpr (NT > 2) _tile_zero(2);
  if constexpr (NT > 3) _tile_zero(3);
  const int64_t tile = 512, cb = kc * tile;  // elements of a B tile, of a column block
  for (int64_t k = 0; k < kc; ++k) {
    _tile_loadd(4, a + k * 32, lda * 2);
    _tile_loadd(5, wp + k * tile, 64);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (NT > 1) {
      _tile_loadd(6, wp + cb + k * tile, 64);
      _tile_dpbf16ps(1, 4, 6);
    }
    if constexpr (NT > 2) {
      _tile_loadd(7, wp + 2 * cb + k * tile, 64);
      _tile_dpbf16ps(2, 4, 7);
    }
    if constexpr (NT > 3) {
      _tile_loadd(5, wp + 3 * cb + k * tile, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  _tile_stored(0, scratch, 64);
  if constexpr (NT > 1) _tile_stored(1, scratch + 256, 64);
  if constexpr (NT > 2) _tile_stored(2, scratch + 512, 64);
  if constexpr (NT > 3) _tile_stored(3, scratch + 768, 64);
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
    for (int64_t k2 = 0; k2 < kc * 16; ++k2) {  // pairs of k: tile k2 / 16, row k2 % 16
      uint16_t* row = blk + (k2 / 16) * 512 + (k2 % 16) * 32;
      for (int64_t c = 0; c < 16; ++c) {
        for (int64_t e = 0; e < 2; ++e) {
          const int64_t k = 2 * k2 + e;
          row[2 * c + e] = c0 + c < n && k < K ? w[(c0 + c) * ldw + k] : uint16_t(0);
        }
      }
    }
  }
}

void gemm(const uint16_t* a, int64_t lda, int64_t rows, const uint16_t* wp, int64_t n, int64_t Kp, float* out,
          int64_t ldo, bool accumulate) {
  alignas(64) float scratch[4 * 256];
  const int64_t kc = Kp / 32, nb = (n + 15) / 16;
  for (int64_t j0 = 0; j0 < rows; j0 += 16) {
    const int64_t rj = std::min<int64_t>(16, rows - j0);
    for (int64_t b0 = 0; b0 < nb; b0 += 4) {
      const int64_t nt = std::min<int64_t>(4, nb - b0);
      const uint16_t* w = wp + b0 * 16 * Kp;
      const uint16_t* aj = a + j0 * lda;
      switch (nt) {
        case 1: block<1>(aj, lda, w, kc, scratch); break;
        case 2: block<2>(aj, lda, w, kc, scratch); break;
        case 3: block<3>(aj, lda, w, kc, scratch); break;
        default: block<4>(aj, lda, w, kc, scratch); break;
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

}  // namespace fusedrnn::cpu::AMX

#else
namespace fusedrnn::cpu::AMX {
bool available() { return false; }
void tile_config() {}
void tile_release() {}
int64_t packed_elems(int64_t n, int64_t Kp) { return (n + 15) / 16 * 16 * Kp; }
void pack(const uint16_t*, int64_t, int64_t, int64_t, int64_t, uint16_t*) {}
void gemm(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, float*, int64_t, bool) {}
}  // namespace fusedrnn::cpu::AMX
#endif
