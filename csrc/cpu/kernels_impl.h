// Vectorised gate passes and small-batch matrix-vector kernels. Included by kernels_default.cpp and
// kernels_avx2.cpp, which define CPU_CAPABILITY (and set the target) first; everything lands in
// fusedrnn::cpu::CPU_CAPABILITY so the two builds never share a symbol.
//
// Dimension letters: b rows alive at this step, H hidden size, G gates, K inner dimension, NR weight rows,
// V vector width (Vectorized<T>::size()), NB batch rows held in registers by a micro-kernel.
// Gate g of hidden unit k sits in column g*H + k (torch.nn order: LSTM i,f,g,o; GRU r,z,n).
#pragma once
#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including kernels_impl.h"
#endif

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <utility>

#include "kernels.h"

namespace fusedrnn::cpu::CPU_CAPABILITY {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Fully unrolls a loop over register-block indices before GCC decides where arrays of vectors live: without it the
// accumulator arrays of the micro-kernels stay on the stack and every FMA is followed by a store.
#define UNROLL _Pragma("GCC unroll 16")

// e^x for float vectors, inline: n = round(x log2 e), r = x - n ln2 (ln2 in two parts, |r| <= ln2 / 2), e^r =
// 1 + r + r^2 P(r) with P of degree 5 (fitted for this kernel: minimax relative error 5e-11 before rounding), then
// times 2^n (AVX-512: scalef; AVX2: two exact power-of-two products, so 2^n never leaves the normal range). x is
// clamped to [-104, 89] first, beyond which e^x rounds to 0 or overflows to inf; NaN stays NaN (the clamps pass their
// second operand through). Within 1.3 ulp of e^x (against double). ATen's exp (SLEEF, 1 ulp) is an out-of-line call
// around which the gate passes spill their live vectors; its exp_u20 is inline but less accurate (the sigmoid below
// measured 6.0 ulp with it near x = -87, 2.9 with this). Other builds and types: ATen's.
template <typename T>
inline Vec<T> exp_fast(const Vec<T>& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const Vec<T> xc = at::vec::minimum(Vec<T>(89.f), at::vec::maximum(Vec<T>(-104.f), x));
#if defined(CPU_CAPABILITY_AVX512)
    const Vec<T> n =
        _mm512_roundscale_ps(xc * Vec<T>(1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    const Vec<T> n = _mm256_round_ps(xc * Vec<T>(1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
    Vec<T> r = at::vec::fmadd(n, Vec<T>(-0.693359375f), xc);  // ln2 = 0.693359375 - 2.12194440e-4 (+ ~1e-11)
    r = at::vec::fmadd(n, Vec<T>(2.12194440054690583e-4f), r);
    Vec<T> p(1.9790340316e-04f);
    p = at::vec::fmadd(p, r, Vec<T>(1.3944645833e-03f));
    p = at::vec::fmadd(p, r, Vec<T>(8.3334970149e-03f));
    p = at::vec::fmadd(p, r, Vec<T>(4.1666295131e-02f));
    p = at::vec::fmadd(p, r, Vec<T>(1.6666665869e-01f));
    p = at::vec::fmadd(p, r, Vec<T>(5.0000000676e-01f));
    const Vec<T> y = at::vec::fmadd(p, r * r, r + Vec<T>(1.f));
#if defined(CPU_CAPABILITY_AVX512)
    return _mm512_scalef_ps(y, n);
#else
    // 2^n as 2^n1 * 2^n2, n1 = floor(n / 2), both in [-75, 64]
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    const __m256i bias = _mm256_set1_epi32(127);
    const Vec<T> s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
    const Vec<T> s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
    return (y * s1) * s2;
#endif
  }
#endif
  return x.exp();
}

template <typename T>
inline Vec<T> sigmoid(const Vec<T>& x) {
  const Vec<T> one(T(1));
  if constexpr (std::is_same_v<T, float>) return one / (one + exp_fast(x.neg()));
  return one / (one + x.neg().exp_u20());
}

// tanh. float: ATen's tanh (SLEEF, 1 ulp) costs about 55 cycles per AVX2 vector and an LSTM step calls it twice
// per unit, more than a third of the step at batch 16. This one costs about 32 (less with exp_fast: an AVX-512 LSTM
// gate pass 57 -> 49 ns a vector) and stays within 2 ulp (measured over [-10, 10] against double): |x| < 0.5 by
// the Taylor series of tanh through x^17 (truncation below 0.2 ulp), else 1 - 2 / (exp(2|x|) + 1) with the sign of
// x (exp overflowing to inf gives exactly 1). NaN stays NaN, -0 stays -0. double keeps ATen's.
template <typename T>
inline Vec<T> tanh_(const Vec<T>& x) {
  if constexpr (!std::is_same_v<T, float>) {
    return x.tanh();
  } else {
    const Vec<T> one(1.f), two(2.f), zero(0.f);
    const Vec<T> ax = x.abs();
    Vec<T> big = one - two / (exp_fast(ax + ax) + one);
    big = Vec<T>::blendv(big, big.neg(), x < zero);
    const Vec<T> x2 = x * x;
    Vec<T> p(6404582.f / 10854718875.f);
    p = at::vec::fmadd(p, x2, Vec<T>(-929569.f / 638512875.f));
    p = at::vec::fmadd(p, x2, Vec<T>(21844.f / 6081075.f));
    p = at::vec::fmadd(p, x2, Vec<T>(-1382.f / 155925.f));
    p = at::vec::fmadd(p, x2, Vec<T>(62.f / 2835.f));
    p = at::vec::fmadd(p, x2, Vec<T>(-17.f / 315.f));
    p = at::vec::fmadd(p, x2, Vec<T>(2.f / 15.f));
    p = at::vec::fmadd(p, x2, Vec<T>(-1.f / 3.f));
    const Vec<T> small = at::vec::fmadd(x * x2, p, x);
    return Vec<T>::blendv(big, small, ax < Vec<T>(0.5f));
  }
}

template <typename T>
inline Vec<T> ld(const T* p, int64_t n) {
  return n == Vec<T>::size() ? Vec<T>::loadu(p) : Vec<T>::loadu(p, n);
}

template <typename T>
inline void st(const Vec<T>& v, T* p, int64_t n) {
  if (n == Vec<T>::size()) v.store(p); else v.store(p, n);
}

// Gradient w.r.t. h at row j, columns [k, k+n): dh plus the optional grad_y addend.
template <typename T>
inline Vec<T> grad_h(const BwdArgs<T>& a, int64_t j, int64_t k, int64_t n) {
  const Vec<T> dh = ld(a.dh + j * a.ld_dh + k, n);
  return a.dh2 ? dh + ld(a.dh2 + j * a.ld_dh2 + k, n) : dh;
}

// Pre-activation columns [col, col+n) of a row p of FwdArgs::pre, plus the biases.
template <typename T>
inline Vec<T> pre_at(const FwdArgs<T>& a, const T* p, int64_t col, int64_t n) {
  const Vec<T> v = ld(p + col, n);
  return a.bias ? v + ld(a.bias + col, n) : v;
}

// Writes the new h at row j, columns [k, k+n), to out and, if given, out2.
template <typename T>
inline void store_h(const FwdArgs<T>& a, int64_t j, int64_t k, const Vec<T>& h, int64_t n) {
  st(h, a.out + j * a.ld_out + k, n);
  if (a.out2) st(h, a.out2 + j * a.ld_out2 + k, n);
}

// ---- gate passes ------------------------------------------------------------------------------------------------

template <typename T>
void lstm_fwd(const FwdArgs<T>& a, int64_t j0, int64_t j1, int64_t k0, int64_t k1) {
  constexpr int64_t V = Vec<T>::size();
  const int64_t H = a.H;
  for (int64_t j = j0; j < j1; ++j) {
    const T* p = a.pre + j * a.ld_pre;
    T* c = a.c + j * a.ld_c;
    T* r = a.res ? a.res + j * a.ld_res : nullptr;
    for (int64_t k = k0; k < k1; k += V) {
      const int64_t n = std::min(V, k1 - k);
      const Vec<T> gi = sigmoid(pre_at(a, p, k, n));
      const Vec<T> gf = sigmoid(pre_at(a, p, H + k, n));
      const Vec<T> gg = tanh_(pre_at(a, p, 2 * H + k, n));
      const Vec<T> go = sigmoid(pre_at(a, p, 3 * H + k, n));
      const Vec<T> cn = at::vec::fmadd(gf, ld(c + k, n), gi * gg);
      const Vec<T> h = go * tanh_(cn);
      st(cn, c + k, n);
      store_h(a, j, k, h, n);
      if (r) {
        st(gi, r + k, n);
        st(gf, r + H + k, n);
        st(gg, r + 2 * H + k, n);
        st(go, r + 3 * H + k, n);
        st(cn, r + 4 * H + k, n);
      }
    }
  }
}

// tanh' = 1 - y^2 is computed as (1 - y)(1 + y) throughout: 1 - y*y rounds y*y first and, near |y| = 1, loses up
// to 2^-25 / (1 - y^2) of the derivative unless the compiler happens to fuse it into an fma.
template <typename T>
void lstm_bwd(const BwdArgs<T>& a, int64_t j0, int64_t j1, int64_t k0, int64_t k1) {
  constexpr int64_t V = Vec<T>::size();
  const int64_t H = a.H;
  const Vec<T> one(T(1));
  for (int64_t j = j0; j < j1; ++j) {
    const T* r = a.res + j * a.ld_res;
    const T* cp = a.prev.row(j);
    T* dc = a.dc + j * a.ld_dc;
    T* dg = a.dg + j * a.ld_dg;
    for (int64_t k = k0; k < k1; k += V) {
      const int64_t n = std::min(V, k1 - k);
      const Vec<T> dh = grad_h(a, j, k, n);
      const Vec<T> gi = ld(r + k, n), gf = ld(r + H + k, n), gg = ld(r + 2 * H + k, n), go = ld(r + 3 * H + k, n);
      const Vec<T> tc = tanh_(ld(r + 4 * H + k, n));
      const Vec<T> dcv = at::vec::fmadd(dh * go, (one - tc) * (one + tc), ld(dc + k, n));
      st(dcv * gf, dc + k, n);
      st(dcv * gg * gi * (one - gi), dg + k, n);
      st(dcv * ld(cp + k, n) * gf * (one - gf), dg + H + k, n);
      st(dcv * gi * ((one - gg) * (one + gg)), dg + 2 * H + k, n);
      st(dh * tc * go * (one - go), dg + 3 * H + k, n);
    }
  }
}

template <typename T>
void gru_fwd(const FwdArgs<T>& a, int64_t j0, int64_t j1, int64_t k0, int64_t k1) {
  constexpr int64_t V = Vec<T>::size();
  const int64_t H = a.H;
  for (int64_t j = j0; j < j1; ++j) {
    const T* p = a.pre + j * a.ld_pre;
    const T* hg = a.hg + j * a.ld_hg;
    const T* hp = a.hprev.row(j);
    T* res = a.res ? a.res + j * a.ld_res : nullptr;
    for (int64_t k = k0; k < k1; k += V) {
      const int64_t n = std::min(V, k1 - k);
      const Vec<T> r = sigmoid(pre_at(a, p, k, n) + ld(hg + k, n));
      const Vec<T> z = sigmoid(pre_at(a, p, H + k, n) + ld(hg + H + k, n));
      Vec<T> hn = ld(hg + 2 * H + k, n);
      if (a.b_hn) hn = hn + ld(a.b_hn + k, n);
      const Vec<T> nn = tanh_(at::vec::fmadd(r, hn, pre_at(a, p, 2 * H + k, n)));
      store_h(a, j, k, at::vec::fmadd(z, ld(hp + k, n) - nn, nn), n);
      if (res) {
        st(r, res + k, n);
        st(z, res + H + k, n);
        st(nn, res + 2 * H + k, n);
        st(hn, res + 3 * H + k, n);
      }
    }
  }
}

template <typename T>
void gru_bwd(const BwdArgs<T>& a, int64_t j0, int64_t j1, int64_t k0, int64_t k1) {
  constexpr int64_t V = Vec<T>::size();
  const int64_t H = a.H;
  const Vec<T> one(T(1));
  for (int64_t j = j0; j < j1; ++j) {
    const T* res = a.res + j * a.ld_res;
    const T* hp = a.prev.row(j);
    T* dg = a.dg + j * a.ld_dg;
    T* dgh = a.dgh + j * a.ld_dgh;
    T* dhprev = a.dhp + j * a.ld_dhp;
    for (int64_t k = k0; k < k1; k += V) {
      const int64_t n = std::min(V, k1 - k);
      const Vec<T> dh = grad_h(a, j, k, n);
      const Vec<T> r = ld(res + k, n), z = ld(res + H + k, n), nn = ld(res + 2 * H + k, n);
      const Vec<T> hn = ld(res + 3 * H + k, n);
      const Vec<T> dpn = dh * (one - z) * ((one - nn) * (one + nn));
      const Vec<T> dpr = dpn * hn * r * (one - r);
      const Vec<T> dpz = dh * (ld(hp + k, n) - nn) * z * (one - z);
      st(dpr, dg + k, n);
      st(dpz, dg + H + k, n);
      st(dpn, dg + 2 * H + k, n);
      st(dpn * r, dgh + k, n);
      st(dh * z, dhprev + k, n);
    }
  }
}

template <typename T, bool kRelu>
void rnn_fwd(const FwdArgs<T>& a, int64_t j0, int64_t j1, int64_t k0, int64_t k1) {
  constexpr int64_t V = Vec<T>::size();
  for (int64_t j = j0; j < j1; ++j) {
    const T* p = a.pre + j * a.ld_pre;
    for (int64_t k = k0; k < k1; k += V) {
      const int64_t n = std::min(V, k1 - k);
      const Vec<T> x = pre_at(a, p, k, n);
      store_h(a, j, k, kRelu ? at::vec::clamp_min(x, Vec<T>(T(0))) : tanh_(x), n);
    }
  }
}

template <typename T, bool kRelu>
void rnn_bwd(const BwdArgs<T>& a, int64_t j0, int64_t j1, int64_t k0, int64_t k1) {
  constexpr int64_t V = Vec<T>::size();
  const Vec<T> one(T(1)), zero(T(0));
  for (int64_t j = j0; j < j1; ++j) {
    const T* y = a.y + j * a.ld_y;
    T* dg = a.dg + j * a.ld_dg;
    for (int64_t k = k0; k < k1; k += V) {
      const int64_t n = std::min(V, k1 - k);
      const Vec<T> dh = grad_h(a, j, k, n);
      const Vec<T> h = ld(y + k, n);
      // relu': torch's threshold_backward, where(h <= 0, 0, dh): an Inf/NaN dh on a dead unit gives 0, as in torch.nn
      st(kRelu ? Vec<T>::blendv(dh, zero, h <= zero) : dh * ((one - h) * (one + h)), dg + k, n);
    }
  }
}

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

template <typename T, int NB>
void matvec_nb(const T* W, int64_t ldw, int64_t NRows, int64_t K, const T* const* h, T* out, int64_t ldo,
               bool accumulate) {
  constexpr int NR = matvec_rows<T, NB>();
  int64_t r = 0;
  for (; r + NR <= NRows; r += NR) matvec_block<T, NB, NR>(W + r * ldw, ldw, K, h, out + r, ldo, accumulate);
  for (; r < NRows; ++r) matvec_block<T, NB, 1>(W + r * ldw, ldw, K, h, out + r, ldo, accumulate);
}

template <typename T>
void matvec(const T* W, int64_t ldw, int64_t NRows, int64_t K, const RowSrc<T>& hs, int64_t b, T* out,
            int64_t ldo, bool accumulate) {
  for (int64_t j0 = 0; j0 < b; j0 += kSmallBatch) {  // batch rows in register blocks of up to 8
    const T* h[kSmallBatch];
    const int64_t nb = std::min(kSmallBatch, b - j0);
    for (int64_t j = 0; j < nb; ++j) h[j] = hs.row(j0 + j);
    T* o = out + j0 * ldo;
    switch (nb) {
      case 1: matvec_nb<T, 1>(W, ldw, NRows, K, h, o, ldo, accumulate); break;
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

// Batch rows the packed-panel and vector-matrix kernels hold in registers (two accumulators a row): 6 with the 16
// vector registers of the baseline and AVX2 builds, 12 with AVX-512's 32.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kPanelRows = 12;
#else
constexpr int kPanelRows = 6;
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

// Rows [0, b) in register blocks of at most kPanelRows, as even as possible (16 rows: 8 + 8, not 12 + 4), so no
// block is left with too few accumulators to hide the FMA latency. Calls f(j0, nb) per block.
template <typename F>
inline void row_blocks(int64_t b, const F& f) {
  if (b <= 0) return;
  const int64_t nblk = (b + kPanelRows - 1) / kPanelRows, base = b / nblk, extra = b % nblk;
  for (int64_t i = 0, j0 = 0; i < nblk; ++i) {
    const int64_t nb = base + (i < extra ? 1 : 0);
    f(j0, nb);
    j0 += nb;
  }
}

// NB batch rows x NC column vectors of out[j, c] = sum_r g[j, r] W[r, c]; n valid lanes in the last vector.
template <typename T, int NB, int NC>
inline void vecmat_block(const T* W, int64_t ldw, int64_t R, const T* g, int64_t ldg, T* out, int64_t ldo,
                         int64_t n, bool accumulate) {
  constexpr int64_t V = Vec<T>::size();
  Vec<T> acc[NB][NC];
  UNROLL
  for (int jb = 0; jb < NB; ++jb)
    UNROLL
    for (int c = 0; c < NC; ++c) acc[jb][c] = Vec<T>(T(0));
  for (int64_t r = 0; r < R; ++r) {
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
  // stays in L1/L2 while every row block reads it instead of the whole slice streaming once per row block.
  for (int64_t c = c0; c < c1; c += 2 * V) {
    const int64_t n = std::min(2 * V, c1 - c);
    row_blocks(b, [&](int64_t j0, int64_t nb) {
      const T* gj = g + j0 * ldg;
      T* o = out + j0 * ldo + c;
      with_rows<kPanelRows>(nb, [&](auto rows) {
        constexpr int NB = decltype(rows)::value;
        if (n > V) vecmat_block<T, NB, 2>(W + c, ldw, R, gj, ldg, o, ldo, n - V, accumulate);
        else vecmat_block<T, NB, 1>(W + c, ldw, R, gj, ldg, o, ldo, n, accumulate);
      });
    });
  }
}

// MR batch rows x one packed panel (2 vectors of columns): out[j, c] (+)= sum_k h_j[k] Wp[k, c], n valid columns.
// Per k: two weight loads and MR broadcasts feed 2 * MR FMAs into 2 * MR accumulators.
template <typename T, int MR>
inline void panel_block(const T* Wp, int64_t K, const T* const* h, T* out, int64_t ldo, int64_t n,
                        bool accumulate) {
  constexpr int64_t V = Vec<T>::size();
  Vec<T> a0[MR], a1[MR];
  const T* hr[MR];
  UNROLL
  for (int j = 0; j < MR; ++j) {
    a0[j] = a1[j] = Vec<T>(T(0));
    hr[j] = h[j];
  }
  for (int64_t k = 0; k < K; ++k) {
    const Vec<T> w0 = Vec<T>::loadu(Wp + k * 2 * V), w1 = Vec<T>::loadu(Wp + k * 2 * V + V);
    UNROLL
    for (int j = 0; j < MR; ++j) {
      const Vec<T> hb(hr[j][k]);
      a0[j] = at::vec::fmadd(w0, hb, a0[j]);
      a1[j] = at::vec::fmadd(w1, hb, a1[j]);
    }
  }
  const int64_t n0 = std::min(V, n), n1 = n - n0;
  UNROLL
  for (int j = 0; j < MR; ++j) {
    T* o = out + j * ldo;
    st(accumulate ? a0[j] + ld(o, n0) : a0[j], o, n0);
    if (n1 > 0) st(accumulate ? a1[j] + ld(o + V, n1) : a1[j], o + V, n1);
  }
}

// One batch row: the weights stream through once, so the k loop is unrolled by four into eight accumulator chains
// (two per k) to keep both FMA ports busy despite their latency; the chains are summed at the end.
template <typename T>
inline void panel_row(const T* Wp, int64_t K, const T* h, T* out, int64_t n, bool accumulate) {
  constexpr int64_t V = Vec<T>::size();
  constexpr int U = 4;
  Vec<T> a0[U], a1[U];
  UNROLL
  for (int u = 0; u < U; ++u) a0[u] = a1[u] = Vec<T>(T(0));
  int64_t k = 0;
  for (; k + U <= K; k += U) {
    UNROLL
    for (int u = 0; u < U; ++u) {
      const Vec<T> hb(h[k + u]);
      a0[u] = at::vec::fmadd(Vec<T>::loadu(Wp + (k + u) * 2 * V), hb, a0[u]);
      a1[u] = at::vec::fmadd(Vec<T>::loadu(Wp + (k + u) * 2 * V + V), hb, a1[u]);
    }
  }
  for (; k < K; ++k) {
    const Vec<T> hb(h[k]);
    a0[0] = at::vec::fmadd(Vec<T>::loadu(Wp + k * 2 * V), hb, a0[0]);
    a1[0] = at::vec::fmadd(Vec<T>::loadu(Wp + k * 2 * V + V), hb, a1[0]);
  }
  const Vec<T> s0 = (a0[0] + a0[1]) + (a0[2] + a0[3]), s1 = (a1[0] + a1[1]) + (a1[2] + a1[3]);
  const int64_t n0 = std::min(V, n), n1 = n - n0;
  st(accumulate ? s0 + ld(out, n0) : s0, out, n0);
  if (n1 > 0) st(accumulate ? s1 + ld(out + V, n1) : s1, out + V, n1);
}

template <typename T>
void panel_gemm(const T* Wp, int64_t K, int64_t n, const RowSrc<T>& hs, int64_t b, T* out, int64_t ldo,
                bool accumulate) {
  constexpr int64_t panel = 2 * Vec<T>::size();
  row_blocks(b, [&](int64_t j0, int64_t nb) {
    const T* h[kPanelRows];
    T* o = out + j0 * ldo;
    for (int64_t k0 = 0; k0 < K; k0 += kSumChunk) {  // see kSumChunk
      const int64_t kc = std::min(kSumChunk, K - k0);
      for (int64_t j = 0; j < nb; ++j) h[j] = hs.row(j0 + j) + k0;
      with_rows<kPanelRows>(nb, [&](auto rows) {
        constexpr int MR = decltype(rows)::value;
        if constexpr (MR == 1) panel_row<T>(Wp + k0 * panel, kc, h[0], o, n, accumulate || k0 > 0);
        else panel_block<T, MR>(Wp + k0 * panel, kc, h, o, ldo, n, accumulate || k0 > 0);
      });
    }
  });
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
  constexpr int64_t V = Vec<T>::size(), panel = 2 * V;
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
  constexpr int64_t V = Vec<T>::size(), panel = 2 * V;
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
  pack_panel_scalar(W, ldw, n, K, dst, 2 * Vec<T>::size());
}
#endif

template <typename T>
KernelTable<T> make_table() {
  KernelTable<T> t{};
  t.fwd[kLSTM] = lstm_fwd<T>;
  t.fwd[kGRU] = gru_fwd<T>;
  t.fwd[kRNNTanh] = rnn_fwd<T, false>;
  t.fwd[kRNNRelu] = rnn_fwd<T, true>;
  t.bwd[kLSTM] = lstm_bwd<T>;
  t.bwd[kGRU] = gru_bwd<T>;
  t.bwd[kRNNTanh] = rnn_bwd<T, false>;
  t.bwd[kRNNRelu] = rnn_bwd<T, true>;
  t.matvec = matvec<T>;
  t.vecmat = vecmat<T>;
  t.panel = 2 * Vec<T>::size();
  t.panel_gemm = panel_gemm<T>;
  t.pack_panel = pack_panel<T>;
  return t;
}

}  // namespace

const KernelTable<float>* kernels_float() {
  static const KernelTable<float> t = make_table<float>();
  return &t;
}
const KernelTable<double>* kernels_double() {
  static const KernelTable<double> t = make_table<double>();
  return &t;
}

}  // namespace fusedrnn::cpu::CPU_CAPABILITY
