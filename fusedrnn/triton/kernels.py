"""Triton kernels for one RNN layer: the whole time loop runs inside one launch (forward and backward).

Dimension letters (docs/design.md): T steps, B batch, N = sum(batch_sizes) packed rows, H hidden size, P size of the
recurrent h (LSTM proj_size, else H), G gates (LSTM 4, GRU 3, RNN 1), D directions, R reserve width per row (LSTM 5H,
GRU 4H, RNN 0).

Design (one program per (direction, block of BLOCK_B batch rows), owning the whole hidden dimension):
- The input projection x W_ih^T + b for every step is one torch GEMM before the kernel (`xp`); the kernel does only
  the recurrence h_{t-1} W_hh^T.
- W_hh is never held on chip: every step streams [BLOCK_K, BLOCK_H] tiles of it from global memory (L2-resident
  after the first step), so any H works; cost per step per program is one pass over W_hh.
- Programs never wait for each other (Triton has no portable grid-wide barrier): a program's batch rows depend only
  on their own history. The recurrent state of its rows lives in a float32 global scratch, double-buffered by step
  parity (read buffer s % 2, write the other), so a step never overwrites a value another thread of the program may
  still read; `tl.debug_barrier()` (bar.sync: orders global-memory writes within the program) separates the steps.
  Scratch loads use cache_modifier ".cg" (served from L2); correctness rests on bar.sync's CTA-scope ordering.
- Variable lengths: step t owns packed rows offs[t] .. offs[t] + bs[t]; rows j >= bs[t] are dead at t: their state
  is carried unchanged into the other buffer, which is also what the reverse direction needs (a sequence starts at
  its own end with hx).
- Backward: per step, phase 1 turns dh (carried + grad_y) into gate gradients dG (pre-activation) stored to global;
  phase 2, after a barrier, computes dh_prev = dG W_hh by streaming W_hh tiles. Weight and input gradients are torch
  GEMMs over dG after the kernel.
- LSTM projection (HAS_PROJ): a step first writes h_full = o * tanh(c) for all H columns to a scratch, then after a
  barrier projects it, h = h_full W_hr^T, streaming W_hr tiles; backward turns dh [P] into dh_full = dh W_hr inside
  the gate-gradient phase and stores dh per row for dW_hr = dh^T h_full (a torch GEMM after the kernel).
- Parallelism is D * ceil(B / BLOCK_B) programs (BLOCK_B = 16, the smallest tl.dot M), each streaming all of W_hh
  (G*H x P) per step through one SM: expect this to trail cuDNN at small batch and large H (not yet measured on a
  GPU: see fusedrnn/triton/bench.py). Splitting the hidden dimension across programs needs a grid-wide per-step sync
  (cooperative launch or clusters), which Triton does not offer portably and the interpreter cannot test.
- tanh is written as 2 * sigmoid(2x) - 1 (libdevice tanh does not run under TRITON_INTERPRET).
- DOT_F32: dot operands upcast to float32 (used under the interpreter, whose bf16/fp16 dot is wrong or accumulates in
  low precision; products of 16-bit values are exact in float32, so results match a float32-accumulating GPU dot).
"""
import triton
import triton.language as tl

# MODE constexpr values
LSTM, GRU, RNN_TANH, RNN_RELU = 0, 1, 2, 3


@triton.jit
def _store_h(p_y, p_hcur, p_hnxt, b_h, prow, rows64, d64, cols, m_live, m_keep, P, D: tl.constexpr):
    """The new h of one [BLOCK_B, BLOCK_H] tile: rounded to y's dtype (what the next step and backward see), stored to
    y for the live rows and to the next state buffer (dead rows carry their state over)."""
    b_h = b_h.to(p_y.dtype.element_ty)
    o_bp = rows64[:, None] * P + cols[None, :]
    b_hprev = tl.load(p_hcur + o_bp, mask=m_keep, other=0., cache_modifier=".cg")
    tl.store(p_y + prow[:, None] * (D * P) + d64 * P + cols[None, :], b_h, mask=m_live)
    tl.store(p_hnxt + o_bp, tl.where(m_live, b_h.to(tl.float32), b_hprev), mask=m_keep)


@triton.jit
def rnn_fwd_kernel(
    p_xp,      # [N, D*G*H]  x W_ih^T + b_ih (+ b_hh except GRU's n part), x dtype
    p_whh,     # [D, G*H, P] recurrent weights, x dtype
    p_bhn,     # [D, H]      GRU b_hn (read iff HAS_BHN)
    p_whr,     # [D, P, H]   LSTM projection weights (read iff HAS_PROJ)
    p_hx,      # [D, B, P]   initial h
    p_cx,      # [D, B, H]   initial c (LSTM)
    p_bs,      # [T] int32   batch_sizes
    p_offs,    # [T] int32   exclusive cumsum of batch_sizes
    p_y,       # [N, D*P]    output
    p_hy,      # [D, B, P]   final h
    p_cy,      # [D, B, H]   final c (LSTM)
    p_res,     # [D, N, R]   reserve (TRAIN, LSTM/GRU)
    p_hbuf,    # [D, 2, B, P] float32 scratch: h of the previous / current step
    p_cbuf,    # [D, 2, B, H] float32 scratch: c (LSTM)
    p_fbuf,    # [D, B, H]    float32 scratch: unprojected h_full of the current step (HAS_PROJ)
    T, B, H, P, N,
    MODE: tl.constexpr, G: tl.constexpr, D: tl.constexpr, TRAIN: tl.constexpr, HAS_BHN: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    d = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    m_row = rows < B
    rows64 = rows.to(tl.int64)
    d64 = d.to(tl.int64)
    GH = G * H
    R = (G + 1) * H
    p_whh_d = p_whh + d64 * GH * P
    p_whr_d = p_whr + d64 * P * H
    p_hbuf_d = p_hbuf + d64 * 2 * B * P
    p_cbuf_d = p_cbuf + d64 * 2 * B * H
    p_fbuf_d = p_fbuf + d64 * B * H

    # scratch buffer 0 <- initial state
    for h0 in range(0, P, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        m = m_row[:, None] & (cols < P)[None, :]
        o_bp = rows64[:, None] * P + cols[None, :]
        tl.store(p_hbuf_d + o_bp, tl.load(p_hx + d64 * B * P + o_bp, mask=m, other=0.).to(tl.float32), mask=m)
    if MODE == 0:
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            m = m_row[:, None] & (cols < H)[None, :]
            o_bh = rows64[:, None] * H + cols[None, :]
            tl.store(p_cbuf_d + o_bh, tl.load(p_cx + d64 * B * H + o_bh, mask=m, other=0.).to(tl.float32), mask=m)
    tl.debug_barrier()

    for s in range(T):
        t = s + d * (T - 1 - 2 * s)          # forward: s, reverse: T-1-s
        n_alive = tl.load(p_bs + t)
        off = tl.load(p_offs + t)
        cur = s % 2
        p_hcur = p_hbuf_d + cur * B * P
        p_hnxt = p_hbuf_d + (1 - cur) * B * P
        p_ccur = p_cbuf_d + cur * B * H
        p_cnxt = p_cbuf_d + (1 - cur) * B * H
        m_alive = rows < n_alive
        prow = off.to(tl.int64) + rows64      # packed row of each batch row at step t
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            m_col = cols < H
            acc0 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            acc1 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            acc2 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            acc3 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            # gates_hh[:, g*H + cols] = h_prev @ W_hh[g*H + cols, :]^T, W_hh streamed in [BLOCK_K, BLOCK_H] tiles
            for k0 in range(0, P, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                m_k = ks < P
                b_h = tl.load(p_hcur + rows64[:, None] * P + ks[None, :], mask=m_row[:, None] & m_k[None, :],
                              other=0., cache_modifier=".cg")
                if not DOT_F32:
                    b_h = b_h.to(p_whh.dtype.element_ty)
                o_w = cols[None, :] * P + ks[:, None]
                m_w = m_k[:, None] & m_col[None, :]
                b_w = tl.load(p_whh_d + o_w, mask=m_w, other=0.)
                if DOT_F32:
                    b_w = b_w.to(tl.float32)
                acc0 = tl.dot(b_h, b_w, acc=acc0, input_precision=PREC)
                if G > 1:
                    b_w = tl.load(p_whh_d + H * P + o_w, mask=m_w, other=0.)
                    if DOT_F32:
                        b_w = b_w.to(tl.float32)
                    acc1 = tl.dot(b_h, b_w, acc=acc1, input_precision=PREC)
                    b_w = tl.load(p_whh_d + 2 * H * P + o_w, mask=m_w, other=0.)
                    if DOT_F32:
                        b_w = b_w.to(tl.float32)
                    acc2 = tl.dot(b_h, b_w, acc=acc2, input_precision=PREC)
                if G > 3:
                    b_w = tl.load(p_whh_d + 3 * H * P + o_w, mask=m_w, other=0.)
                    if DOT_F32:
                        b_w = b_w.to(tl.float32)
                    acc3 = tl.dot(b_h, b_w, acc=acc3, input_precision=PREC)

            m_live = m_alive[:, None] & m_col[None, :]
            m_keep = m_row[:, None] & m_col[None, :]
            o_bh = rows64[:, None] * H + cols[None, :]
            p_xrow = p_xp + prow[:, None] * (D * GH) + d64 * GH + cols[None, :]
            p_rrow = p_res + (d64 * N + prow[:, None]) * R + cols[None, :]
            if MODE == 0:
                b_i = tl.sigmoid(acc0 + tl.load(p_xrow, mask=m_live, other=0.).to(tl.float32))
                b_f = tl.sigmoid(acc1 + tl.load(p_xrow + H, mask=m_live, other=0.).to(tl.float32))
                b_g = 2. * tl.sigmoid(2. * (acc2 + tl.load(p_xrow + 2 * H, mask=m_live, other=0.).to(tl.float32))) - 1.
                b_o = tl.sigmoid(acc3 + tl.load(p_xrow + 3 * H, mask=m_live, other=0.).to(tl.float32))
                b_cprev = tl.load(p_ccur + o_bh, mask=m_keep, other=0., cache_modifier=".cg")
                b_c = b_f * b_cprev + b_i * b_g
                b_hnew = b_o * (2. * tl.sigmoid(2. * b_c) - 1.)
                tl.store(p_cnxt + o_bh, tl.where(m_live, b_c, b_cprev), mask=m_keep)
                if TRAIN:
                    tl.store(p_rrow, b_i.to(p_res.dtype.element_ty), mask=m_live)
                    tl.store(p_rrow + H, b_f.to(p_res.dtype.element_ty), mask=m_live)
                    tl.store(p_rrow + 2 * H, b_g.to(p_res.dtype.element_ty), mask=m_live)
                    tl.store(p_rrow + 3 * H, b_o.to(p_res.dtype.element_ty), mask=m_live)
                    tl.store(p_rrow + 4 * H, b_c.to(p_res.dtype.element_ty), mask=m_live)
            elif MODE == 1:
                b_r = tl.sigmoid(acc0 + tl.load(p_xrow, mask=m_live, other=0.).to(tl.float32))
                b_z = tl.sigmoid(acc1 + tl.load(p_xrow + H, mask=m_live, other=0.).to(tl.float32))
                b_hn = acc2
                if HAS_BHN:
                    b_hn += tl.load(p_bhn + d64 * H + cols, mask=m_col, other=0.).to(tl.float32)[None, :]
                b_n = 2. * tl.sigmoid(2. * (tl.load(p_xrow + 2 * H, mask=m_live, other=0.).to(tl.float32)
                                            + b_r * b_hn)) - 1.
                b_hprev = tl.load(p_hcur + o_bh, mask=m_keep, other=0., cache_modifier=".cg")
                b_hnew = (1. - b_z) * b_n + b_z * b_hprev
                if TRAIN:
                    tl.store(p_rrow, b_r.to(p_res.dtype.element_ty), mask=m_live)
                    tl.store(p_rrow + H, b_z.to(p_res.dtype.element_ty), mask=m_live)
                    tl.store(p_rrow + 2 * H, b_n.to(p_res.dtype.element_ty), mask=m_live)
                    tl.store(p_rrow + 3 * H, b_hn.to(p_res.dtype.element_ty), mask=m_live)
            else:
                b_a = acc0 + tl.load(p_xrow, mask=m_live, other=0.).to(tl.float32)
                if MODE == 2:
                    b_hnew = 2. * tl.sigmoid(2. * b_a) - 1.
                else:
                    b_hnew = tl.maximum(b_a, 0.)
            if HAS_PROJ:
                tl.store(p_fbuf_d + o_bh, b_hnew, mask=m_live)
            else:   # P == H: this tile is the new h
                _store_h(p_y, p_hcur, p_hnxt, b_hnew, prow, rows64, d64, cols, m_live, m_keep, P, D)

        if HAS_PROJ:
            tl.debug_barrier()
            # h[:, cols] = h_full @ W_hr[cols, :]^T, W_hr streamed in [BLOCK_K, BLOCK_H] tiles
            for h0 in range(0, P, BLOCK_H):
                cols = h0 + tl.arange(0, BLOCK_H)
                m_col = cols < P
                acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                for k0 in range(0, H, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    m_k = ks < H
                    b_f = tl.load(p_fbuf_d + rows64[:, None] * H + ks[None, :], mask=m_alive[:, None] & m_k[None, :],
                                  other=0., cache_modifier=".cg")
                    b_w = tl.load(p_whr_d + cols[None, :] * H + ks[:, None], mask=m_k[:, None] & m_col[None, :],
                                  other=0.)
                    if DOT_F32:
                        b_w = b_w.to(tl.float32)
                    else:
                        b_f = b_f.to(p_whr.dtype.element_ty)
                    acc = tl.dot(b_f, b_w, acc=acc, input_precision=PREC)
                _store_h(p_y, p_hcur, p_hnxt, acc, prow, rows64, d64, cols, m_alive[:, None] & m_col[None, :],
                         m_row[:, None] & m_col[None, :], P, D)
        tl.debug_barrier()

    fin = T % 2
    for h0 in range(0, P, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        m = m_row[:, None] & (cols < P)[None, :]
        o_bp = rows64[:, None] * P + cols[None, :]
        b_h = tl.load(p_hbuf_d + fin * B * P + o_bp, mask=m, other=0., cache_modifier=".cg")
        tl.store(p_hy + d64 * B * P + o_bp, b_h.to(p_hy.dtype.element_ty), mask=m)
    if MODE == 0:
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            m = m_row[:, None] & (cols < H)[None, :]
            o_bh = rows64[:, None] * H + cols[None, :]
            b_c = tl.load(p_cbuf_d + fin * B * H + o_bh, mask=m, other=0., cache_modifier=".cg")
            tl.store(p_cy + d64 * B * H + o_bh, b_c.to(p_cy.dtype.element_ty), mask=m)


@triton.jit
def rnn_bwd_kernel(
    p_gy,      # [N, D*P]     grad of y
    p_ghy,     # [D, B, P]    grad of hy
    p_gcy,     # [D, B, H]    grad of cy (LSTM)
    p_res,     # [D, N, R]    reserve from the forward (LSTM/GRU)
    p_y,       # [N, D*P]     forward output (RNN: activation derivative)
    p_hprev,   # [D, N, P]    h_prev of every packed row (GRU)
    p_cprev,   # [D, N, H]    c_prev of every packed row (LSTM)
    p_whh,     # [D, G*H, P]  recurrent weights
    p_whr,     # [D, P, H]    projection weights (HAS_PROJ)
    p_bs,      # [T] int32
    p_offs,    # [T] int32
    p_dg,      # [N, D*GD*H]  out: pre-activation gate grads; GD = 4 LSTM ([di,df,dg,do]), 4 GRU
               #              ([dr,dz,dhn,dn]: the first 3H multiply W_hh, [dr,dz,dn] multiply W_ih), 1 RNN
    p_dhp,     # [N, D*P]     out (HAS_PROJ): total dh of every row, for dW_hr
    p_dhx,     # [D, B, P]    out: grad of hx
    p_dcx,     # [D, B, H]    out: grad of cx (LSTM)
    p_dhbuf,   # [D, 2, B, P] float32 scratch: dh carried between steps
    p_dcbuf,   # [D, 2, B, H] float32 scratch: dc carried between steps (LSTM)
    T, B, H, P, N,
    MODE: tl.constexpr, G: tl.constexpr, GD: tl.constexpr, D: tl.constexpr, HAS_PROJ: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    d = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    m_row = rows < B
    rows64 = rows.to(tl.int64)
    d64 = d.to(tl.int64)
    GH = G * H
    GDH = GD * H          # width of one direction's dG block
    R = (G + 1) * H
    p_whh_d = p_whh + d64 * GH * P
    p_whr_d = p_whr + d64 * P * H
    p_dhbuf_d = p_dhbuf + d64 * 2 * B * P
    p_dcbuf_d = p_dcbuf + d64 * 2 * B * H

    for h0 in range(0, P, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        m = m_row[:, None] & (cols < P)[None, :]
        o_bp = rows64[:, None] * P + cols[None, :]
        tl.store(p_dhbuf_d + o_bp, tl.load(p_ghy + d64 * B * P + o_bp, mask=m, other=0.).to(tl.float32), mask=m)
    if MODE == 0:
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            m = m_row[:, None] & (cols < H)[None, :]
            o_bh = rows64[:, None] * H + cols[None, :]
            tl.store(p_dcbuf_d + o_bh, tl.load(p_gcy + d64 * B * H + o_bh, mask=m, other=0.).to(tl.float32),
                     mask=m)
    tl.debug_barrier()

    for s in range(T):
        t = (T - 1 - s) + d * (2 * s + 1 - T)     # the forward's order reversed: forward dir T-1..0, reverse 0..T-1
        n_alive = tl.load(p_bs + t)
        off = tl.load(p_offs + t)
        cur = s % 2
        p_dhcur = p_dhbuf_d + cur * B * P
        p_dhnxt = p_dhbuf_d + (1 - cur) * B * P
        p_dccur = p_dcbuf_d + cur * B * H
        p_dcnxt = p_dcbuf_d + (1 - cur) * B * H
        m_alive = rows < n_alive
        prow = off.to(tl.int64) + rows64
        p_dgrow = p_dg + prow[:, None] * (D * GDH) + d64 * GDH
        p_gyrow = p_gy + prow[:, None] * (D * P) + d64 * P

        # phase 1: gate gradients of this step
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            m_col = cols < H
            m_live = m_alive[:, None] & m_col[None, :]
            m_keep = m_row[:, None] & m_col[None, :]
            o_bh = rows64[:, None] * H + cols[None, :]
            if HAS_PROJ:
                # dh_full[:, cols] = dh @ W_hr[:, cols], dh = carried + grad_y, streamed over P
                b_dh = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                for k0 in range(0, P, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    m_k = ks < P
                    m_bk = m_alive[:, None] & m_k[None, :]
                    b_dp = tl.load(p_dhcur + rows64[:, None] * P + ks[None, :], mask=m_bk, other=0.,
                                   cache_modifier=".cg")
                    b_dp += tl.load(p_gyrow + ks[None, :], mask=m_bk, other=0.).to(tl.float32)
                    b_w = tl.load(p_whr_d + ks[:, None] * H + cols[None, :], mask=m_k[:, None] & m_col[None, :],
                                  other=0.)
                    if DOT_F32:
                        b_w = b_w.to(tl.float32)
                    else:
                        b_dp = b_dp.to(p_whr.dtype.element_ty)
                    b_dh = tl.dot(b_dp, b_w, acc=b_dh, input_precision=PREC)
            else:
                b_dh = tl.load(p_dhcur + o_bh, mask=m_live, other=0., cache_modifier=".cg")
                b_dh += tl.load(p_gyrow + cols[None, :], mask=m_live, other=0.).to(tl.float32)
            p_rrow = p_res + (d64 * N + prow[:, None]) * R + cols[None, :]
            p_dgc = p_dgrow + cols[None, :]
            if MODE == 0:
                b_i = tl.load(p_rrow, mask=m_live, other=0.).to(tl.float32)
                b_f = tl.load(p_rrow + H, mask=m_live, other=0.).to(tl.float32)
                b_g = tl.load(p_rrow + 2 * H, mask=m_live, other=0.).to(tl.float32)
                b_o = tl.load(p_rrow + 3 * H, mask=m_live, other=0.).to(tl.float32)
                b_c = tl.load(p_rrow + 4 * H, mask=m_live, other=0.).to(tl.float32)
                b_cprev = tl.load(p_cprev + (d64 * N + prow[:, None]) * H + cols[None, :], mask=m_live,
                                  other=0.).to(tl.float32)
                b_dcin = tl.load(p_dccur + o_bh, mask=m_keep, other=0., cache_modifier=".cg")
                b_tc = 2. * tl.sigmoid(2. * b_c) - 1.
                b_dc = b_dcin + b_dh * b_o * (1. - b_tc * b_tc)
                tl.store(p_dgc, (b_dc * b_g * b_i * (1. - b_i)).to(p_dg.dtype.element_ty), mask=m_live)
                tl.store(p_dgc + H, (b_dc * b_cprev * b_f * (1. - b_f)).to(p_dg.dtype.element_ty), mask=m_live)
                tl.store(p_dgc + 2 * H, (b_dc * b_i * (1. - b_g * b_g)).to(p_dg.dtype.element_ty), mask=m_live)
                tl.store(p_dgc + 3 * H, (b_dh * b_tc * b_o * (1. - b_o)).to(p_dg.dtype.element_ty), mask=m_live)
                tl.store(p_dcnxt + o_bh, tl.where(m_live, b_dc * b_f, b_dcin), mask=m_keep)
            elif MODE == 1:
                b_r = tl.load(p_rrow, mask=m_live, other=0.).to(tl.float32)
                b_z = tl.load(p_rrow + H, mask=m_live, other=0.).to(tl.float32)
                b_n = tl.load(p_rrow + 2 * H, mask=m_live, other=0.).to(tl.float32)
                b_hn = tl.load(p_rrow + 3 * H, mask=m_live, other=0.).to(tl.float32)
                b_hprev = tl.load(p_hprev + (d64 * N + prow[:, None]) * H + cols[None, :], mask=m_live,
                                  other=0.).to(tl.float32)
                b_dan = b_dh * (1. - b_z) * (1. - b_n * b_n)
                tl.store(p_dgc, (b_dan * b_hn * b_r * (1. - b_r)).to(p_dg.dtype.element_ty), mask=m_live)
                tl.store(p_dgc + H, (b_dh * (b_hprev - b_n) * b_z * (1. - b_z)).to(p_dg.dtype.element_ty),
                         mask=m_live)
                tl.store(p_dgc + 2 * H, (b_dan * b_r).to(p_dg.dtype.element_ty), mask=m_live)
                tl.store(p_dgc + 3 * H, b_dan.to(p_dg.dtype.element_ty), mask=m_live)
            else:
                b_y = tl.load(p_y + prow[:, None] * (D * H) + d64 * H + cols[None, :], mask=m_live,
                              other=0.).to(tl.float32)
                if MODE == 2:
                    b_da = b_dh * (1. - b_y * b_y)
                else:
                    b_da = tl.where(b_y > 0., b_dh, 0.)
                tl.store(p_dgc, b_da.to(p_dg.dtype.element_ty), mask=m_live)
        tl.debug_barrier()

        # phase 2: dh_prev = dG[:, :G*H] @ W_hh (+ dh * z for GRU), W_hh streamed in [BLOCK_K, BLOCK_H] tiles
        for h0 in range(0, P, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            m_col = cols < P
            m_live = m_alive[:, None] & m_col[None, :]
            m_keep = m_row[:, None] & m_col[None, :]
            o_bp = rows64[:, None] * P + cols[None, :]
            acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            for k0 in range(0, GH, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                m_k = ks < GH
                b_dg = tl.load(p_dgrow + ks[None, :], mask=m_alive[:, None] & m_k[None, :], other=0.,
                               cache_modifier=".cg")
                b_w = tl.load(p_whh_d + ks[:, None] * P + cols[None, :], mask=m_k[:, None] & m_col[None, :],
                              other=0.)
                if DOT_F32:
                    b_dg = b_dg.to(tl.float32)
                    b_w = b_w.to(tl.float32)
                acc = tl.dot(b_dg, b_w, acc=acc, input_precision=PREC)
            b_dhcur = tl.load(p_dhcur + o_bp, mask=m_keep, other=0., cache_modifier=".cg")
            if MODE == 1:
                b_dh = b_dhcur + tl.load(p_gyrow + cols[None, :], mask=m_live, other=0.).to(tl.float32)
                b_z = tl.load(p_res + (d64 * N + prow[:, None]) * R + H + cols[None, :], mask=m_live,
                              other=0.).to(tl.float32)
                acc += b_dh * b_z
            if HAS_PROJ:
                b_dh = b_dhcur + tl.load(p_gyrow + cols[None, :], mask=m_live, other=0.).to(tl.float32)
                tl.store(p_dhp + prow[:, None] * (D * P) + d64 * P + cols[None, :],
                         b_dh.to(p_dhp.dtype.element_ty), mask=m_live)
            tl.store(p_dhnxt + o_bp, tl.where(m_live, acc, b_dhcur), mask=m_keep)
        tl.debug_barrier()

    fin = T % 2
    for h0 in range(0, P, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        m = m_row[:, None] & (cols < P)[None, :]
        o_bp = rows64[:, None] * P + cols[None, :]
        b_dh = tl.load(p_dhbuf_d + fin * B * P + o_bp, mask=m, other=0., cache_modifier=".cg")
        tl.store(p_dhx + d64 * B * P + o_bp, b_dh.to(p_dhx.dtype.element_ty), mask=m)
    if MODE == 0:
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            m = m_row[:, None] & (cols < H)[None, :]
            o_bh = rows64[:, None] * H + cols[None, :]
            b_dc = tl.load(p_dcbuf_d + fin * B * H + o_bh, mask=m, other=0., cache_modifier=".cg")
            tl.store(p_dcx + d64 * B * H + o_bh, b_dc.to(p_dcx.dtype.element_ty), mask=m)
