"""The reference backend: pure PyTorch, any device and dtype, the fallback and the test oracle.

`forward` and `backward` have the signatures of the layer op (docs/design.md). The backward is written out by hand
(gate gradients per step, weight gradients as one GEMM each after the time loop) rather than recorded by autograd:
it documents the math every backend implements, and it avoids the O(T^2) trap of autograd through a loop that
indexes a precomputed tensor (every index's backward materialises a full-size gradient).

Dimension letters: T steps, B batch, N = sum(batch_sizes) packed rows, I input, H hidden, P = proj or H,
G gates, D directions.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import debug
from ..backends import GATES, Backend, register_backend

RESERVE_WIDTH = {"lstm": 5, "gru": 4, "rnn_tanh": 0, "rnn_relu": 0}  # in units of H


def split_weights(weights: list[Tensor], has_biases: bool, num_directions: int):
    """Per direction: (w_ih [G*H, I], w_hh [G*H, P], b_ih [G*H] | None, b_hh [G*H] | None, w_hr [P, H] | None)."""
    per = len(weights) // num_directions
    out = []
    for d in range(num_directions):
        g = list(weights[d * per:(d + 1) * per])
        w_ih, w_hh = g[0], g[1]
        b_ih, b_hh = (g[2], g[3]) if has_biases else (None, None)
        w_hr = g[-1] if per == 3 + 2 * has_biases else None
        out.append((w_ih, w_hh, b_ih, b_hh, w_hr))
    return out


def step_offsets(batch_sizes: Tensor) -> tuple[list[int], list[int]]:
    bs = [int(b) for b in batch_sizes.tolist()]
    offs, acc = [], 0
    for b in bs:
        offs.append(acc)
        acc += b
    return bs, offs


def check_batch_sizes(bs: list[int], B: int, N: int) -> None:
    """The layer op's batch_sizes contract (docs/design.md), as the cpu kernels check it (csrc/common.h). The modules
    check PackedSequence input with torch.nn's messages in eager mode; under torch.compile those data-dependent
    checks cannot run at trace time (fusedrnn/modules.py, _packed_batch), so this is where a compiled call with an
    inconsistent PackedSequence fails rather than reading out of bounds."""
    if any(b < 0 for b in bs) or any(a < b for a, b in zip(bs, bs[1:])) or (bs and bs[0] != B) \
            or (B and bs and bs[-1] == 0):
        raise RuntimeError(f"fusedrnn: batch_sizes should be non-increasing, positive, with batch_sizes[0] == B = {B}")
    if sum(bs) != N:
        raise RuntimeError(f"fusedrnn: sum(batch_sizes) = {sum(bs)} but x has {N} rows")


def _tanh_grad(y: Tensor) -> Tensor:
    """tanh' = 1 - y^2 from y = tanh(x), as (1 - y)(1 + y): near saturation (|y| -> 1) 1 - y*y rounds y*y first and
    keeps only the low bits of the result (in float32 at y = 0.99985, 1 - y^2 = 2.9e-4 is off by up to 1e-4 of itself),
    while 1 - |y| is exact there (Sterbenz) and the product is good to 2 roundings. torch.nn's tanh_backward and the
    cpu kernels' AVX2 build get the same accuracy from a fused multiply-add."""
    return (1 - y) * (1 + y)


def _activate(mode: str, pre: Tensor) -> Tensor:
    return torch.tanh(pre) if mode == "rnn_tanh" else torch.relu(pre)


def _forward_direction(mode, x_proj, bs, offs, reverse, h0, c0, w_hh, b_hh, w_hr, y, reserve):
    """Runs one direction. x_proj [N, G*H] = x W_ih^T + b_ih; y [N, P] (a column slice of the output) and
    reserve [N, R] are written in place. Returns (hy [B, P], cy [B, H] | None)."""
    T = len(bs)
    H = w_hh.shape[0] // GATES[mode]
    hy, cy = h0.clone(), (c0.clone() if c0 is not None else None)
    h = h0[:0]
    c = c0[:0] if c0 is not None else None
    steps = range(T - 1, -1, -1) if reverse else range(T)
    for t in steps:
        b = bs[t]
        if reverse and b > h.shape[0]:          # sequences that start here begin from h0
            h = torch.cat([h, h0[h.shape[0]:b]])
            if c is not None:
                c = torch.cat([c, c0[c.shape[0]:b]])
        elif not reverse:
            if t == 0:
                h, c = h0[:b], (c0[:b] if c0 is not None else None)
            elif b < h.shape[0]:                # sequences that ended at t-1 keep their state
                hy[b:h.shape[0]] = h[b:]
                h = h[:b]
                if c is not None:
                    cy[b:c.shape[0]] = c[b:]
                    c = c[:b]
        rows = slice(offs[t], offs[t] + b)
        gi = x_proj[rows]
        gh = h @ w_hh.t()
        if b_hh is not None:
            gh = gh + b_hh
        if mode == "lstm":
            i, f, g, o = (gi + gh).chunk(4, 1)
            i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
            c = f * c + i * g
            h = o * torch.tanh(c)
            if w_hr is not None:
                h = h @ w_hr.t()
            if reserve is not None:
                reserve[rows] = torch.cat([i, f, g, o, c], 1)
        elif mode == "gru":
            ir, iz, in_ = gi.chunk(3, 1)
            hr, hz, hn = gh.chunk(3, 1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            n = torch.tanh(in_ + r * hn)
            h = (1 - z) * n + z * h
            if reserve is not None:
                reserve[rows] = torch.cat([r, z, n, hn], 1)
        else:
            h = _activate(mode, gi + gh)
        y[rows] = h
    if h.shape[0]:
        hy[:h.shape[0]] = h
        if c is not None:
            cy[:c.shape[0]] = c
    return hy, cy


def forward(mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions, train):
    """See docs/design.md: returns y [N, D*P], hy [D, B, P], cy [D, B, H] or [0], reserve [D, N, R] or [0]."""
    bs, offs = step_offsets(batch_sizes)
    N, D, P = x.shape[0], num_directions, hx.shape[2]
    check_batch_sizes(bs, hx.shape[1], N)
    groups = split_weights(weights, has_biases, D)
    H = groups[0][1].shape[0] // GATES[mode]
    y = debug.empty((N, D * P), x)  # outputs and workspaces: NaN-filled under FUSEDRNN_DEBUG_NAN=1
    reserve = debug.empty((D, N, RESERVE_WIDTH[mode] * H), x) if train else x.new_empty(0)
    hys, cys = [], []
    for d, (w_ih, w_hh, b_ih, b_hh, w_hr) in enumerate(groups):
        x_proj = torch.addmm(b_ih, x, w_ih.t()) if b_ih is not None else x @ w_ih.t()
        hy, cy = _forward_direction(mode, x_proj, bs, offs, d == 1, hx[d], cx[d] if cx is not None else None,
                                    w_hh, b_hh, w_hr, y[:, d * P:(d + 1) * P],
                                    reserve[d] if train else None)
        hys.append(hy)
        cys.append(cy)
    cy = torch.stack(cys) if mode == "lstm" else x.new_empty(0)
    return y, torch.stack(hys), cy, reserve


def _prev_rows(src_rows, init, bs, offs, reverse):
    """The state each packed row's step started from, as one [N, K] matrix: src_rows [N, K] holds every step's
    new state, init [B, K] the initial state."""
    T = len(bs)
    parts = []
    for t in range(T):
        b = bs[t]
        if not reverse:
            parts.append(init[:b] if t == 0 else src_rows[offs[t - 1]:offs[t - 1] + b])
        else:
            nb = bs[t + 1] if t + 1 < T else 0
            if nb:
                parts.append(src_rows[offs[t + 1]:offs[t + 1] + nb])
            parts.append(init[nb:b])
    return torch.cat(parts) if parts else init[:0]


def _backward_direction(mode, bs, offs, reverse, grad_y, grad_hy, grad_cy, h_prev, c_prev, w_hh, w_hr, y, res):
    """Gate gradients of one direction. Returns (dgi [N, G*H] (w.r.t. the input-projection pre-activations),
    dgh [N, G*H] (w.r.t. h_prev W_hh^T + b_hh), dh0 [B, P], dc0 [B, H] | None, dy_total [N, P])."""
    T, N = len(bs), grad_y.shape[0]
    H = w_hh.shape[0] // GATES[mode]
    dgi = debug.empty((N, GATES[mode] * H), grad_y)
    dgh = dgi if mode != "gru" else debug.empty_like(dgi)
    dy_total = debug.empty_like(grad_y)
    # every row of dh0/dc0 is written below (the steps' row ranges cover 0..B-1), so no zero fill
    dh0, dc0 = debug.empty_like(grad_hy), (debug.empty_like(grad_cy) if mode == "lstm" else None)
    dh = grad_hy[:0]
    dc = grad_cy[:0] if mode == "lstm" else None
    steps = range(T) if reverse else range(T - 1, -1, -1)
    for t in steps:
        b = bs[t]
        if reverse:
            if t == 0:
                dh = grad_hy[:b]
                dc = grad_cy[:b] if mode == "lstm" else None
        elif b > dh.shape[0]:                   # sequences whose last step is t receive grad_hy here
            dh = torch.cat([dh, grad_hy[dh.shape[0]:b]])
            if mode == "lstm":
                dc = torch.cat([dc, grad_cy[dc.shape[0]:b]])
        rows = slice(offs[t], offs[t] + b)
        dh = dh + grad_y[rows]
        dy_total[rows] = dh
        hp = h_prev[rows]
        if mode == "lstm":
            i, f, g, o, c = res[rows].split(H, 1)
            tc = torch.tanh(c)
            dhf = dh @ w_hr if w_hr is not None else dh
            dc = dc + dhf * o * _tanh_grad(tc)
            dgi[rows] = torch.cat([dc * g * i * (1 - i), dc * c_prev[rows] * f * (1 - f),
                                   dc * i * _tanh_grad(g), dhf * tc * o * (1 - o)], 1)
            dc = dc * f
            dh = dgi[rows] @ w_hh
        elif mode == "gru":
            r, z, n, hn = res[rows].split(H, 1)
            dn = dh * (1 - z) * _tanh_grad(n)
            dr = dn * hn * r * (1 - r)
            dz = dh * (hp - n) * z * (1 - z)
            dgi[rows] = torch.cat([dr, dz, dn], 1)
            dgh[rows] = torch.cat([dr, dz, dn * r], 1)
            dh = dh * z + dgh[rows] @ w_hh
        else:
            h = y[rows]
            # relu': torch.nn's threshold_backward, where(y <= 0, 0, dh): a NaN y passes dh through, a NaN dh at y <= 0
            # gives 0 (dh * (y > 0) would do the opposite on both)
            da = dh * _tanh_grad(h) if mode == "rnn_tanh" else dh.masked_fill(h <= 0, 0)
            dgi[rows] = da
            dh = da @ w_hh
        if reverse:                             # rows past the next step's batch started from h0
            nb = bs[t + 1] if t + 1 < T else 0
            dh0[nb:b] = dh[nb:]
            dh = dh[:nb]
            if mode == "lstm":
                dc0[nb:b] = dc[nb:]
                dc = dc[:nb]
        elif t == 0:
            dh0[:b] = dh
            if mode == "lstm":
                dc0[:b] = dc
    return dgi, dgh, dh0, dc0, dy_total


def backward(mode, grad_y, grad_hy, grad_cy, x, batch_sizes, hx, cx, weights, has_biases, num_directions, y,
             reserve):
    """See docs/design.md: returns grad_x [N, I], grad_hx [D, B, P], grad_cx [D, B, H] or [0], weight grads."""
    if reserve.dim() != 3:
        raise RuntimeError("fusedrnn: backward needs the reserve of a forward run with train=True")
    bs, offs = step_offsets(batch_sizes)
    D, P = num_directions, hx.shape[2]
    groups = split_weights(weights, has_biases, D)
    H = groups[0][1].shape[0] // GATES[mode]
    grad_x = torch.zeros_like(x)
    ghx, gcx, gws = [], [], []
    for d, (w_ih, w_hh, b_ih, b_hh, w_hr) in enumerate(groups):
        rev = d == 1
        y_d = y[:, d * P:(d + 1) * P]
        res = reserve[d]
        h_prev = _prev_rows(y_d, hx[d], bs, offs, rev)
        c_prev = _prev_rows(res[:, 4 * H:], cx[d], bs, offs, rev) if mode == "lstm" else None
        dgi, dgh, dh0, dc0, dy_tot = _backward_direction(
            mode, bs, offs, rev, grad_y[:, d * P:(d + 1) * P], grad_hy[d], grad_cy[d] if mode == "lstm" else None,
            h_prev, c_prev, w_hh, w_hr, y_d, res)
        grad_x.addmm_(dgi, w_ih)
        gw = [dgi.t() @ x, dgh.t() @ h_prev]
        if has_biases:
            gw += [dgi.sum(0), dgh.sum(0)]
        if w_hr is not None:
            o, c = res[:, 3 * H:4 * H], res[:, 4 * H:]
            gw.append(dy_tot.t() @ (o * torch.tanh(c)))
        ghx.append(dh0)
        gcx.append(dc0)
        gws += gw
    gcx_t = torch.stack(gcx) if mode == "lstm" else x.new_empty(0)
    return grad_x, torch.stack(ghx), gcx_t, gws


class ReferenceBackend(Backend):
    name = "reference"

    def supports(self, device, dtype, mode, has_proj):
        return dtype.is_floating_point

    def forward(self, *args):
        return forward(*args)

    def backward(self, *args):
        return backward(*args)


register_backend(ReferenceBackend())
