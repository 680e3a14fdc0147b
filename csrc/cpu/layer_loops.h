// Shared pieces of the CPU layer driver: forward (layer.cpp) and backward (layer_backward.cpp). Internal.
//
// One RNN layer over the whole sequence on the CPU, both directions, forward and backward (docs/design.md).
//
// Dimension letters: T steps, B batch, N = sum(batch_sizes) packed rows, b rows alive at one step, I input size,
// H hidden size, P size of h (proj_size or H), G gates, D directions, R reserve row width, S thread slices.
//
// Forward: per direction, the input projections (training: of all steps, one GEMM into the reserve; inference:
// one GEMM per time chunk of ~4 MiB, see chunk_rows()), then a time loop. Large problems do one BLAS GEMM per
// step into preallocated buffers and one fused gate pass (rows split over threads). Small ones (see
// small_batch()) run a persistent loop: each thread owns a slice of hidden units (all gates of them), repacks its
// slice of W_hh once per call into k-major panels (kept in its own cache), computes its part of the recurrent
// product with a register-blocked kernel (KernelTable::panel_gemm) and its gates locally, and meets the other
// threads once per step (twice with a projection); or, with enough rows (batch_blocks()), each thread runs a
// block of the batch alone. The backward's loop does the same with column strips of W_hh.
// Backward runs the time loop once (fused gate gradients, the recurrent product dG W_hh per step) and computes
// the weight gradients as large GEMMs per time chunk (dW_ih = dG^T x, dW_hh = dG^T H_prev, H_prev gathered).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/Version.h>
#include <dlfcn.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <type_traits>

#include "../common.h"
#include "layer.h"
#include "machine.h"

namespace fusedrnn::cpu::loops {

using at::Tensor;

// ---- kernel table choice ----------------------------------------------------------------------------------------

inline std::atomic<int> g_forced{-1};  // -1: by CPU capability, else a Capability

// What at::get_cpu_capability() allows (it honours ATEN_CPU_CAPABILITY, so one variable lowers both torch's and
// fusedrnn's kernels) among the builds compiled in.
inline Capability cpu_best() {
  static const Capability best = [] {
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512" && AVX512::kernels_float() != nullptr) return kCapAVX512;
    if ((cap == "AVX2" || cap == "AVX512") && AVX2::kernels_float() != nullptr) return kCapAVX2;
    return kCapDefault;
  }();
  return best;
}

inline Capability current() {
  const int f = g_forced.load();
  return f < 0 ? cpu_best() : static_cast<Capability>(f);
}

template <typename T>
const KernelTable<T>* table_of(Capability c) {
  if constexpr (std::is_same_v<T, float>) {
    return c == kCapAVX512 ? AVX512::kernels_float() : c == kCapAVX2 ? AVX2::kernels_float()
                                                                     : DEFAULT::kernels_float();
  } else {
    return c == kCapAVX512 ? AVX512::kernels_double() : c == kCapAVX2 ? AVX2::kernels_double()
                                                                      : DEFAULT::kernels_double();
  }
}

template <typename T>
const KernelTable<T>& table() {
  return *table_of<T>(current());
}

// ---- helpers ----------------------------------------------------------------------------------------------------

// The BLAS that ATen itself uses, found at run time (MKL builds of torch export the Fortran sgemm_/dgemm_).
// Calling it with raw pointers keeps the time loops free of tensor allocation and dispatcher overhead; where
// the symbols are absent the fallback wraps the pointers in tensors and calls at::addmm_out.
using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                          const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                          const double*, const int*, const double*, const int*, const double*, double*, const int*);

template <typename T>
void* blas_symbol() {
  static void* const fn = dlsym(RTLD_DEFAULT, std::is_same_v<T, float> ? "sgemm_" : "dgemm_");
  return fn;
}

// oneDNN's float32 matmul, as ATen links it (at::native::mkldnn_matmul: result = beta result + a b; no header of
// it ships with torch, so it is found at run time by its mangled name, torch 2.x's signature). Used for the
// forward's input projections (layer.cpp, input_projection) where FUSEDRNN_CPU_GEMM says so: by
// default on AMD CPUs, where MKL's sgemm runs well below oneDNN's (AMD EPYC Zen 4, 2 threads, GFLOP/s, MKL /
// oneDNN: 1600 x 256 x 1024 ~140 / ~165, 1600 x 512 x 2048 ~120 / ~200). On Intel CPUs MKL stays.
using dnnl_matmul_fn = void (*)(const Tensor&, const Tensor&, const Tensor&, float, float);

inline std::atomic<bool> g_dnnl_failed{false};  // it refused once (a CPU below its ISA): BLAS from then on

inline dnnl_matmul_fn onednn_matmul() {
  static const auto fn =
      reinterpret_cast<dnnl_matmul_fn>(dlsym(RTLD_DEFAULT, "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff"));
  if (!fn || g_dnnl_failed.load(std::memory_order_relaxed)) return nullptr;
  bool on = cpu_is_amd() && at::get_cpu_capability() == std::string("AVX512");  // it needs AVX-512 BW/VL/DQ
  if (const char* e = std::getenv("FUSEDRNN_CPU_GEMM")) {
    if (std::strcmp(e, "onednn") == 0) on = true;
    else if (std::strcmp(e, "blas") == 0) on = false;
  }
  return on ? fn : nullptr;
}

// oneDNN reads its operands in place when they are contiguous or the transpose of a contiguous matrix (else
// mkldnn_matmul copies them first, and BLAS, which takes any row stride, stays the faster).
inline bool onednn_operand(const Tensor& t) {
  return t.is_contiguous() || (t.stride(0) == 1 && t.stride(1) == t.size(0));
}

// out = a b (beta 0) or out += a b (beta 1): float32 on oneDNN where onednn_matmul() is on and it reads the
// operands in place, else ATen's (BLAS). The forward's input projections and (bwd_onednn) the backward's GEMMs.
inline void dense_mm(Tensor out, const Tensor& a, const Tensor& b, float beta = 0.f) {
  if (out.scalar_type() == at::kFloat && a.numel() > 0 && b.numel() > 0 && onednn_operand(a) &&
      onednn_operand(b) && out.stride(1) == 1) {
    if (const dnnl_matmul_fn fn = onednn_matmul()) {
      try {
        return fn(a, b, out, beta, 1.f);
      } catch (const c10::Error&) {
        g_dnnl_failed.store(true);
      }
    }
  }
  if (beta == 0.f) at::mm_out(out, a, b);
  else out.addmm_(a, b);
}

// Whether gemm() (the GEMM-per-step loops' products, batches above kPersistentMaxBatch) runs float32 on oneDNN's
// matmul: where onednn_matmul() is on (AMD CPUs with AVX-512, where MKL's sgemm takes its AVX2 path) and the
// operands are matrices it reads in place. Time oneDNN / BLAS on an EPYC Zen 5, 2 threads, H512 B128 T100: forward
// LSTM 0.64, GRU 0.59, RNN 0.70 (B256 T50 LSTM 0.64); forward+backward LSTM 0.73, GRU 0.93, RNN 0.82 (LSTM H256
// 0.78). Peak forward+backward memory at most 0.25 MiB more (RNN B128 H512 T20: 14.26 against 14.01, torch.nn's
// 17.25). FUSEDRNN_CPU_GEMM_STEP=onednn|blas overrides.
inline bool step_onednn() {
  if (const char* e = std::getenv("FUSEDRNN_CPU_GEMM_STEP")) {
    if (std::strcmp(e, "onednn") == 0) return true;  // dense_mm still needs onednn_matmul() (else ATen's mm)
    if (std::strcmp(e, "blas") == 0) return false;
  }
  return onednn_matmul() != nullptr;
}

// Row-major C[m, n] = op(A)[m, k] op(B)[k, n] + beta * C (beta 0 or 1). Column-major BLAS sees the transposes,
// so the operands swap.
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
          T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, bool t, int64_t rows, int64_t cols, int64_t ld) {
    at::Tensor v = at::from_blob(const_cast<T*>(p), t ? at::IntArrayRef{cols, rows} : at::IntArrayRef{rows, cols},
                                 {ld, 1}, opts);
    return t ? v.t() : v;
  };
  if constexpr (std::is_same_v<T, float>) {
    if (k > 0 && step_onednn()) {
      at::Tensor c = at::from_blob(C, {m, n}, {ldc, 1}, opts);
      const at::Tensor a = view(A, ta, m, k, lda), b = view(B, tb, k, n, ldb);
      if (onednn_operand(a) && onednn_operand(b)) return dense_mm(c, a, b, static_cast<float>(beta));
    }
  }
  if (void* sym = blas_symbol<T>(); sym && std::max({m, n, k, lda, ldb, ldc}) < (int64_t(1) << 31)) {
    const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
    const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
    const T one(1);
    if constexpr (std::is_same_v<T, float>)
      reinterpret_cast<sgemm_fn>(sym)(&tB, &tA, &in, &im, &ik, &one, B, &ildb, A, &ilda, &beta, C, &ildc);
    else
      reinterpret_cast<dgemm_fn>(sym)(&tB, &tA, &in, &im, &ik, &one, B, &ildb, A, &ilda, &beta, C, &ildc);
    return;
  }
  at::Tensor c = at::from_blob(C, {m, n}, {ldc, 1}, opts);
  const at::Tensor a = view(A, ta, m, k, lda), b = view(B, tb, k, n, ldb);
  if (beta == T(0)) at::mm_out(c, a, b);
  else c.addmm_(a, b);
}

// A sense-reversing spin barrier for the threads of one at::parallel_for. Each caller arrives with the number
// of slices it runs, so it stays correct however the runtime maps slices to threads. Spinning yields after a
// while so a loaded machine does not starve the thread being waited for.
class SpinBarrier {
 public:
  explicit SpinBarrier(int64_t total) : total_(total) {}
  void wait(int64_t weight) {
    if (weight == total_) return;
    const int64_t gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(weight, std::memory_order_acq_rel) + weight == total_) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; gen_.load(std::memory_order_acquire) == gen; ++spins) {
      if (spins > 2000) std::this_thread::yield();
#if defined(__x86_64__) || defined(__i386__)
      else __builtin_ia32_pause();
#endif
    }
  }

 private:
  const int64_t total_;
  std::atomic<int64_t> count_{0};
  std::atomic<int64_t> gen_{0};
};

// Width of every slice but the last when n columns are cut into S slices aligned to 8 (a whole vector for float
// and double).
inline int64_t slice_chunk(int64_t n, int64_t S) { return ((n + S - 1) / S + 7) / 8 * 8; }

// [lo, hi) of slice s.
inline std::pair<int64_t, int64_t> slice_range(int64_t n, int64_t s, int64_t S) {
  const int64_t chunk = slice_chunk(n, S);
  const int64_t lo = std::min(n, s * chunk);
  return {lo, std::min(n, lo + chunk)};
}

// Everything one direction's time loops need, as raw pointers into preallocated tensors.
template <typename T>
struct Dir {
  const Layout* L;
  int64_t d;
  bool reverse;
  const T* w_hh;   // [G*H, P]
  const T* w_hr;   // [P, H] or nullptr
  const T* b_hn;   // GRU [H] or nullptr
  const T* bias;   // [G*H] input-side biases (FwdArgs::bias) or nullptr
  const T* hx;     // [B, P]
  const T* cx;     // [B, H] (LSTM)
  T* y;            // [N, D*P]
  int64_t ldy;
  T* res;          // [N, R] of this direction, or nullptr
  // The packed row that y and res point at: 0, or the first row of the window of them a half-precision backward
  // converts for one chunk (backward_typed).
  int64_t base = 0;
  // The batch rows this loop runs: j0 .. j0 + nrows - 1 (all of them, or one thread's block when the batch is
  // split across threads; see batch_blocks()). Row j of a step is packed row offs[t] + j (sorted sequences).
  int64_t j0 = 0, nrows = 0;
  int64_t GH() const { return L->G * L->H; }
  // Rows of this block alive at step t, and the packed row of the first.
  int64_t rows(int64_t t) const { return std::clamp<int64_t>(L->bs[t] - j0, 0, nrows); }
  int64_t row0(int64_t t) const { return L->offs[t] + j0; }
  // The same direction restricted to rows [j0 + a, j0 + a + n).
  Dir block(int64_t a, int64_t n) const {
    Dir r = *this;
    r.j0 = j0 + a;
    r.nrows = n;
    return r;
  }
  // Step t of the loop at position s (time order of this direction).
  int64_t step(int64_t s) const { return reverse ? L->T - 1 - s : s; }
  // Step whose state feeds step t, or -1 when every row starts from hx / cx.
  int64_t prev_step(int64_t t) const {
    if (reverse) return t == L->T - 1 ? -1 : t + 1;
    return t == 0 ? -1 : t - 1;
  }
  // h_prev of step t: rows of y at the previous step while their sequence runs, hx for those that start here.
  RowSrc<T> h_prev(int64_t t) const {
    const int64_t p = prev_step(t);
    RowSrc<T> r{nullptr, 0, 0, hx + j0 * L->P, L->P};
    if (p >= 0) r = {y + (row0(p) - base) * ldy + d * L->P, ldy, rows(p), hx + j0 * L->P, L->P};
    return r;
  }
  // c_prev of step t (LSTM backward): c_t of the previous step from the reserve, or cx.
  RowSrc<T> c_prev(int64_t t) const {
    const int64_t p = prev_step(t);
    const T* c0 = cx ? cx + j0 * L->H : nullptr;
    RowSrc<T> r{nullptr, 0, 0, c0, L->H};
    if (p >= 0) r = {res + (row0(p) - base) * L->R + 4 * L->H, L->R, rows(p), c0, L->H};
    return r;
  }
  T* y_row(int64_t t) const { return y + (row0(t) - base) * ldy + d * L->P; }
  T* res_row(int64_t t) const { return res ? res + (row0(t) - base) * L->R : nullptr; }
};

template <typename T>
Dir<T> make_dir(const Layout& L, int64_t d, const std::vector<Tensor>& ws, const std::vector<Tensor>& b_hn,
                const Tensor& bias, const Tensor& hx, const Tensor& cx, Tensor& y, Tensor& reserve) {
  Dir<T> r;
  r.L = &L;
  r.d = d;
  r.reverse = d == 1;
  r.w_hh = L.w_hh(ws, d).data_ptr<T>();
  r.w_hr = L.proj ? L.w_hr(ws, d).data_ptr<T>() : nullptr;
  r.b_hn = b_hn.empty() ? nullptr : b_hn[d].data_ptr<T>() + 2 * L.H;  // b_hn: each direction's whole b_hh
  r.bias = bias.defined() ? bias.data_ptr<T>() + d * L.G * L.H : nullptr;
  // (pointer arithmetic, not hx[d]: each select is a dispatcher op, a cell step's fixed cost)
  r.hx = hx.data_ptr<T>() + d * L.B * L.P;
  r.cx = L.mode == kLSTM ? cx.data_ptr<T>() + d * L.B * L.H : nullptr;
  r.y = y.data_ptr<T>();
  r.ldy = L.D * L.P;
  r.res = reserve.numel() && L.R ? reserve.data_ptr<T>() + d * L.N * L.R : nullptr;
  r.j0 = 0;
  r.nrows = L.B;
  return r;
}

// Number of thread slices for the small-batch loops: enough columns per thread to amortise a barrier, and one
// slice (no barrier, no thread reading the h another wrote) while a step's product is so small that the barrier
// and the exchange of h cost more than a second thread saves: up to 8 rows with W_hh of at most kOneSliceWeights
// elements (64 KiB in float32). A barrier round trip between two cores took ~230 ns on this Xeon, plus each
// thread's read of the h the other wrote. Measured there (AVX-512, 2 threads, T100, I = H; knob_ab.py, 30 rounds,
// time with one slice / two, forward | forward+backward): LSTM B1 H64 (16 Ki weights) 0.848 | 0.854, GRU B1 H64
// 0.901 | 0.902, RNN B1 H128 0.927 | 0.918, LSTM B4 H64 1.013 and B8 0.970 | 0.987 (within the noise); above
// the bound, where two slices stay: LSTM B1 H96 (36 Ki) 0.993 | 1.010, RNN B1 H192 1.045 forward, GRU B8 H96
// 1.051. FUSEDRNN_CPU_SPLIT=hidden keeps the slices (tests).
constexpr int64_t kOneSliceWeights = 16 * 1024;

inline int64_t small_slices(const Layout& L) {
  if (at::in_parallel_region()) return 1;
  const char* split = std::getenv("FUSEDRNN_CPU_SPLIT");
  const bool forced = split && std::strcmp(split, "hidden") == 0;
  if (!forced && L.B <= kSmallBatch && L.G * L.H * L.P <= kOneSliceWeights) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(loop_threads(), std::min(L.H, L.P) / 32));
}

// The persistent (thread-sliced matrix-vector) loops or the GEMM-per-step loops. Persistent: batches of up to 8,
// and up to 64 while each thread's slice of W_hh fits its private L2 (512 KiB here). Measured with 2 threads on
// an idle machine (time of the GEMM loop / the persistent loop, fwd and fwd+bwd): LSTM T100 B16 H256 1.51 / 0.97,
// LSTM T500 B32 H128 1.02 / 0.96, GRU T100 B16 H256 1.40 / 1.02, RNN T200 B16 H256 1.20 / 0.96; under heavy load
// the per-step BLAS calls (an OpenMP fork/join each) degrade far more (2.3-15x). FUSEDRNN_CPU_LOOP=persistent|gemm
// overrides (tests and benchmarks use it to run both loops on the same shapes).
constexpr int64_t kPersistentMaxBatch = 64;
constexpr int64_t kPersistentMaxSliceBytes = 512 * 1024;

// The forward's persistent loop multiplies by packed panels that every row block of the batch reuses from L1, so
// the weights stream once per step whatever their size; it beats a GEMM call per step up to batch 64 (LSTM T100
// B64 H512, 2 threads: 1.0x torch.nn against 0.8-0.9x with the per-step GEMM). The backward's vector-matrix
// kernel reads the gate gradients of the whole batch per column strip and only wins while W_hh's slice stays in L2.
inline bool small_batch(const Layout& L, bool forward) {
  if (L.T == 0) return false;
  if (const char* e = std::getenv("FUSEDRNN_CPU_LOOP")) {
    if (std::strcmp(e, "persistent") == 0) return true;
    if (std::strcmp(e, "gemm") == 0) return false;
  }
  if (L.B <= kSmallBatch) return true;
  if (L.B > kPersistentMaxBatch) return false;
  if (forward) return true;
  const int64_t slice_bytes = L.G * L.H * L.P * static_cast<int64_t>(sizeof(float)) / small_slices(L);
  return slice_bytes <= kPersistentMaxSliceBytes;
}

// Bidirectional layers on 2 or 3 threads: each direction runs whole on a thread of its own (its persistent loop
// with one slice), so no step waits at a barrier and no thread reads the h another wrote; the other direction's
// work is the same size, so neither waits long at the end. Each thread then streams all of its direction's W_hh
// every step, which pays while that fits the thread's L2 cache. More threads: the directions one after the
// other, each over all threads. FUSEDRNN_CPU_DIRS=parallel|serial overrides (tests run both).
inline bool directions_in_parallel(const Layout& L, bool small, size_t elem_bytes) {
  if (L.D != 2 || !small || L.T == 0 || at::in_parallel_region()) return false;
  if (const char* e = std::getenv("FUSEDRNN_CPU_DIRS")) {
    if (std::strcmp(e, "parallel") == 0) return true;
    if (std::strcmp(e, "serial") == 0) return false;
  }
  const int64_t threads = loop_threads();
  if (threads < 2 || threads > 3) return false;
  return L.G * L.H * L.P * static_cast<int64_t>(elem_bytes) <= l2_bytes() / 2;
}

// Split batch: the persistent loop's threads take contiguous blocks of batch rows instead of slices of hidden
// units; each runs its rows' whole recurrence alone (no barrier, no h another thread wrote), multiplying by all of
// W_hh. Chosen from 8 rows a thread while W_hh fits a thread's L2 cache. Measured (2 threads, AVX-512, time split /
// time sliced, fwd and fwd+bwd): LSTM T500 B32 H128 0.85 / 0.90, GRU same 0.79 / 0.86, RNN T200 B16 H256 0.82 /
// 0.88, LSTM and GRU T100 B16 H256 0.92-0.95 / 0.90; B8-B12 within 3% either way; B4 1.32 / 1.19 (too few rows to
// block); H512 (W_hh 3-4 MiB, past L2) 1.0-1.1. Lengths that vary: split while W_hh fits half a thread's L2 and a
// thread would hold fewer than 16 rows. Measured with the three-vector panels (kernels_products.h; time split /
// sliced, forward, lengths evenly from T to T/4 as the bench's packed cases, and uniform in [T/10, T] with two
// seeds): LSTM T100 B16 H256 0.919-0.930 / 0.927-0.937 (forward+backward 0.938), GRU same 0.935 / 0.906-0.950,
// LSTM B32 H256 0.975 / 1.011-1.093 (hence under 16 rows a thread), B64 1.026; W_hh past half of L2: LSTM B16 H384
// (2.25 MiB) 1.131, H512 1.313. (With the two-vector panels before them, uniform lengths: LSTM B16 H256 1.04-1.06,
// LSTM T500 B32 H128 0.95.) The blocks are cut so that the most expensive costs least (see block_cost(); sequences
// are sorted longest first, so a block of long sequences has fewer rows). Returns the block boundaries [0, ..., B]:
// one block (no split) unless chosen. FUSEDRNN_CPU_SPLIT=batch|hidden overrides (tests run both).
//
// A block's cost in row-steps: its tokens, plus, at each step where fewer than kStepRows of its rows are alive,
// the rows missing to kStepRows: a step streams all of W_hh from L2 however few rows multiply it, which takes
// about as long as the arithmetic of two rows (1 MiB at ~115 GB/s against 0.5 MFLOP a row at ~140 GFLOP/s). len:
// the sequence length of each row (non-increasing), cum: its prefix sums.
constexpr int64_t kStepRows = 2;

inline int64_t block_cost(const std::vector<int64_t>& len, const std::vector<int64_t>& cum, int64_t j0, int64_t j1) {
  int64_t c = cum[j1] - cum[j0];
  // steps with exactly r of the block's rows alive: len[j0 + r] <= t < len[j0 + r - 1]
  for (int64_t r = 1; r < kStepRows && j0 + r - 1 < j1; ++r)
    c += (kStepRows - r) * (len[j0 + r - 1] - (j0 + r < j1 ? len[j0 + r] : 0));
  return c;
}

inline std::vector<int64_t> batch_blocks(const Layout& L, bool small, size_t elem_bytes) {
  const std::vector<int64_t> whole{0, L.B};
  if (!small || L.T == 0 || at::in_parallel_region()) return whole;
  const int64_t nblk = std::min<int64_t>(loop_threads(), L.B);
  // Lengths that vary (under 90% of B*T tokens): blocks of long sequences spend many steps with few rows, where a
  // step costs the stream of all of W_hh from L2 (a thread slice streams half); split only while W_hh is small
  // and the blocks are too small for the sliced loop's register blocks to pay.
  const bool even = 10 * L.N >= 9 * L.B * L.T;
  const int64_t w_bytes = L.G * L.H * L.P * static_cast<int64_t>(elem_bytes);
  bool split = L.B >= 8 * nblk && (even ? w_bytes <= l2_bytes() : w_bytes <= l2_bytes() / 2 && L.B < 16 * nblk);
  if (const char* e = std::getenv("FUSEDRNN_CPU_SPLIT")) {
    if (std::strcmp(e, "batch") == 0) split = true;
    if (std::strcmp(e, "hidden") == 0) split = false;
  }
  if (!split || nblk < 2) return whole;
  std::vector<int64_t> len(L.B, 0), cum(L.B + 1, 0);  // len[j]: steps with more than j rows
  for (int64_t t = 0; t < L.T; ++t) len[L.bs[t] - 1] += 1;
  for (int64_t j = L.B - 2; j >= 0; --j) len[j] += len[j + 1];
  for (int64_t j = 0; j < L.B; ++j) cum[j + 1] = cum[j] + len[j];
  // Greedy cut under a bound on the cost (the cost only grows as a block takes more rows), every block at least
  // one row; the least bound that leaves no row over, by bisection.
  auto cut = [&](int64_t bound) {
    std::vector<int64_t> out{0};
    for (int64_t k = 1; k < nblk; ++k) {
      const int64_t j0 = out.back();
      int64_t j1 = j0 + 1;
      while (j1 < L.B - (nblk - k) && block_cost(len, cum, j0, j1 + 1) <= bound) ++j1;
      out.push_back(j1);
    }
    out.push_back(L.B);
    return out;
  };
  // Any block holding row 0 costs at least that row alone, and no single row costs more.
  int64_t lo = block_cost(len, cum, 0, 1), hi = block_cost(len, cum, 0, L.B);
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    const std::vector<int64_t> b = cut(mid);
    if (block_cost(len, cum, b[nblk - 1], L.B) <= mid) hi = mid;
    else lo = mid + 1;
  }
  return cut(lo);
}

// Rows of the largest block of batch_blocks().
inline int64_t max_block_rows(const std::vector<int64_t>& blocks) {
  int64_t r = 0;
  for (size_t i = 0; i + 1 < blocks.size(); ++i) r = std::max(r, blocks[i + 1] - blocks[i]);
  return r;
}

// Runs fn(i) for i in [0, n) on the intra-op threads, one task a thread. The tasks call ATen ops, so each worker
// takes the caller's thread-local state first (at::parallel_for does not carry it): without it a worker runs
// them with grad mode on and the autograd keys active, and an out= op on a parameter that requires grad fails.
template <typename F>
void in_threads(int64_t n, const F& fn) {
  const at::ThreadLocalState tls;
  at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
    at::ThreadLocalStateGuard guard(tls);
    for (int64_t i = i0; i < i1; ++i) fn(i);
  });
}

// Runs fn(j0, j1) over rows [0, b), split across threads when the step has enough elements to pay for it.
template <typename F>
void for_rows(int64_t b, int64_t width, const F& fn) {
  constexpr int64_t kMinElems = 16384;
  if (b * width < 2 * kMinElems) return fn(0, b);
  at::parallel_for(0, b, std::max<int64_t>(1, kMinElems / width), fn);
}

// ---- time chunks ------------------------------------------------------------------------------------------------

// The loops run over chunks of consecutive loop positions, whose rows are contiguous in the packed layout. The
// workspaces that grow with the sequence (inference: the input projections; backward: the gate gradients and the
// other operands of the weight-gradient GEMMs) are then chunk-sized, so memory beyond the outputs and the reserve
// stays bounded however long the sequence, and a chunk's workspace is still in cache when its GEMMs run. A chunk
// holds about kChunkRows rows (at least one step): enough for the GEMMs over it to run near their peak.
// The inference forward's chunks are larger, about kInferChunkBytes of input projections (and at least kChunkRows
// rows): fewer BLAS calls and thread forks, and more rows a GEMM. Measured in one process, alternating call by
// call (2 threads, AVX-512, forward, time at 512 rows / time at the larger chunk): LSTM T500 B32 H128 1.057 (2048
// rows), RNN T200 B16 H256 1.055 (2048); LSTM T100 B16 H256 512 / 1024 rows 0.99, LSTM T100 B64 H512 512 / 2048
// 0.985, within the spread; 4x larger again (16 MiB) was slower by 2-6%. The backward keeps kChunkRows (LSTM
// T500 B32 H128 forward+backward 2.2% slower at 2048 rows). FUSEDRNN_CPU_CHUNK_ROWS overrides both (tests use a
// few rows to run many chunks on small shapes).
constexpr int64_t kChunkRows = 512;
constexpr int64_t kInferChunkBytes = int64_t(4) << 20;

// row_bytes: bytes a packed row of the chunk's largest workspace takes (the inference forward: G*H elements), or
// 0 for kChunkRows.
inline int64_t chunk_rows(int64_t row_bytes = 0) {
  if (const char* e = std::getenv("FUSEDRNN_CPU_CHUNK_ROWS")) {
    const long v = std::atol(e);
    if (v > 0) return v;
  }
  return row_bytes > 0 ? std::max(kChunkRows, kInferChunkBytes / row_bytes) : kChunkRows;
}

// Training (the forward's chunked input projections, the backward's workspaces): kChunkRows rows, but for GRU and
// RNN at most a kTrainChunkParts-th of the N packed rows. On short sequences a chunk of kChunkRows was the whole
// sequence, a workspace as large as the saved activations it works on, and the peak memory of forward+backward
// went over torch.nn's (GRU T10 B80 H256 9.63 against 8.67 MiB, RNN T5 B128 H64 0.63 against 0.53: 53 shapes of T
// 5-50, B 1-128, H 64-512 over it, up to 1.18x; none with chunks of at most a quarter). A chunk has a fixed cost,
// though (about 130 us on 2 threads: the loop's and each GEMM's fork and join), so more of them cost the shortest
// calls: forward+backward T100 B1 H256, 25 rows a chunk / 100, 1.14 (LSTM and GRU). LSTM keeps kChunkRows: its
// peak stays far below torch.nn's (no shape of that sweep over it). From H = kMinTrainChunkH no chunk is under
// kMinTrainChunkRows rows: at batch 1-2 a quarter of a short sequence was chunks of a few rows, each paying the
// fixed cost (time with at least 64 rows / without, fwd+bwd: GRU T100 B1 H256 0.94, RNN 0.91). Below that H the
// bound would put the peak over torch.nn's again (13 of 156 shapes of N < 256 rows, all H64, when it held for
// every H); with it only where H >= 256 the sweep (GRU, RNN, T 2-100, B 1-32, H 64/256/512, N < 256) is as before:
// all at or below torch.nn's but T2 B32 H64 (the known short-sequence gap).
constexpr int64_t kTrainChunkParts = 4, kMinTrainChunkRows = 64, kMinTrainChunkH = 256;

inline int64_t train_chunk_rows(const Layout& L) {
  if (const char* e = std::getenv("FUSEDRNN_CPU_CHUNK_ROWS")) {
    const long v = std::atol(e);
    if (v > 0) return v;
  }
  if (L.mode == kLSTM) return kChunkRows;
  const int64_t lo = L.H >= kMinTrainChunkH ? kMinTrainChunkRows : 1;
  return std::clamp<int64_t>((L.N + kTrainChunkParts - 1) / kTrainChunkParts, lo, kChunkRows);
}

struct Chunk {
  int64_t s0, s1;  // loop positions [s0, s1)
  int64_t r0, r1;  // packed rows [r0, r1)
};

// The packed rows [lo, hi) of a half-precision chunk's float32 windows of y and the reserve (Dir::base = lo): its
// own and up to B rows either side, which hold the neighbouring steps (h_prev and c_prev in either direction).
// A window never exceeds the chunk's rows + 2B, nor N.
inline std::pair<int64_t, int64_t> window_rows(const Layout& L, const Chunk& ch) {
  return {std::max<int64_t>(0, ch.r0 - L.B), std::min(L.N, ch.r1 + L.B)};
}

// Chunks of about target rows (chunk_rows()) of the loop positions [0, T) of a direction, in loop order; a short
// tail joins the chunk before it.
inline std::vector<Chunk> time_chunks(const Layout& L, bool reverse, int64_t target) {
  auto rows_of = [&](int64_t s0, int64_t s1) {  // rows of loop positions [s0, s1): steps ta..tb
    const int64_t ta = reverse ? L.T - s1 : s0, tb = reverse ? L.T - 1 - s0 : s1 - 1;
    return std::pair<int64_t, int64_t>{L.offs[ta], L.offs[tb] + L.bs[tb]};
  };
  std::vector<Chunk> out;
  int64_t s0 = 0, rows = 0;
  for (int64_t s = 0; s < L.T; ++s) {
    rows += L.bs[reverse ? L.T - 1 - s : s];
    if (rows >= target || s == L.T - 1) {
      if (!out.empty() && rows < target / 2) s0 = out.back().s0, out.pop_back();
      const auto [r0, r1] = rows_of(s0, s + 1);
      out.push_back({s0, s + 1, r0, r1});
      s0 = s + 1;
      rows = 0;
    }
  }
  return out;
}

// A chunk-sized buffer indexed by packed row: row r at p + (r - r0) * ld.
template <typename T>
struct RowBuf {
  T* p = nullptr;
  int64_t ld = 0, r0 = 0;
  T* row(int64_t r) const { return p + (r - r0) * ld; }
};

// Per-thread packed weight slices of the persistent loops: slice sl of S at p + sl * pstride. Forward: gate g of
// a slice at g * gw * P (gw columns a gate, see pack_slice_gate()); backward: column strips (pack_columns()).
// p == nullptr: not packed, the loops multiply by W_hh as it is (see pack_weights()).
template <typename T>
struct Packed {
  Tensor buf;
  T* p = nullptr;
  int64_t S = 1, gw = 0, pstride = 0;
  int64_t vecs = 2;  // vectors a panel (KernelTable::panel_vecs_for)
  // Forward with a projection: W_hr [P, H] likewise, slice sl (rows [p0, p1) of slice_range(P, sl, S)) at
  // pr + sl * prstride, panels of K = H.
  T* pr = nullptr;
  int64_t prstride = 0;
  // Forward LSTM (fused_lstm()): each slice's W_hh packed in gate-interleaved panels, one a vector of hidden units
  // (KernelTable::lstm_panel_fwd), the group of units [k0 + u*vec, ...) of slice sl at p + sl * pstride + u*4*vec*P.
  bool fused = false;
};

// Whether the persistent loops repack W_hh (forward: rows into k-major panels; backward: columns into strips). The
// packed copy is as large as W_hh and lives through the call; packing reads W_hh from memory once and writes the
// copy (LSTM H256: 0.17-0.3 ms a call, more once W_hh and its copy outgrow L2).
// Forward: at batch 1-2 the unpacked kernel (KernelTable::matvec, whose horizontal sums are a shuffle tree) runs a
// step as fast as the packed one, so packing never pays (2 threads, AVX-512, LSTM fwd, time packed / unpacked:
// H256 B1 T1 1.63, T100 1.05, T400 0.99; B2 T200 1.06; H512 B1 T200 1.04). From batch 3 the register-blocked panels
// win per step by more the shorter K = P is (the sums' share), against a fixed cost: they pay from about 2N >= P
// packed rows (H256 B4: T8 1.10, T32 0.98, T100 0.98; B8 T4 1.09, T16 0.84; B16 T4 1.02, T16 0.78; H128 B4 T16 0.88,
// T128 0.80; B3 T16 1.2, T200 0.94; H512 B64 T1 1.46, T2 1.06, T4 0.95).
// On an AMD Zen 5 (family 0x1A, 2 threads, AVX-512), though, the packed panels win from batch 1 (the matrix-vector
// kernel's 16 row streams of W_hh come from L2 slower than one panel stream): LSTM fwd, time packed / unpacked, H256
// B1 T2 1.15, T8 1.08, T16 1.00, T30 0.87, T100 0.96, T400 0.90; B2 T100 0.86; H512 B1 T8 1.08, T100 0.91; GRU H256
// B1 T8 1.04, T100 0.84; RNN T200 0.84. There the forward packs from kPackMinRowsZen5 packed rows at batch 1-2,
// and LSTM's backward packs its strips from twice that at any batch (fwd+bwd, packed / unpacked backward: H256 B1
// T30 0.99, T100 0.92, T400 0.87, H512 B1 T100 0.91, H256 B2 T100 0.98, B8 T100 0.97).
// Backward: the vector-matrix kernel on W_hh as it is wins at batch 1 (fwd+bwd 4% faster), the packed strips from
// batch 4 by 1-4% (fwd+bwd, LSTM T100 B16 H256 1.2%, GRU same 2.9%, LSTM T500 B32 H128 4.4%, LSTM T100 B64 H512
// 3.4%; with the three-vector panels and the vector-matrix kernel's prefetch, LSTM, time packed / unpacked: T100
// B16 H256 0.974-0.982, 2-layer bidirectional 0.975, T50 B16 1.008, T100 B8 1.0). GRU and RNN pack only while the
// copy adds at most an eighth to the reserve (G*H*P <= N*G*H / 8): on short sequences and small batches the copy was
// what put the peak memory of forward+backward above torch.nn's (RNN T100 B4 H512: 1.17x, 0.96x without it). LSTM,
// whose peak is far below torch.nn's (0.37-0.69x where this adds a copy), packs from N >= 4P. FUSEDRNN_CPU_PACK=0|1 (both),
// fwd or bwd (only that one) overrides (tests and benchmarks).
constexpr int64_t kPackMinRowsZen5 = 32;

inline bool pack_weights(const Layout& L, bool forward) {
  if (const char* e = std::getenv("FUSEDRNN_CPU_PACK")) {
    if (std::strcmp(e, "0") == 0) return false;
    if (std::strcmp(e, "1") == 0) return true;
    if (std::strcmp(e, "fwd") == 0) return forward;
    if (std::strcmp(e, "bwd") == 0) return !forward;
  }
  if (forward) return L.B > 2 ? 2 * L.N >= L.P : amd_family() >= 0x1A && L.N >= kPackMinRowsZen5;
  if (L.mode == kLSTM && amd_family() >= 0x1A) return L.N >= 2 * kPackMinRowsZen5;
  return L.B > 2 && (L.mode == kLSTM ? 4 * L.P <= L.N : 8 * L.P <= L.N);
}

// Whether the forward's persistent loop multiplies an LSTM's W_hh with its cell fused into the product
// (KernelTable::lstm_panel_fwd on gate-interleaved panels: blocks of up to 6 rows x one vector of units of each gate,
// their sums straight to the cell) rather than panel_gemm into the pre-activations and a gate pass over them. S:
// the loop's thread slices; rows: the most rows one loop runs (a block of a split batch, or the batch). Not with one
// slice of 7 or 8 rows, which the fused kernel takes in two blocks of 4 and panel_gemm in one of 8 x 3 vectors.
// Measured (AVX-512 Xeon, forward, time fused / not, alternating call by call, 30 rounds; 2 threads unless said):
// LSTM T100 H256 B4 0.865-0.90, B8 0.93-0.95, B12 (a split batch, 6 rows a thread) 0.92, B32 0.99, T500 B32 H128
// 0.987, T100 B64 H512 0.98, B4 H512 0.95, B8 H128 0.88, T300 B3 0.91; one thread: B4 0.955, B12 0.994, T500 B32
// H128 1.007, T100 B16 1.003; the cases left out: B16 (a split batch of 8 rows a thread) 1.02, B16 H512 P128 1.016,
// one thread B8 1.036. Only the AVX-512 build (fused_rows, the kernel's block rows, 6): the AVX2 build's blocks of 2
// rows were slower (its kernels forced on the same Xeon, time fused / not: B4 1.08, B8 1.06, B16 1.16, T500 B32
// H128 1.07). Bitwise the same results either way. FUSEDRNN_CPU_FUSED=0|1 overrides (tests run both, every build).
inline bool fused_lstm(const Layout& L, int64_t S, int64_t rows, int64_t fused_rows) {
  if (L.mode != kLSTM) return false;
  if (const char* e = std::getenv("FUSEDRNN_CPU_FUSED")) return std::strcmp(e, "0") != 0;
  return fused_rows >= 6 && (S > 1 || rows < 7 || rows > 8);
}

// The forward at batch kSmallBatch (8) to kPersistentMaxBatch takes one GEMM call a step instead of the persistent
// loop for a single step (a cell's, in a decoder loop) and wherever W_hh would stay as it is (pack_weights: a short
// sequence, 2N < P). There the loop multiplies through the matrix-vector kernel, whose blocks of 8 batch rows x 2
// weight rows sum 16 accumulators across their lanes every block; and a single step that packs W_hh pays the
// transpose for one product, besides the loop's parallel region. Measured (benchmarks/cell_steps.py, 2-core Xeon,
// forward, torch.nn time / ours, persistent -> GEMM): W_hh unpacked: LSTMCell B8 H256 1.11 -> 1.28, B16 H256
// 0.99 -> 1.20, B32 H128 1.05 -> 1.16, B64 H256 0.94 -> 1.29, B8 H64 1.13-1.15 -> 1.27-1.28; GRUCell B32 H128 0.90
// -> 1.03; RNNCell B16 H64 0.69-0.70 -> 0.94-0.99, B16 H128 0.81 -> 1.01, B32 0.87 -> 0.97; packed: LSTMCell B32
// H64 0.89-0.91 -> 1.21-1.22, B64 H128 1.21-1.24 -> 1.51, B16 H32 0.85-0.90 -> 1.22-1.24; GRUCell B64 H128 1.00 ->
// 1.14-1.23; RNNCell B64 H64 0.68-0.71 -> 0.86-0.88. Equal at LSTMCell B4 H256 (1.32 / 1.29; hence from 8 rows),
// RNNCell B8 H128, GRUCell B12 H256. Sequences whose W_hh is packed keep the loop from 2 steps: modules, knob_ab,
// time GEMM / persistent: LSTM T2 B32 H64 0.96, T8 1.13, T32 1.27; T8 B16 H256 1.19, T16 1.28; GRU T16 B16 H256
// 1.24. The backward keeps its rule (small_batch): the same cells' forward+backward moved by no more than the
// spread either way. Half precision keeps the persistent loop (its recurrent product may be AMX's; not measured).
// FUSEDRNN_CPU_LOOP, when set, decides instead (small_batch).
inline bool forward_steps_on_gemm(const Layout& L, bool half) {
  if (half || std::getenv("FUSEDRNN_CPU_LOOP")) return false;
  return L.B >= kSmallBatch && L.B <= kPersistentMaxBatch && (L.T == 1 || !pack_weights(L, true));
}

// ---- bfloat16 and float16 --------------------------------------------------------------------------------------

// Half-precision layers run the float32 kernels: every product, gate and carried state in float32, the results
// cast back to x's dtype once (reserve included, so the op's contract holds: every output has x's dtype). The
// forward's input projections multiply x and W_ih as they are (layer.cpp, input_projection); the other weights and
// the states are float32 copies. The backward converts x, y, the reserve and grad_y chunk by chunk into float32
// windows (backward_typed), the rest whole. The casts cost a pass over y and the reserve (and in the backward over
// x, y, the reserve and grad_y), small against the layer's products.
inline bool half_precision(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

inline void check_dtype(const Tensor& x) {
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || half_precision(t),
              "fusedrnn: the cpu backend takes float32, float64, bfloat16 or float16, got ", t);
}

inline Tensor to_float(const Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; }

inline std::vector<Tensor> to_float(at::TensorList ts) {
  std::vector<Tensor> r;
  r.reserve(ts.size());
  for (const auto& t : ts) r.push_back(to_float(t));
  return r;
}

inline std::optional<Tensor> to_float(const std::optional<Tensor>& t) {
  return t ? std::optional<Tensor>(to_float(*t)) : std::nullopt;
}

inline std::vector<Tensor> contiguous_all(at::TensorList ws) {
  std::vector<Tensor> r;
  r.reserve(ws.size());
  for (const auto& w : ws) r.push_back(w.contiguous());
  return r;
}

}  // namespace fusedrnn::cpu::loops
