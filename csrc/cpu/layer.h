// Entry points of the CPU layer kernels (csrc/cpu/layer.cpp, layer_backward.cpp); arguments and shapes as docs/design.md's
// rnn_layer / rnn_layer_backward minus `backend`.
//
// Dimension letters: N packed rows, I input size, B batch, P size of h, H hidden size, D directions, R reserve width.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fusedrnn::cpu {

// x: [N, I], batch_sizes: int64 [T], hx: [D, B, P], cx: [D, B, H] (LSTM) -> y [N, D*P], hy [D, B, P],
// cy [D, B, H] or [0], reserve [D, N, R] (train) or [0].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_forward(
    const std::string& mode, const at::Tensor& x, const at::Tensor& batch_sizes, const at::Tensor& hx,
    const std::optional<at::Tensor>& cx, at::TensorList weights, bool has_biases, int64_t num_directions,
    bool train);

// Which gradients a backward computes: x's; the initial states' (hx and cx); the weights'. One not asked for is
// returned as an empty [0] tensor (each weight's, for weights) and its work skipped: grad_x's GEMM (x of a first
// layer on raw features needs none), the recurrent product of the loop's first step (hx left as zeros), the weight
// gradients' GEMMs (a frozen layer).
struct GradMask {
  bool x = true, state = true, weights = true;
};

// grad_y: [N, D*P], grad_hy: [D, B, P], grad_cy: [D, B, H] or [0] -> grad_x [N, I], grad_hx [D, B, P],
// grad_cx [D, B, H] or [0], grad_weights shaped as weights.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> rnn_backward(
    const std::string& mode, const at::Tensor& grad_y, const at::Tensor& grad_hy, const at::Tensor& grad_cy,
    const at::Tensor& x, const at::Tensor& batch_sizes, const at::Tensor& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, bool has_biases, int64_t num_directions, const at::Tensor& y, const at::Tensor& reserve,
    GradMask mask = {});

// Kernel builds, in order: each runs wherever a later one does.
enum Capability : int { kCapDefault = 0, kCapAVX2 = 1, kCapAVX512 = 2 };

// Whether build c is compiled in and this CPU (as at::get_cpu_capability() reports it) can run it.
bool capability_available(Capability c);
// Kernel build used by the next calls: -1 the best this CPU allows (default), else a Capability (error if
// !capability_available).
void force_capability(int which);
// "DEFAULT", "AVX2" or "AVX512".
std::string active_capability();

// The library the float32 input projections run on now: "onednn" or "blas" (layer_loops.h, onednn_matmul).
std::string gemm_library();

// Threads the persistent loops split into now (layer_loops.h, loop_threads).
int64_t loop_thread_count();

// The cache of blocks (block_cache.h): frees its idle blocks and returns their bytes; its idle bytes and blocks;
// the most idle bytes it keeps; the least bytes of a block it serves and the most idle blocks it keeps.
int64_t empty_block_cache();
std::pair<int64_t, int64_t> block_cache_idle();
int64_t block_cache_limit();
std::pair<int64_t, int64_t> block_cache_bounds();

// One cell step as the fusedrnn::cpu_cell op's Autograd kernel runs it (csrc/cpu/cell.cpp: the C++ Function where a
// graph is recorded), for a caller that has done the op's checks and needs no dispatcher in front (the modules'
// fast path, through fusedrnn._C.cell_step): (h, c) with c an empty [0] but for lstm.
std::tuple<at::Tensor, at::Tensor> cell_step(const std::string& mode, const at::Tensor& x, const at::Tensor& hx,
                                             const std::optional<at::Tensor>& cx, at::TensorList weights,
                                             bool has_biases);

// Bytes a second that the persistent loops' threads (loop_threads(), each its own buffer of bytes_per_thread,
// first touched by it) read together from wherever a buffer of that size stays between passes (L1, L2 or beyond):
// the best of 5 timed runs of about 64 MiB of reads a thread, summed over the threads. The benchmark's ceiling
// takes it as the speed at which a step can stream the recurrent weights (fusedrnn/bench/metrics.py).
double cache_read_bandwidth(int64_t bytes_per_thread);

}  // namespace fusedrnn::cpu
