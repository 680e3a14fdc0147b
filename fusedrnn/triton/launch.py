"""Launchers: torch glue around the Triton kernels (input-projection GEMM before, weight-gradient GEMMs after).

Shapes as in docs/design.md: x [N, I], batch_sizes [T] (CPU int64), hx [D, B, P], cx [D, B, H], y [N, D*P],
reserve [D, N, R]; P = proj_size for an LSTM with projection, else H.
"""
from __future__ import annotations

import contextlib

import torch
import triton

from . import kernels as K

_MODE = {"lstm": K.LSTM, "gru": K.GRU, "rnn_tanh": K.RNN_TANH, "rnn_relu": K.RNN_RELU}
_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
# columns of dG per direction, in units of H (GRU keeps dn beside dhn: W_ih and W_hh see different n gradients)
_GD = {"lstm": 4, "gru": 4, "rnn_tanh": 1, "rnn_relu": 1}
_RES = {"lstm": 5, "gru": 4, "rnn_tanh": 0, "rnn_relu": 0}


def interpreting() -> bool:
    """True when the kernels were built for TRITON_INTERPRET (decided when triton was first imported)."""
    return type(K.rnn_fwd_kernel).__name__ == "InterpretedFunction"


def _blocks(H: int, dtype: torch.dtype, blocks):
    """(BLOCK_B, BLOCK_H, BLOCK_K, num_warps, num_stages). tl.dot needs every block dimension >= 16.
    GPU choices checked with ptxas for sm_90a (H=1024, all modes and both kernels: at most 16 bytes of register
    spills, in a few float32 variants): 16-bit
    64x64 tiles with 8 warps, float32 32x32 tiles with 4 warps (IEEE fp32 dots hold more registers)."""
    if blocks is not None:
        return blocks
    if interpreting():
        b = max(16, min(32, triton.next_power_of_2(H)))
        return 16, b, b, 4, 1
    if dtype == torch.float32:
        b = max(16, min(32, triton.next_power_of_2(H)))
        return 16, b, b, 4, 2
    b = max(16, min(64, triton.next_power_of_2(H)))
    return 16, b, b, 8, 2


def fwd_constexprs(mode: str, D: int, train: bool, has_biases: bool, has_proj: bool, H: int, dtype: torch.dtype,
                   blocks=None):
    """Compile-time arguments and launch options of rnn_fwd_kernel for one call."""
    BB, BH, BK, nw, ns = _blocks(H, dtype, blocks)
    dot_f32, prec = _dot_args(dtype)
    return dict(MODE=_MODE[mode], G=_GATES[mode], D=D, TRAIN=bool(train and _RES[mode]),
                HAS_BHN=bool(mode == "gru" and has_biases), HAS_PROJ=bool(has_proj), BLOCK_B=BB, BLOCK_H=BH,
                BLOCK_K=BK, DOT_F32=dot_f32, PREC=prec), dict(num_warps=nw, num_stages=ns)


def bwd_constexprs(mode: str, D: int, has_proj: bool, H: int, dtype: torch.dtype, blocks=None):
    """Compile-time arguments and launch options of rnn_bwd_kernel for one call."""
    BB, BH, BK, nw, ns = _blocks(H, dtype, blocks)
    dot_f32, prec = _dot_args(dtype)
    return dict(MODE=_MODE[mode], G=_GATES[mode], GD=_GD[mode], D=D, HAS_PROJ=bool(has_proj), BLOCK_B=BB,
                BLOCK_H=BH, BLOCK_K=BK, DOT_F32=dot_f32, PREC=prec), dict(num_warps=nw, num_stages=ns)


def _dot_args(dtype: torch.dtype):
    """(DOT_F32, PREC): under the interpreter dot in float32 (its bf16 dot is wrong); float32 dots are IEEE, not
    TF32, like torch's default."""
    return interpreting(), "ieee" if (dtype == torch.float32 or interpreting()) else "tf32"


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _split(mode, weights, has_biases, D):
    """Per-direction weight groups, and whether they carry an LSTM projection w_hr [P, H] (last of each group)."""
    n = len(weights) // D
    groups = [weights[d * n:(d + 1) * n] for d in range(D)]
    has_proj = n == 3 + 2 * has_biases
    if has_proj and mode != "lstm":
        raise ValueError(f"fusedrnn triton backend: a projection weight was given for mode={mode}")
    return groups, has_proj


def _steps(batch_sizes: torch.Tensor, device):
    bs = batch_sizes.to(torch.int64)
    offs = torch.zeros_like(bs)
    if bs.numel() > 1:
        offs[1:] = torch.cumsum(bs, 0)[:-1]
    return bs.to(device=device, dtype=torch.int32), offs.to(device=device, dtype=torch.int32), bs, offs


def _prev_index(bs: torch.Tensor, offs: torch.Tensor, reverse: bool) -> torch.Tensor:
    """[N] int64 index into cat([rows of y (N), hx rows (B)]): where each packed row's h_prev comes from."""
    T = bs.numel()
    N = int(bs.sum())
    t_of = torch.repeat_interleave(torch.arange(T), bs)
    j = torch.arange(N) - offs[t_of]
    if not reverse:
        src = torch.where(t_of > 0, offs[(t_of - 1).clamp(min=0)] + j, N + j)
    else:
        tn = (t_of + 1).clamp(max=T - 1)
        alive_next = (t_of + 1 < T) & (j < bs[tn])
        src = torch.where(alive_next, offs[tn] + j, N + j)
    return src


def forward(mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions, train, blocks=None):
    """One layer. x [N, I]; hx [D, B, P], cx [D, B, H] or None -> y [N, D*P], hy [D, B, P], cy [D, B, H] or [0],
    reserve [D, N, R] (train) or [0]."""
    D, G = num_directions, _GATES[mode]
    is_lstm, is_gru = mode == "lstm", mode == "gru"
    groups, has_proj = _split(mode, weights, has_biases, D)
    dev, dt = x.device, x.dtype
    T = batch_sizes.numel()
    B, P = hx.shape[1], hx.shape[2]
    H = groups[0][1].shape[0] // G
    x = x.contiguous()
    N = x.shape[0]
    w_ih = torch.cat([g[0] for g in groups], 0)                      # [D*G*H, I]
    w_hh = torch.stack([g[1] for g in groups], 0).contiguous()       # [D, G*H, P]
    w_hr = torch.stack([g[-1] for g in groups], 0).contiguous() if has_proj else w_hh   # [D, P, H]
    b_hn = x.new_empty(0)
    if has_biases:
        bias = []
        for g in groups:
            b_hh = g[3]
            if is_gru:   # b_hn stays inside r * (W_hn h + b_hn)
                b_hh = torch.cat([b_hh[:2 * H], torch.zeros_like(b_hh[2 * H:])])
            bias.append(g[2] + b_hh)
        xp = torch.addmm(torch.cat(bias), x, w_ih.t())              # [N, D*G*H]
        if is_gru:
            b_hn = torch.stack([g[3][2 * H:] for g in groups]).contiguous()
    else:
        xp = torch.mm(x, w_ih.t())
    y = torch.empty(N, D * P, device=dev, dtype=dt)
    hy = torch.empty(D, B, P, device=dev, dtype=dt)
    cy = torch.empty(D, B, H, device=dev, dtype=dt) if is_lstm else x.new_empty(0)
    R = _RES[mode] * H
    reserve = torch.empty(D, N, R, device=dev, dtype=dt) if train else x.new_empty(0)
    if T == 0 or N == 0 or B == 0:
        hy.copy_(hx)
        if is_lstm:
            cy.copy_(cx)
        return y, hy, cy, reserve
    bs_d, offs_d, _, _ = _steps(batch_sizes, dev)
    hbuf = torch.empty(D, 2, B, P, device=dev, dtype=torch.float32)
    cbuf = torch.empty(D, 2, B, H, device=dev, dtype=torch.float32) if is_lstm else hbuf
    fbuf = torch.empty(D, B, H, device=dev, dtype=torch.float32) if has_proj else hbuf
    const, opts = fwd_constexprs(mode, D, train, has_biases, has_proj, H, dt, blocks)
    hx = hx.contiguous()
    cx_arg = cx.contiguous() if is_lstm else hx
    grid = (D, triton.cdiv(B, const["BLOCK_B"]))
    with _on(dev):
        K.rnn_fwd_kernel[grid](
            xp, w_hh, b_hn if is_gru and has_biases else xp, w_hr, hx, cx_arg, bs_d, offs_d,
            y, hy, cy if is_lstm else hy, reserve if (train and R) else y, hbuf, cbuf, fbuf,
            T, B, H, P, N, **const, **opts,
        )
    return y, hy, cy, reserve


def backward(mode, grad_y, grad_hy, grad_cy, x, batch_sizes, hx, cx, weights, has_biases, num_directions, y,
             reserve, blocks=None, output_mask=(True, True, True)):
    """Gradients of one layer: grad_y [N, D*P], grad_hy [D, B, P], grad_cy [D, B, H] ([0] unless LSTM) ->
    grad_x [N, I], grad_hx [D, B, P], grad_cx [D, B, H] or [0], weight grads in the order of `weights`.
    output_mask (x, the states, the weights): each gradient not asked for comes back as an empty [0] and its GEMMs
    are skipped (grad_x's, the weight gradients'; the states' come out of the time loop's kernel anyway)."""
    need_x, need_state, need_w = output_mask
    D, G, GD = num_directions, _GATES[mode], _GD[mode]
    is_lstm, is_gru = mode == "lstm", mode == "gru"
    groups, has_proj = _split(mode, weights, has_biases, D)
    dev, dt = x.device, x.dtype
    T = batch_sizes.numel()
    B, P = hx.shape[1], hx.shape[2]
    H = groups[0][1].shape[0] // G
    x = x.contiguous()
    N, I = x.shape
    y = y.contiguous()
    grad_y = grad_y.contiguous()
    grad_hx = torch.empty(D, B, P, device=dev, dtype=dt)
    grad_cx = torch.empty(D, B, H, device=dev, dtype=dt) if is_lstm else x.new_empty(0)
    if T == 0 or N == 0 or B == 0:
        grad_hx.copy_(grad_hy)
        if is_lstm:
            grad_cx.copy_(grad_cy)
        grads = []
        for g in groups:
            grads += [torch.zeros_like(w) if need_w else x.new_empty(0) for w in g]
        return _masked(x.new_zeros(N, I), grad_hx, grad_cx, grads, x, need_x, need_state)
    bs_d, offs_d, bs, offs = _steps(batch_sizes, dev)
    w_hh = torch.stack([g[1] for g in groups], 0).contiguous()       # [D, G*H, P]
    w_hr = torch.stack([g[-1] for g in groups], 0).contiguous() if has_proj else w_hh   # [D, P, H]
    # h_prev [D, N, P] / c_prev [D, N, H] of every packed row, per direction
    hprev = []
    cprev = []
    for d in range(D):
        idx = _prev_index(bs, offs, reverse=d == 1).to(dev)
        hprev.append(torch.cat([y[:, d * P:(d + 1) * P], hx[d]], 0).index_select(0, idx))
        if is_lstm:
            cprev.append(torch.cat([reserve[d, :, 4 * H:], cx[d]], 0).index_select(0, idx))
    hprev = torch.stack(hprev, 0)
    cprev = torch.stack(cprev, 0) if is_lstm else hprev
    dg = torch.empty(N, D * GD * H, device=dev, dtype=dt)
    dhp = torch.empty(N, D * P, device=dev, dtype=dt) if has_proj else dg
    dhbuf = torch.empty(D, 2, B, P, device=dev, dtype=torch.float32)
    dcbuf = torch.empty(D, 2, B, H, device=dev, dtype=torch.float32) if is_lstm else dhbuf
    const, opts = bwd_constexprs(mode, D, has_proj, H, dt, blocks)
    grid = (D, triton.cdiv(B, const["BLOCK_B"]))
    with _on(dev):
        K.rnn_bwd_kernel[grid](
            grad_y, grad_hy.contiguous(), grad_cy.contiguous() if is_lstm else grad_hy,
            reserve if reserve.numel() else y, y, hprev, cprev, w_hh, w_hr, bs_d, offs_d,
            dg, dhp, grad_hx, grad_cx if is_lstm else grad_hx, dhbuf, dcbuf,
            T, B, H, P, N, **const, **opts,
        )
    # weight / input gradients: torch GEMMs over dG
    grad_x = None
    if not is_gru and need_x:   # one GEMM for both directions: [N, D*G*H] @ [D*G*H, I]
        grad_x = torch.mm(dg, torch.cat([g[0] for g in groups], 0))
    dg = dg.view(N, D, GD * H)
    grads = []
    for d, g in enumerate(groups):
        dg_d = dg[:, d]
        if is_gru:
            dgi = torch.cat([dg_d[:, :2 * H], dg_d[:, 3 * H:]], 1)      # [N, 3H] (dr, dz, dn)
            dgh = dg_d[:, :3 * H]                                      # [N, 3H] (dr, dz, dhn)
        else:
            dgi = dgh = dg_d
        if is_gru and need_x:
            gx = torch.mm(dgi, g[0])
            grad_x = gx if grad_x is None else grad_x.add_(gx)
        if not need_w:
            grads += [x.new_empty(0) for _ in g]
            continue
        grads.append(torch.mm(dgi.t(), x))
        grads.append(torch.mm(dgh.t(), hprev[d]))
        if has_biases:
            grads.append(dgi.sum(0))
            grads.append(dgh.sum(0))
        if has_proj:   # dW_hr = dh^T h_full, h_full = o * tanh(c) recomputed from the reserve
            h_full = reserve[d, :, 3 * H:4 * H] * torch.tanh(reserve[d, :, 4 * H:])
            grads.append(torch.mm(dhp[:, d * P:(d + 1) * P].t(), h_full))
    return _masked(grad_x, grad_hx, grad_cx, grads, x, need_x, need_state)


def _masked(grad_x, grad_hx, grad_cx, grads, x, need_x, need_state):
    """backward's results with grad_x, and the states' gradients, replaced by empty [0] tensors where not asked for."""
    if not need_x:
        grad_x = x.new_empty(0)
    if not need_state:
        grad_hx, grad_cx = x.new_empty(0), x.new_empty(0)
    return grad_x, grad_hx, grad_cx, grads
