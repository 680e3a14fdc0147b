// Vectorised gate passes and (kernels_products.h) small-batch matrix-vector kernels. Included by
// kernels_default.cpp, kernels_avx2.cpp and kernels_avx512.cpp, which define CPU_CAPABILITY (and set the target)
// first; everything lands in fusedrnn::cpu::CPU_CAPABILITY so the builds never share a symbol.
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
#include <array>
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

// x86 min / max of float vectors returning b where either operand is NaN (the instructions' own rule), so a
// clamp written min(hi, max(lo, x)) passes a NaN x through. at::vec::minimum / maximum propagate NaN from either
// operand at the cost of three more instructions each, about a tenth of an exp.
#if defined(CPU_CAPABILITY_AVX512)
inline Vec<float> min_nan_b(const Vec<float>& a, const Vec<float>& b) { return _mm512_min_ps(a, b); }
inline Vec<float> max_nan_b(const Vec<float>& a, const Vec<float>& b) { return _mm512_max_ps(a, b); }
#elif defined(CPU_CAPABILITY_AVX2)
inline Vec<float> min_nan_b(const Vec<float>& a, const Vec<float>& b) { return _mm256_min_ps(a, b); }
inline Vec<float> max_nan_b(const Vec<float>& a, const Vec<float>& b) { return _mm256_max_ps(a, b); }
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// e^r - 1 for |r| <= ln2 / 2 as r + r^2 P(r), P of degree 5 fitted (for these kernels) to the relative error of
// e^r - 1, 2.2e-9 with the float coefficients (a 27th of float's half ulp); e^r's relative error is 6e-10. (A fit
// to e^r's relative error alone, as before, leaves e^r - 1 a full ulp off near r = 0.06: tanh measured 2.4 ulp with
// it; degree 4 fitted this way is 1.7e-8.)
inline Vec<float> expm1_reduced(const Vec<float>& r) {
  Vec<float> p(1.9845877250e-04f);
  p = at::vec::fmadd(p, r, Vec<float>(1.3940617209e-03f));
  p = at::vec::fmadd(p, r, Vec<float>(8.3333896473e-03f));
  p = at::vec::fmadd(p, r, Vec<float>(4.1666362435e-02f));
  p = at::vec::fmadd(p, r, Vec<float>(1.6666665673e-01f));
  p = at::vec::fmadd(p, r, Vec<float>(0.5f));
  return at::vec::fmadd(p, r * r, r);
}

// n = round(x log2 e) and r = x - n ln2 (ln2 in two parts, |r| <= ln2 / 2), so e^x = 2^n e^r.
inline std::pair<Vec<float>, Vec<float>> exp_reduce(const Vec<float>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const Vec<float> n =
      _mm512_roundscale_ps(x * Vec<float>(1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const Vec<float> n = _mm256_round_ps(x * Vec<float>(1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
  Vec<float> r = at::vec::fmadd(n, Vec<float>(-0.693359375f), x);  // ln2 = 0.693359375 - 2.12194440e-4 (+ ~1e-11)
  r = at::vec::fmadd(n, Vec<float>(2.12194440054690583e-4f), r);
  return {n, r};
}
#endif

// e^x for float vectors, inline: e^x = 2^n (1 + expm1_reduced(r)), times 2^n (AVX-512: scalef; AVX2: two exact
// power-of-two products, so 2^n never leaves the normal range). x is clamped to [-104, 89] first, beyond which e^x
// rounds to 0 or overflows to inf; NaN stays NaN (min_nan_b). Within 1.0 ulp of e^x against double (steps of 3e-6
// over [-87, 88]; 1.23 with the fit before). ATen's exp (SLEEF, 1 ulp) is an out-of-line call around which the gate
// passes spill their live vectors; its exp_u20 is inline but less accurate (the sigmoid below measured 6.0 ulp with
// it near x = -87, 2.5 with this). Other builds and types: ATen's.
template <typename T>
inline Vec<T> exp_fast(const Vec<T>& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const auto [n, r] = exp_reduce(min_nan_b(Vec<T>(89.f), max_nan_b(Vec<T>(-104.f), x)));
    const Vec<T> y = expm1_reduced(r) + Vec<T>(1.f);
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

// tanh. float (AVX2 / AVX-512): tanh |x| = m / (m + 2) with m = e^(2|x|) - 1 = 2^n (e^r - 1) + (2^n - 1)
// (exp_reduce, expm1_reduced: no cancellation near 0, where m is 2|x| to a few ulp), |x| clamped to 10 (beyond,
// tanh rounds to 1; m stays finite), the sign of x put back. Within 1.62 ulp against double under AVX-512, 1.96
// under AVX2 (every float in [0, 0.6], steps of 1e-6 up to 12; benchmarks/gate_micro.py); NaN stays NaN, -0 stays
// -0, +-inf gives +-1. One exp-like polynomial and one division (AVX2) or its reciprocal form (AVX-512): the form
// before (1 - 2 / (e^(2|x|) + 1), below |x| 0.5 a Taylor polynomial through x^17, blended; 1.6
// ulp) evaluated both branches. LSTM gate pass, one core, 16 rows x H 256 from L1 (AVX-512, ns per vector of
// units, best of 20 interleaved runs): 28.4 before, 23.5 with four vectors of units at a time (kGateVecs), 18.0
// with this tanh as well; with the NaN-passing clamps of exp_fast too 14.3 (16.3-17 with the correction of m + 2).
// ATen's tanh (SLEEF, 1 ulp) costs about 55 cycles per AVX2 vector. double keeps ATen's.
template <typename T>
inline Vec<T> tanh_(const Vec<T>& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const Vec<T> ax = x.abs();
    const Vec<T> z = min_nan_b(Vec<T>(20.f), ax + ax);
    const auto [n, r] = exp_reduce(z);
    const Vec<T> q = expm1_reduced(r);
#if defined(CPU_CAPABILITY_AVX512)
    const Vec<T> s = _mm512_scalef_ps(Vec<T>(1.f), n);  // 2^n, n in [0, 29]
    const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x80000000));
#else
    const Vec<T> s = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                                            _mm256_set1_epi32(127)), 23));
    const __m256i sign = _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x80000000));
#endif
    const Vec<T> m = at::vec::fmadd(s, q, s - Vec<T>(1.f));
    // t = m / (m + 2), corrected for the rounding of d = m + 2: e = m + 2 - d exactly (the larger operand first),
    // which alone was an ulp of t near the top of a binade (2.4 ulp in all without it).
    const Vec<T> d = m + Vec<T>(2.f);
    const Vec<T> e = (max_nan_b(m, Vec<T>(2.f)) - d) + min_nan_b(m, Vec<T>(2.f));
#if defined(CPU_CAPABILITY_AVX512)
    // AVX-512: the quotient from the 14-bit reciprocal estimate y0 of d, q0 = m y0, corrected once by the remainder
    // of the exact divisor d + e, rem = m - q0 d - q0 e (each step one FMA), t = q0 + rem y0: about 2^-28 relative
    // before the last rounding, where the division's quotient and a separate correction t e / d rounded twice
    // (1.96 ulp in all). As fast (gate_micro, ns a vector of units, two runs each, division / this: LSTM 25.9-26.3
    // / 25.2-27.1, GRU 17.2-17.3 / 16.6-17.5, RNN 6.5 / 6.1-6.3).
    const __m512 y0 = _mm512_rcp14_ps(d);
    const __m512 q0 = _mm512_mul_ps(m, y0);
    const __m512 rem = _mm512_fnmadd_ps(q0, e, _mm512_fnmadd_ps(q0, d, m));
    const Vec<T> t = _mm512_fmadd_ps(rem, y0, q0);
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), sign));
#else
    // AVX2: the division, then the correction t e / d with d's reciprocal estimate (12 bits are plenty for a term
    // of 2^-24 t). (The reciprocal form above would need two corrections from 12 bits.)
    const Vec<T> t0 = m / d;
    const Vec<T> t = _mm256_fnmadd_ps(t0 * e, _mm256_rcp_ps(d), t0);
    return _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(t), sign));
#endif
  }
#endif
  if constexpr (std::is_same_v<T, float>) {
    // Baseline build: 1 - 2 / (e^(2|x|) + 1) with the sign of x, below |x| 0.5 the Taylor series of tanh through
    // x^17 (truncation below 0.2 ulp); within 2 ulp (glibc's tanhf, ATen's fallback here, measured 2.06).
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
  return x.tanh();
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

// The forward gate passes take U vectors of units at a time, each statement for all U before the next: a vector's
// gates are one long dependency chain (exp, division, the tanh of the new c after all four gates), too long for the
// out-of-order window to reach the next vector's on its own. U = 4 under AVX-512 (its 32 registers hold an LSTM's
// six live vectors a unit block four times over), else 2 (16 registers). Measured on one core, an LSTM step of 16
// rows x H 256 from L1 (AVX-512, ns a vector of units, best of 20 interleaved runs; with an earlier form of the
// tanh above): one at a time 24.1, two 22.4, four 18.7 (with the tanh before it two 26.9, four 23.5); the final
// figures: `python benchmarks/gate_micro.py` (LSTM 16.8). With two, in the modules (2 threads, forward,
// time one at a time / two): GRU T500 B32 H128 1.030, T100 B16 H256 1.017, LSTM T500 B32 H128 1.021, B16 1.006,
// B64 H512 1.025, RNN T200 1.004. What is left of a row runs two vectors, then one at a time, the last n lanes wide.
// On an AVX2-only CPU (AMD EPYC Zen 1, cpuid family 23), four at a time in the AVX2 build gained nothing
// measurable: the same microbenchmark built with --build avx2, ns a vector of 8 units, two / four, three pairs run
// alternately (the machine's speed drifting by up to 25% between runs): LSTM 104.6 / 117.6, 113.0 / 90.6, 86.7 /
// 89.0; GRU 66.7 / 76.5, 80.2 / 56.6, 57.4 / 56.8; LSTM backward 32.1 / 42.4, 46.5 / 30.3, 32.0 / 31.1.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kGateVecs = 4;
#else
constexpr int kGateVecs = 2;
#endif

// The LSTM cell on U vectors of units: pre(g, u) gives vector u's pre-activations of gate g (biases added), place(u)
// its place {row j, first unit k, valid lanes n}. Each statement runs for all U before the next (see kGateVecs).
// Shared by the gate pass (U vectors along a row) and the product with the cell fused into it (U rows of one
// vector of units; kernels_products.h, lstm_panel_fwd), so both give bitwise the same states.
template <typename T, int U, typename Pre, typename At>
inline void lstm_fwd_core(const FwdArgs<T>& a, const Pre& pre, const At& place) {
  const int64_t H = a.H;
  Vec<T> gi[U], gf[U], gg[U], go[U], cn[U], h[U];
  UNROLL
  for (int u = 0; u < U; ++u) gi[u] = sigmoid(pre(0, u));
  UNROLL
  for (int u = 0; u < U; ++u) gf[u] = sigmoid(pre(1, u));
  UNROLL
  for (int u = 0; u < U; ++u) gg[u] = tanh_(pre(2, u));
  UNROLL
  for (int u = 0; u < U; ++u) go[u] = sigmoid(pre(3, u));
  UNROLL
  for (int u = 0; u < U; ++u) {
    const auto [j, k, n] = place(u);
    cn[u] = at::vec::fmadd(gf[u], ld(a.c + j * a.ld_c + k, n), gi[u] * gg[u]);
  }
  UNROLL
  for (int u = 0; u < U; ++u) h[u] = go[u] * tanh_(cn[u]);
  UNROLL
  for (int u = 0; u < U; ++u) {
    const auto [j, k, n] = place(u);
    st(cn[u], a.c + j * a.ld_c + k, n);
    store_h(a, j, k, h[u], n);
    if (a.res) {
      T* r = a.res + j * a.ld_res;
      st(gi[u], r + k, n);
      st(gf[u], r + H + k, n);
      st(gg[u], r + 2 * H + k, n);
      st(go[u], r + 3 * H + k, n);
      st(cn[u], r + 4 * H + k, n);
    }
  }
}

// Units [k, k + U*V) of row j (the last vector n valid lanes; whole vectors before it).
template <typename T, int U>
inline void lstm_fwd_units(const FwdArgs<T>& a, int64_t j, int64_t k, int64_t n) {
  constexpr int64_t V = Vec<T>::size();
  const T* p = a.pre + j * a.ld_pre;
  auto m = [&](int u) { return u == U - 1 ? n : V; };
  lstm_fwd_core<T, U>(
      a, [&](int g, int u) { return pre_at(a, p, g * a.H + k + u * V, m(u)); },
      [&](int u) { return std::array<int64_t, 3>{j, k + u * V, m(u)}; });
}

template <typename T, typename F>
inline void gate_rows(int64_t j0, int64_t j1, int64_t k0, int64_t k1, const F& units) {
  constexpr int64_t V = Vec<T>::size();
  for (int64_t j = j0; j < j1; ++j) {
    int64_t k = k0;
    for (; k + kGateVecs * V <= k1; k += kGateVecs * V) units(j, k, V, std::integral_constant<int, kGateVecs>{});
    if constexpr (kGateVecs > 2)
      for (; k + 2 * V <= k1; k += 2 * V) units(j, k, V, std::integral_constant<int, 2>{});
    for (; k < k1; k += V) units(j, k, std::min(V, k1 - k), std::integral_constant<int, 1>{});
  }
}

template <typename T>
void lstm_fwd(const FwdArgs<T>& a, int64_t j0, int64_t j1, int64_t k0, int64_t k1) {
  gate_rows<T>(j0, j1, k0, k1, [&](int64_t j, int64_t k, int64_t n, auto u) {
    lstm_fwd_units<T, decltype(u)::value>(a, j, k, n);
  });
}

// tanh' = 1 - y^2 is computed as (1 - y)(1 + y) throughout: 1 - y*y rounds y*y first and, near |y| = 1, loses up
// to 2^-25 / (1 - y^2) of the derivative unless the compiler happens to fuse it into an fma.
//
// Units [k, k + U*V) of row j, U vectors at a time as the forward's (the tanh of c is the long chain; U = 4 under
// AVX-512: 9.3 -> 7.9 ns a vector of units, one core, 16 rows x H 256 from L1; bitwise the same gradients).
template <typename T, int U>
inline void lstm_bwd_units(const BwdArgs<T>& a, int64_t j, int64_t k, int64_t n) {
  constexpr int64_t V = Vec<T>::size();
  const int64_t H = a.H;
  const Vec<T> one(T(1));
  const T* r = a.res + j * a.ld_res;
  const T* cp = a.prev.row(j);
  T* dc = a.dc + j * a.ld_dc;
  T* dg = a.dg + j * a.ld_dg;
  auto m = [&](int u) { return u == U - 1 ? n : V; };
  Vec<T> dh[U], tc[U], dcv[U];
  UNROLL
  for (int u = 0; u < U; ++u) dh[u] = grad_h(a, j, k + u * V, m(u));
  UNROLL
  for (int u = 0; u < U; ++u) tc[u] = tanh_(ld(r + 4 * H + k + u * V, m(u)));
  UNROLL
  for (int u = 0; u < U; ++u) {
    const int64_t ku = k + u * V;
    const Vec<T> go = ld(r + 3 * H + ku, m(u));
    dcv[u] = at::vec::fmadd(dh[u] * go, (one - tc[u]) * (one + tc[u]), ld(dc + ku, m(u)));
    st(dh[u] * tc[u] * go * (one - go), dg + 3 * H + ku, m(u));
  }
  UNROLL
  for (int u = 0; u < U; ++u) {
    const int64_t ku = k + u * V;
    const Vec<T> gi = ld(r + ku, m(u)), gf = ld(r + H + ku, m(u)), gg = ld(r + 2 * H + ku, m(u));
    st(dcv[u] * gf, dc + ku, m(u));
    st(dcv[u] * gg * gi * (one - gi), dg + ku, m(u));
    st(dcv[u] * ld(cp + ku, m(u)) * gf * (one - gf), dg + H + ku, m(u));
    st(dcv[u] * gi * ((one - gg) * (one + gg)), dg + 2 * H + ku, m(u));
  }
}

template <typename T>
void lstm_bwd(const BwdArgs<T>& a, int64_t j0, int64_t j1, int64_t k0, int64_t k1) {
  gate_rows<T>(j0, j1, k0, k1, [&](int64_t j, int64_t k, int64_t n, auto u) {
    lstm_bwd_units<T, decltype(u)::value>(a, j, k, n);
  });
}

template <typename T, int U>
inline void gru_fwd_units(const FwdArgs<T>& a, int64_t j, int64_t k, int64_t n) {
  constexpr int64_t V = Vec<T>::size();
  const int64_t H = a.H;
  const T* p = a.pre + j * a.ld_pre;
  const T* hg = a.hg + j * a.ld_hg;
  const T* hp = a.hprev.row(j);
  T* res = a.res ? a.res + j * a.ld_res : nullptr;
  Vec<T> r[U], z[U], hn[U], nn[U];
  auto m = [&](int u) { return u == U - 1 ? n : V; };
  UNROLL
  for (int u = 0; u < U; ++u) r[u] = sigmoid(pre_at(a, p, k + u * V, m(u)) + ld(hg + k + u * V, m(u)));
  UNROLL
  for (int u = 0; u < U; ++u) z[u] = sigmoid(pre_at(a, p, H + k + u * V, m(u)) + ld(hg + H + k + u * V, m(u)));
  UNROLL
  for (int u = 0; u < U; ++u) {
    hn[u] = ld(hg + 2 * H + k + u * V, m(u));
    if (a.b_hn) hn[u] = hn[u] + ld(a.b_hn + k + u * V, m(u));
  }
  UNROLL
  for (int u = 0; u < U; ++u) nn[u] = tanh_(at::vec::fmadd(r[u], hn[u], pre_at(a, p, 2 * H + k + u * V, m(u))));
  UNROLL
  for (int u = 0; u < U; ++u) {
    const int64_t ku = k + u * V;
    store_h(a, j, ku, at::vec::fmadd(z[u], ld(hp + ku, m(u)) - nn[u], nn[u]), m(u));
    if (res) {
      st(r[u], res + ku, m(u));
      st(z[u], res + H + ku, m(u));
      st(nn[u], res + 2 * H + ku, m(u));
      st(hn[u], res + 3 * H + ku, m(u));
    }
  }
}

template <typename T>
void gru_fwd(const FwdArgs<T>& a, int64_t j0, int64_t j1, int64_t k0, int64_t k1) {
  gate_rows<T>(j0, j1, k0, k1, [&](int64_t j, int64_t k, int64_t n, auto u) {
    gru_fwd_units<T, decltype(u)::value>(a, j, k, n);
  });
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

template <typename T, bool kRelu, int U>
inline void rnn_fwd_units(const FwdArgs<T>& a, int64_t j, int64_t k, int64_t n) {
  constexpr int64_t V = Vec<T>::size();
  const T* p = a.pre + j * a.ld_pre;
  Vec<T> x[U];
  auto m = [&](int u) { return u == U - 1 ? n : V; };
  UNROLL
  for (int u = 0; u < U; ++u) x[u] = pre_at(a, p, k + u * V, m(u));
  UNROLL
  for (int u = 0; u < U; ++u) x[u] = kRelu ? at::vec::clamp_min(x[u], Vec<T>(T(0))) : tanh_(x[u]);
  UNROLL
  for (int u = 0; u < U; ++u) store_h(a, j, k + u * V, x[u], m(u));
}

template <typename T, bool kRelu>
void rnn_fwd(const FwdArgs<T>& a, int64_t j0, int64_t j1, int64_t k0, int64_t k1) {
  gate_rows<T>(j0, j1, k0, k1, [&](int64_t j, int64_t k, int64_t n, auto u) {
    rnn_fwd_units<T, kRelu, decltype(u)::value>(a, j, k, n);
  });
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

// KernelTable::read_sum: whole blocks of U vectors a step into U accumulators, the tail one element at a time.
template <typename T>
T read_sum(const T* p, int64_t n, int64_t reps) {
  constexpr int64_t V = Vec<T>::size(), U = 8;
  const int64_t nb = n / (U * V) * (U * V);
  Vec<T> acc[U];
  UNROLL
  for (int64_t u = 0; u < U; ++u) acc[u] = Vec<T>(T(0));
  T tail = T(0);
  for (int64_t r = 0; r < reps; ++r) {
    for (int64_t i = 0; i < nb; i += U * V) {
      UNROLL
      for (int64_t u = 0; u < U; ++u) acc[u] = acc[u] + Vec<T>::loadu(p + i + u * V);
    }
    for (int64_t i = nb; i < n; ++i) tail += p[i];
  }
  Vec<T> s = acc[0];
  UNROLL
  for (int64_t u = 1; u < U; ++u) s = s + acc[u];
  alignas(64) T lanes[V];
  s.store(lanes);
  for (int64_t v = 0; v < V; ++v) tail += lanes[v];
  return tail;
}

}  // namespace
}  // namespace fusedrnn::cpu::CPU_CAPABILITY

#include "kernels_products.h"

namespace fusedrnn::cpu::CPU_CAPABILITY {
namespace {

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
  t.matvec_short = matvec<T, true>;
  t.vecmat = vecmat<T>;
  t.vec = Vec<T>::size();
  t.panel_vecs = kPanelVecs;
  t.panel_gemm = panel_gemm<T>;
  t.lstm_panel_fwd = lstm_panel_fwd<T>;
  t.fused_rows = kFusedRows;
  t.pack_panel = pack_panel<T>;
  t.read_sum = read_sum<T>;
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
