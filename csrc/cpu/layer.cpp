// One RNN layer over the whole sequence on the CPU, both directions, forward and backward (docs/design.md).
//
// Dimension letters: T steps, B batch, N = sum(batch_sizes) packed rows, b rows alive at one step, I input size,
// H hidden size, P size of h (proj_size or H), G gates, D directions, R reserve row width, S thread slices.
//
// Forward: the input projection of all steps and both directions is one GEMM into XG [N, D*G*H]; then per
// direction a time loop. Large problems do one BLAS GEMM per step into preallocated buffers and one fused
// gate pass (rows split over threads). Small ones (see small_batch()) run a persistent loop: each thread owns a
// slice of hidden units (all gates of them), repacks its slice of W_hh once per call into k-major panels of two
// vectors of columns (kept in its own cache), computes its part of the recurrent product with a register-blocked
// kernel (6 batch rows x 2 vectors, 12 accumulators; one row: 4 accumulator chains) and its
// gates locally, and meets the other threads once per step (twice with a projection). The backward's loop does
// the same with column strips of W_hh.
// Backward runs the time loop once (fused gate gradients, the recurrent product dG W_hh per step) and computes
// the weight gradients after the loop as large GEMMs (dW_ih = dG^T x, dW_hh = dG^T H_prev, H_prev gathered).
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

namespace fusedrnn::cpu {
namespace {

using at::Tensor;

// ---- kernel table choice ----------------------------------------------------------------------------------------

std::atomic<int> g_forced{-1};  // -1: by CPU capability, else a Capability

// What at::get_cpu_capability() allows (it honours ATEN_CPU_CAPABILITY, so one variable lowers both torch's and
// fusedrnn's kernels) among the builds compiled in.
Capability cpu_best() {
  static const Capability best = [] {
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512" && AVX512::kernels_float() != nullptr) return kCapAVX512;
    if ((cap == "AVX2" || cap == "AVX512") && AVX2::kernels_float() != nullptr) return kCapAVX2;
    return kCapDefault;
  }();
  return best;
}

Capability current() {
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

// Row-major C[m, n] = op(A)[m, k] op(B)[k, n] + beta * C (beta 0 or 1). Column-major BLAS sees the transposes,
// so the operands swap.
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
          T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
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
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, bool t, int64_t rows, int64_t cols, int64_t ld) {
    at::Tensor v = at::from_blob(const_cast<T*>(p), t ? at::IntArrayRef{cols, rows} : at::IntArrayRef{rows, cols},
                                 {ld, 1}, opts);
    return t ? v.t() : v;
  };
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
int64_t slice_chunk(int64_t n, int64_t S) { return ((n + S - 1) / S + 7) / 8 * 8; }

// [lo, hi) of slice s.
std::pair<int64_t, int64_t> slice_range(int64_t n, int64_t s, int64_t S) {
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
    if (p >= 0) r = {y + row0(p) * ldy + d * L->P, ldy, rows(p), hx + j0 * L->P, L->P};
    return r;
  }
  // c_prev of step t (LSTM backward): c_t of the previous step from the reserve, or cx.
  RowSrc<T> c_prev(int64_t t) const {
    const int64_t p = prev_step(t);
    const T* c0 = cx ? cx + j0 * L->H : nullptr;
    RowSrc<T> r{nullptr, 0, 0, c0, L->H};
    if (p >= 0) r = {res + row0(p) * L->R + 4 * L->H, L->R, rows(p), c0, L->H};
    return r;
  }
  T* y_row(int64_t t) const { return y + row0(t) * ldy + d * L->P; }
  T* res_row(int64_t t) const { return res ? res + row0(t) * L->R : nullptr; }
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
  r.b_hn = b_hn.empty() ? nullptr : b_hn[d].data_ptr<T>();
  r.bias = bias.defined() ? bias.data_ptr<T>() + d * L.G * L.H : nullptr;
  r.hx = hx[d].data_ptr<T>();
  r.cx = L.mode == kLSTM ? cx[d].data_ptr<T>() : nullptr;
  r.y = y.data_ptr<T>();
  r.ldy = L.D * L.P;
  r.res = reserve.numel() && L.R ? reserve[d].data_ptr<T>() : nullptr;
  r.j0 = 0;
  r.nrows = L.B;
  return r;
}

// Number of thread slices for the small-batch loops: enough columns per thread to amortise a barrier.
int64_t small_slices(const Layout& L) {
  if (at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), std::min(L.H, L.P) / 32));
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
bool small_batch(const Layout& L, bool forward) {
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

// Bytes of one core's L2 cache (as the OS reports it; 512 KiB where it does not).
int64_t l2_bytes() {
  static const int64_t l2 = [] {
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return v > 0 ? static_cast<int64_t>(v) : int64_t(512) * 1024;
  }();
  return l2;
}

// Bidirectional layers on 2 or 3 threads: each direction runs whole on a thread of its own (its persistent loop
// with one slice), so no step waits at a barrier and no thread reads the h another wrote; the other direction's
// work is the same size, so neither waits long at the end. Each thread then streams all of its direction's W_hh
// every step, which pays while that fits the thread's L2 cache. More threads: the directions one after the
// other, each over all threads. FUSEDRNN_CPU_DIRS=parallel|serial overrides (tests run both).
bool directions_in_parallel(const Layout& L, bool small, size_t elem_bytes) {
  if (L.D != 2 || !small || L.T == 0 || at::in_parallel_region()) return false;
  if (const char* e = std::getenv("FUSEDRNN_CPU_DIRS")) {
    if (std::strcmp(e, "parallel") == 0) return true;
    if (std::strcmp(e, "serial") == 0) return false;
  }
  const int threads = at::get_num_threads();
  if (threads < 2 || threads > 3) return false;
  return L.G * L.H * L.P * static_cast<int64_t>(elem_bytes) <= l2_bytes() / 2;
}

// Split batch: the persistent loop's threads take contiguous blocks of batch rows instead of slices of hidden
// units; each runs its rows' whole recurrence alone (no barrier, no h another thread wrote), multiplying by all of
// W_hh. The blocks hold about equal numbers of tokens (sequences are sorted longest first, so a block of long
// sequences has fewer rows). Chosen from 8 rows a thread while W_hh fits a thread's L2 cache. Measured (2
// threads, AVX-512, time split / time sliced, fwd and fwd+bwd): LSTM T500 B32 H128 0.85 / 0.90, GRU same 0.79 /
// 0.86, RNN T200 B16 H256 0.82 / 0.88, LSTM and GRU T100 B16 H256 0.92-0.95 / 0.90; B8-B12 within 3% either way;
// B4 1.32 / 1.19 (too few rows to block); H512 (W_hh 3-4 MiB, past L2) 1.0-1.1. Returns the block boundaries
// [0, ..., B]: one block (no split) unless chosen. FUSEDRNN_CPU_SPLIT=batch|hidden overrides (tests run both).
std::vector<int64_t> batch_blocks(const Layout& L, bool small, size_t elem_bytes) {
  const std::vector<int64_t> whole{0, L.B};
  if (!small || L.T == 0 || at::in_parallel_region()) return whole;
  const int64_t nblk = std::min<int64_t>(at::get_num_threads(), L.B);
  bool split = L.B >= 8 * nblk && L.G * L.H * L.P * static_cast<int64_t>(elem_bytes) <= l2_bytes();
  if (const char* e = std::getenv("FUSEDRNN_CPU_SPLIT")) {
    if (std::strcmp(e, "batch") == 0) split = true;
    if (std::strcmp(e, "hidden") == 0) split = false;
  }
  if (!split || nblk < 2) return whole;
  // tokens of row j = number of steps with bs[t] > j; cumulative over rows, split at equal shares
  std::vector<int64_t> len(L.B, 0);
  for (int64_t t = 0; t < L.T; ++t) len[L.bs[t] - 1] += 1;
  for (int64_t j = L.B - 2; j >= 0; --j) len[j] += len[j + 1];
  const int64_t total = L.N;
  std::vector<int64_t> out{0};
  int64_t acc = 0;
  for (int64_t j = 0; j < L.B; ++j) {
    acc += len[j];
    const int64_t k = static_cast<int64_t>(out.size());  // the boundary being placed, after row j
    const int64_t later = nblk - k, remaining = L.B - (j + 1);  // blocks and rows after it: one row each at least
    if (k < nblk && remaining >= later && (acc * nblk >= total * k || remaining == later)) out.push_back(j + 1);
  }
  out.push_back(L.B);
  return out;
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
// FUSEDRNN_CPU_CHUNK_ROWS overrides it (tests use a few rows to run many chunks on small shapes).
constexpr int64_t kChunkRows = 512;

int64_t chunk_rows() {
  if (const char* e = std::getenv("FUSEDRNN_CPU_CHUNK_ROWS")) {
    const long v = std::atol(e);
    if (v > 0) return v;
  }
  return kChunkRows;
}

struct Chunk {
  int64_t s0, s1;  // loop positions [s0, s1)
  int64_t r0, r1;  // packed rows [r0, r1)
};

// Chunks of the loop positions [0, T) of a direction, in loop order; a short tail joins the chunk before it.
std::vector<Chunk> time_chunks(const Layout& L, bool reverse) {
  auto rows_of = [&](int64_t s0, int64_t s1) {  // rows of loop positions [s0, s1): steps ta..tb
    const int64_t ta = reverse ? L.T - s1 : s0, tb = reverse ? L.T - 1 - s0 : s1 - 1;
    return std::pair<int64_t, int64_t>{L.offs[ta], L.offs[tb] + L.bs[tb]};
  };
  const int64_t target = chunk_rows();
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

// ---- forward ----------------------------------------------------------------------------------------------------

// Per-direction scratch of the forward loops: hg GRU [B, G*H] (h_prev W_hh^T), hf proj [B, H] (unprojected h).
template <typename T>
struct FwdScratch {
  Tensor hg_t, hf_t;
  T* hg = nullptr;
  T* hf = nullptr;
  explicit FwdScratch(const Layout& L) {
    const auto dtype = c10::CppTypeToScalarType<T>::value;
    if (L.mode == kGRU) hg = (hg_t = alloc({L.B, L.G * L.H}, at::TensorOptions(dtype))).template data_ptr<T>();
    if (L.proj) hf = (hf_t = alloc({L.B, L.H}, at::TensorOptions(dtype))).template data_ptr<T>();
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
// panel q of gate g holds columns g*H + k0 + q*panel + [0, panel) (zero past k1) at dst + (g*npan + q)*panel*K.
template <typename T>
void pack_slice_gate(const KernelTable<T>& Kt, const T* W, int64_t H, int64_t g, int64_t K, int64_t k0, int64_t k1,
                     int64_t npan, T* dst) {
  const int64_t panel = Kt.panel;
  for (int64_t q = 0; q < npan; ++q) {
    const int64_t c0 = k0 + q * panel;
    Kt.pack_panel(W + (g * H + c0) * K, K, std::clamp<int64_t>(k1 - c0, 0, panel), K,
                  dst + (g * npan + q) * panel * K);
  }
}

// Per-thread packed weight slices of the persistent loops: slice sl of S at p + sl * pstride, npan panels a gate.
// p == nullptr: not packed, the loops multiply by W_hh as it is (see pack_weights()).
template <typename T>
struct Packed {
  Tensor buf;
  T* p = nullptr;
  int64_t S = 1, npan = 0, pstride = 0;
  // Forward with a projection: W_hr [P, H] likewise, slice sl (rows [p0, p1) of slice_range(P, sl, S)) at
  // pr + sl * prstride, npan_r panels of K = H.
  T* pr = nullptr;
  int64_t npan_r = 0, prstride = 0;
};

// Whether the persistent loops repack W_hh (forward: rows into k-major panels; backward: columns into strips). The
// packed copy is as large as W_hh and lives through the call. Forward: the packed kernel wins at every batch
// (2 threads, AVX-512, LSTM T100 H256: 15% at batch 1, 40% from batch 4). Backward: the vector-matrix kernel on
// W_hh as it is wins at batch 1 (fwd+bwd 4% faster), the packed strips from batch 4 (2-3% at batch 8-32).
// FUSEDRNN_CPU_PACK=0|1 (both), fwd or bwd (only that one) overrides (tests and benchmarks).
bool pack_weights(const Layout& L, bool forward) {
  if (const char* e = std::getenv("FUSEDRNN_CPU_PACK")) {
    if (std::strcmp(e, "0") == 0) return false;
    if (std::strcmp(e, "1") == 0) return true;
    if (std::strcmp(e, "fwd") == 0) return forward;
    if (std::strcmp(e, "bwd") == 0) return !forward;
  }
  return forward || L.B > 2;
}

template <typename T>
Packed<T> pack_forward(const Dir<T>& dir, const KernelTable<T>& K, int64_t S) {
  const Layout& L = *dir.L;
  Packed<T> pk;
  pk.S = S;
  if (!pack_weights(L, true)) return pk;
  pk.npan = (slice_chunk(L.H, pk.S) + K.panel - 1) / K.panel;
  pk.pstride = L.G * pk.npan * K.panel * L.P;
  if (L.proj) {
    pk.npan_r = (slice_chunk(L.P, pk.S) + K.panel - 1) / K.panel;
    pk.prstride = pk.npan_r * K.panel * L.H;
  }
  pk.buf = alloc({pk.S * (pk.pstride + pk.prstride)}, at::TensorOptions(c10::CppTypeToScalarType<T>::value));
  pk.p = pk.buf.template data_ptr<T>();
  pk.pr = L.proj ? pk.p + pk.S * pk.pstride : nullptr;
  // (slice, gate) pairs over the threads, then the projection's slices: with one slice (a split batch) the gates
  // are still packed in parallel. With a slice a thread, thread s packs slice s (the pairs are cut in equal
  // contiguous ranges).
  const int64_t n_hh = pk.S * L.G;
  at::parallel_for(0, n_hh + (L.proj ? pk.S : 0), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (i >= n_hh) {
        const int64_t sl = i - n_hh;
        const auto [p0, p1] = slice_range(L.P, sl, pk.S);
        pack_slice_gate(K, dir.w_hr, L.P, 0, L.H, p0, p1, pk.npan_r, pk.pr + sl * pk.prstride);
        continue;
      }
      const int64_t sl = i / L.G, g = i % L.G;
      const auto [k0, k1] = slice_range(L.H, sl, pk.S);
      pack_slice_gate(K, dir.w_hh, L.H, g, L.P, k0, k1, pk.npan, pk.p + sl * pk.pstride);
    }
  });
  return pk;
}

template <typename T>
void forward_small(const Dir<T>& dir, const KernelTable<T>& K, const Packed<T>& pk, const RowBuf<T>& xg, int64_t s0,
                   int64_t s1, T* h, T* c, const FwdScratch<T>& scratch) {
  const Layout& L = *dir.L;
  const int64_t H = L.H, P = L.P, GH = dir.GH(), S = pk.S, panel = K.panel;
  // States and scratch of this loop's rows (all, or one thread's block).
  h += dir.j0 * P;
  if (c) c += dir.j0 * H;
  T* hg = scratch.hg ? scratch.hg + dir.j0 * GH : nullptr;
  T* hf = scratch.hf ? scratch.hf + dir.j0 * H : nullptr;
  T* rec_out = L.mode == kGRU ? hg : nullptr;  // GRU: h_prev W_hh^T apart; else accumulated into the XG rows
  SpinBarrier barrier(S);
  at::parallel_for(0, S, 1, [&](int64_t sl0, int64_t sl1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t t = dir.step(s), b = dir.rows(t);
      if (b == 0) continue;  // a block whose sequences have ended (or, reversed, not yet begun): every slice skips
      T* pre = xg.row(dir.row0(t));
      const RowSrc<T> hp = dir.h_prev(t);
      T* out = rec_out ? rec_out : pre;
      const int64_t ldo = rec_out ? GH : xg.ld;
      for (int64_t sl = sl0; sl < sl1; ++sl) {
        const auto [k0, k1] = slice_range(H, sl, S);
        for (int64_t g = 0; g < L.G; ++g) {
          if (!pk.p) {
            K.matvec(dir.w_hh + (g * H + k0) * P, P, k1 - k0, P, hp, b, out + g * H + k0, ldo, !rec_out);
            continue;
          }
          for (int64_t q = 0, c0 = k0; c0 < k1; ++q, c0 += panel)
            K.panel_gemm(pk.p + sl * pk.pstride + (g * pk.npan + q) * panel * P, P, std::min(panel, k1 - c0), hp,
                         b, out + g * H + c0, ldo, !rec_out);
        }
        const FwdArgs<T> a = fwd_args(dir, t, pre, xg.ld, hg, hp, c, h, hf);
        K.fwd[L.mode](a, 0, b, k0, k1);
      }
      barrier.wait(sl1 - sl0);
      if (!L.proj) continue;
      for (int64_t sl = sl0; sl < sl1; ++sl) {
        const auto [p0, p1] = slice_range(P, sl, S);
        const RowSrc<T> hfs{hf, H, b, nullptr, 0};
        if (pk.pr) {
          for (int64_t q = 0, c0 = p0; c0 < p1; ++q, c0 += panel)
            K.panel_gemm(pk.pr + sl * pk.prstride + q * panel * H, H, std::min(panel, p1 - c0), hfs, b,
                         dir.y_row(t) + c0, dir.ldy, false);
        } else {
          K.matvec(dir.w_hr + p0 * H, H, p1 - p0, H, hfs, b, dir.y_row(t) + p0, dir.ldy, false);
        }
        for (int64_t j = 0; j < b; ++j)
          std::memcpy(h + j * P + p0, dir.y_row(t) + j * dir.ldy + p0, (p1 - p0) * sizeof(T));
      }
      barrier.wait(sl1 - sl0);
    }
  });
}

// Per-direction input-side biases, added in the gate pass: LSTM/RNN b_ih + b_hh; GRU b_ih + (b_hr, b_hz, 0) (b_hn
// stays apart because r multiplies it). Returns [D*G*H]. (Added there, not by the input GEMM: addmm's bias is a
// broadcast copy over the whole [rows, G*H] output before the GEMM, a pass of memory traffic per call.)
Tensor input_bias(const Layout& L, const std::vector<Tensor>& ws) {
  std::vector<Tensor> parts;
  for (int64_t d = 0; d < L.D; ++d) {
    Tensor b = L.b_ih(ws, d).clone();
    if (L.mode == kGRU) b.narrow(0, 0, 2 * L.H).add_(L.b_hh(ws, d).narrow(0, 0, 2 * L.H));
    else b.add_(L.b_hh(ws, d));
    parts.push_back(b);
  }
  return at::cat(parts);
}

std::vector<Tensor> contiguous_all(at::TensorList ws) {
  std::vector<Tensor> r;
  r.reserve(ws.size());
  for (const auto& w : ws) r.push_back(w.contiguous());
  return r;
}

// out = x W_ih^T: the input projections of one direction for the rows of x (biases: FwdArgs::bias).
void input_projection(Tensor out, const Tensor& x, const Tensor& w_ih) { at::mm_out(out, x, w_ih.t()); }

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_typed(const Layout& L, const Tensor& x_, const Tensor& hx_,
                                                        const std::optional<Tensor>& cx_, at::TensorList weights,
                                                        bool train) {
  const KernelTable<T>& K = table<T>();
  const auto ws = contiguous_all(weights);
  const Tensor x = x_.contiguous(), hx = hx_.contiguous();
  const Tensor cx = L.mode == kLSTM ? cx_->contiguous() : Tensor();
  const auto opts = x.options();
  const int64_t GH = L.G * L.H;
  Tensor reserve = train ? alloc({L.D, L.N, L.R}, opts) : at::empty({0}, opts);
  const Tensor bias = L.bias ? input_bias(L, ws) : Tensor();
  // The input projections. Training LSTM / GRU: for the whole sequence straight into the first G*H columns of each
  // direction's reserve rows, where the gate pass overwrites them in place with the activated gates (the reserve
  // row holds the gates at the same columns): no buffer of their own. Else chunk by chunk into one chunk-sized
  // buffer, just before the loop reaches them.
  const bool in_reserve = train && L.R >= GH;
  if (in_reserve)
    for (int64_t d = 0; d < L.D; ++d) input_projection(reserve[d].narrow(1, 0, GH), x, L.w_ih(ws, d));
  std::vector<Tensor> b_hn;
  if (L.mode == kGRU && L.bias)
    for (int64_t d = 0; d < L.D; ++d) b_hn.push_back(L.b_hh(ws, d).narrow(0, 2 * L.H, L.H).contiguous());

  Tensor y = alloc({L.N, L.D * L.P}, opts);
  Tensor hy = hx.clone();
  Tensor cy = L.mode == kLSTM ? cx.clone() : at::empty({0}, opts);
  const bool small = small_batch(L, true);
  const bool parallel_dirs = directions_in_parallel(L, small, sizeof(T));
  const std::vector<int64_t> blocks =
      parallel_dirs ? std::vector<int64_t>{0, L.B} : batch_blocks(L, small, sizeof(T));
  const int64_t nblk = static_cast<int64_t>(blocks.size()) - 1;
  auto run_direction = [&](int64_t d) {
    const Dir<T> dir = make_dir<T>(L, d, ws, b_hn, bias, hx, cx, y, reserve);
    T* c = L.mode == kLSTM ? cy[d].data_ptr<T>() : nullptr;
    T* h = hy[d].data_ptr<T>();
    const FwdScratch<T> scratch(L);
    // Split batch: every block's thread multiplies by all of W_hh (one slice); else each thread its own slice.
    const Packed<T> pk = small ? pack_forward(dir, K, nblk > 1 ? 1 : small_slices(L)) : Packed<T>{};
    auto loop = [&](const RowBuf<T>& buf, int64_t s0, int64_t s1) {
      if (!small) return forward_large(dir, K, buf, s0, s1, h, c, scratch);
      if (nblk == 1) return forward_small(dir, K, pk, buf, s0, s1, h, c, scratch);
      in_threads(nblk, [&](int64_t i) {
        forward_small(dir.block(blocks[i], blocks[i + 1] - blocks[i]), K, pk, buf, s0, s1, h, c, scratch);
      });
    };
    if (in_reserve) return loop(RowBuf<T>{reserve[d].data_ptr<T>(), L.R, 0}, 0, L.T);
    const std::vector<Chunk> chunks = time_chunks(L, dir.reverse);
    int64_t max_rows = 0;
    for (const Chunk& ch : chunks) max_rows = std::max(max_rows, ch.r1 - ch.r0);
    Tensor xg = alloc({max_rows, GH}, opts);
    for (const Chunk& ch : chunks) {
      Tensor part = xg.narrow(0, 0, ch.r1 - ch.r0);
      input_projection(part, x.narrow(0, ch.r0, ch.r1 - ch.r0), L.w_ih(ws, d));
      loop(RowBuf<T>{part.data_ptr<T>(), GH, ch.r0}, ch.s0, ch.s1);
    }
  };
  if (parallel_dirs) {
    in_threads(L.D, run_direction);
  } else {
    for (int64_t d = 0; d < L.D; ++d) run_direction(d);
  }
  return {y, hy, cy, reserve};
}

// ---- backward ---------------------------------------------------------------------------------------------------

// Buffers of one direction's backward loop. Chunk-sized, row r at (r - r0): dg [rows, G*H] input-side gate
// gradients; dgh GRU [rows, G*H] recurrent-side gate gradients; dht proj [rows, P] total gradient w.r.t. h per
// step. State: dhf proj [B, H]; dh [B, P] and dc [B, H] running state gradients (in: grad_hy / grad_cy, out:
// grad_hx / grad_cx). gy: rows of grad_y [N, D*P] (all of them, or a contiguous copy of the chunk's).
template <typename T>
struct BwdBufs {
  T* dg;
  T* dgh;
  T* dht;
  int64_t r0;
  T* dhf;
  T* dh;
  T* dc;
  RowBuf<const T> gy;
  // Where the recurrent product reads its gate gradients: GRU's recurrent side, else the input side ([b, G*H]).
  const T* rec(const Dir<T>& dir, int64_t t) const { return (dgh ? dgh : dg) + (dir.row0(t) - r0) * dir.GH(); }
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
  const int64_t o = dir.row0(t), GH = dir.GH();
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
  a.dg = bb.dg + (o - bb.r0) * GH; a.ld_dg = GH;
  a.dgh = bb.dgh ? bb.dgh + (o - bb.r0) * GH : nullptr; a.ld_dgh = GH;
  a.dhp = bb.dh; a.ld_dhp = L.P;
  return a;
}

// Loop positions s1-1 down to s0.
template <typename T>
void backward_large(const Dir<T>& dir, const KernelTable<T>& K, const BwdBufs<T>& bb, int64_t s0, int64_t s1) {
  const Layout& L = *dir.L;
  const int64_t H = L.H, P = L.P, GH = dir.GH();
  TORCH_INTERNAL_ASSERT(dir.j0 == 0 && dir.nrows == L.B, "the GEMM loop runs the whole batch");
  for (int64_t s = s1 - 1; s >= s0; --s) {
    const int64_t t = dir.step(s), b = dir.rows(t);
    if (L.proj) {
      total_dh(dir, bb, t, 0, P);
      gemm<T>(false, false, b, H, P, bb.dht + (dir.row0(t) - bb.r0) * P, P, dir.w_hr, H, T(0), bb.dhf, H);
    }
    const BwdArgs<T> a = bwd_args(dir, bb, t);
    for_rows(b, GH, [&](int64_t j0, int64_t j1) { K.bwd[L.mode](a, j0, j1, 0, H); });
    gemm<T>(false, false, b, P, GH, bb.rec(dir, t), GH, dir.w_hh, P, T(L.mode == kGRU ? 1 : 0), bb.dh, P);
  }
}

// Columns [p0, p1) of W_hh [GH, P] in strips of `panel` columns, each strip contiguous ([GH, panel], zero past p1),
// for KernelTable::panel_gemm with the gate gradients as the rows (dh = dG W_hh).
template <typename T>
void pack_columns(const T* W, int64_t R, int64_t ldw, int64_t p0, int64_t p1, int64_t panel, int64_t npan, T* dst) {
  for (int64_t q = 0; q < npan; ++q) {
    T* d = dst + q * panel * R;
    const int64_t c0 = p0 + q * panel, n = std::max<int64_t>(0, std::min(panel, p1 - c0));
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t c = 0; c < n; ++c) d[r * panel + c] = W[r * ldw + c0 + c];
      for (int64_t c = n; c < panel; ++c) d[r * panel + c] = T(0);
    }
  }
}

// dh = dG W_hh multiplies by per-thread packed strips of W_hh's columns, as the forward does with its rows.
template <typename T>
Packed<T> pack_backward(const Dir<T>& dir, const KernelTable<T>& K, int64_t S) {
  const Layout& L = *dir.L;
  Packed<T> pk;
  pk.S = S;
  if (!pack_weights(L, false)) return pk;
  pk.npan = (slice_chunk(L.P, pk.S) + K.panel - 1) / K.panel;
  pk.pstride = pk.npan * K.panel * dir.GH();
  pk.buf = alloc({pk.S * pk.pstride}, at::TensorOptions(c10::CppTypeToScalarType<T>::value));
  pk.p = pk.buf.template data_ptr<T>();
  at::parallel_for(0, pk.S, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t sl = s0; sl < s1; ++sl) {
      const auto [p0, p1] = slice_range(L.P, sl, pk.S);
      pack_columns(dir.w_hh, dir.GH(), L.P, p0, p1, K.panel, pk.npan, pk.p + sl * pk.pstride);
    }
  });
  return pk;
}

template <typename T>
void backward_small(const Dir<T>& dir, const KernelTable<T>& K, const Packed<T>& pk, const BwdBufs<T>& all,
                    int64_t s0, int64_t s1) {
  const Layout& L = *dir.L;
  const BwdBufs<T> bb = all.block(dir);
  const int64_t H = L.H, P = L.P, GH = dir.GH(), S = pk.S, panel = K.panel;
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
        if (b > 0) {
          const RowSrc<T> g{bb.rec(dir, t), GH, b, nullptr, 0};
          if (!pk.p) K.vecmat(dir.w_hh, P, GH, p0, p1, bb.rec(dir, t), GH, b, bb.dh, P, L.mode == kGRU);
          for (int64_t q = 0, c0 = p0; pk.p && c0 < p1; ++q, c0 += panel)
            K.panel_gemm(pk.p + sl * pk.pstride + q * panel * GH, GH, std::min(panel, p1 - c0), g, b, bb.dh + c0,
                         P, L.mode == kGRU);
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

// out = a b, or out += a b after the first chunk.
void mm_acc(Tensor out, const Tensor& a, const Tensor& b, bool first) {
  if (first) at::mm_out(out, a, b);
  else out.addmm_(a, b);
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> backward_typed(
    const Layout& L, const Tensor& grad_y_, const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& x_,
    const Tensor& hx_, const std::optional<Tensor>& cx_, at::TensorList weights, const Tensor& y_,
    const Tensor& reserve_) {
  const KernelTable<T>& K = table<T>();
  const auto ws = contiguous_all(weights);
  const Tensor x = x_.contiguous(), hx = hx_.contiguous(), y = y_.contiguous();
  // grad_y as it comes when it is contiguous; else (an expanded tensor, as the gradient of y.sum() is) a
  // contiguous copy of each chunk's rows, never a copy of the whole.
  const bool gy_whole = grad_y_.is_contiguous();
  const Tensor& gy = grad_y_;
  Tensor reserve = reserve_.contiguous();
  const Tensor cx = L.mode == kLSTM ? cx_->contiguous() : Tensor();
  const auto opts = x.options();
  const int64_t GH = L.G * L.H;
  TORCH_CHECK(reserve.numel() == L.D * L.N * L.R && (L.R == 0 || reserve.dim() == 3),
              "fusedrnn: reserve has the wrong size; was the forward run with train=True?");
  TORCH_CHECK(gy.sizes() == y.sizes(), "fusedrnn: grad_y should have the shape of y");

  Tensor grad_hx = grad_hy.numel() ? grad_hy.contiguous().clone() : at::zeros_like(hx);
  Tensor grad_cx = L.mode != kLSTM ? at::empty({0}, opts)
                   : grad_cy.numel() ? grad_cy.contiguous().clone() : at::zeros_like(cx);
  Tensor grad_x = alloc({L.N, L.I}, opts);
  std::vector<Tensor> gw(ws.size());
  for (size_t i = 0; i < ws.size(); ++i) gw[i] = L.T ? alloc(ws[i].sizes(), opts) : at::zeros_like(ws[i]);
  if (L.T == 0) grad_x.zero_();
  const bool small = small_batch(L, false);
  const bool parallel_dirs = directions_in_parallel(L, small, sizeof(T));
  const std::vector<int64_t> blocks =
      parallel_dirs ? std::vector<int64_t>{0, L.B} : batch_blocks(L, small, sizeof(T));
  const int64_t nblk = static_cast<int64_t>(blocks.size()) - 1;
  // Directions on their own threads cannot both accumulate into grad_x: the reverse one writes its own copy.
  Tensor grad_x_rev = parallel_dirs && L.T ? alloc({L.N, L.I}, opts) : Tensor();
  Tensor y_mut = y;  // Dir holds non-const pointers; backward never writes y or the reserve
  auto run_direction = [&](int64_t d) {
    const Dir<T> dir = make_dir<T>(L, d, ws, {}, Tensor(), hx, cx, y_mut, reserve);
    const std::vector<Chunk> chunks = time_chunks(L, dir.reverse);
    int64_t max_rows = 0;
    for (const Chunk& ch : chunks) max_rows = std::max(max_rows, ch.r1 - ch.r0);
    Tensor dg = alloc({max_rows, GH}, opts);
    Tensor dgh = L.mode == kGRU ? alloc({max_rows, GH}, opts) : Tensor();
    Tensor dht = L.proj ? alloc({max_rows, L.P}, opts) : Tensor();
    Tensor hprev = alloc({max_rows, L.P}, opts);
    Tensor dhf = L.proj ? alloc({L.B, L.H}, opts) : Tensor();
    const Packed<T> pk = small && L.T ? pack_backward(dir, K, nblk > 1 ? 1 : small_slices(L)) : Packed<T>{};
    Tensor& g_ih = gw[d * L.group + 0];
    Tensor& g_hh = gw[d * L.group + 1];
    for (size_t i = 0; i < chunks.size(); ++i) {  // the last chunk of the loop first
      const Chunk& ch = chunks[chunks.size() - 1 - i];
      const int64_t rows = ch.r1 - ch.r0;
      const bool first = i == 0;
      BwdBufs<T> bb{dg.data_ptr<T>(), dgh.defined() ? dgh.data_ptr<T>() : nullptr,
                    dht.defined() ? dht.data_ptr<T>() : nullptr, ch.r0,
                    dhf.defined() ? dhf.data_ptr<T>() : nullptr, grad_hx[d].data_ptr<T>(),
                    L.mode == kLSTM ? grad_cx[d].data_ptr<T>() : nullptr, RowBuf<const T>{}};
      Tensor gy_chunk;
      if (gy_whole) {
        bb.gy = {gy.data_ptr<T>(), L.D * L.P, 0};
      } else {
        gy_chunk = gy.narrow(0, ch.r0, rows).contiguous();
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
      // This chunk's share of the weight gradients and its rows of grad_x, while its workspaces are in cache.
      const Tensor dg_c = dg.narrow(0, 0, rows);
      const Tensor dg_rec = dgh.defined() ? dgh.narrow(0, 0, rows) : dg_c;
      gather_h_prev(dir, ch, hprev.data_ptr<T>());
      mm_acc(g_ih, dg_c.t(), x.narrow(0, ch.r0, rows), first);
      mm_acc(g_hh, dg_rec.t(), hprev.narrow(0, 0, rows), first);
      Tensor gx = (d == 0 || !parallel_dirs ? grad_x : grad_x_rev).narrow(0, ch.r0, rows);
      mm_acc(gx, dg_c, L.w_ih(ws, d), d == 0 || parallel_dirs);
      if (L.bias) {
        Tensor& g_b = gw[d * L.group + 2];
        if (first) at::sum_out(g_b, dg_c, at::IntArrayRef{0});
        else g_b.add_(dg_c.sum(0));
        if (dgh.defined()) {
          Tensor& g_bh = gw[d * L.group + 3];
          if (first) at::sum_out(g_bh, dg_rec, at::IntArrayRef{0});
          else g_bh.add_(dg_rec.sum(0));
        }
      }
      if (L.proj) {
        const Tensor r = reserve[d].narrow(0, ch.r0, rows);
        const Tensor h_full = r.narrow(1, 3 * L.H, L.H) * r.narrow(1, 4 * L.H, L.H).tanh();
        mm_acc(gw[d * L.group + L.group - 1], dht.narrow(0, 0, rows).t(), h_full, first);
      }
    }
    // LSTM and RNN: both biases get the same gradient (one pass over dG, not two).
    if (L.bias && !dgh.defined() && L.T) gw[d * L.group + 3].copy_(gw[d * L.group + 2]);
  };
  if (parallel_dirs) {
    in_threads(L.D, run_direction);
    if (grad_x_rev.defined()) grad_x.add_(grad_x_rev);
  } else {
    for (int64_t d = 0; d < L.D; ++d) run_direction(d);
  }
  return {grad_x, grad_hx, grad_cx, gw};
}

}  // namespace

bool capability_available(Capability c) { return c <= cpu_best(); }

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
  if (x.scalar_type() == at::kDouble) return forward_typed<double>(L, x, hx, cx, weights, train);
  return forward_typed<float>(L, x, hx, cx, weights, train);
}

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> rnn_backward(
    const std::string& mode, const Tensor& grad_y, const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& x,
    const Tensor& batch_sizes, const Tensor& hx, const std::optional<Tensor>& cx, at::TensorList weights,
    bool has_biases, int64_t num_directions, const Tensor& y, const Tensor& reserve) {
  const Layout L = check_inputs(mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions);
  for (const Tensor* g : {&grad_y, &grad_hy, &grad_cy, &y, &reserve})
    TORCH_CHECK(g->scalar_type() == x.scalar_type() && g->device().is_cpu(),
                "fusedrnn: backward tensors should be CPU tensors of x's dtype");
  if (x.scalar_type() == at::kDouble)
    return backward_typed<double>(L, grad_y, grad_hy, grad_cy, x, hx, cx, weights, y, reserve);
  return backward_typed<float>(L, grad_y, grad_hy, grad_cy, x, hx, cx, weights, y, reserve);
}

}  // namespace fusedrnn::cpu
