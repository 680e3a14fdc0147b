"""The `cpu` backend (csrc/cpu) against the reference backend, op by op: forward outputs, reserve and every
gradient, for all modes, projection, both directions, packed variable lengths (incl. length-1 sequences), the
persistent (matrix-vector, B <= 8 or small weights) and GEMM-per-step time loops, every kernel build the CPU runs (baseline, AVX2, AVX-512),
float64 tight and float32 to float32 rounding; opcheck on the internal ops; the GIL is released while they run.
Test ids: mode-D{directions}-B{batch}-{lengths}-{proj}-{dtype}-{capability}.
"""
import os
import platform
import threading
import time

import pytest
import torch

from fusedrnn.backends import GATES, get_backend
from helpers import MASKS, assert_masked_grads

cpu = pytest.importorskip("fusedrnn.cpu")
pytestmark = pytest.mark.skipif(cpu._C is None, reason="fusedrnn._C is not built")

MODES = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
# float64: both sides compute the same formulas in the same precision; float32: vs the float64 reference, a few
# float32 roundings per step, accumulated over the sequence.
TOL = {torch.float64: 1e-10, torch.float32: 3e-5}


def capabilities():
    """Every kernel build this CPU runs (the baseline always)."""
    caps = ["default"]
    for cap in ("avx2", "avx512"):
        try:
            cpu.set_capability(cap)
            caps.append(cap)
        except RuntimeError:
            pass
        finally:
            cpu.set_capability("auto")
    return caps


@pytest.fixture(params=capabilities())
def capability(request):
    cpu.set_capability(request.param)
    yield request.param
    cpu.set_capability("auto")


def make_case(mode, D, B, lengths, I, H, proj, dtype, bias=True, seed=0):
    """Random op arguments. lengths: per-sequence lengths (sorted, longest first) or None for all equal (T=5)."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [5] * B
    T = lengths[0]
    bs = torch.tensor([sum(1 for n in lengths if n > t) for t in range(T)], dtype=torch.int64)
    N = int(bs.sum())
    G = GATES[mode]
    P = proj or H

    def rnd(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)

    weights = []
    for _ in range(D):
        weights += [rnd(G * H, I) * 0.5, rnd(G * H, P) * 0.5]
        if bias:
            weights += [rnd(G * H) * 0.5, rnd(G * H) * 0.5]
        if proj:
            weights.append(rnd(P, H) * 0.5)
    x = rnd(N, I)
    hx = rnd(D, B, P) * 0.5
    cx = rnd(D, B, H) * 0.5 if mode == "lstm" else None
    grads = (rnd(N, D * P), rnd(D, B, P), rnd(D, B, H) if mode == "lstm" else torch.zeros(0, dtype=dtype))
    return dict(mode=mode, x=x, batch_sizes=bs, hx=hx, cx=cx, weights=weights, has_biases=bias, num_directions=D), grads


def forward(backend, args, train):
    a = args
    return get_backend(backend).forward(a["mode"], a["x"], a["batch_sizes"], a["hx"], a["cx"], a["weights"],
                                        a["has_biases"], a["num_directions"], train)


def cast_tensor(t, dtype):
    """t in dtype; None and the int64 batch sizes as they are."""
    return t if t is None or t.dtype == torch.int64 else t.to(dtype)


def cast_args(args, dtype):
    """make_case's op arguments with every float tensor (weights included) in dtype."""
    return {k: ([cast_tensor(w, dtype) for w in v] if k == "weights" else
                cast_tensor(v, dtype) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def run(backend, args, grads, dtype=None):
    """Forward (train=True) and backward of one backend; inputs cast to dtype first if given."""
    cast = (lambda t: cast_tensor(t, dtype)) if dtype else (lambda t: t)
    a = cast_args(args, dtype) if dtype else args
    b = get_backend(backend)
    y, hy, cy, reserve = forward(backend, a, True)
    gy, ghy, gcy = (cast(t) for t in grads)
    gx, ghx, gcx, gws = b.backward(a["mode"], gy, ghy, gcy, a["x"], a["batch_sizes"], a["hx"], a["cx"],
                                   a["weights"], a["has_biases"], a["num_directions"], y, reserve)
    return {"y": y, "hy": hy, "cy": cy, "reserve": reserve, "grad_x": gx, "grad_hx": ghx, "grad_cx": gcx,
            **{f"grad_w{i}": w for i, w in enumerate(gws)}}


def assert_match(ours, ref, tol):
    assert ours.keys() == ref.keys()
    for k in ref:
        a, r = ours[k].double(), ref[k].double()
        assert a.shape == r.shape, (k, a.shape, r.shape)
        assert torch.isfinite(a).all(), f"{k}: non-finite values"
        scale = max(r.abs().max().item(), 1e-3) if r.numel() else 1.0
        err = (a - r).abs().max().item() / scale if r.numel() else 0.0
        assert err <= tol, f"{k}: relative error {err:.3g} > {tol:g}"


CASES = [
    # (D, B, lengths, proj): B <= 8 takes the matrix-vector path, B > 8 the GEMM-per-step path
    (1, 1, None, 0),
    (2, 3, [5, 5, 3, 2, 1][:3], 0),
    (2, 5, [6, 4, 4, 1, 1], 0),
    (1, 8, None, 0),
    (2, 11, [7, 7, 6, 5, 5, 3, 3, 2, 1, 1, 1], 0),
    (1, 12, None, 0),
    (2, 4, [4, 3, 1, 1], 5),
    (2, 10, [5, 5, 4, 4, 3, 3, 2, 2, 1, 1], 5),
]


def case_id(c):
    D, B, lengths, proj = c
    return f"D{D}-B{B}-{'packed' if lengths else 'padded'}-{'proj' if proj else 'noproj'}"


# proj_size exists only for LSTM: the other modes take the cases without it.
MODE_CASES = [(m, c) for m in MODES for c in CASES if m == "lstm" or not c[3]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode,case", MODE_CASES, ids=lambda v: v if isinstance(v, str) else case_id(v))
def test_matches_reference(mode, case, dtype, capability):
    D, B, lengths, proj = case
    # H = 40 is not a multiple of the vector width and splits into two thread slices of 24 and 16 hidden units.
    args, grads = make_case(mode, D, B, lengths, I=7, H=40, proj=proj, dtype=torch.float64)
    ref = run("reference", args, grads)
    ours = run("cpu", args, grads, dtype=dtype)
    assert ours["y"].dtype == dtype
    assert_match(ours, ref, TOL[dtype])


@pytest.mark.parametrize("loop", ["persistent", "persistent-unpacked", "gemm"])
@pytest.mark.parametrize("mode,case", [("lstm", (2, 11, [7, 7, 6, 5, 5, 3, 3, 2, 1, 1, 1], 0)),
                                       ("lstm", (2, 10, [5, 5, 4, 4, 3, 3, 2, 2, 1, 1], 5)),
                                       ("gru", (2, 19, None, 0)), ("rnn_tanh", (1, 3, [4, 2, 2], 0)),
                                       ("gru", (1, 1, None, 0)), ("lstm", (2, 1, None, 4))])
def test_both_time_loops(mode, case, loop, monkeypatch):
    """Each shape through both loops: persistent (thread slices; W_hh repacked into panels, or as it is, which
    batch 1 takes) and GEMM per step."""
    monkeypatch.setenv("FUSEDRNN_CPU_LOOP", loop.split("-")[0])
    monkeypatch.setenv("FUSEDRNN_CPU_PACK", "0" if loop.endswith("unpacked") else "1")
    D, B, lengths, proj = case
    args, grads = make_case(mode, D, B, lengths, I=7, H=40, proj=proj, dtype=torch.float64)
    assert_match(run("cpu", args, grads), run("reference", args, grads), TOL[torch.float64])


@pytest.mark.parametrize("pack", ["0", "1"], ids=["unpacked", "packed"])
@pytest.mark.parametrize("B", range(1, 9))
def test_small_batch_kernels_float32(B, pack, capability, monkeypatch):
    """Every batch-row block of the persistent loop's kernels in float32, where the AVX-512 and AVX2 builds sum
    the matrix-vector product's accumulators with a shuffle tree: batch 1-8 (B > 4 blocks of 2 weight rows,
    B 3-4 of 4, 2 of 8, 1 of 16 with AVX-512), H = 40 (thread slices of 24 and 16 rows: whole blocks and tails;
    K = 40 is not a multiple of the vector width), on W_hh as it is and on packed panels."""
    monkeypatch.setenv("FUSEDRNN_CPU_LOOP", "persistent")
    monkeypatch.setenv("FUSEDRNN_CPU_PACK", pack)
    monkeypatch.setenv("FUSEDRNN_CPU_SPLIT", "hidden")
    for mode in ("lstm", "gru"):
        args, grads = make_case(mode, 1, B, None, I=7, H=40, proj=0, dtype=torch.float64)
        assert_match(run("cpu", args, grads, dtype=torch.float32), run("reference", args, grads),
                     TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("split", ["hidden", "batch"])
@pytest.mark.parametrize("mode,B,proj", [("lstm", 6, 0), ("gru", 8, 0), ("lstm", 13, 0), ("lstm", 7, 50),
                                         ("rnn_tanh", 5, 0)])
def test_wide_panels(mode, B, proj, split, dtype, capability, monkeypatch):
    """The packed panels of up to three vectors of columns (AVX-512, from 6 rows a block; 2 vectors below that
    and in the other builds): H = 88 cuts into thread slices of 48 and 40 hidden units (float32: a whole
    three-vector panel, and one whose last vector is half full; float64: 3 + 3 and 3 + 2 vectors), or, with the
    batch split, one slice of 88 a gate (float32: 3 + 3 vectors, the last half full); P = 50 cuts the
    projection's panels likewise; B = 13 gives row blocks of 7 and 6, B = 5 the two-vector panels. Forward and
    backward, packed rows and strips, against the reference."""
    monkeypatch.setenv("FUSEDRNN_CPU_LOOP", "persistent")
    monkeypatch.setenv("FUSEDRNN_CPU_PACK", "1")
    monkeypatch.setenv("FUSEDRNN_CPU_SPLIT", split)
    args, grads = make_case(mode, 1, B, None, I=9, H=88, proj=proj, dtype=torch.float64)
    assert_match(run("cpu", args, grads, dtype=dtype), run("reference", args, grads), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("split", ["hidden", "batch"])
@pytest.mark.parametrize("mode", MODES)
def test_gate_pass_unit_groups(mode, split, dtype, capability, monkeypatch):
    """The forward gate passes take four vectors of units at a time under AVX-512 (two under AVX2), then two,
    then one, the last partly filled: H = 120 gives, with the batch split, one slice of 120 units a gate (float32
    4 + 2 + 1 + a half vector; float64 4 + 4 + 4 + 2 + 1) and, with hidden slices, slices of 64 and 56 units
    (float32 4 and 2 + 1 + a half). Training forward and backward (the LSTM backward's gate pass groups the same
    way) and the inference forward against the reference; B = 9 for the batch split's row blocks."""
    monkeypatch.setenv("FUSEDRNN_CPU_LOOP", "persistent")
    monkeypatch.setenv("FUSEDRNN_CPU_SPLIT", split)
    args, grads = make_case(mode, 1, 9, None, I=5, H=120, proj=0, dtype=torch.float64)
    assert_match(run("cpu", args, grads, dtype=dtype), run("reference", args, grads), TOL[dtype])
    ours = forward("cpu", cast_args(args, dtype), False)[:3]
    ref = forward("reference", args, False)[:3]
    assert_match(dict(zip("y hy cy".split(), ours)), dict(zip("y hy cy".split(), ref)), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("split", ["hidden", "batch"])
@pytest.mark.parametrize("B,H,varlen,proj", [(3, 40, False, 0), (8, 40, False, 0), (13, 88, True, 0), (7, 40, True, 5),
                                             (70, 24, False, 0), (6, 260, False, 0)],
                         ids=["B3", "B8", "B13-packed", "B7-proj", "B70", "K260"])
def test_fused_lstm_cell_is_bitwise_the_gate_pass(B, H, varlen, proj, split, dtype, capability, monkeypatch):
    """The LSTM forward's product with the cell fused into it (FUSEDRNN_CPU_FUSED=1, KernelTable::lstm_panel_fwd:
    blocks of up to 6 rows with AVX-512, 2 elsewhere, one vector of units of each gate) gives bitwise the outputs,
    states and reserve of panel_gemm into the pre-activations and the gate pass (=0), in training and inference,
    and matches the reference. H = 40 and 88: slices whose last vector of units is partly filled; B 3-13: one and
    several row blocks, packed lengths (rows ending mid-sequence); B = 70: more rows than one call keeps the sums
    of (64); H = 260: K = 260 > 256, whose first 256 terms go to the pre-activations first (kSumChunk); a
    projection (its own panels after the cell)."""
    monkeypatch.setenv("FUSEDRNN_CPU_LOOP", "persistent")
    monkeypatch.setenv("FUSEDRNN_CPU_PACK", "1")
    monkeypatch.setenv("FUSEDRNN_CPU_SPLIT", split)
    lengths = [max(1, 6 - j // 3) for j in range(B)] if varlen else None
    args, grads = make_case("lstm", 2, B, lengths, I=9, H=H, proj=proj, dtype=torch.float64)
    a = cast_args(args, dtype)
    outs = {}
    for fused in ("0", "1"):
        monkeypatch.setenv("FUSEDRNN_CPU_FUSED", fused)
        outs[fused] = [*forward("cpu", a, True), *forward("cpu", a, False)[:3]]
    for name, x, y in zip("y hy cy reserve y_inf hy_inf cy_inf".split(), outs["0"], outs["1"]):
        assert torch.equal(x, y), name
    assert_match(run("cpu", args, grads, dtype=dtype), run("reference", args, grads), TOL[dtype])


def _float32_train_and_inference_match_reference(mode, case):
    """The float32 cpu layer's training forward and backward, and its inference forward, against the float64
    reference to float32 rounding (I=20, H=24)."""
    D, B, lengths, proj = case
    args, grads = make_case(mode, D, B, lengths, I=20, H=24, proj=proj, dtype=torch.float64)
    ref = run("reference", args, grads)
    assert_match(run("cpu", args, grads, dtype=torch.float32), ref, TOL[torch.float32])
    y, hy, _, _ = forward("cpu", cast_args(args, torch.float32), False)
    torch.testing.assert_close(y.double(), ref["y"], rtol=0, atol=TOL[torch.float32])
    torch.testing.assert_close(hy.double(), ref["hy"], rtol=0, atol=TOL[torch.float32])


@pytest.mark.parametrize("bwd", ["-", "onednn", "blas"])
@pytest.mark.parametrize("library", ["blas", "onednn"])
@pytest.mark.parametrize("mode,case", [("lstm", (2, 6, [9, 8, 8, 5, 3, 1], 0)), ("lstm", (1, 4, None, 3)),
                                       ("lstm", (2, 3, None, 0)), ("gru", (2, 5, [8, 8, 4, 3, 1], 0)),
                                       ("rnn_relu", (1, 3, None, 0))])
def test_gemm_library(mode, case, library, bwd, monkeypatch):
    """The float32 layers' input projections (into a chunk buffer, inference, or the reserve's strided rows,
    training) on BLAS or on torch's oneDNN matmul (FUSEDRNN_CPU_GEMM; the default on AMD CPUs), and the backward's
    GEMMs (weight gradients accumulated over time chunks, dW_hh from views of y and hx or a gathered H_prev,
    grad_x summed over two directions) on either (FUSEDRNN_CPU_GEMM_BWD; unset: oneDNN for LSTM where the forward
    has it, but BLAS for chunks as small as these): the same results to float32 rounding, in several time chunks. oneDNN's fp32 matmul needs
    AVX-512 (BW, VL, DQ): on such a CPU it must run, elsewhere the layers fall back to BLAS."""
    monkeypatch.setenv("FUSEDRNN_CPU_GEMM", library)
    monkeypatch.setenv("FUSEDRNN_CPU_SMALL_PROJ", "0")  # these chunks are small enough for the matrix-vector kernel
    monkeypatch.setenv("FUSEDRNN_CPU_SMALL_BWD", "0")  # and the backward's products for the vector-matrix kernel
    if bwd != "-":
        monkeypatch.setenv("FUSEDRNN_CPU_GEMM_BWD", bwd)
    monkeypatch.setenv("FUSEDRNN_CPU_CHUNK_ROWS", "5")
    _float32_train_and_inference_match_reference(mode, case)
    onednn_runs = platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() == "AVX512"
    assert cpu.gemm_library() == (library if onednn_runs else "blas")


@pytest.mark.parametrize("rows", ["0", "8", "1000"])
@pytest.mark.parametrize("mode,case", [("lstm", (2, 6, [9, 8, 8, 5, 3, 1], 0)), ("lstm", (1, 4, None, 3)),
                                       ("gru", (2, 5, [8, 8, 4, 3, 1], 0)), ("rnn_tanh", (1, 3, None, 0))])
def test_small_input_projection(mode, case, rows, monkeypatch):
    """Input projections of at most FUSEDRNN_CPU_SMALL_PROJ rows (default 16, or 64 under 5 MFLOP: a cell's step,
    short sequences) run on the matrix-vector kernel, larger ones on the GEMM. All on the GEMM (0); inference
    chunks of 5-9 rows on either and the training projection of the whole sequence on the GEMM (8); all on the
    kernel (1000): the same forward and backward to float32 rounding, training (into the reserve's strided rows)
    and inference."""
    monkeypatch.setenv("FUSEDRNN_CPU_SMALL_PROJ", rows)
    monkeypatch.setenv("FUSEDRNN_CPU_CHUNK_ROWS", "5")
    _float32_train_and_inference_match_reference(mode, case)


@pytest.mark.parametrize("small", ["0", "1"])
@pytest.mark.parametrize("chunk_rows", ["1", "5", "1000"])
@pytest.mark.parametrize("mode,case", [("lstm", (2, 6, [9, 8, 8, 5, 3, 1], 0)), ("lstm", (1, 4, None, 3)),
                                       ("lstm", (2, 1, None, 0)), ("gru", (2, 5, [8, 8, 4, 3, 1], 0)),
                                       ("gru", (1, 1, None, 0)), ("rnn_tanh", (2, 3, None, 0))])
def test_small_backward_products(mode, case, chunk_rows, small, monkeypatch):
    """The backward's products with few rows (grad_x = dG W_ih over a chunk's rows; the weight gradients, summed
    over a chunk's rows, accumulated chunk after chunk, dW_hh from views of y and hx or a gathered H_prev, dW_hr of
    a projection) on the vector-matrix kernel (FUSEDRNN_CPU_SMALL_BWD=1, the default for products this small) or on
    BLAS (0): the same gradients, float64 against the reference to its tolerance and float32 to float32 rounding,
    in chunks of one row (a chunk a step), a few rows and one chunk (over 16 rows of some cases: BLAS there)."""
    monkeypatch.setenv("FUSEDRNN_CPU_SMALL_BWD", small)
    monkeypatch.setenv("FUSEDRNN_CPU_CHUNK_ROWS", chunk_rows)
    D, B, lengths, proj = case
    args, grads = make_case(mode, D, B, lengths, I=5, H=24, proj=proj, dtype=torch.float64)
    assert_match(run("cpu", args, grads), run("reference", args, grads), TOL[torch.float64])
    _float32_train_and_inference_match_reference(mode, case)


@pytest.mark.parametrize("step", ["blas", "onednn"])
@pytest.mark.parametrize("mode,case", [("lstm", (2, 6, [9, 8, 8, 5, 3, 1], 0)), ("lstm", (1, 4, None, 3)),
                                       ("gru", (2, 5, [8, 8, 4, 3, 1], 0)), ("rnn_tanh", (1, 3, None, 0))])
def test_gemm_loop_step_library(mode, case, step, monkeypatch):
    """The GEMM-per-step loops' products (the recurrence, LSTM's projection, the backward's dG W_hh by parts) on
    BLAS or on oneDNN's matmul (FUSEDRNN_CPU_GEMM_STEP; unset: oneDNN where the input projections have it, with
    BLAS for operands it would copy): the same forward and backward to float32 rounding."""
    monkeypatch.setenv("FUSEDRNN_CPU_LOOP", "gemm")
    monkeypatch.setenv("FUSEDRNN_CPU_GEMM", "onednn")
    monkeypatch.setenv("FUSEDRNN_CPU_GEMM_STEP", step)
    _float32_train_and_inference_match_reference(mode, case)


@pytest.mark.parametrize("schedule", ["dirs-parallel", "dirs-serial", "batch-split"])
@pytest.mark.parametrize("chunk_rows", [1, 5, 9])
@pytest.mark.parametrize("loop", ["persistent", "gemm"])
@pytest.mark.parametrize("mode,case", [("lstm", (2, 6, [9, 8, 8, 5, 3, 1], 0)), ("lstm", (2, 4, [7, 6, 2, 2], 3)),
                                       ("gru", (2, 5, [8, 8, 4, 3, 1], 0)), ("rnn_relu", (2, 3, [6, 4, 4], 0)),
                                       ("lstm", (1, 7, [9, 9, 8, 6, 6, 2, 1], 4)), ("gru", (1, 3, None, 0)),
                                       ("lstm", (2, 3, None, 2))])
def test_time_chunks(mode, case, loop, chunk_rows, schedule, monkeypatch):
    """The loops run the sequence in chunks of about FUSEDRNN_CPU_CHUNK_ROWS packed rows (inference: the input
    projections chunk by chunk; backward: the gate gradients and the weight-gradient GEMMs): one row (a chunk per
    step), a few rows (chunks of several steps, a short tail merged into the chunk before it), and more rows
    than the sequence has (one chunk) give the same forward (train and inference) and backward; with the
    persistent loop's threads on the two directions (FUSEDRNN_CPU_DIRS=parallel), on slices of hidden units
    (serial directions) or on blocks of batch rows (FUSEDRNN_CPU_SPLIT=batch; uneven lengths: blocks of unequal
    row counts, some of whose sequences end, or in reverse begin, before others'). Equal lengths: dW_hh from
    views of y and hx (chunks with and without the first step of either direction) instead of a gathered H_prev."""
    monkeypatch.setenv("FUSEDRNN_CPU_LOOP", loop)
    monkeypatch.setenv("FUSEDRNN_CPU_DIRS", "parallel" if schedule == "dirs-parallel" else "serial")
    monkeypatch.setenv("FUSEDRNN_CPU_SPLIT", "batch" if schedule == "batch-split" else "hidden")
    D, B, lengths, proj = case
    args, grads = make_case(mode, D, B, lengths, I=5, H=24, proj=proj, dtype=torch.float64)
    ref = run("reference", args, grads)
    monkeypatch.setenv("FUSEDRNN_CPU_CHUNK_ROWS", str(chunk_rows))
    assert_match(run("cpu", args, grads), ref, TOL[torch.float64])
    y, hy, cy, _ = forward("cpu", args, False)
    torch.testing.assert_close(y, ref["y"], rtol=0, atol=TOL[torch.float64])
    torch.testing.assert_close(hy, ref["hy"], rtol=0, atol=TOL[torch.float64])
    # grad_y expanded from one row (strides (0, 1)): read in place with row stride 0, same gradients
    expanded = (grads[0][:1].expand_as(grads[0]), *grads[1:])
    monkeypatch.delenv("FUSEDRNN_CPU_CHUNK_ROWS")
    ref = run("reference", args, expanded)
    monkeypatch.setenv("FUSEDRNN_CPU_CHUNK_ROWS", str(chunk_rows))
    assert_match(run("cpu", args, expanded), ref, TOL[torch.float64])


@pytest.mark.parametrize("layout", ["scalar-expanded", "row-slice", "transposed"])
@pytest.mark.parametrize("mode,case", [("lstm", (2, 4, [5, 4, 2, 2], 3)), ("gru", (1, 3, None, 0))])
def test_grad_y_layouts(mode, case, layout, monkeypatch):
    """grad_y in the layouts autograd hands over: expanded from a scalar (y.sum(), strides (0, 0): one row read
    with row stride 0), a slice of wider rows (row stride above the width: read in place), transposed (column
    stride not 1: copied chunk by chunk); every one gives the gradients of the same values held contiguously."""
    monkeypatch.setenv("FUSEDRNN_CPU_CHUNK_ROWS", "5")
    D, B, lengths, proj = case
    args, grads = make_case(mode, D, B, lengths, I=5, H=24, proj=proj, dtype=torch.float64)
    g = grads[0]
    if layout == "scalar-expanded":
        g = torch.tensor(0.75, dtype=g.dtype).expand_as(g)
    elif layout == "row-slice":
        g = torch.cat([g, torch.randn_like(g)], 1)[:, :g.shape[1]]
    else:
        g = g.t().contiguous().t()
    assert not g.is_contiguous()
    ref = run("reference", args, (g.contiguous(), *grads[1:]))
    assert_match(run("cpu", args, (g, *grads[1:])), ref, TOL[torch.float64])


@pytest.mark.parametrize("mode", MODES)
def test_no_bias_and_large_hidden(mode, capability):
    """No biases; H = 70 (several vectors plus a tail per thread slice); T = 1 (a cell call)."""
    args, grads = make_case(mode, 2, 9, [1] * 9, I=13, H=70, proj=0, dtype=torch.float64, bias=False)
    assert_match(run("cpu", args, grads), run("reference", args, grads), TOL[torch.float64])
    args, grads = make_case(mode, 1, 2, [3, 1], I=13, H=70, proj=0, dtype=torch.float64, bias=False)
    assert_match(run("cpu", args, grads), run("reference", args, grads), TOL[torch.float64])


def test_inference_outputs_and_empty_reserve():
    args, _ = make_case("lstm", 2, 3, [4, 2, 1], I=5, H=16, proj=0, dtype=torch.float32)
    y, hy, cy, reserve = forward("cpu", args, False)
    y_t, hy_t, cy_t, reserve_t = forward("cpu", args, True)
    assert reserve.shape == (0,) and reserve_t.shape == (2, int(args["batch_sizes"].sum()), 5 * 16)
    # The same kernels, but not always bitwise: with the directions on threads of their own the inference
    # projections run chunk by chunk inside a thread (MKL single-threaded) and the training ones before the loop on
    # both threads, which on some CPUs (an AMD EPYC here) rounds differently by an ulp.
    for a, b in ((y, y_t), (hy, hy_t), (cy, cy_t)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_capability_switch():
    """auto runs the best build torch's own CPU capability allows; a build this CPU cannot run is refused."""
    cpu.set_capability("default")
    assert cpu.capability() == "DEFAULT"
    cpu.set_capability("auto")
    caps = capabilities()
    assert cpu.capability() == caps[-1].upper()
    torch_cap = torch.backends.cpu.get_cpu_capability()
    if torch_cap in ("AVX2", "AVX512") and platform.machine() in ("x86_64", "AMD64"):
        assert "avx2" in caps
    if torch_cap == "AVX512" and platform.machine() in ("x86_64", "AMD64"):
        assert "avx512" in caps
    for cap in {"avx2", "avx512"} - set(caps):
        with pytest.raises(RuntimeError, match="cannot run"):
            cpu.set_capability(cap)
        assert cpu.capability() == caps[-1].upper()  # unchanged
    with pytest.raises(ValueError):
        cpu.set_capability("sse9")


def test_bad_inputs_raise():
    args, _ = make_case("gru", 1, 2, None, I=5, H=8, proj=0, dtype=torch.float32)
    bad = dict(args, batch_sizes=torch.tensor([2, 3, 1, 1, 1]))
    with pytest.raises(RuntimeError, match="non-increasing"):
        forward("cpu", bad, False)
    bad = dict(args, weights=args["weights"][:3])
    with pytest.raises(RuntimeError, match="weights"):
        forward("cpu", bad, False)


@pytest.mark.parametrize("mode,proj,dtype", [("lstm", 0, torch.float64), ("lstm", 3, torch.float64),
                                            ("gru", 0, torch.float64), ("rnn_relu", 0, torch.float64),
                                            ("lstm", 3, torch.bfloat16), ("gru", 0, torch.float16)])
def test_opcheck(mode, proj, dtype):
    args, grads = make_case(mode, 2, 3, [3, 2, 1], I=4, H=6, proj=proj, dtype=dtype)
    fwd_args = (args["mode"], args["x"], args["batch_sizes"], args["hx"], args["cx"], args["weights"],
                args["has_biases"], args["num_directions"], True)
    torch.library.opcheck(torch.ops.fusedrnn.cpu_rnn_forward.default, fwd_args)
    y, _, _, reserve = torch.ops.fusedrnn.cpu_rnn_forward(*fwd_args)
    bwd_args = (args["mode"], *grads, args["x"], args["batch_sizes"], args["hx"], args["cx"], args["weights"],
                args["has_biases"], args["num_directions"], y, reserve)
    for mask in ([True, True, True], [False, True, False], [True, False, True]):
        torch.library.opcheck(torch.ops.fusedrnn.cpu_rnn_backward.default, (*bwd_args, mask))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("loop", ["persistent", "gemm"])
@pytest.mark.parametrize("mode,case", [("lstm", (2, 6, [9, 8, 8, 5, 3, 1], 0)), ("lstm", (1, 4, None, 3)),
                                       ("gru", (2, 5, [8, 8, 4, 3, 1], 0)), ("gru", (1, 12, None, 0)),
                                       ("rnn_tanh", (2, 3, None, 0)), ("lstm", (1, 1, None, 0))])
def test_backward_output_mask(mode, case, loop, dtype, monkeypatch):
    """cpu_rnn_backward's output_mask (x, the states, the weights): every gradient asked for is bitwise the one
    the full backward gives (skipping grad_x's GEMM, the first step's recurrent product or the weight GEMMs
    changes no other result); each one not asked for comes back as an empty [0]. Both time loops (the skipped
    first-step product lives in each), both directions, packed lengths, projection, small time chunks."""
    monkeypatch.setenv("FUSEDRNN_CPU_LOOP", loop)
    monkeypatch.setenv("FUSEDRNN_CPU_CHUNK_ROWS", "5")
    D, B, lengths, proj = case
    args, grads = make_case(mode, D, B, lengths, I=5, H=24, proj=proj, dtype=dtype)
    fwd = (args["mode"], args["x"], args["batch_sizes"], args["hx"], args["cx"], args["weights"],
           args["has_biases"], args["num_directions"], True)
    y, _, _, reserve = torch.ops.fusedrnn.cpu_rnn_forward(*fwd)
    bwd = (args["mode"], *grads, args["x"], args["batch_sizes"], args["hx"], args["cx"], args["weights"],
           args["has_biases"], args["num_directions"], y, reserve)
    full = torch.ops.fusedrnn.cpu_rnn_backward(*bwd, [True, True, True])
    for mask in MASKS:
        assert_masked_grads(torch.ops.fusedrnn.cpu_rnn_backward(*bwd, list(mask)), full, mask, mode == "lstm")


def test_gil_released():
    """A Python thread keeps running while a long kernel call is in flight."""
    args, _ = make_case("lstm", 1, 1, [400], I=64, H=256, proj=0, dtype=torch.float32)
    ticks = []
    done = threading.Event()

    def ticker():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    t0 = time.perf_counter()
    forward("cpu", args, False)
    solo = time.perf_counter() - t0
    th = threading.Thread(target=ticker)
    th.start()
    time.sleep(0.01)
    n0 = len(ticks)
    for _ in range(max(1, int(0.1 / max(solo, 1e-4)))):
        forward("cpu", args, False)
    n1 = len(ticks)
    done.set()
    th.join()
    assert n1 - n0 >= 5, f"only {n1 - n0} ticks while the kernel ran: the GIL was held"


def test_tanh_accuracy(capability):
    """The kernels' float32 tanh (AVX2 / AVX-512: m / (m + 2), m = e^(2|x|) - 1; the baseline build a Taylor
    series below 0.5, exp above) within 2 ulp of the float64 tanh over a dense sweep (1.75 under AVX-512, whose
    quotient comes from the reciprocal estimate with one exact-remainder correction: 1.62 measured on
    benchmarks/gate_micro.py's sweep, 1.96 with the division and a separate correction), at the old branch point, and exact on 0, +-inf, NaN, tiny and huge inputs (-0 becomes +0 before
    tanh: the recurrent term adds +0, as in torch.nn). It runs through the op:
    an RNN (tanh) with I = H = 1, W_ih = 1, W_hh = 0 and no biases computes y = tanh(x) row by row."""
    specials = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-40, 0.4999999, 0.5, 0.50000006, -0.5, 9.0, 88.0, -88.0,
                             1e10, -1e10, float("inf"), -float("inf"), float("nan")])
    # every float in [0.2030, 0.2038], where the division with a separate correction was at its worst (1.96 ulp
    # at 0.2034182)
    lo, hi = (torch.tensor([v], dtype=torch.float32).view(torch.int32).item() for v in (0.2030, 0.2038))
    near = torch.arange(lo, hi + 1, dtype=torch.int32).view(torch.float32)
    x = torch.cat([torch.linspace(-12, 12, 240001), torch.logspace(-8, 1.2, 20001), near, specials]).float()
    ones, zeros = torch.ones(1, 1), torch.zeros(1, 1)
    y, _, _, _ = get_backend("cpu").forward("rnn_tanh", x[:, None], torch.tensor([x.numel()]),
                                            torch.zeros(1, x.numel(), 1), None, [ones, zeros], False, 1, False)
    y = y[:, 0]
    ref = torch.tanh(x.double())
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(y[~finite & ~torch.isnan(ref)], ref[~finite & ~torch.isnan(ref)].float())
    r32 = ref[finite].float().abs()
    ulp = (torch.nextafter(r32, torch.tensor(float("inf"))) - r32).double()
    err = ((y[finite].double() - ref[finite]).abs() / ulp).max().item()
    bound = 1.75 if capability == "avx512" else 2.0
    assert err <= bound, f"tanh under {capability}: {err:.2f} ulp"


def test_sigmoid_accuracy(capability):
    """The kernels' float32 sigmoid, 1 / (1 + e^-x) with the kernels' inline exp, within 3.5 ulp of the float64
    sigmoid wherever it is a normal float (2.46 measured; ATen's exp_u20 in its place 6.0 near x = -87), exactly 1
    above 30, below the normal range 0 or the float of the true value, and NaN for NaN. It runs through the op: a
    GRU with I = H = 1, the input weight on the z gate only, W_hh = 0, no biases and h_prev = 1 computes
    n = tanh(0) = 0, so h = z + (1 - z) * 0 = sigmoid(x) row by row."""
    specials = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 30.0, 100.0, 1e10, 1e38, -88.5, -104.0, -1e10, -1e38,
                             float("nan")])
    x = torch.cat([torch.linspace(-87, 30, 400001), -torch.logspace(-8, 1.9, 20001), torch.logspace(-8, 1.4, 20001),
                   specials]).float()
    w_ih = torch.tensor([[0.0], [1.0], [0.0]])
    y, _, _, _ = get_backend("cpu").forward("gru", x[:, None], torch.tensor([x.numel()]), torch.ones(1, x.numel(), 1),
                                            None, [w_ih, torch.zeros(3, 1)], False, 1, False)
    y = y[:, 0]
    ref = torch.sigmoid(x.double())
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    normal = ref >= torch.finfo(torch.float32).tiny
    tail = ~normal & ~torch.isnan(ref)
    assert ((y[tail] == 0) | (y[tail] == ref[tail].float())).all()
    r32 = ref[normal].float()
    ulp = (torch.nextafter(r32, torch.tensor(float("inf"))) - r32).double()
    err = ((y[normal].double() - ref[normal]).abs() / ulp).max().item()
    assert err <= 3.5, f"sigmoid: {err:.2f} ulp"
    assert torch.equal(y[x >= 30], torch.ones_like(y[x >= 30]))


@pytest.mark.parametrize("dirs", ["parallel", "serial"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_directions_on_threads_through_the_module(kind, dirs, monkeypatch):
    """A bidirectional module whose parameters require grad, the directions on threads of their own: the ATen ops
    the workers call (chunk GEMMs, weight gradients) run with the caller's autograd state, and forward and every
    gradient match torch.nn in float64."""
    import fusedrnn
    monkeypatch.setenv("FUSEDRNN_CPU_DIRS", dirs)
    monkeypatch.setenv("FUSEDRNN_CPU_CHUNK_ROWS", "7")  # several chunks, so the inference path chunks too
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        ref = getattr(torch.nn, kind)(5, 12, num_layers=2, bidirectional=True).double()
        ours = getattr(fusedrnn, kind)(5, 12, num_layers=2, bidirectional=True, backend="cpu").double()
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(6, 4, 5, dtype=torch.float64)
        outs = []
        for m in (ref, ours):
            xx = x.clone().requires_grad_()
            y, _ = m(xx)
            (y * torch.linspace(-1, 1, y.shape[-1], dtype=torch.float64)).sum().backward()
            with torch.no_grad():
                y_inf, _ = m(x)
            outs.append([y, y_inf, xx.grad] + [p.grad for p in m.parameters()])
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    finally:
        torch.set_num_threads(threads)


def _vm_flags(addr):
    """VmFlags of the mapping of this process that holds addr (/proc/self/smaps), or None."""
    flags, inside = None, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                flags = line.split()[1:]
    return flags


def _thp_mode():
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), or None without THP."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps") or _thp_mode() in (None, "never"),
                    reason="needs Linux /proc/self/smaps and a kernel with transparent huge pages on")
@pytest.mark.parametrize("setting", ["default", "off"])
def test_large_buffers_advised_huge_pages(setting, monkeypatch):
    """Buffers of 32 MiB or more (here the training reserve, [1, N, R]) are advised MADV_HUGEPAGE ("hg" in their
    mapping's VmFlags) before they are written; FUSEDRNN_CPU_HUGEPAGES=0 leaves them as the allocator gave them. A
    small buffer (the output y) is never advised. (The cache of large blocks is emptied first: a block it hands
    out again keeps the advice it had.)"""
    from fusedrnn import cpu
    cpu.empty_cache()
    if setting == "off":
        monkeypatch.setenv("FUSEDRNN_CPU_HUGEPAGES", "0")
    else:
        monkeypatch.delenv("FUSEDRNN_CPU_HUGEPAGES", raising=False)
    args, _ = make_case("lstm", 1, 64, [256] * 64, I=8, H=128, proj=0, dtype=torch.float32)
    y, _, _, reserve = forward("cpu", args, True)
    assert reserve.numel() * reserve.element_size() >= 32 << 20
    big = _vm_flags(reserve.data_ptr() + (4 << 20))  # a whole 2 MiB page inside the buffer
    assert big is not None
    assert ("hg" in big) == (setting == "default"), big
    assert y.numel() * y.element_size() < 32 << 20
    assert "hg" not in (_vm_flags(y.data_ptr()) or [])
