"""The custom ops themselves: gradcheck against finite differences, torch.library.opcheck (schema, fake tensor,
autograd registration, AOT dispatch), and torch.compile(fullgraph=True) of models holding the modules."""
import pytest
import torch
from torch import nn

import fusedrnn
from conftest import conformance_backends
from fusedrnn.reference import split_weights  # noqa: F401  (the layout helper the ops' docs refer to)

MODES = ["lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu"]


def layer_args(mode, D=2, packed=True, train=True, backend="reference", dtype=torch.float64, seed=0):
    """Random arguments for torch.ops.fusedrnn.rnn_layer: I=3, H=4, P=2 with projection, B=3, T=4."""
    g = torch.Generator().manual_seed(seed)
    proj = mode == "lstm_proj"
    mode = "lstm" if proj else mode
    G = {"lstm": 4, "gru": 3}.get(mode, 1)
    I, H, B = 3, 4, 3
    P = 2 if proj else H
    bs = torch.tensor([3, 3, 2, 1] if packed else [3] * 4, dtype=torch.int64)
    N = int(bs.sum())

    def r(*s):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    weights = []
    for _ in range(D):
        weights += [r(G * H, I), r(G * H, P), r(G * H), r(G * H)] + ([r(P, H)] if proj else [])
    cx = r(D, B, H) if mode == "lstm" else None
    return (mode, r(N, I), bs, r(D, B, P), cx, weights, True, D, train, backend)


@pytest.mark.parametrize("backend", conformance_backends())
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("D", [1, 2])
def test_gradcheck(mode, D, backend):
    args = layer_args(mode, D=D, backend=backend)

    def f(x, hx, cx, *weights):
        y, hy, cy, _ = torch.ops.fusedrnn.rnn_layer(args[0], x, args[2], hx, cx, list(weights), True, D, True,
                                                    backend)
        return (y, hy, cy) if args[0] == "lstm" else (y, hy)
    assert torch.autograd.gradcheck(f, (args[1], args[3], args[4], *args[5]), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", conformance_backends())
@pytest.mark.parametrize("mode", MODES)
def test_opcheck_forward_and_backward_ops(mode, backend):
    args = layer_args(mode, backend=backend)
    torch.library.opcheck(torch.ops.fusedrnn.rnn_layer.default, args)
    torch.library.opcheck(torch.ops.fusedrnn.rnn_layer.default, args[:8] + (False, backend))
    y, hy, cy, reserve = torch.ops.fusedrnn.rnn_layer(*args)
    bargs = (args[0], torch.randn_like(y), torch.randn_like(hy), torch.randn_like(cy), *[
        a.detach() if isinstance(a, torch.Tensor) else a for a in args[1:5]],
        [w.detach() for w in args[5]], args[6], args[7], y.detach(), reserve.detach(), backend)
    torch.library.opcheck(torch.ops.fusedrnn.rnn_layer_backward.default, bargs)


class _Model(nn.Module):
    def __init__(self, kind, **kw):
        super().__init__()
        self.rnn = getattr(fusedrnn, kind)(5, 6, **kw)
        D = 2 if kw.get("bidirectional") else 1
        self.head = nn.Linear(D * kw.get("proj_size", 6), 3)
        self.cell = fusedrnn.GRUCell(3, 6)

    def forward(self, x):
        y, h = self.rnn(x)
        out = self.head(y)
        s = self.cell(out[-1] if not self.rnn.batch_first else out[:, -1])
        hs = h if isinstance(h, torch.Tensor) else h[0]
        return out.sum() + s.sum() + hs.sum()


@pytest.mark.parametrize("kind,kw", [("LSTM", {"num_layers": 2, "bidirectional": True}),
                                     ("LSTM", {"proj_size": 2, "batch_first": True}), ("GRU", {}),
                                     ("RNN", {"nonlinearity": "relu", "num_layers": 2})])
def test_compile_fullgraph_matches_eager(kind, kw):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Model(kind, **kw).double()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    for shape in [(7, 3, 5), (4, 2, 5)]:  # a second shape exercises dynamic T and B without recompiling per size
        x = torch.randn(*shape, dtype=torch.float64)
        le = model(x)
        lc = compiled(x)
        params = list(model.parameters())
        ge = torch.autograd.grad(le, params)
        gc = torch.autograd.grad(lc, params)
        torch.testing.assert_close(lc, le)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b)


def test_compile_with_inductor_fullgraph():
    torch._dynamo.reset()
    model = _Model("LSTM", num_layers=2).double()
    x = torch.randn(5, 2, 5, dtype=torch.float64)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


def test_backward_without_saved_reserve_is_a_clear_error():
    args = layer_args("gru")
    with torch.no_grad():
        out = torch.ops.fusedrnn.rnn_layer(*args[:8], False, "reference")
    assert out[3].numel() == 0
    with pytest.raises(RuntimeError, match="reserve"):
        torch.ops.fusedrnn.rnn_layer_backward(args[0], out[0], out[1], torch.zeros(0, dtype=torch.float64),
                                              args[1].detach(), args[2], args[3].detach(), None,
                                              [w.detach() for w in args[5]], True, 2, out[0], out[3],
                                              "reference")


def _packing_op_args():
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 4, 1])
    data, bs = torch.ops.fusedrnn.pack_padded(x, lengths, False)
    d = data.detach().requires_grad_()
    return [(torch.ops.fusedrnn.pack_padded.default, (x, lengths, False)),
            (torch.ops.fusedrnn.pack_padded.default, (x.detach().transpose(0, 1).contiguous().requires_grad_(),
                                                      lengths, True)),
            (torch.ops.fusedrnn.pack_padded_backward.default, (torch.randn(11, 4, dtype=torch.float64), [6, 3, 4],
                                                               bs, False)),
            (torch.ops.fusedrnn.pad_packed.default, (d, bs, False, 0.0, 7, 3)),
            (torch.ops.fusedrnn.pad_packed.default, (d, bs, True, -1.0, 6, -1)),  # B unknown to the caller
            (torch.ops.fusedrnn.pad_packed_backward.default, (torch.randn(7, 3, 4, dtype=torch.float64), bs, False,
                                                              [11, 4]))]


@pytest.mark.parametrize("case", range(6))
def test_opcheck_packing_ops(case):
    """The packing ops behind fusedrnn.ops.pack_padded_sequence / pad_packed_sequence (fake kernels with run-time
    sizes, autograd)."""
    op, args = _packing_op_args()[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", fusedrnn.available_backends())
def test_layer_op_rejects_inconsistent_batch_sizes(backend):
    """Every backend's forward rejects batch_sizes that do not fit hx (B) and x (N) (the cpu and cuda kernels and the
    reference check it themselves, the op checks it for any other): under torch.compile this run-time check is the
    only one a hand-built PackedSequence gets."""
    args = list(layer_args("gru", backend=backend))  # B = 3, N = 9, batch_sizes [3, 3, 2, 1]
    for bs in ([3, 2, 3, 1], [3, 3, 2, 2], [2, 2, 2, 2, 1], [3, 3, 3, 0]):
        args[2] = torch.tensor(bs)
        with pytest.raises(RuntimeError, match="batch_sizes"):
            torch.ops.fusedrnn.rnn_layer(*args)


# ---- the eager path (fusedrnn.ops.layer) ----------------------------------------------------------------------

class _Watching(torch.overrides.TorchFunctionMode):
    """A torch function mode that changes nothing: while it is active, something may be watching the op calls,
    so the modules must call the custom op itself."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _node_names(fn):
    """Class names of every autograd node reachable from fn."""
    seen, todo = set(), [fn]
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        todo += [n for n, _ in f.next_functions]
    return {type(f).__name__ for f in seen}


def _run_module(kind, backend, watch, **kw):
    torch.manual_seed(0)
    m = getattr(fusedrnn, kind)(3, 5, backend=backend, **kw).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    ctx = _Watching() if watch else torch.enable_grad()
    with ctx:
        y, _ = m(x)
        kinds = _node_names(y.grad_fn)
        (y * torch.arange(y.numel(), dtype=torch.float64).view_as(y).sin()).sum().backward()
    return kinds, [y.detach(), x.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("backend", conformance_backends())
@pytest.mark.parametrize("kind,kw", [("LSTM", {"num_layers": 2, "bidirectional": True}), ("LSTM", {"proj_size": 2}),
                                     ("GRU", {}), ("RNN", {"nonlinearity": "relu"})])
def test_eager_path_equals_the_op_bitwise(kind, kw, backend):
    """Plain eager autograd runs the layer through ops._EagerLayer, anything watching (here a torch function mode)
    through the custom op; both give bitwise the same outputs and gradients."""
    eager_kinds, eager = _run_module(kind, backend, watch=False, **kw)
    op_kinds, op = _run_module(kind, backend, watch=True, **kw)
    assert "_EagerLayerBackward" in eager_kinds and "_EagerLayerBackward" not in op_kinds
    for a, b in zip(eager, op):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", conformance_backends())
@pytest.mark.parametrize("grad_off", [torch.no_grad, torch.inference_mode])
def test_no_grad_path_equals_the_op_bitwise(grad_off, backend, monkeypatch):
    """With grad mode off the eager path calls the layer's body without an autograd.Function (nothing to record):
    the same results, bitwise, as the op, and tensors without a graph as torch.nn gives."""
    def no_function(*args):
        raise AssertionError("grad mode is off: the layer should not go through _EagerLayer")
    monkeypatch.setattr(fusedrnn.ops._EagerLayer, "apply", no_function)
    torch.manual_seed(0)
    m = fusedrnn.LSTM(3, 5, num_layers=2, bidirectional=True, backend=backend).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    with grad_off():
        y, (h, c) = m(x)
        with _Watching():
            y_op, (h_op, c_op) = m(x)
    for a, b in [(y, y_op), (h, h_op), (c, c_op)]:
        assert torch.equal(a, b)
        assert a.grad_fn is None and not a.requires_grad


def test_eager_path_is_left_under_fake_tensors_and_dispatch_modes():
    """Under FakeTensorMode (a dispatch mode) the modules call the op, whose fake gives the shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    m = fusedrnn.GRU(3, 5, num_layers=2)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(4, 2, 3))
        y, h = m(x)
    assert y.shape == (4, 2, 5) and h.shape == (2, 2, 5)
    assert type(y).__name__ == "FakeTensor"


@pytest.mark.parametrize("backend", conformance_backends())
@pytest.mark.parametrize("watch", [False, True], ids=["eager", "op"])
@pytest.mark.parametrize("kind,kw", [("LSTM", {}), ("LSTM", {"proj_size": 2}), ("GRU", {}), ("RNN", {}),
                                     ("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {}),
                                     ("RNNCell", {"nonlinearity": "relu"})],
                         ids=["lstm", "proj", "gru", "rnn", "lstmcell", "grucell", "rnncell", "rnncell-relu"])
def test_double_backward_matches_torch_nn(kind, kw, watch, backend):
    """create_graph=True, as a gradient penalty (WGAN-GP) or second-order MAML asks: gradients with a graph whose
    backward gives torch.nn's second derivatives, for x, h0 and every parameter, on both paths (the eager Function
    and the custom op). Two layers, both directions, a packed batch of unequal lengths. (Before: a RuntimeError.)"""
    from torch.nn.utils.rnn import pack_padded_sequence
    from helpers import flatten_out, make_pair
    cell = kind.endswith("Cell")
    extra = {} if cell else {"num_layers": 2, "bidirectional": True}
    ref, ours = make_pair(kind, 3, 4, backend=backend, **extra, **kw)
    g = torch.Generator().manual_seed(6)
    x = torch.randn((3, 3) if cell else (5, 3, 3), generator=g, dtype=torch.float64)
    h0 = torch.randn((3, 4) if cell else (4, 3, kw.get("proj_size", 4)), generator=g, dtype=torch.float64)
    results = []
    for module in (ref, ours):
        xl, hl = x.clone().requires_grad_(), h0.clone().requires_grad_()
        inp = xl if cell else pack_padded_sequence(xl, torch.tensor([5, 3, 2]))
        with _Watching() if watch else torch.enable_grad():
            hx = (hl, torch.zeros_like(hl) if cell else torch.zeros(4, 3, 4, dtype=torch.float64)) \
                if "LSTM" in kind else hl
            out = flatten_out(module(inp, hx))
            loss = sum((o * o.sin()).sum() for o in out)
            params = list(module.parameters())
            grads = torch.autograd.grad(loss, [xl, hl, *params], create_graph=True)
            assert all(gr.requires_grad for gr in grads)
            penalty = sum((gr ** 2).sum() for gr in grads)
            results.append([t.detach() for t in grads] + list(torch.autograd.grad(penalty, [xl, hl, *params])))
    for k, (got, want) in enumerate(zip(results[1], results[0])):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9, msg=f"tensor {k}")


@pytest.mark.parametrize("backend", conformance_backends())
@pytest.mark.parametrize("watch", [False, True], ids=["eager", "op"])
@pytest.mark.parametrize("needs", ["weights", "hx", "x+hx", "layer0-frozen", "all"])
@pytest.mark.parametrize("kind,kw", [("LSTM", {"num_layers": 2, "bidirectional": True}), ("LSTM", {"proj_size": 2}),
                                     ("GRU", {"num_layers": 2}), ("RNN", {})])
def test_gradients_only_where_needed(kind, kw, needs, watch, backend, monkeypatch):
    """Inputs that need no gradient (raw features as x, hx given without grad, a frozen layer that x's gradient
    passes through, as in prompt tuning):
    the backward asks the layer's backward for the others only (rnn_layer_backward's output_mask; the `cpu`
    backend skips their GEMMs). Every gradient that is needed equals torch.nn's (float64); the others stay None,
    on the eager path and on the op's own autograd (what torch.compile uses)."""
    torch.manual_seed(0)
    ref = getattr(nn, kind)(3, 4, **kw).double()
    ours = getattr(fusedrnn, kind)(3, 4, backend=backend, **kw).double()
    ours.load_state_dict(ref.state_dict())
    D = 2 if kw.get("bidirectional") else 1
    L = kw.get("num_layers", 1)
    P = kw.get("proj_size") or 4
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
    h0 = torch.randn(L * D, 2, P, generator=g, dtype=torch.float64)
    c0 = torch.randn(L * D, 2, 4, generator=g, dtype=torch.float64)
    impl = fusedrnn.backends.get_backend(backend)
    masks = []
    if impl.takes_output_mask:
        real = impl.backward

        def spy(*args):
            masks.append(tuple(args[-1]))
            return real(*args)
        monkeypatch.setattr(impl, "backward", spy)
    results = []
    for m in (ref, ours):
        for name, p in m.named_parameters():
            p.requires_grad_(needs != "hx" and not (needs == "layer0-frozen" and "_l0" in name))
        x = x0.clone().requires_grad_(needs in ("x+hx", "layer0-frozen", "all"))
        hx = [t.clone().requires_grad_(needs in ("hx", "x+hx", "all")) for t in (h0, c0)]
        state = tuple(hx) if kind == "LSTM" else hx[0]
        with _Watching() if watch else torch.enable_grad():
            y, _ = m(x, state)
        (y * torch.arange(y.numel(), dtype=torch.float64).view_as(y).cos()).sum().backward()
        results.append([x.grad, *(t.grad for t in hx[:2 if kind == "LSTM" else 1]),
                        *(p.grad for p in m.parameters())])
    for a, b in zip(*results):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)
    # the first layer's backward (the last to run) got the mask of what its inputs need
    first = {"weights": (False, False, True), "hx": (False, True, False), "x+hx": (True, True, True),
             "layer0-frozen": (True, False, False), "all": (True, True, True)}[needs]
    assert not impl.takes_output_mask or masks[-1] == first, masks
