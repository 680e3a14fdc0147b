// Microbenchmark of the cpu backend's gate passes and gate functions, one core, data in L1 (benchmarks/gate_micro.py
// builds and runs it). Compiled with -DGATE_AVX512 or -DGATE_AVX2 and that build's flags; includes the kernels as
// the module does, so it times exactly their code. Prints ns per vector of hidden units (best of interleaved
// repeats) for each forward gate pass (inference and training) and the LSTM backward's, then the worst error in ulp
// of exp, sigmoid and tanh against double over dense sweeps.
#include "kernels.h"
#if defined(GATE_AVX512)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#else
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#include "kernels_impl.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

using namespace fusedrnn::cpu;
using namespace fusedrnn::cpu::CPU_CAPABILITY;

int main(int argc, char** argv) {
  const int64_t B = 16, H = argc > 1 ? std::atol(argv[1]) : 256;
  constexpr int64_t V = Vec<float>::size();
  std::mt19937 gen(0);
  std::normal_distribution<float> nd(0.f, 2.f);
  auto filled = [&](int64_t n, float scale) {
    std::vector<float> v(n);
    for (auto& e : v) e = nd(gen) * scale;
    return v;
  };
  std::vector<float> pre = filled(B * 4 * H, 1.f), bias = filled(4 * H, 0.1f), hg = filled(B * 3 * H, 1.f),
                     hp = filled(B * H, 0.3f), c(B * H, 0.5f), out(B * H), res(B * 5 * H);
  const KernelTable<float>& K = *kernels_float();
  auto fwd_args = [&](bool train) {
    FwdArgs<float> a;
    a.H = H;
    a.pre = pre.data(); a.ld_pre = 4 * H;
    a.bias = bias.data();
    a.hg = hg.data(); a.ld_hg = 3 * H;
    a.hprev = RowSrc<float>{hp.data(), H, B, nullptr, 0};
    a.c = c.data(); a.ld_c = H;
    a.out = out.data(); a.ld_out = H;
    if (train) { a.res = res.data(); a.ld_res = 5 * H; }
    return a;
  };
  std::vector<float> bres(B * 5 * H), bcp(B * H), bdh(B * H), bdc(B * H), bdg(B * 4 * H);
  for (auto* v : {&bres, &bcp, &bdh})
    for (auto& e : *v) e = std::uniform_real_distribution<float>(0.f, 1.f)(gen);
  BwdArgs<float> ba;
  ba.H = H;
  ba.dh = bdh.data(); ba.ld_dh = H;
  ba.res = bres.data(); ba.ld_res = 5 * H;
  ba.prev = RowSrc<float>{bcp.data(), H, B, nullptr, 0};
  ba.dc = bdc.data(); ba.ld_dc = H;
  ba.dg = bdg.data(); ba.ld_dg = 4 * H;

  const FwdArgs<float> inf = fwd_args(false), tr = fwd_args(true);
  std::vector<std::pair<std::string, std::function<void()>>> cases;
  const char* names[] = {"lstm", "gru", "rnn_tanh"};
  for (int m = 0; m < 3; ++m) {
    cases.push_back({std::string(names[m]) + " fwd", [&, m] { K.fwd[m](inf, 0, B, 0, H); }});
    cases.push_back({std::string(names[m]) + " fwd train", [&, m] { K.fwd[m](tr, 0, B, 0, H); }});
  }
  cases.push_back({"lstm bwd", [&] { K.bwd[kLSTM](ba, 0, B, 0, H); }});
  std::vector<double> best(cases.size(), 1e9);
  for (int round = 0; round < 20; ++round) {
    for (size_t i = 0; i < cases.size(); ++i) {
      std::fill(c.begin(), c.end(), 0.5f);
      std::fill(bdc.begin(), bdc.end(), 0.1f);
      const auto t0 = std::chrono::steady_clock::now();
      for (int it = 0; it < 200; ++it) cases[i].second();
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 200;
      best[i] = std::min(best[i], dt);
    }
  }
  std::printf("gate passes, %s build, %ld rows x H %ld (ns a vector of %ld units, best of 20 interleaved rounds)\n",
#if defined(GATE_AVX512)
              "AVX-512",
#else
              "AVX2",
#endif
              static_cast<long>(B), static_cast<long>(H), static_cast<long>(V));
  for (size_t i = 0; i < cases.size(); ++i)
    std::printf("  %-16s %6.2f\n", cases[i].first.c_str(), best[i] * 1e9 / (B * H / V));

  // Worst error in ulp (the spacing above the correctly rounded float), every float in [0, 0.6] for tanh and
  // steps of 1e-6 (relative to 1 near 0) elsewhere.
  auto worst = [&](const char* name, auto fn, auto ref, float lo, float hi) {
    double w = 0;
    float wx = 0;
    float xs[V], ys[V];
    for (float x = lo; x < hi;) {
      int n = 0;
      for (; n < V && x < hi; ++n) {
        xs[n] = x;
        x = (x >= 0.f && x < 0.6f) ? std::nextafter(x, 1.f) : x + std::max(1e-6f, std::fabs(x) * 1e-7f);
      }
      for (int i = n; i < V; ++i) xs[i] = xs[0];
      fn(Vec<float>::loadu(xs)).store(ys);
      for (int i = 0; i < n; ++i) {
        const double r = ref(static_cast<double>(xs[i]));
        const float rf = static_cast<float>(r);
        if (!std::isfinite(rf) || std::fabs(r) < 1.2e-38) continue;
        const double e = std::fabs(ys[i] - r) / (std::nextafter(std::fabs(rf), INFINITY) - std::fabs(rf));
        if (e > w) { w = e; wx = xs[i]; }
      }
    }
    std::printf("  %-8s %.2f ulp (at %.7g)\n", name, w, wx);
  };
  std::printf("worst error against double\n");
  worst("exp", [](Vec<float> v) { return exp_fast(v); }, [](double x) { return std::exp(x); }, -87.f, 88.f);
  worst("sigmoid", [](Vec<float> v) { return sigmoid(v); }, [](double x) { return 1 / (1 + std::exp(-x)); }, -87.f,
        30.f);
  worst("tanh", [](Vec<float> v) { return tanh_(v); }, [](double x) { return std::tanh(x); }, -12.f, 12.f);
  return 0;
}
