"""The `cpu` backend's bfloat16 and float16 layers (computed in float32: docs/design.md) and its AMX products,
against the reference and torch.nn: the low-precision 2x rule, the forward's and backward's float32 windows, the op's
dtype contract, and torch.compile. Split from test_cpu_kernels.py, whose case builders they share."""
import pytest
import torch

from fusedrnn.backends import get_backend, resolve
from test_cpu_kernels import cast_args, cast_tensor, forward, make_case, run

cpu = pytest.importorskip("fusedrnn.cpu")
pytestmark = pytest.mark.skipif(cpu._C is None, reason="fusedrnn._C is not built")

LP_CELLS = [("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "tanh"}), ("RNN", {"nonlinearity": "relu"}),
            ("LSTM", {"proj_size": 5})]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cell", LP_CELLS, ids=lambda c: c[0] + c[1].get("nonlinearity", "") + ("-proj" if "proj_size" in c[1] else ""))
@pytest.mark.parametrize("H,loop", [(16, "persistent"), (40, "gemm"), (16, "amx")])
def test_half_precision_2x_rule(cell, dtype, H, loop, monkeypatch):
    """bfloat16 / float16 on the cpu backend (float32 kernels; bfloat16's recurrent product on AMX where the CPU has
    it): 2 layers, bidirectional, unsorted packed input; outputs and every gradient within the flash-attention rule
    (error against float64 at most 2x torch.nn's in the same dtype), in both time loops and the AMX product.
    A relu layer's half-precision gradients hang on which pre-activations lie within rounding of zero (the
    derivative's mask): at H 24 ours (float32 kernels or AMX alike) reach 0.05 on one tensor against torch.nn's 0.004,
    and the reference backend's reach 0.12-0.28 at other shapes; the AMX case runs the persistent case's H 16."""
    from helpers import check_2x_rule

    if loop == "amx":
        if dtype != torch.bfloat16 or not cpu.amx_available():
            pytest.skip("the AMX product is bfloat16's, on a CPU with AMX-BF16")
        monkeypatch.setenv("FUSEDRNN_CPU_AMX", "1")
        loop = "persistent"
    monkeypatch.setenv("FUSEDRNN_CPU_LOOP", loop)
    kind, kw = cell
    check_2x_rule(kind, kw, 8, H, 12, 6, [12, 12, 9, 5, 2, 1], dtype, "cpu", "cpu", layers=2)


@pytest.mark.parametrize("loop", ["persistent", "gemm"])
@pytest.mark.parametrize("mode,proj,lengths", [("lstm", 0, None), ("lstm", 3, [7, 7, 5, 2, 1]),
                                               ("gru", 0, [6, 4, 4, 1, 1]), ("rnn_relu", 0, None)])
def test_half_precision_backward_windows(mode, proj, lengths, loop, monkeypatch):
    """The half-precision backward converts, chunk by chunk, only the rows of y, the reserve, x and grad_y that the
    chunk reads (its own and the neighbouring steps', for h_prev and c_prev) into float32: with chunks of a few
    rows, both directions, equal and varying lengths and a projection, every gradient is bitwise the float32
    backward's on whole float32 copies of the same inputs."""
    monkeypatch.setenv("FUSEDRNN_CPU_LOOP", loop)
    monkeypatch.setenv("FUSEDRNN_CPU_CHUNK_ROWS", "4")
    B = 5
    args, grads = make_case(mode, 2, B, lengths, I=7, H=12, proj=proj, dtype=torch.bfloat16)
    y, _, _, reserve = forward("cpu", args, True)
    b = get_backend("cpu")
    f = lambda t: cast_tensor(t, torch.float32)  # noqa: E731
    a, a32 = args, cast_args(args, torch.float32)
    got = b.backward(mode, *grads, a["x"], a["batch_sizes"], a["hx"], a["cx"], a["weights"], True, 2, y, reserve)
    want = b.backward(mode, *(f(g) for g in grads), a32["x"], a32["batch_sizes"], a32["hx"], a32["cx"],
                      a32["weights"], True, 2, f(y), f(reserve))
    flat = lambda o: [o[0], o[1], o[2], *o[3]]  # noqa: E731
    for i, (g, w) in enumerate(zip(flat(got), flat(want))):
        assert g.dtype == torch.bfloat16 and torch.equal(g, w.to(torch.bfloat16)), i


@pytest.mark.parametrize("loop", ["persistent", "gemm"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("mode,proj,lengths", [("lstm", 0, None), ("lstm", 3, [7, 7, 5, 2, 1]),
                                               ("gru", 0, [6, 4, 4, 1, 1]), ("rnn_tanh", 0, [7, 6, 3, 3, 2])])
def test_half_precision_forward_windows(mode, proj, lengths, train, loop, monkeypatch):
    """The half-precision forward computes each time chunk in float32 windows of y and the reserve (the chunk's rows
    and the step before them), cast into the outputs chunk by chunk: with chunks of a few rows, both directions,
    equal and varying lengths and a projection, every output is bitwise the float32 forward's on whole float32
    copies, cast once. I = 1, so the input projection is one exact product whatever GEMM computes it."""
    monkeypatch.setenv("FUSEDRNN_CPU_LOOP", loop)
    monkeypatch.setenv("FUSEDRNN_CPU_CHUNK_ROWS", "4")
    args, _ = make_case(mode, 2, 5, lengths, I=1, H=12, proj=proj, dtype=torch.bfloat16)
    got = forward("cpu", args, train)
    want = forward("cpu", cast_args(args, torch.float32), train)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.bfloat16 and torch.equal(g, w.to(torch.bfloat16)), i
    if train and mode != "rnn_tanh":  # a plain RNN keeps no reserve
        assert got[3].numel() > 0


@pytest.mark.parametrize("half_gemm", ["-", "0"], ids=["mixed-gemm", "float32-copies"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode,proj,I,train", [("lstm", 0, 6, True), ("lstm", 3, 6, True), ("gru", 0, 6, True),
                                               ("rnn_tanh", 0, 6, True), ("lstm", 0, 96, True),
                                               ("gru", 0, 96, False)])
def test_half_precision_op_contract(mode, proj, I, train, dtype, half_gemm, monkeypatch):
    """Every output of the half-precision op has x's dtype (reserve included) and, in the persistent loop (batch 4,
    under the half-precision GEMM loop's size), its values are the float32 kernels' on the same rounded inputs,
    rounded once: the forward to within that rounding (the input projections
    run as a GEMM of the half-precision operands with float32 sums, whose order may differ), the backward (float32
    throughout, on the rounded y and reserve it is given) exactly. `auto` picks the cpu backend for them."""
    from conftest import rel_err

    if half_gemm == "0":
        monkeypatch.setenv("FUSEDRNN_CPU_HALF_GEMM", "0")
    args, grads = make_case(mode, 2, 4, [5, 4, 2, 1], I=I, H=8, proj=proj, dtype=dtype)
    assert resolve("auto", torch.device("cpu"), dtype, mode, bool(proj)) == "cpu"
    f = lambda t: cast_tensor(t, torch.float32)  # noqa: E731
    a = cast_args(args, torch.float32)
    if not train:
        for got, want in zip(forward("cpu", args, False), forward("cpu", a, False)):
            assert got.dtype == dtype and rel_err(got, want) <= torch.finfo(dtype).eps
        return
    lp = run("cpu", args, grads)
    for v in lp.values():
        assert v.dtype == dtype
    for k, v in zip(["y", "hy", "cy", "reserve"], forward("cpu", a, True)):
        assert rel_err(lp[k], v) <= torch.finfo(dtype).eps, k
    b = get_backend("cpu")
    gx, ghx, gcx, gws = b.backward(mode, *(f(g) for g in grads), a["x"], a["batch_sizes"], a["hx"], a["cx"],
                                   a["weights"], True, 2, f(lp["y"]), f(lp["reserve"]))
    for k, v in zip(["grad_x", "grad_hx", "grad_cx"] + [f"grad_w{i}" for i in range(len(gws))], [gx, ghx, gcx, *gws]):
        assert torch.equal(lp[k], v.to(dtype)), k


@pytest.mark.skipif(not cpu.amx_available(), reason="the CPU has no AMX-BF16 (or the OS did not grant its state)")
@pytest.mark.parametrize("split", ["hidden", "batch"])
@pytest.mark.parametrize("mode,B,H,proj", [("lstm", 37, 40, 0), ("lstm", 5, 24, 13), ("gru", 33, 48, 0),
                                           ("rnn_tanh", 17, 20, 0), ("lstm", 1, 16, 0)])
def test_amx_product_matches_float32(mode, B, H, proj, split, monkeypatch):
    """The bfloat16 layer's recurrent product on AMX (h split into two bfloat16 parts) against the float32 panels:
    both directions, lengths that vary, row blocks past 16 and partial ones, slices of hidden units that are not
    whole tiles, K = 2P padded to 32; forward outputs agree to bfloat16's rounding (measured: 0.1-0.3% of y's
    elements differ, by one ulp; with h rounded to bfloat16 instead of split, 17-28% do) and neither is further
    from the float64 reference than the other by more than that."""
    from conftest import rel_err

    monkeypatch.setenv("FUSEDRNN_CPU_SPLIT", split)
    lengths = [max(1, 9 - j % 9) for j in range(B)]
    lengths.sort(reverse=True)
    args, _ = make_case(mode, 2, B, lengths, I=12, H=H, proj=proj, dtype=torch.bfloat16)
    outs = {}
    for v in ("0", "1"):
        monkeypatch.setenv("FUSEDRNN_CPU_AMX", v)
        outs[v] = forward("cpu", args, True)
    ref = forward("reference", cast_args(args, torch.float64), True)
    eps = torch.finfo(torch.bfloat16).eps
    for i, (f32, amx, r) in enumerate(zip(outs["0"], outs["1"], ref)):
        if r.numel() == 0 or i == 3:  # the reserve: its layouts differ between backends
            continue
        assert rel_err(amx, f32) <= 2 * eps, i
        assert rel_err(amx, r) <= rel_err(f32, r) + eps, i
        if i == 0:
            assert (amx != f32).float().mean().item() <= 0.02


@pytest.mark.skipif(not cpu.amx_available(), reason="the CPU has no AMX-BF16 (or the OS did not grant its state)")
@pytest.mark.parametrize("B,I,H", [(300, 70, 300), (37, 64, 16), (5, 33, 20)])
def test_amx_input_projection(B, I, H, monkeypatch):
    """The bfloat16 input projection on AMX, seen through one step of a relu RNN from h = 0 without biases, where
    y = relu(x W_ih^T) rounded once to bfloat16: every element within half a bfloat16 ulp of the float64 product
    plus the float32 sum's rounding (so a wrong tile, pair or edge shows), in both directions. The shapes cut rows
    into 32-row blocks with a tail, columns into 256-column tasks with an odd count of 16-column blocks and a partial
    last one, and K into 32-wide tiles with a partial last one (read from a zeroed copy: an inf in the next row must
    not turn the padding into a NaN, checked with a row of infs)."""
    monkeypatch.setenv("FUSEDRNN_CPU_AMX", "1")
    args, _ = make_case("rnn_relu", 2, B, [1] * B, I=I, H=H, proj=0, dtype=torch.bfloat16, bias=False)
    args["hx"] = torch.zeros_like(args["hx"])
    args["x"][1] = float("inf")
    y = forward("cpu", args, False)[0].double()
    for d in range(2):
        w = args["weights"][2 * d].double()
        want = torch.relu(args["x"].double() @ w.t())
        got = y[:, d * H:(d + 1) * H]
        keep = torch.arange(B) != 1
        ulp = torch.finfo(torch.bfloat16).eps * want[keep].abs().clamp_min(2.0 ** -126)
        sums = I * torch.finfo(torch.float32).eps * (args["x"].double().abs() @ w.abs().t())[keep]
        assert ((got[keep] - want[keep]).abs() <= ulp / 2 + sums).all(), d
        assert not torch.isfinite(got[1]).all()


def test_half_precision_compiles_fullgraph():
    """A bfloat16 LSTM on the cpu backend under torch.compile(fullgraph=True): the op's fake gives every output
    x's dtype as the kernels do, so the compiled forward and backward match eager."""
    import fusedrnn

    torch.manual_seed(0)
    m = fusedrnn.LSTM(6, 8, num_layers=2, bidirectional=True).bfloat16()
    x = torch.randn(5, 3, 6).bfloat16()
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye = m(xe)[0]
    yc = torch.compile(m, fullgraph=True)(xc)[0]
    assert yc.dtype == torch.bfloat16 and torch.equal(ye, yc)
    ye.float().sum().backward()
    yc.float().sum().backward()
    assert xc.grad.dtype == torch.bfloat16 and torch.equal(xe.grad, xc.grad)
