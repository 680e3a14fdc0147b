"""The layer op: `torch.ops.fusedrnn.rnn_layer` and its backward, as torch.library custom ops.

One call runs one layer of an LSTM/GRU/RNN over the whole sequence, both directions, variable lengths taken from the
packed batch sizes. Shapes and the reserve layout: docs/design.md. The `backend` argument names the implementation
(fusedrnn/backends.py); the modules resolve `auto` before calling, so a compiled graph holds a fixed backend.
Registered here: the fake (meta) functions, so torch.compile can trace without running kernels, and the autograd
formula, which calls the backward op.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import debug
from .backends import GATES, get_backend
from .reference import RESERVE_WIDTH, check_batch_sizes

# Backends whose forward checks batch_sizes against hx and x itself (csrc/common.h, csrc/cuda/torch_ops.cpp, the
# reference). For any other the op checks it: under torch.compile the modules cannot (fusedrnn/modules.py,
# _packed_batch), and a kernel given a batch_sizes that does not match B or N would read or write out of bounds.
_CHECKS_BATCH_SIZES = ("cpu", "cuda", "reference")



def _impl(backend: str, x: Tensor):
    """The backend to run. An empty batch (no rows) has no work for a kernel, and BLAS rejects zero leading
    dimensions: the reference's loop over zero rows gives the exact, empty result for every backend."""
    return get_backend("reference" if x.shape[0] == 0 else backend)


@torch.library.custom_op("fusedrnn::rnn_layer", mutates_args=())
def rnn_layer(mode: str, x: Tensor, batch_sizes: Tensor, hx: Tensor, cx: Optional[Tensor], weights: list[Tensor],
              has_biases: bool, num_directions: int, train: bool, backend: str
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x [N, I], batch_sizes [T] (int64, CPU), hx [D, B, P], cx [D, B, H] (LSTM) or None, weights per direction
    (w_ih, w_hh[, b_ih, b_hh][, w_hr]) -> y [N, D*P], hy [D, B, P], cy [D, B, H] or [0], reserve [D, N, R] or [0]."""
    if backend not in _CHECKS_BATCH_SIZES:
        check_batch_sizes(batch_sizes.tolist(), hx.shape[1], x.shape[0])
    out = tuple(_impl(backend, x).forward(mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions, train))
    if debug.nan_fill_enabled():  # FUSEDRNN_DEBUG_NAN=1: outputs were NaN-filled; none may stay unwritten
        debug.check_written(backend, "rnn_layer", [x, hx, cx, weights],
                            {"y": out[0], "hy": out[1], "cy": out[2], "reserve": out[3]})
    return out


def _hidden_size(mode: str, weights) -> int:
    return weights[1].shape[0] // GATES[mode]


@rnn_layer.register_fake
def _rnn_layer_fake(mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions, train, backend):
    N, D, B, P = x.shape[0], num_directions, hx.shape[1], hx.shape[2]
    H = _hidden_size(mode, weights)
    y = x.new_empty(N, D * P)
    hy = x.new_empty(D, B, P)
    cy = x.new_empty(D, B, H) if mode == "lstm" else x.new_empty(0)
    reserve = x.new_empty(D, N, RESERVE_WIDTH[mode] * H) if train else x.new_empty(0)
    return y, hy, cy, reserve


@torch.library.custom_op("fusedrnn::rnn_layer_backward", mutates_args=())
def rnn_layer_backward(mode: str, grad_y: Tensor, grad_hy: Tensor, grad_cy: Tensor, x: Tensor, batch_sizes: Tensor,
                       hx: Tensor, cx: Optional[Tensor], weights: list[Tensor], has_biases: bool,
                       num_directions: int, y: Tensor, reserve: Tensor, backend: str
                       ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """grad_y [N, D*P], grad_hy [D, B, P], grad_cy [D, B, H] or [0] -> grad_x [N, I], grad_hx [D, B, P],
    grad_cx [D, B, H] or [0], weight grads shaped as `weights`."""
    gx, ghx, gcx, gws = _impl(backend, x).backward(mode, grad_y, grad_hy, grad_cy, x, batch_sizes, hx, cx, weights,
                                                   has_biases, num_directions, y, reserve)
    if debug.nan_fill_enabled():
        debug.check_written(backend, "rnn_layer_backward", [grad_y, grad_hy, grad_cy, x, hx, cx, weights, y, reserve],
                            {"grad_x": gx, "grad_hx": ghx, "grad_cx": gcx, "grad_weights": list(gws)})
    return gx, ghx, gcx, list(gws)


@rnn_layer_backward.register_fake
def _rnn_layer_backward_fake(mode, grad_y, grad_hy, grad_cy, x, batch_sizes, hx, cx, weights, has_biases,
                             num_directions, y, reserve, backend):
    gcx = x.new_empty(cx.shape) if mode == "lstm" else x.new_empty(0)
    return (x.new_empty(x.shape), x.new_empty(hx.shape), gcx, [w.new_empty(w.shape) for w in weights])


def _setup_context(ctx, inputs, output):
    mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions, train, backend = inputs
    y, _, _, reserve = output
    ctx.mode, ctx.has_biases, ctx.num_directions, ctx.backend = mode, has_biases, num_directions, backend
    ctx.train = train
    ctx.n_weights = len(weights)
    ctx.save_for_backward(x, batch_sizes, hx, cx, y, reserve, *weights)


def _backward(ctx, grad_y, grad_hy, grad_cy, _grad_reserve):
    x, batch_sizes, hx, cx, y, reserve, *weights = ctx.saved_tensors
    if not ctx.train:  # the forward kept no reserve (the modules never do this): recompute it
        y, _, _, reserve = torch.ops.fusedrnn.rnn_layer(ctx.mode, x, batch_sizes, hx, cx, weights, ctx.has_biases,
                                                        ctx.num_directions, True, ctx.backend)
    if grad_y is None:
        grad_y = torch.zeros_like(y)
    if grad_hy is None:
        grad_hy = torch.zeros_like(hx)
    if ctx.mode == "lstm":
        if grad_cy is None:
            grad_cy = torch.zeros_like(cx)
    else:
        grad_cy = x.new_zeros(0)
    gx, ghx, gcx, gws = torch.ops.fusedrnn.rnn_layer_backward(
        ctx.mode, grad_y, grad_hy, grad_cy, x, batch_sizes, hx, cx, weights, ctx.has_biases, ctx.num_directions, y,
        reserve, ctx.backend)
    return (None, gx, None, ghx, gcx if ctx.mode == "lstm" else None, list(gws), None, None, None, None)


rnn_layer.register_autograd(_backward, setup_context=_setup_context)
