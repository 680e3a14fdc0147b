"""The CUDA backend (csrc/cuda, fusedrnn/cuda.py).

- Without a GPU (these run wherever the extension is built, and the import test everywhere): the import never fails,
  `supports()`, and the fakes against the contract's shapes under FakeTensorMode.
- With a GPU (`requires_cuda`, skipped otherwise; no device is queried at import):
  float32 conformance of the layer ops against an independent float64 oracle (outputs and every gradient) and of the
  reserve against the reference backend; the modules on backend="cuda" against torch.nn; float16/bfloat16 by the rule
  "our error against float64 is at most 2x torch.nn's in the same dtype"; CUDA-graph capture of forward + backward;
  opcheck; argument errors. Fresh allocations are poisoned with NaN before each op so unwritten outputs show.
- compute-sanitizer (memcheck, racecheck) over small cases: `test_compute_sanitizer` with FUSEDRNN_SANITIZE=1, or
  csrc/cuda/sanitize.sh; both run this file as a script (`python tests/test_cuda.py --sanitize-cases`).
Test ids read like `lstm-D2-bias-proj-packed`.
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

import fusedrnn
from fusedrnn import backends

MODES = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
G = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
TOL_FP32 = 2e-5  # max |ours - ref| / max |ref| against float64, as tests/conftest.py TOLERANCE[float32]


def _built():
    return "cuda" in backends.available_backends()


# available_backends() only asks whether the extension imported: no device query
requires_ext = pytest.mark.skipif(not _built(), reason="fusedrnn._C_cuda is not built (see fusedrnn/cuda.py)")


@pytest.fixture(autouse=True)
def _full_fp32_matmul():
    """The GEMMs go through at::mm, which follows torch's float32 matmul precision: hold it at "highest" (no TF32)
    so that a test elsewhere that lowers it cannot loosen these comparisons."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(prev)


# ------------------------------------------------------------------------------------------------ inputs and oracle

def _lengths(kind, T, B):
    if kind == "padded":
        return [T] * B
    # variable lengths, sorted longest first, several sequences ending at the same step and one of length 1
    base = [T, T - 2, T - 2, max(T // 3, 1), 1, 1, T - 1, 2]
    return sorted((base * (B // len(base) + 1))[:B], reverse=True)


def _batch_sizes(lengths):
    T = max(lengths)
    return torch.tensor([sum(1 for n in lengths if n > t) for t in range(T)], dtype=torch.int64)


def make_case(mode, D, has_biases, proj, seq, T=7, B=6, I=10, H=6, P=3, dtype=torch.float32, device="cuda", seed=0):
    """Random layer-op arguments (docs/design.md) on `device` in `dtype`, values drawn in float64 then rounded."""
    g = torch.Generator().manual_seed(seed)
    Pr = P if proj else H
    lengths = _lengths(seq, T, B)
    bs = _batch_sizes(lengths)
    N = sum(lengths)  # from Python ints, so the case can also be built under FakeTensorMode
    k = 1.0 / H ** 0.5

    def r(*shape, scale=1.0):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1).mul(scale).to(device, dtype)

    weights = []
    for _ in range(D):
        weights += [r(G[mode] * H, I, scale=k), r(G[mode] * H, Pr, scale=k)]
        if has_biases:
            weights += [r(G[mode] * H, scale=k), r(G[mode] * H, scale=k)]
        if proj:
            weights.append(r(Pr, H, scale=k))
    x = r(N, I)
    hx = r(D, B, Pr, scale=0.5)
    cx = r(D, B, H, scale=0.5) if mode == "lstm" else None
    return dict(mode=mode, x=x, batch_sizes=bs, hx=hx, cx=cx, weights=weights, has_biases=has_biases,
                num_directions=D)


def cotangents(case, seed=1):
    """Random grad_y, grad_hy, grad_cy for a case, in its dtype."""
    g = torch.Generator().manual_seed(seed)
    x, hx, mode = case["x"], case["hx"], case["mode"]
    D, B, P = hx.shape
    N = x.shape[0]

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(x.device, x.dtype)

    gcy = r(*case["cx"].shape) if mode == "lstm" else x.new_zeros(0)
    return r(N, D * P), r(D, B, P), gcy


def oracle_forward(mode, x, batch_sizes, hx, cx, weights, has_biases, num_directions):
    """The recurrence of docs/design.md written directly (differentiable, any dtype): y, hy, cy."""
    D = num_directions
    per = len(weights) // D
    bs = batch_sizes.tolist()
    offs = [sum(bs[:t]) for t in range(len(bs))]
    T = len(bs)
    ys, hys, cys = [], [], []
    for d in range(D):
        w = weights[d * per:(d + 1) * per]
        w_ih, w_hh = w[0], w[1]
        b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
        w_hr = w[-1] if per == 2 + 2 * int(has_biases) + 1 else None
        h, c = hx[d], (cx[d] if mode == "lstm" else None)
        out = [None] * T
        for t in (range(T) if d == 0 else reversed(range(T))):
            b = bs[t]
            gi = x[offs[t]:offs[t] + b] @ w_ih.t()
            gh = h[:b] @ w_hh.t()
            if has_biases:
                gi, gh = gi + b_ih, gh + b_hh
            if mode == "lstm":
                i, f, gg, o = (gi + gh).chunk(4, 1)
                c_new = torch.sigmoid(f) * c[:b] + torch.sigmoid(i) * torch.tanh(gg)
                h_new = torch.sigmoid(o) * torch.tanh(c_new)
                if w_hr is not None:
                    h_new = h_new @ w_hr.t()
                c = torch.cat([c_new, c[b:]])
            elif mode == "gru":
                ir, iz, inn = gi.chunk(3, 1)
                hr, hz, hn = gh.chunk(3, 1)
                rr, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
                n = torch.tanh(inn + rr * hn)
                h_new = (1 - z) * n + z * h[:b]
            else:
                pre = gi + gh
                h_new = torch.tanh(pre) if mode == "rnn_tanh" else torch.relu(pre)
            h = torch.cat([h_new, h[b:]])
            out[t] = h_new
        ys.append(torch.cat(out))
        hys.append(h)
        cys.append(c)
    y = torch.cat(ys, 1)
    cy = torch.stack(cys) if mode == "lstm" else x.new_zeros(0)
    return y, torch.stack(hys), cy


def oracle64(case, grads):
    """Outputs and gradients (grad_x, grad_hx, grad_cx, *grad_weights) of the oracle in float64."""
    mode = case["mode"]
    x = case["x"].double().requires_grad_()
    hx = case["hx"].double().requires_grad_()
    cx = case["cx"].double().requires_grad_() if mode == "lstm" else None
    ws = [w.double().requires_grad_() for w in case["weights"]]
    y, hy, cy = oracle_forward(mode, x, case["batch_sizes"], hx, cx, ws, case["has_biases"], case["num_directions"])
    gy, ghy, gcy = (g.double() for g in grads)
    loss = (y * gy).sum() + (hy * ghy).sum() + ((cy * gcy).sum() if mode == "lstm" else 0)
    leaves = [x, hx] + ([cx] if mode == "lstm" else []) + ws
    gr = torch.autograd.grad(loss, leaves)
    gcx = gr[2] if mode == "lstm" else None
    return (y.detach(), hy.detach(), cy.detach()), (gr[0], gr[1], gcx, list(gr[2 + (mode == "lstm"):]))


# ------------------------------------------------------------------------------------------------ running our ops

def _poison(device):
    """Fill the caching allocator's free blocks with NaN, so an output element a kernel never writes reads NaN."""
    blocks = [torch.full((n,), float("nan"), device=device) for n in (1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 22)
              for _ in range(4)]
    del blocks


def run_ours(case, grads=None, train=True):
    """Forward (and backward when grads are given) through torch.ops.fusedrnn.cuda_*: outputs, reserve, grads."""
    c = case
    _poison(c["x"].device)
    y, hy, cy, reserve = torch.ops.fusedrnn.cuda_rnn_forward(c["mode"], c["x"], c["batch_sizes"], c["hx"], c["cx"],
                                                            c["weights"], c["has_biases"], c["num_directions"], train)
    if grads is None:
        return (y, hy, cy), reserve, None
    _poison(c["x"].device)
    gx, ghx, gcx, gws = torch.ops.fusedrnn.cuda_rnn_backward(c["mode"], *grads, c["x"], c["batch_sizes"], c["hx"],
                                                             c["cx"], c["weights"], c["has_biases"],
                                                             c["num_directions"], y, reserve)
    return (y, hy, cy), reserve, (gx, ghx, gcx if c["mode"] == "lstm" else None, list(gws))


def rel_err(ours, ref):
    ours, ref = ours.detach().double(), ref.detach().double()
    if ref.numel() == 0:
        return 0.0
    scale = ref.abs().max().item()
    return (ours - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def _flat(outs, grads):
    gx, ghx, gcx, gws = grads
    return [t for t in list(outs) + [gx, ghx, gcx] + list(gws) if t is not None]


def _names(mode, per, D):
    names = ["y", "hy", "cy"]
    names += ["grad_x", "grad_hx"] + (["grad_cx"] if mode == "lstm" else [])
    w = ["w_ih", "w_hh", "b_ih", "b_hh", "w_hr"]
    for d in range(D):
        names += [f"grad_{n}{'_reverse' if d else ''}" for n in (w[:2] + (w[2:4] if per >= 4 else []) +
                                                                  (["w_hr"] if per in (3, 5) else []))]
    return names


def assert_all_close(ours, ref, tol, names):
    assert len(ours) == len(ref)
    for name, a, b in zip(names, ours, ref):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        assert not torch.isnan(a).any(), f"{name}: NaN (an element was never written?)"
        err = rel_err(a, b)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"


# ------------------------------------------------------------------------------------------------ no GPU needed

def test_import_never_fails():
    import fusedrnn.cuda as cuda_mod  # noqa: F401  (never raises, GPU or not, built or not)
    if _built():
        assert isinstance(backends.get_backend("cuda"), cuda_mod.CudaBackend)
    else:
        msg = backends._unavailable_message("cuda")
        assert "FUSEDRNN_FORCE_CUDA=1 pip install --no-build-isolation -e ." in msg, msg


@requires_ext
def test_supports():
    b = backends.get_backend("cuda")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for mode in MODES:
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            assert b.supports(cuda, dt, mode, False)
        assert not b.supports(cuda, torch.float64, mode, False)
        assert not b.supports(cpu, torch.float32, mode, False)
    assert b.supports(cuda, torch.bfloat16, "lstm", True)
    assert not b.supports(cuda, torch.float32, "gru", True)
    assert "cuda" not in backends.AUTO_ORDER["cpu"]


@requires_ext
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "infer"])
def test_fakes_match_contract(mode, train):
    """The fakes give the contract's shapes/dtypes on fake CUDA tensors (no GPU needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    proj = mode == "lstm"
    with FakeTensorMode(allow_non_fake_inputs=True):
        c = make_case(mode, 2, True, proj, "packed", dtype=torch.bfloat16, device="cuda")
        y, hy, cy, reserve = torch.ops.fusedrnn.cuda_rnn_forward(
            mode, c["x"], c["batch_sizes"], c["hx"], c["cx"], c["weights"], True, 2, train)
        N, P, H = c["x"].shape[0], (3 if proj else 6), 6
        assert y.shape == (N, 2 * P) and y.dtype == torch.bfloat16 and y.device.type == "cuda"
        assert hy.shape == (2, 6, P)
        assert cy.shape == ((2, 6, H) if mode == "lstm" else (0,))
        R = {"lstm": 5, "gru": 4}.get(mode, 0) * H
        assert reserve.shape == ((2, N, R) if train else (0,))
        grads = (y.new_empty(y.shape), hy.new_empty(hy.shape), cy.new_empty(cy.shape))
        gx, ghx, gcx, gws = torch.ops.fusedrnn.cuda_rnn_backward(
            mode, *grads, c["x"], c["batch_sizes"], c["hx"], c["cx"], c["weights"], True, 2, y,
            reserve if train else y.new_empty(2, N, R))
        assert gx.shape == c["x"].shape and ghx.shape == c["hx"].shape
        assert gcx.shape == ((2, 6, H) if mode == "lstm" else (0,))
        assert [g.shape for g in gws] == [w.shape for w in c["weights"]]


# ------------------------------------------------------------------------------------------------ host check (no GPU)

def _grid():
    out = []
    for mode in MODES:
        for D in (1, 2):
            for bias in (True, False):
                for proj in ((False, True) if mode == "lstm" else (False,)):
                    for seq in ("padded", "packed"):
                        out.append(pytest.param(mode, D, bias, proj, seq, id=f"{mode}-D{D}-{'bias' if bias else 'nobias'}"
                                                f"{'-proj' if proj else ''}-{seq}"))
    return out



@requires_ext
@pytest.mark.parametrize("mode,D,bias,proj,seq", _grid())
def test_host_driver_fp32_vs_oracle(mode, D, bias, proj, seq):
    """CPU tensors run csrc/cuda/torch_ops.cpp's per-step driver with the kernels' element code in host loops: the
    indexing, carries (n_cont / n_prev), GEMM shapes and reserve layout against the float64 oracle, without a GPU."""
    case = make_case(mode, D, bias, proj, seq, device="cpu")
    grads = cotangents(case)
    outs, reserve, ours_grads = run_ours(case, grads)
    ref_outs, ref_grads = oracle64(case, grads)
    per = len(case["weights"]) // D
    assert_all_close(_flat(outs, ours_grads), _flat(ref_outs, ref_grads), TOL_FP32, _names(mode, per, D))
    ref_reserve = backends.get_backend("reference").forward(mode, case["x"], case["batch_sizes"], case["hx"],
                                                             case["cx"], case["weights"], bias, D, True)[3]
    assert reserve.shape == ref_reserve.shape
    assert rel_err(reserve, ref_reserve) <= TOL_FP32


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_host_driver_low_precision(mode, dtype):
    """The 16-bit storage paths of the element code (conversions, float32 carries) on the host: against the float64
    oracle on the same rounded inputs, within a few 16-bit rounding steps."""
    case = make_case(mode, 2, True, mode == "lstm", "packed", T=9, B=5, I=8, H=12, P=5, dtype=dtype, device="cpu")
    grads = cotangents(case)
    outs, _, ours_grads = run_ours(case, grads)
    ref_outs, ref_grads = oracle64(case, grads)
    tol = 16 * torch.finfo(dtype).eps
    assert_all_close(_flat(outs, ours_grads), _flat(ref_outs, ref_grads), tol,
                     _names(mode, len(case["weights"]) // 2, 2))


@requires_ext
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,B,I,H,P", [(13, 5, 7, 33, 17), (3, 30, 16, 8, 5)], ids=["T13-B5-H33", "T3-B30-H8"])
def test_host_driver_larger(mode, T, B, I, H, P):
    case = make_case(mode, 2, True, mode == "lstm", "packed", T=T, B=B, I=I, H=H, P=P, device="cpu", seed=3)
    grads = cotangents(case, seed=4)
    outs, _, ours_grads = run_ours(case, grads)
    ref_outs, ref_grads = oracle64(case, grads)
    assert_all_close(_flat(outs, ours_grads), _flat(ref_outs, ref_grads), 1e-4,
                     _names(mode, len(case["weights"]) // 2, 2))


# ------------------------------------------------------------------------------------------------ GPU: float32

@pytest.mark.requires_cuda
@requires_ext
@pytest.mark.parametrize("mode,D,bias,proj,seq", _grid())
def test_layer_fp32_vs_oracle(mode, D, bias, proj, seq):
    case = make_case(mode, D, bias, proj, seq)
    grads = cotangents(case)
    outs, reserve, ours_grads = run_ours(case, grads)
    ref_outs, ref_grads = oracle64(case, grads)
    per = len(case["weights"]) // D
    assert_all_close(_flat(outs, ours_grads), _flat(ref_outs, ref_grads), TOL_FP32, _names(mode, per, D))
    # the reserve follows docs/design.md's layout: the reference backend fills the same one
    ref_reserve = backends.get_backend("reference").forward(mode, case["x"], case["batch_sizes"], case["hx"],
                                                             case["cx"], case["weights"], bias, D, True)[3]
    assert reserve.shape == ref_reserve.shape
    assert rel_err(reserve, ref_reserve) <= TOL_FP32


@pytest.mark.requires_cuda
@requires_ext
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,B,I,H,P", [(40, 16, 32, 64, 24), (13, 5, 7, 33, 17), (3, 300, 16, 8, 5)],
                         ids=["T40-B16-H64", "T13-B5-H33", "T3-B300-H8"])
def test_layer_fp32_larger(mode, T, B, I, H, P):
    """Sizes that are not multiples of anything, several blocks per step, long and wide batches."""
    proj = mode == "lstm"
    case = make_case(mode, 2, True, proj, "packed", T=T, B=B, I=I, H=H, P=P, seed=3)
    grads = cotangents(case, seed=4)
    outs, _, ours_grads = run_ours(case, grads)
    ref_outs, ref_grads = oracle64(case, grads)
    per = len(case["weights"]) // 2
    assert_all_close(_flat(outs, ours_grads), _flat(ref_outs, ref_grads), 1e-4, _names(mode, per, 2))


@pytest.mark.requires_cuda
@requires_ext
@pytest.mark.parametrize("mode", MODES)
def test_inference_has_empty_reserve(mode):
    case = make_case(mode, 2, True, mode == "lstm", "packed")
    outs_t, res_t, _ = run_ours(case, train=True)
    outs_i, res_i, _ = run_ours(case, train=False)
    assert res_i.numel() == 0
    for a, b in zip(outs_t, outs_i):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    assert all(o.dtype == case["x"].dtype and o.is_cuda for o in outs_i)


@pytest.mark.requires_cuda
@requires_ext
def test_noncontiguous_inputs():
    case = make_case("lstm", 2, True, True, "packed")
    ref_outs, _, _ = run_ours(case)
    wide = torch.randn(case["x"].shape[0], 2 * case["x"].shape[1], device="cuda")
    wide[:, ::2] = case["x"]
    case2 = dict(case, x=wide[:, ::2], hx=case["hx"].transpose(0, 1).contiguous().transpose(0, 1))
    outs, _, _ = run_ours(case2)
    for a, b in zip(outs, ref_outs):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


DEVICES = [pytest.param("cpu", id="host"), pytest.param("cuda", id="cuda", marks=pytest.mark.requires_cuda)]


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [0, 1])
def test_empty_batch(T, device):
    """B = 0 (and T = 0): no rows at all; outputs are empty, hy = hx, and the weight gradients are zeros."""
    case = make_case("lstm", 2, True, False, "padded", device=device)
    x, hx, cx = case["x"][:0], case["hx"][:, :0], case["cx"][:, :0]
    bs = torch.zeros(T, dtype=torch.int64)
    y, hy, cy, reserve = torch.ops.fusedrnn.cuda_rnn_forward("lstm", x, bs, hx, cx, case["weights"], True, 2, True)
    assert y.shape == (0, 12) and hy.shape == (2, 0, 6) and cy.shape == (2, 0, 6) and reserve.shape == (2, 0, 30)
    gx, ghx, gcx, gws = torch.ops.fusedrnn.cuda_rnn_backward("lstm", y, hy, cy, x, bs, hx, cx, case["weights"], True,
                                                             2, y, reserve)
    assert gx.shape == (0, 10) and ghx.shape == (2, 0, 6) and gcx.shape == (2, 0, 6)
    assert all(g.shape == w.shape and not g.any() for g, w in zip(gws, case["weights"]))


@pytest.mark.requires_cuda
@requires_ext
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_module_on_cuda_backend_vs_torch_nn(cell):
    """fusedrnn modules with backend='cuda' (2 layers, bidirectional, packed, proj for LSTM) against torch.nn in
    float64 on the same device: outputs and every gradient."""
    from torch.nn.utils.rnn import pack_padded_sequence
    kw = dict(num_layers=2, bidirectional=True)
    if cell == "LSTM":
        kw["proj_size"] = 4
    torch.manual_seed(0)
    ref = getattr(torch.nn, cell)(10, 8, **kw).double().cuda()
    ours = getattr(fusedrnn, cell)(10, 8, backend="cuda", **kw).cuda()
    ours.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    lengths = torch.tensor([7, 5, 5, 2, 1, 1])
    x = torch.randn(7, 6, 10, dtype=torch.float64, device="cuda")
    results = []
    for m, dt in ((ref, torch.float64), (ours, torch.float32)):
        xi = x.detach().to(dt).requires_grad_()
        out, _ = m(pack_padded_sequence(xi, lengths))
        g = torch.Generator(device="cpu").manual_seed(5)
        loss = (out.data * torch.randn(out.data.shape, generator=g, dtype=torch.float64).to("cuda", dt)).sum()
        grads = torch.autograd.grad(loss, [xi] + list(m.parameters()))
        results.append([out.data.detach()] + list(grads))
    for i, (a, b) in enumerate(zip(results[1], results[0])):
        assert rel_err(a, b) <= 1e-4, f"tensor {i}: {rel_err(a, b):.3g}"


# ------------------------------------------------------------------------------------------------ GPU: fp16 / bf16

def _nn_module(case):
    """The torch.nn module (one layer) holding the case's weights, on its device and in its dtype."""
    mode, D, bias = case["mode"], case["num_directions"], case["has_biases"]
    x, hx, ws = case["x"], case["hx"], case["weights"]
    I, H = x.shape[1], ws[1].shape[0] // G[mode]
    P = hx.shape[2]
    kw = dict(bias=bias, bidirectional=D == 2)
    if mode == "lstm":
        m = torch.nn.LSTM(I, H, proj_size=P if P != H else 0, **kw)
    elif mode == "gru":
        m = torch.nn.GRU(I, H, **kw)
    else:
        m = torch.nn.RNN(I, H, nonlinearity="tanh" if mode == "rnn_tanh" else "relu", **kw)
    m = m.to(x.device, x.dtype)
    with torch.no_grad():
        for name, w in zip(m._flat_weights_names, ws):
            getattr(m, name).copy_(w)
    return m


def _torch_nn_same_dtype(case, grads):
    """torch.nn (cuDNN or its fallback) on the case in the case's dtype: outputs and gradients like oracle64."""
    mode = case["mode"]
    x, hx, cx = case["x"], case["hx"], case["cx"]
    m = _nn_module(case)
    xi, hi = x.detach().clone().requires_grad_(), hx.detach().clone().requires_grad_()
    leaves = [xi, hi]
    if mode == "lstm":
        ci = cx.detach().clone().requires_grad_()
        leaves.append(ci)
        out, (hy, cy) = m(PackedSequence(xi, case["batch_sizes"]), (hi, ci))
    else:
        out, hy = m(PackedSequence(xi, case["batch_sizes"]), hi)
        cy = None
    gy, ghy, gcy = grads
    loss = (out.data.float() * gy.float()).sum() + (hy.float() * ghy.float()).sum()
    if mode == "lstm":
        loss = loss + (cy.float() * gcy.float()).sum()
    params = [getattr(m, n) for n in m._flat_weights_names]
    gr = torch.autograd.grad(loss, leaves + params)
    k = len(leaves)
    outs = (out.data.detach(), hy.detach(), cy.detach() if cy is not None else x.new_zeros(0))
    return outs, (gr[0], gr[1], gr[2] if mode == "lstm" else None, list(gr[k:]))


@pytest.mark.requires_cuda
@requires_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode,D,proj,seq", [("lstm", 1, False, "padded"), ("lstm", 2, True, "packed"),
                                             ("gru", 2, False, "packed"), ("rnn_tanh", 1, False, "packed"),
                                             ("rnn_relu", 2, False, "padded")],
                         ids=["lstm-D1", "lstm-D2-proj-packed", "gru-D2-packed", "rnn_tanh-D1-packed",
                              "rnn_relu-D2"])
def test_low_precision_2x_rule(dtype, mode, D, proj, seq):
    case = make_case(mode, D, True, proj, seq, T=20, B=8, I=32, H=48, P=16, dtype=dtype, seed=7)
    grads = cotangents(case, seed=8)
    outs, _, ours_grads = run_ours(case, grads)
    ref_outs, ref_grads = oracle64(case, grads)
    try:
        nn_outs, nn_grads = _torch_nn_same_dtype(case, grads)
    except RuntimeError as e:  # torch.nn has no kernel for this dtype here: nothing to compare against
        pytest.skip(f"torch.nn cannot run {mode} in {dtype}: {e}")
    floor = 4 * torch.finfo(dtype).eps
    names = _names(mode, len(case["weights"]) // D, D)
    ours_all, nn_all, ref_all = _flat(outs, ours_grads), _flat(nn_outs, nn_grads), _flat(ref_outs, ref_grads)
    assert len(names) == len(ours_all) == len(nn_all) == len(ref_all)
    for name, a, t, r in zip(names, ours_all, nn_all, ref_all):
        assert a.dtype == dtype and not torch.isnan(a).any(), name
        e_ours, e_nn = rel_err(a, r), rel_err(t, r)
        assert e_ours <= 2 * e_nn + floor, f"{name}: ours {e_ours:.3g} vs torch.nn {e_nn:.3g}"


# ------------------------------------------------------------------------------------------------ GPU: graphs, opcheck

@pytest.mark.requires_cuda
@requires_ext
@pytest.mark.parametrize("mode,D", [("lstm", 2), ("gru", 1), ("rnn_relu", 2)])
def test_cuda_graph_capture(mode, D):
    """Forward + backward (both direction streams) captured in one CUDA graph and replayed on new inputs give what
    eager gives on those inputs."""
    case = make_case(mode, D, True, mode == "lstm", "packed", T=9, B=5, seed=11)
    grads = cotangents(case, seed=12)
    c = case
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (cuBLAS handles, workspaces) off the capture
        for _ in range(2):
            run_ours(case, grads)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, hy, cy, reserve = torch.ops.fusedrnn.cuda_rnn_forward(mode, c["x"], c["batch_sizes"], c["hx"], c["cx"],
                                                                c["weights"], True, D, True)
        bwd = torch.ops.fusedrnn.cuda_rnn_backward(mode, *grads, c["x"], c["batch_sizes"], c["hx"], c["cx"],
                                                   c["weights"], True, D, y, reserve)
    fresh = make_case(mode, D, True, mode == "lstm", "packed", T=9, B=5, seed=13)
    fresh_grads = cotangents(fresh, seed=14)
    for dst, src in zip([c["x"], c["hx"]] + ([c["cx"]] if mode == "lstm" else []) + c["weights"] + list(grads),
                        [fresh["x"], fresh["hx"]] + ([fresh["cx"]] if mode == "lstm" else []) + fresh["weights"] +
                        list(fresh_grads)):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    eager_outs, eager_res, eager_grads = run_ours(fresh, fresh_grads)
    captured = [y, hy, cy, reserve, bwd[0], bwd[1]] + ([bwd[2]] if mode == "lstm" else []) + list(bwd[3])
    expected = list(eager_outs) + [eager_res] + [g for g in eager_grads[:3] if g is not None] + eager_grads[3]
    assert len(captured) == len(expected)
    for i, (a, b) in enumerate(zip(captured, expected)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), f"tensor {i} differs after replay"


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode, device):
    """Schema (no input mutated or aliased) and fakes against real outputs; on the host too (CPU key)."""
    case = make_case(mode, 2, True, mode == "lstm", "packed", device=device)
    c = case
    fwd_args = (mode, c["x"], c["batch_sizes"], c["hx"], c["cx"], c["weights"], True, 2, True)
    torch.library.opcheck(torch.ops.fusedrnn.cuda_rnn_forward.default, fwd_args,
                          test_utils=("test_schema", "test_faketensor"))
    y, hy, cy, reserve = torch.ops.fusedrnn.cuda_rnn_forward(*fwd_args)
    bwd_args = (mode, *cotangents(case), c["x"], c["batch_sizes"], c["hx"], c["cx"], c["weights"], True, 2, y,
                reserve)
    torch.library.opcheck(torch.ops.fusedrnn.cuda_rnn_backward.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.requires_cuda
@requires_ext
def test_errors():
    case = make_case("lstm", 1, True, False, "padded")
    c = case
    op = torch.ops.fusedrnn.cuda_rnn_forward
    with pytest.raises(RuntimeError, match="dtype"):
        op("lstm", c["x"].double(), c["batch_sizes"], c["hx"].double(), c["cx"].double(),
           [w.double() for w in c["weights"]], True, 1, True)
    with pytest.raises(RuntimeError, match="batch_sizes"):
        op("lstm", c["x"], c["batch_sizes"].cuda(), c["hx"], c["cx"], c["weights"], True, 1, True)
    with pytest.raises(RuntimeError, match="rows"):
        op("lstm", c["x"][1:], c["batch_sizes"], c["hx"], c["cx"], c["weights"], True, 1, True)
    with pytest.raises(RuntimeError, match="cx"):
        op("lstm", c["x"], c["batch_sizes"], c["hx"], None, c["weights"], True, 1, True)
    with pytest.raises(RuntimeError, match="unknown mode"):
        op("lstmx", c["x"], c["batch_sizes"], c["hx"], c["cx"], c["weights"], True, 1, True)


# ------------------------------------------------------------------------------------------------ compute-sanitizer

def sanitize_cases():
    """Small forward + backward runs of every mode, both directions, packed, fp32 and bf16: what compute-sanitizer
    watches (run as `python tests/test_cuda.py --sanitize-cases`)."""
    for mode in MODES:
        for dtype in (torch.float32, torch.bfloat16):
            case = make_case(mode, 2, True, mode == "lstm", "packed", T=5, B=4, I=6, H=5, P=3, dtype=dtype)
            run_ours(case, cotangents(case))
    torch.cuda.synchronize()
    print("sanitize cases ok")


@pytest.mark.requires_cuda
@requires_ext
@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer(tool):
    if os.environ.get("FUSEDRNN_SANITIZE") != "1":
        pytest.skip("set FUSEDRNN_SANITIZE=1 to run compute-sanitizer (minutes)")
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        pytest.skip("compute-sanitizer is not on PATH")
    # without the caching allocator every tensor is its own allocation, so memcheck sees out-of-bounds accesses
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    r = subprocess.run([exe, "--tool", tool, "--error-exitcode", "3", sys.executable, os.path.abspath(__file__),
                        "--sanitize-cases"], capture_output=True, text=True, timeout=1800, env=env)
    assert r.returncode == 0 and "sanitize cases ok" in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]


# ------------------------------------------------------------------------------------------------ timing (GPU)

def time_vs_cudnn(reps=20, configs=None, device="cuda"):
    """Median times of the cuda backend's layer ops and of torch.nn (cuDNN) on the same padded inputs, forward
    (inference) and forward + backward, one layer. `python tests/test_cuda.py --time`; a first look, not the
    benchmark suite (fusedrnn.bench)."""
    configs = configs or [("lstm", 1024, 16, 768, torch.bfloat16), ("lstm", 1024, 16, 768, torch.float16),
               ("lstm", 100, 64, 512, torch.float32), ("gru", 256, 64, 512, torch.float16),
               ("rnn_tanh", 512, 32, 256, torch.float32)]

    def median_ms(fn):
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2]

    print(f"{'mode':9} {'T':>5} {'B':>4} {'H':>5} {'dtype':9} {'ours fwd':>9} {'cuDNN fwd':>9} "
          f"{'ours f+b':>9} {'cuDNN f+b':>9}  (ms)")
    for mode, T, B, H, dt in configs:
        c = make_case(mode, 1, True, False, "padded", T=T, B=B, I=H, H=H, dtype=dt, device=device)
        grads = cotangents(c)
        args = (mode, c["x"], c["batch_sizes"], c["hx"], c["cx"], c["weights"], True, 1)

        def ours_fwd():
            torch.ops.fusedrnn.cuda_rnn_forward(*args, False)

        def ours_fb():
            y, hy, cy, res = torch.ops.fusedrnn.cuda_rnn_forward(*args, True)
            torch.ops.fusedrnn.cuda_rnn_backward(mode, *grads, *args[1:], y, res)

        m = _nn_module(c)
        xs = c["x"].view(T, B, -1)
        state = (c["hx"], c["cx"]) if mode == "lstm" else c["hx"]

        def nn_fwd():
            with torch.no_grad():
                m(xs, state)

        xg = xs.detach().clone().requires_grad_()
        gy = grads[0].view(T, B, -1)

        def nn_fb():
            out, _ = m(xg, state)
            out.backward(gy)

        row = [median_ms(f) for f in (ours_fwd, nn_fwd, ours_fb, nn_fb)]
        print(f"{mode:9} {T:5} {B:4} {H:5} {str(dt)[6:]:9} " + " ".join(f"{v:9.3f}" for v in row))


if __name__ == "__main__":
    if "--sanitize-cases" in sys.argv:
        sanitize_cases()
    elif "--time" in sys.argv:
        time_vs_cudnn()
    else:
        sys.exit(pytest.main([__file__] + sys.argv[1:]))
