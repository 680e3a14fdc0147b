"""fusedrnn::cpu_cell, the CPU cell step's op (csrc/cpu/cell.cpp): its gradients (first and second, by finite
differences, and opcheck), the backward asking only for what needs a gradient, the cell modules' use of it, and
fusedrnn._C.cell_step, the same step without the dispatcher call in front."""
import pytest
import torch

from fusedrnn.backends import GATES
from helpers import MASKS, assert_masked_grads

cpu = pytest.importorskip("fusedrnn.cpu")
pytestmark = pytest.mark.skipif(cpu._C is None, reason="fusedrnn._C is not built")

MODES = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


CELL_MODULES = {"lstm": "LSTMCell", "gru": "GRUCell", "rnn_tanh": "RNNCell", "rnn_relu": "RNNCell"}


def _cell_case(mode, bias, dtype, B=3, I=4, H=5):
    g = torch.Generator().manual_seed(3)
    G = GATES[mode]
    shapes = [(G * H, I), (G * H, H)] + ([(G * H,), (G * H,)] if bias else [])
    ws = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]
    x, h = (torch.randn(B, n, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for n in (I, H))
    c = torch.randn(B, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if mode == "lstm" else None
    return x, h, c, ws


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cell_op_gradients(mode, bias):
    """fusedrnn::cpu_cell (one cell step, its autograd a C++ Function): first and second derivatives by finite
    differences in float64, every input; opcheck (schema, fake, autograd registration, AOT dispatch)."""
    x, h, c, ws = _cell_case(mode, bias, torch.float64)
    n = len(ws)

    def f(x, h, c, *ws):
        hn, cn, _ = torch.ops.fusedrnn.cpu_cell(mode, x, h, c, list(ws), bias, False)
        return (hn, cn) if mode == "lstm" else hn

    args = (x, h, c, *ws)
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)
    assert n == (4 if bias else 2)
    torch.library.opcheck(torch.ops.fusedrnn.cpu_cell.default, (mode, x, h, c, ws, bias, False))
    # (the backward op runs with grad mode off, as the Function's backward calls it: on detached tensors)
    x, h, c = (t.detach() if t is not None else None for t in (x, h, c))
    ws = [w.detach() for w in ws]
    hn, _, reserve = torch.ops.fusedrnn.cpu_cell(mode, x, h, c, ws, bias, True)
    gc = torch.randn_like(c) if mode == "lstm" else x.new_empty(0)
    bwd = (mode, torch.randn_like(hn), gc, x, h, c, ws, bias, hn, reserve)
    full = torch.ops.fusedrnn.cpu_cell_backward(*bwd, [True, True, True])
    for mask in [[True, True, True], *map(list, MASKS)]:
        torch.library.opcheck(torch.ops.fusedrnn.cpu_cell_backward.default, (*bwd, mask))
        assert_masked_grads(torch.ops.fusedrnn.cpu_cell_backward(*bwd, mask), full, mask, mode == "lstm")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("needs", ["x", "hx", "weights", "x+weights", "hx+weights"])
def test_cell_backward_asks_only_for_what_needs_a_gradient(mode, needs):
    """A cell step whose x, state or weights need no gradient (a decoder's first step from a zero state, an input
    without grad, a frozen cell): the gradients that do are torch.nn's (float64), the others stay None; the C++
    Function asks the backward op for those only (the op's empty [0] never reaches a .grad)."""
    import fusedrnn
    kw = {"nonlinearity": "relu"} if mode == "rnn_relu" else {}
    ref = getattr(torch.nn, CELL_MODULES[mode])(4, 5, **kw).double()
    ours = getattr(fusedrnn, CELL_MODULES[mode])(4, 5, **kw).double()
    ours.load_state_dict(ref.state_dict())
    x, h, c, _ = _cell_case(mode, True, torch.float64)
    grads = {}
    for name, m in (("torch", ref), ("ours", ours)):
        m.requires_grad_("weights" in needs)
        xi = x.detach().requires_grad_("x" in needs.split("+"))
        hi = h.detach().requires_grad_("hx" in needs)
        ci = c.detach().requires_grad_("hx" in needs) if c is not None else None
        out = m(xi, (hi, ci) if mode == "lstm" else hi)
        loss = (out[0] * 2 + out[1]).sum() if mode == "lstm" else out.sum()
        loss.backward()
        grads[name] = [t.grad for t in (xi, hi, ci) if t is not None] + [p.grad for p in m.parameters()]
    for a, b in zip(grads["ours"], grads["torch"]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
def test_cell_module_takes_the_cell_op(mode, dtype, grad):
    """A CPU cell step in plain eager mode runs as cpu_cell (its graph node is the C++ Function), with the layer
    op's results: outputs and every gradient equal to the layer path's (the same kernels), loss on h alone and on
    h and c."""
    import fusedrnn
    import fusedrnn.modules as fm
    kw = {"nonlinearity": "relu"} if mode == "rnn_relu" else {}
    cell = getattr(fusedrnn, CELL_MODULES[mode])(4, 5, **kw).to(dtype)
    x, h, c, _ = _cell_case(mode, True, dtype)
    hx = (h, c) if mode == "lstm" else h
    results = []
    for fast in (True, False):
        if not fast:
            fm._cpu_cell_step, saved = (lambda *a: False), fm._cpu_cell_step
            fm._cell_op_applies, saved2 = (lambda *a: False), fm._cell_op_applies
            fm._cpu_cell_forward, saved3 = (lambda *a: None), fm._cpu_cell_forward
        try:
            with torch.set_grad_enabled(grad):
                out = cell(x, hx)
        finally:
            if not fast:
                fm._cpu_cell_step, fm._cell_op_applies, fm._cpu_cell_forward = saved, saved2, saved3
        outs = out if isinstance(out, tuple) else (out,)
        if grad:
            node = outs[0].grad_fn.name()
            assert ("CellFunction" in node) == fast, node
            loss = sum((o.float() * (k + 1)).sum() for k, o in enumerate(outs))
            results.append([*outs, *torch.autograd.grad(loss, [x, h] + ([c] if c is not None else [])
                                                        + list(cell.parameters()))])
        else:
            assert outs[0].grad_fn is None
            results.append(list(outs))
    for got, want in zip(*results):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cell_step_is_the_op_without_the_dispatcher_call(mode, bias, dtype):
    """fusedrnn._C.cell_step (the modules' fast path calls it instead of torch.ops.fusedrnn.cpu_cell): bitwise the
    op's h and c, with and without a graph, the graph's node the op's C++ Function and its gradients the op's."""
    x, h, c, ws = _cell_case(mode, bias, dtype)

    def step(direct):
        if direct:
            out = cpu._C.cell_step(mode, x, h, c, ws, bias)
            return list(out) if mode == "lstm" else [out]
        hn, cn, _ = torch.ops.fusedrnn.cpu_cell(mode, x, h, c, ws, bias, False)
        return [hn, cn] if mode == "lstm" else [hn]

    results = []
    for direct in (True, False):
        with torch.no_grad():
            outs = step(direct)
        assert all(o.grad_fn is None for o in outs)
        graph = step(direct)
        assert "CellFunction" in graph[0].grad_fn.name()
        loss = sum((o.float() * (k + 2)).sum() for k, o in enumerate(graph))
        wrt = [x, h] + ([c] if c is not None else []) + ws
        results.append(outs + [o.detach() for o in graph] + list(torch.autograd.grad(loss, wrt)))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_cell_step_errors():
    """Wrong arguments are a TypeError, a kernel's refusal a RuntimeError with the kernel's message: never a crash."""
    x, h, c, ws = _cell_case("gru", True, torch.float32)
    with pytest.raises(TypeError):
        cpu._C.cell_step("gru", x, h, None, ws)
    with pytest.raises(TypeError):
        cpu._C.cell_step("gru", x, h, None, tuple(ws), True)
    with pytest.raises(TypeError):
        cpu._C.cell_step("gru", x, h, None, [ws[0], 1.0, ws[2], ws[3]], True)
    with pytest.raises(RuntimeError, match="cpu_cell"):
        cpu._C.cell_step("gru", x[0], h, None, ws, True)  # x not [B, I]
    with torch.no_grad(), pytest.raises(RuntimeError, match="cx for lstm only"):
        cpu._C.cell_step("gru", x, h, h, ws, True)


def test_profiler_sees_the_cell_op_from_the_module():
    """The modules' steps skip the dispatcher call torch.ops makes, not the op: the profiler still records
    fusedrnn::cpu_cell for each step."""
    import fusedrnn
    cell = fusedrnn.GRUCell(4, 5)
    x, h = torch.randn(2, 4), torch.randn(2, 5)
    with torch.profiler.profile() as prof:
        for _ in range(3):
            h = cell(x, h)
    assert sum(e.name == "fusedrnn::cpu_cell" for e in prof.events()) == 3
