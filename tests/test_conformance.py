"""Every backend against torch.nn in float64: outputs and every gradient (input, h0, c0, each parameter), over all
combinations of the module flags and input kinds. Parametrised over the available backends, so a new backend is held
to the same suite as soon as it registers."""
import itertools

import pytest
import torch

from conftest import assert_close_all, conformance_backends
from helpers import make_pair, outputs_and_grads, sequence_input

T, B, I, H, PROJ = 5, 3, 4, 6, 3
CELLS = [("LSTM", {}), ("LSTM", {"proj_size": PROJ}), ("GRU", {}), ("RNN", {"nonlinearity": "tanh"}),
         ("RNN", {"nonlinearity": "relu"})]
INPUTS = ["padded", "packed_sorted", "packed_unsorted", "unbatched"]


def _id(v):
    kind, kw = v
    return kind + "".join(f"-{k}{w}" for k, w in kw.items())


@pytest.mark.parametrize("backend", conformance_backends())
@pytest.mark.parametrize("cell", CELLS, ids=_id)
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, False), (1, True), (2, True)],
                         ids=["L1", "L2", "L1-bi", "L2-bi"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bfirst"])
def test_sequence_modules(backend, cell, layers, bidirectional, bias, batch_first):
    kind, kw = cell
    ref, ours = make_pair(kind, I, H, num_layers=layers, bidirectional=bidirectional, bias=bias,
                          batch_first=batch_first, backend=backend, **kw)
    D = 2 if bidirectional else 1
    P = kw.get("proj_size", H)
    for inp_kind, with_hx in itertools.product(INPUTS, [False, True]):
        batched = inp_kind != "unbatched"
        hx = None
        if with_hx:
            g = torch.Generator().manual_seed(3)
            shape = (layers * D, B) if batched else (layers * D,)
            h0 = torch.randn(*shape, P, generator=g, dtype=torch.float64)
            hx = (h0, torch.randn(*shape, H, generator=g, dtype=torch.float64)) if kind == "LSTM" else h0
        make = sequence_input(inp_kind, T, B, I, batch_first, torch.float64)
        o_ref, g_ref = outputs_and_grads(ref, make, hx)
        o_ours, g_ours = outputs_and_grads(ours, make, hx)
        what = f"{inp_kind} hx={with_hx}"
        assert_close_all(o_ours, o_ref, torch.float64, what + " outputs")
        assert_close_all(g_ours, g_ref, torch.float64, what + " grads")


@pytest.mark.parametrize("backend", conformance_backends())
@pytest.mark.parametrize("kind,kw", [("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {"nonlinearity": "tanh"}),
                                     ("RNNCell", {"nonlinearity": "relu"})])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_cells(backend, kind, kw, bias, batched):
    ref, ours = make_pair(kind, I, H, bias=bias, backend=backend, **kw)
    g = torch.Generator().manual_seed(4)
    shape = (B,) if batched else ()
    x = torch.randn(*shape, I, generator=g, dtype=torch.float64)
    h = torch.randn(*shape, H, generator=g, dtype=torch.float64)
    for hx in (None, (h, h * 0.5) if kind == "LSTMCell" else h):
        def make():
            leaf = x.clone().requires_grad_()
            return leaf, [leaf]
        o_ref, g_ref = outputs_and_grads(ref, make, hx)
        o_ours, g_ours = outputs_and_grads(ours, make, hx)
        assert_close_all(o_ours, o_ref, torch.float64, "outputs")
        assert_close_all(g_ours, g_ref, torch.float64, "grads")


@pytest.mark.parametrize("backend", conformance_backends())
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_long_packed_with_length_one_sequences(backend, kind):
    """Lengths with ties, length-1 sequences and a big spread, bidirectional, two layers."""
    ref, ours = make_pair(kind, I, H, num_layers=2, bidirectional=True, backend=backend)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(23, 6, I, generator=g, dtype=torch.float64)
    lengths = [23, 1, 9, 9, 1, 17]

    def make():
        leaf = x.clone().requires_grad_()
        return torch.nn.utils.rnn.pack_padded_sequence(leaf, lengths, enforce_sorted=False), [leaf]
    o_ref, g_ref = outputs_and_grads(ref, make)
    o_ours, g_ours = outputs_and_grads(ours, make)
    assert_close_all(o_ours, o_ref, torch.float64, "outputs")
    assert_close_all(g_ours, g_ref, torch.float64, "grads")


@pytest.mark.parametrize("backend", conformance_backends(dtype=torch.float32))
@pytest.mark.parametrize("kind,kw", [("LSTM", {}), ("LSTM", {"proj_size": PROJ}), ("GRU", {}), ("RNN", {})])
def test_float32_against_float64(backend, kind, kw):
    """float32 results agree with the float64 torch.nn result to float32 rounding (TOLERANCE[float32])."""
    ref, ours = make_pair(kind, I, H, num_layers=2, bidirectional=True, backend=backend, **kw)
    ours = ours.float()
    make64 = sequence_input("packed_unsorted", 12, 4, I, False, torch.float64)
    make32 = sequence_input("packed_unsorted", 12, 4, I, False, torch.float32)
    o_ref, g_ref = outputs_and_grads(ref, make64)
    o_ours, g_ours = outputs_and_grads(ours, make32)
    assert_close_all(o_ours, o_ref, torch.float32, "outputs")
    assert_close_all(g_ours, g_ref, torch.float32, "grads")



TANH_CASES = [pytest.param(b, "auto", id=b) for b in conformance_backends(dtype=torch.float32)]
if "cpu" in conformance_backends(dtype=torch.float32):
    TANH_CASES.append(pytest.param("cpu", "default", id="cpu-baseline-build"))


@pytest.mark.parametrize("backend,capability", TANH_CASES)
def test_tanh_derivative_is_accurate_near_saturation(backend, capability):
    """tanh' = 1 - y^2 at |y| -> 1 cancels: as 1 - y*y without a fused multiply-add, y*y is rounded first and the
    derivative loses up to 2^-25 / (1 - y^2) of itself (1e-4 at y = 0.99985), which the release fuzz profile caught as
    the reference's RNNCell input gradient 2.3x torch.nn's error. Given the backend's own float32 y, its derivative
    must be within 2 ulps of 1 - y^2 (torch.nn's tanh_backward is, through an fma)."""
    from fusedrnn import RNN
    m = RNN(1, 1, bias=False, backend=backend)
    with torch.no_grad():
        m.weight_ih_l0.fill_(1.0)
        m.weight_hh_l0.fill_(0.0)
    x = torch.linspace(0.5, 6.0, 4096).view(1, 4096, 1).requires_grad_()  # y from 0.46 to 1 - 1e-5
    if capability != "auto":
        from fusedrnn import cpu
        cpu.set_capability(capability)
    try:
        y, _ = m(x)
        g, = torch.autograd.grad(y.sum(), x)
    finally:
        if capability != "auto":
            cpu.set_capability("auto")
    want = 1 - y.detach().double() ** 2
    ok = want > 0  # y rounded to exactly 1: the derivative is 0 in every implementation
    err = ((g.double() - want).abs() / want)[ok]
    assert err.max() <= 2 * torch.finfo(torch.float32).eps, err.max()


def _subset_grads(module, x, hx, use):
    """Gradients (x, h0 [, c0], every parameter) of a random projection of only the outputs named in `use`
    (y, h, c): the others' gradients reach the layers as None."""
    x = x.detach().clone().requires_grad_()
    hx = tuple(h.detach().clone().requires_grad_() for h in hx)
    y, state = module(x, hx if len(hx) == 2 else hx[0])
    outs = {"y": y, "h": state[0] if isinstance(state, tuple) else state}
    if isinstance(state, tuple):
        outs["c"] = state[1]
    g = torch.Generator().manual_seed(4)
    loss = sum((outs[k] * torch.randn(outs[k].shape, generator=g, dtype=torch.float64)).sum() for k in use)
    wrt = [x, *hx, *module.parameters()]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return [torch.zeros_like(w) if gr is None else gr for gr, w in zip(grads, wrt)]


@pytest.mark.parametrize("backend", conformance_backends())
@pytest.mark.parametrize("kind,use", [(k, u) for k in ("LSTM", "GRU", "RNN") for u in ("y", "h", "c", "yc")
                                      if k == "LSTM" or "c" not in u])  # (c_n: LSTM only)
def test_loss_on_some_outputs_only(backend, kind, use):
    """A loss on part of the outputs (a classifier's on h_n alone, a tagger's on y alone): the unused outputs'
    gradients reach the layers' backward as lazy zeros (an expanded grad_y, empty grad_hy / grad_cy; see
    docs/design.md, Backward), and every gradient still matches torch.nn's. Two layers, both directions."""
    ref, ours = make_pair(kind, I, H, num_layers=2, bidirectional=True, backend=backend)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    hx = tuple(torch.randn(4, B, H, generator=g, dtype=torch.float64) for _ in range(2 if kind == "LSTM" else 1))
    assert_close_all(_subset_grads(ours, x, hx, use), _subset_grads(ref, x, hx, use), torch.float64, use)
