"""The Triton backend (fusedrnn/triton) against the pure-PyTorch reference and torch.nn.

Two halves:
- CPU, through the Triton interpreter: the interpreter must be on before triton is first imported, which a normal
  pytest run has already done (conftest imports fusedrnn). So in a normal run `test_interpreter_suite` re-runs this file
  in a subprocess with TRITON_INTERPRET=1, and the interpreter tests run there (run them directly with
  `TRITON_INTERPRET=1 pytest tests/test_triton.py`). Tiny shapes: the interpreter executes every block op in numpy.
- CUDA (`requires_cuda`): conformance in float32, the low-precision 2x rule against cuDNN, a benchmark hook.
"""
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton): no triton backend")

import fusedrnn  # noqa: E402
import fusedrnn.reference as reference  # noqa: E402
from fusedrnn.backends import available_backends, get_backend  # noqa: E402

from conftest import assert_close_all, assert_low_precision  # noqa: E402
from helpers import assert_masked_grads, check_2x_rule, low_precision_inputs, make_pair, outputs_and_grads  # noqa: E402

if "triton" not in available_backends():  # importable triton, but the backend failed to register: a real failure
    raise RuntimeError("triton is importable but fusedrnn's triton backend did not register")

from fusedrnn.triton import launch  # noqa: E402

INTERPRETING = launch.interpreting()
interp_only = pytest.mark.skipif(not INTERPRETING, reason="interpreter tests: run by test_interpreter_suite "
                                 "(or directly with TRITON_INTERPRET=1)")
MODES = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
G = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
NN = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}


def test_interpreter_suite():
    """Runs this file's interpreter tests in a fresh process with TRITON_INTERPRET=1 (they skip in this one)."""
    if INTERPRETING:
        pytest.skip("already interpreting: the interpreter tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("FUSEDRNN_BACKEND", None)
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not requires_cuda",
                        os.path.join(here, "test_triton.py")], env=env, cwd=os.path.dirname(here),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-3000:]


# ---------------------------------------------------------------------------------------------------------------------
# layer-op level: fusedrnn.triton.launch against fusedrnn.reference (float64)

def _layer_case(mode, T, B, I, H, D, has_biases, lengths, seed=0, P=None):
    """Random inputs of one layer in float64: x [N, I], batch_sizes, hx, cx, weights, and upstream grads.
    P: LSTM proj_size (None: no projection)."""
    g = torch.Generator().manual_seed(seed)
    lengths = sorted(lengths, reverse=True)
    bs = torch.tensor([sum(1 for L in lengths if L > t) for t in range(T)], dtype=torch.int64)
    N = int(bs.sum())
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    k = H ** -0.5
    proj, P = P is not None, P or H
    weights = []
    for _ in range(D):
        weights += [r(G[mode] * H, I) * k, r(G[mode] * H, P) * k]
        if has_biases:
            weights += [r(G[mode] * H) * k, r(G[mode] * H) * k]
        if proj:
            weights += [r(P, H) * k]
    cx = r(D, B, H) if mode == "lstm" else None
    grads = (r(N, D * P), r(D, B, P), r(D, B, H) if mode == "lstm" else torch.zeros(0, dtype=torch.float64))
    return dict(x=r(N, I), batch_sizes=bs, hx=r(D, B, P), cx=cx, weights=weights), grads


def _cast(case, dtype):
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return dict(x=c(case["x"]), batch_sizes=case["batch_sizes"], hx=c(case["hx"]), cx=c(case["cx"]),
                weights=[c(w) for w in case["weights"]])


def _run_layer(fwd, bwd, mode, case, grads, has_biases, D, dtype, **kw):
    a = _cast(case, dtype)
    y, hy, cy, res = fwd(mode, a["x"], a["batch_sizes"], a["hx"], a["cx"], a["weights"], has_biases, D, True, **kw)
    gy, ghy, gcy = (t.to(dtype) for t in grads)
    gx, ghx, gcx, gws = bwd(mode, gy, ghy, gcy, a["x"], a["batch_sizes"], a["hx"], a["cx"], a["weights"], has_biases,
                            D, y, res, **kw)
    return [y, hy, cy, res], [gx, ghx, gcx, *gws]


# (T, B, lengths): padded, packed with variable lengths (incl. length-1 sequences), one step (a cell call)
SEQS = {"padded": (4, 3, [4, 4, 4]), "packed": (5, 4, [5, 3, 3, 1]), "T1": (1, 2, [1, 1])}


@interp_only
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seq", list(SEQS))
@pytest.mark.parametrize("D", [1, 2], ids=["uni", "bi"])
def test_layer_vs_reference_fp32(mode, seq, D):
    """float32 kernels vs the float64 reference: y, hy, cy, reserve, and every gradient. H=20 with 16-wide tiles:
    two hidden tiles and two K tiles per step, the second one masked (the streaming path)."""
    T, B, lengths = SEQS[seq]
    has_biases = not (seq == "T1" and D == 1)   # one no-bias case per mode
    case, grads = _layer_case(mode, T, B, I=7, H=20, D=D, has_biases=has_biases, lengths=lengths)
    ref_f, ref_b = _run_layer(reference.forward, reference.backward, mode, case, grads, has_biases, D, torch.float64)
    out_f, out_b = _run_layer(launch.forward, launch.backward, mode, case, grads, has_biases, D, torch.float32,
                              blocks=(16, 16, 16, 4, 1))
    assert_close_all(out_f, ref_f, torch.float32, f"{mode} forward")
    assert_close_all(out_b, ref_b, torch.float32, f"{mode} backward")


@interp_only
@pytest.mark.parametrize("seq", ["padded", "packed"])
@pytest.mark.parametrize("D", [1, 2], ids=["uni", "bi"])
def test_layer_lstm_proj_fp32(seq, D):
    """LSTM with proj_size: P=17 and H=20 with 16-wide tiles (both streamed in two tiles, the second masked)."""
    T, B, lengths = SEQS[seq]
    case, grads = _layer_case("lstm", T, B, I=5, H=20, D=D, has_biases=D == 2, lengths=lengths, P=17, seed=3)
    ref_f, ref_b = _run_layer(reference.forward, reference.backward, "lstm", case, grads, D == 2, D, torch.float64)
    out_f, out_b = _run_layer(launch.forward, launch.backward, "lstm", case, grads, D == 2, D, torch.float32,
                              blocks=(16, 16, 16, 4, 1))
    assert_close_all(out_f, ref_f, torch.float32, "lstm-proj forward")
    assert_close_all(out_b, ref_b, torch.float32, "lstm-proj backward")


@interp_only
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_layer_two_batch_blocks(mode):
    """B=18 > BLOCK_B=16: two programs per direction, the second one partly masked; default block choice."""
    T, B = 2, 18
    lengths = [2] * 10 + [1] * 8
    case, grads = _layer_case(mode, T, B, I=3, H=8, D=2, has_biases=True, lengths=lengths, seed=4)
    ref_f, ref_b = _run_layer(reference.forward, reference.backward, mode, case, grads, True, 2, torch.float64)
    out_f, out_b = _run_layer(launch.forward, launch.backward, mode, case, grads, True, 2, torch.float32)
    assert_close_all(out_f, ref_f, torch.float32, f"{mode} forward")
    assert_close_all(out_b, ref_b, torch.float32, f"{mode} backward")


@interp_only
def test_layer_hidden_1024():
    """LSTM, H = 1024: W_hh streamed as 8 x 8 tiles of 128 x 128 per gate and step (the interpreter's cost grows with
    the number of tiles, so larger tiles than the GPU's; the tile loops are shared by all modes)."""
    mode, T, B = "lstm", 2, 2
    case, grads = _layer_case(mode, T, B, I=8, H=1024, D=1, has_biases=True, lengths=[2, 1], seed=5)
    ref_f, ref_b = _run_layer(reference.forward, reference.backward, mode, case, grads, True, 1, torch.float64)
    out_f, out_b = _run_layer(launch.forward, launch.backward, mode, case, grads, True, 1, torch.float32,
                              blocks=(16, 128, 128, 4, 1))
    assert_close_all(out_f, ref_f, torch.float32, f"{mode} forward")
    assert_close_all(out_b, ref_b, torch.float32, f"{mode} backward")


@interp_only
@pytest.mark.parametrize("mode,P", [("lstm", 6), ("gru", None), ("rnn_relu", None)], ids=["lstm-proj", "gru", "relu"])
def test_layer_writes_every_output(monkeypatch, mode, P):
    """Every fresh allocation of the launcher (outputs and scratch) starts as NaN: a value the kernels never write,
    or scratch they never initialise, shows up as NaN in the results."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", nan_empty)
    case, grads = _layer_case(mode, 4, 3, I=3, H=8, D=2, has_biases=True, lengths=[4, 2, 1], P=P, seed=6)
    out_f, out_b = _run_layer(launch.forward, launch.backward, mode, case, grads, True, 2, torch.float32)
    monkeypatch.undo()
    ref_f, ref_b = _run_layer(reference.forward, reference.backward, mode, case, grads, True, 2, torch.float64)
    for t in out_f + out_b:
        assert not torch.isnan(t).any()
    assert_close_all(out_f, ref_f, torch.float32, f"{mode} forward")
    assert_close_all(out_b, ref_b, torch.float32, f"{mode} backward")


@interp_only
def test_opcheck_triton():
    """torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch) of both ops on this backend
    (one case: the interpreter makes each of opcheck's many runs slow)."""
    mode, P = "lstm", 5
    case, grads = _layer_case(mode, 3, 2, I=3, H=8, D=2, has_biases=True, lengths=[3, 1], P=P, seed=7)
    a = _cast(case, torch.float32)
    leaf = lambda t: None if t is None else t.requires_grad_()  # noqa: E731
    args = (mode, leaf(a["x"]), a["batch_sizes"], leaf(a["hx"]), leaf(a["cx"]), [leaf(w) for w in a["weights"]], True,
            2, True, "triton")
    torch.library.opcheck(torch.ops.fusedrnn.rnn_layer.default, args)
    with torch.no_grad():
        y, hy, cy, reserve = torch.ops.fusedrnn.rnn_layer(*args)
    det = lambda t: None if t is None else t.detach()  # noqa: E731
    bargs = (mode, *(t.float() for t in grads), det(a["x"]), a["batch_sizes"], det(a["hx"]), det(a["cx"]),
             [w.detach() for w in a["weights"]], True, 2, y, reserve, "triton")
    torch.library.opcheck(torch.ops.fusedrnn.rnn_layer_backward.default, bargs)
    torch.library.opcheck(torch.ops.fusedrnn.rnn_layer_backward.default, (*bargs, [False, True, False]))


@interp_only
@pytest.mark.parametrize("mode,D,P", [("lstm", 2, None), ("gru", 1, None), ("lstm", 1, 5)],
                         ids=["lstm-bi", "gru", "proj"])
def test_layer_output_mask(mode, D, P):
    """backward's output_mask (x, the states, the weights): what is asked for is bitwise the full backward's (the
    skipped GEMMs change nothing else), the rest empty [0]."""
    case, grads = _layer_case(mode, 4, 3, I=5, H=8, D=D, has_biases=True, lengths=[4, 3, 1], P=P, seed=5)
    a = _cast(case, torch.float32)
    y, _, _, res = launch.forward(mode, a["x"], a["batch_sizes"], a["hx"], a["cx"], a["weights"], True, D, True)
    args = (mode, *(t.float() for t in grads), a["x"], a["batch_sizes"], a["hx"], a["cx"], a["weights"], True, D, y,
            res)
    full = launch.backward(*args)
    for mask in [(False, True, True), (True, False, True), (True, True, False), (False, False, True)]:
        assert_masked_grads(launch.backward(*args, output_mask=mask), full, mask, mode == "lstm")


@interp_only
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_module_gradients_only_where_needed(kind):
    """A 2-layer module whose input needs no gradient and whose first layer is frozen: the gradients that are
    needed are torch.nn's (float32 rounding), the others None (the op asks the backend for those only)."""
    ref, ours = make_pair(kind, 3, 8, num_layers=2, backend="triton", dtype=torch.float32)
    x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0))
    results = []
    for m in (ref, ours):
        for name, p in m.named_parameters():
            p.requires_grad_("_l0" not in name)
        y, _ = m(x)
        (y * torch.arange(y.numel(), dtype=torch.float32).view_as(y).cos()).sum().backward()
        results.append([p.grad for p in m.parameters()])
    for a, b in zip(*results):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@interp_only
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_layer_empty_batch(mode):
    """B = 0 (batch_sizes all zero, N = 0): no launch; outputs and gradients shaped as the reference's."""
    case, grads = _layer_case(mode, 3, 0, I=3, H=8, D=2, has_biases=True, lengths=[])
    ref_f, ref_b = _run_layer(reference.forward, reference.backward, mode, case, grads, True, 2, torch.float64)
    out_f, out_b = _run_layer(launch.forward, launch.backward, mode, case, grads, True, 2, torch.float32)
    assert_close_all(out_f, ref_f, torch.float32, f"{mode} forward")
    assert_close_all(out_b, ref_b, torch.float32, f"{mode} backward")


@interp_only
def test_bench_hook_smoke_cpu():
    """fusedrnn/triton/bench.py end to end on the CPU (the timing numbers mean nothing under the interpreter)."""
    from fusedrnn.triton import bench

    rows = bench.run([("gru", 3, 2, 4, 8, torch.float32)], warmup=0, iters=1, device="cpu")
    assert len(rows) == 1 and rows[0]["triton_fwdbwd_ms"] > 0 and rows[0]["cudnn_fwd_ms"] > 0
    assert rows[0]["max_rel_err_vs_cudnn"] < 1e-5, rows[0]


@interp_only
def test_layer_inference_and_empty_reserve():
    """train=False: no reserve, same outputs as train=True."""
    case, _ = _layer_case("gru", 3, 2, 4, 16, 1, True, [3, 2])
    a = _cast(case, torch.float32)
    y0, hy0, cy0, res0 = launch.forward("gru", a["x"], a["batch_sizes"], a["hx"], None, a["weights"], True, 1, False)
    y1, hy1, _, _ = launch.forward("gru", a["x"], a["batch_sizes"], a["hx"], None, a["weights"], True, 1, True)
    assert res0.numel() == 0 and cy0.numel() == 0
    assert torch.equal(y0, y1) and torch.equal(hy0, hy1)


# ---------------------------------------------------------------------------------------------------------------------
# module level, through torch.ops.fusedrnn.rnn_layer (the path users take)

MODULE_CELLS = [("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "tanh"}), ("RNN", {"nonlinearity": "relu"}),
                ("LSTM", {"proj_size": 5})]


def _cell_id(c):
    return c[0] + c[1].get("nonlinearity", "") + ("-proj" if "proj_size" in c[1] else "")


@interp_only
@pytest.mark.parametrize("cell", MODULE_CELLS, ids=_cell_id)
def test_module_packed_bidirectional_fp32(cell):
    """fusedrnn.<Module>(backend="triton"), 2 layers, bidirectional, unsorted packed input, vs torch.nn in float64."""
    kind, kw = cell
    ref, ours = make_pair(kind, 3, 8, num_layers=2, bidirectional=True, backend="triton", dtype=torch.float32, **kw)
    ref.double()
    make32, make64 = low_precision_inputs(4, 3, 3, [2, 4, 1], torch.float32)
    o, g = outputs_and_grads(ours, make32)
    o_ref, g_ref = outputs_and_grads(ref, make64)
    assert_close_all(o, o_ref, torch.float32, f"{kind} outputs")
    assert_close_all(g, g_ref, torch.float32, f"{kind} grads")


@interp_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cell", MODULE_CELLS[:3] + MODULE_CELLS[4:], ids=_cell_id)
def test_module_low_precision_2x_rule(cell, dtype):
    """fp16/bf16: our error vs float64 at most 2x torch.nn's own error in the same dtype (torch.nn on the CPU)."""
    kind, kw = cell
    check_2x_rule(kind, kw, 4, 16, 5, 3, [5, 2, 4], dtype, "cpu", "triton")


# ---------------------------------------------------------------------------------------------------------------------
# backend contract

def test_supports():
    b = get_backend("triton")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not b.supports(cuda, torch.float64, "gru", False)
    assert not b.supports(cuda, torch.float32, "gru", True), "projection exists only for LSTM"
    assert b.supports(cpu, torch.float32, "lstm", False) == INTERPRETING
    for mode in MODES:
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            assert b.supports(cuda, dt, mode, False) == (not INTERPRETING)
    assert b.supports(cuda, torch.bfloat16, "lstm", True) == (not INTERPRETING)


# ---------------------------------------------------------------------------------------------------------------------
# GPU code generation without a GPU: Triton compiles the kernels to cubin (ptxas ships with triton) for a target

_TL_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _compile_for(kernel, const, opts, dtype, arch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {}
    for a in kernel.arg_names:
        if a in const:
            sig[a] = "constexpr"
        elif a in ("p_bs", "p_offs"):
            sig[a] = "*i32"
        elif a.startswith("p_"):
            sig[a] = "*fp32" if a.endswith("buf") else "*" + _TL_DTYPE[dtype]
        else:
            sig[a] = "i32"
    return triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", arch, 32), options=opts)


@pytest.mark.skipif(INTERPRETING, reason="the interpreter replaces the compiler")
@pytest.mark.parametrize("mode,dtype,H,arch", [("lstm", torch.bfloat16, 1024, 90), ("lstm", torch.float32, 1024, 90),
                                               ("gru", torch.float16, 256, 90), ("rnn_relu", torch.float32, 64, 90),
                                               ("lstm", torch.float16, 512, 80),
                                               ("lstm-proj", torch.bfloat16, 768, 90)],
                         ids=["lstm-bf16-sm90", "lstm-fp32-sm90", "gru-fp16-sm90", "rnn_relu-fp32-sm90",
                              "lstm-fp16-sm80", "lstm-proj-bf16-sm90"])
def test_gpu_codegen(mode, dtype, H, arch):
    """The launcher's exact compile-time configuration builds for NVIDIA targets (no GPU needed), with the step
    barriers and tensor-core / FMA dots in the PTX. Catches Triton-language errors the interpreter lets through."""
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        pytest.skip("triton's NVIDIA backend is not installed")
    import fusedrnn.triton.kernels as K

    proj = mode == "lstm-proj"
    mode = "lstm" if proj else mode
    for kernel, (const, opts) in ((K.rnn_fwd_kernel, launch.fwd_constexprs(mode, 2, True, True, proj, H, dtype)),
                                  (K.rnn_bwd_kernel, launch.bwd_constexprs(mode, 2, proj, H, dtype))):
        k = _compile_for(kernel, const, opts, dtype, arch)
        ptx = k.asm["ptx"]
        assert len(k.asm["cubin"]) > 0
        assert ptx.count("bar.sync") + ptx.count("barrier.sync") >= 2, "step barriers missing"
        assert "ld.global.cg" in ptx, "scratch loads must bypass L1"
        if dtype != torch.float32:
            assert "mma" in ptx, "16-bit dots should use tensor cores"


# ---------------------------------------------------------------------------------------------------------------------
# CUDA: not runnable on a CPU-only machine; the same comparisons at real sizes

GPU_SHAPES = [(7, 5, 12, 32, [7, 7, 4, 2, 1]), (16, 33, 40, 100, None), (6, 4, 64, 1024, [6, 5, 5, 3])]


def _gpu_id(s):
    return f"T{s[0]}-B{s[1]}-I{s[2]}-H{s[3]}" + ("-packed" if s[4] else "")


@pytest.mark.requires_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=_gpu_id)
@pytest.mark.parametrize("D", [1, 2], ids=["uni", "bi"])
def test_cuda_layer_fp32(mode, shape, D):
    T, B, I, H, lengths = shape
    case, grads = _layer_case(mode, T, B, I, H, D, True, lengths or [T] * B)
    ref_f, ref_b = _run_layer(reference.forward, reference.backward, mode, case, grads, True, D, torch.float64)
    cuda_case = {k: (v.cuda() if isinstance(v, torch.Tensor) and k != "batch_sizes" else v) for k, v in case.items()}
    cuda_case["weights"] = [w.cuda() for w in case["weights"]]
    out_f, out_b = _run_layer(launch.forward, launch.backward, mode, cuda_case, [t.cuda() for t in grads], True, D,
                              torch.float32)
    assert_close_all([t.cpu() for t in out_f], ref_f, torch.float32, f"{mode} forward")
    assert_close_all([t.cpu() for t in out_b], ref_b, torch.float32, f"{mode} backward")


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cell", MODULE_CELLS, ids=_cell_id)
@pytest.mark.parametrize("H", [64, 512])
def test_cuda_low_precision_2x_rule(cell, dtype, H):
    """fp16/bf16 on CUDA: our error vs float64 at most 2x torch.nn's (cuDNN) in the same dtype."""
    kind, kw = cell
    check_2x_rule(kind, kw, 32, H, 20, 8, [20, 20, 17, 9, 9, 5, 2, 1], dtype, "cuda", "triton", layers=2)


@pytest.mark.requires_cuda
def test_cuda_compile_fullgraph():
    """torch.compile(fullgraph=True) over the op with the triton backend, forward and backward."""
    ref, ours = make_pair("LSTM", 16, 32, backend="triton", dtype=torch.float32)
    ours = ours.cuda()
    x = torch.randn(6, 4, 16, device="cuda", requires_grad=True)
    eager = ours(x)[0]
    compiled = torch.compile(ours, fullgraph=True)(x)[0]
    assert torch.allclose(eager, compiled, atol=1e-6)
    compiled.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.requires_cuda
@pytest.mark.slow
def test_cuda_benchmark_hook():
    """The benchmark hook runs and reports finite times for triton and torch.nn (cuDNN)."""
    from fusedrnn.triton import bench

    rows = bench.run([("lstm", 64, 16, 256, 256, torch.float16)], warmup=2, iters=5)
    assert len(rows) == 1
    r = rows[0]
    assert r["triton_fwd_ms"] > 0 and r["cudnn_fwd_ms"] > 0 and r["triton_fwdbwd_ms"] > 0
    assert r["max_rel_err_vs_cudnn"] < 5e-2, r
