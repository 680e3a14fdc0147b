// Entry points of the CPU layer kernels (csrc/cpu/layer.cpp); arguments and shapes as docs/design.md's
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

// grad_y: [N, D*P], grad_hy: [D, B, P], grad_cy: [D, B, H] or [0] -> grad_x [N, I], grad_hx [D, B, P],
// grad_cx [D, B, H] or [0], grad_weights shaped as weights.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> rnn_backward(
    const std::string& mode, const at::Tensor& grad_y, const at::Tensor& grad_hy, const at::Tensor& grad_cy,
    const at::Tensor& x, const at::Tensor& batch_sizes, const at::Tensor& hx, const std::optional<at::Tensor>& cx,
    at::TensorList weights, bool has_biases, int64_t num_directions, const at::Tensor& y, const at::Tensor& reserve);

// Kernel build used by the next calls: -1 by CPU capability (default), 0 baseline, 1 AVX2 (error if unavailable).
void force_capability(int which);
std::string active_capability();
bool avx2_available();

}  // namespace fusedrnn::cpu
