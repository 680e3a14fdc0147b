"""The sequence modules' fast path (fusedrnn.fast_path._cpu_sequence): when a forward calls the cpu layer op (or, one
training step, the cell op) straight away, and that what it returns is what the general path and torch.nn return;
and what every path must get right around them (a training call after an inference-mode one, forward-mode AD)."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
import fusedrnn.modules as fm
from helpers import PassDispatchMode, PassFunctionMode, make_pair

cpu = pytest.importorskip("fusedrnn.cpu")
pytestmark = pytest.mark.skipif(cpu._C is None, reason="fusedrnn._C is not built")

I, H = 5, 6


@pytest.fixture
def general_calls(monkeypatch):
    """Counts the general path's layer calls (ops.layer through modules.run_layer)."""
    calls = []
    real = fm.run_layer

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(fm, "run_layer", counted)
    return calls


def _state(kind, LD, B, P, batched, g):
    shape = (LD, B) if batched else (LD,)
    h = torch.randn(*shape, P, generator=g, dtype=torch.float64)
    if kind == "LSTM":
        return h, torch.randn(*shape, H, generator=g, dtype=torch.float64)
    return h


def _config_ids(c):
    return "-".join(f"{k}{v}" for k, v in c.items()) or "plain"


CONFIGS = [{}, {"num_layers": 2}, {"bidirectional": True}, {"num_layers": 2, "bidirectional": True},
           {"batch_first": True}, {"bias": False}, {"unbatched": True}, {"unbatched": True, "batch_first": True},
           {"no_hx": True}, {"proj_size": 4, "num_layers": 2, "bidirectional": True}, {"nonlinearity": "relu"}]


def _exists(kind, config):
    """Whether torch.nn has this module: proj_size is LSTM's alone, nonlinearity RNN's."""
    return not ("proj_size" in config and kind != "LSTM" or "nonlinearity" in config and kind != "RNN")


@pytest.mark.parametrize("kind,config", [(k, c) for k in ("LSTM", "GRU", "RNN") for c in CONFIGS if _exists(k, c)],
                         ids=lambda v: v if isinstance(v, str) else _config_ids(v))
@pytest.mark.parametrize("T", [1, 7])
def test_fast_path_matches_general_path_and_torch_nn(kind, config, T, general_calls, monkeypatch):
    """Under no_grad the forward takes the fast path (no general-path layer call) and gives torch.nn's outputs, and
    exactly the general path's (the same op calls): values, shapes and strides."""
    kw = {k: v for k, v in config.items() if k not in ("unbatched", "no_hx")}
    ref, ours = make_pair(kind, I, H, **kw)
    D = 2 if kw.get("bidirectional") else 1
    LD, B, P = kw.get("num_layers", 1) * D, 3, kw.get("proj_size") or H
    batched = not config.get("unbatched")
    g = torch.Generator().manual_seed(T)
    shape = ((B, T) if kw.get("batch_first") else (T, B)) if batched else (T,)
    x = torch.randn(*shape, I, generator=g, dtype=torch.float64)
    args = (x,) if config.get("no_hx") else (x, _state(kind, LD, B, P, batched, g))
    with torch.no_grad():
        got = ours(*args)
        assert general_calls == []
        want = ref(*args)
        monkeypatch.setattr(fm, "_cpu_sequence", lambda *a: None)
        general = ours(*args)
    assert general_calls
    got_t, want_t, gen_t = (torch.utils._pytree.tree_leaves(o) for o in (got, want, general))
    assert len(got_t) == len(want_t) == len(gen_t)
    for a, b, c in zip(got_t, want_t, gen_t):
        assert a.shape == b.shape == c.shape
        assert a.stride() == c.stride()
        assert torch.equal(a, c)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_fast_path_in_grad_mode_when_nothing_requires_grad(kind, general_calls):
    """A frozen module (no parameter requiring grad) in grad mode records no graph: the op runs straight away. With
    the input requiring grad the fast path records through the general path's autograd.Function, and the gradients
    are torch.nn's."""
    ref, ours = make_pair(kind, I, H)
    x = torch.randn(4, 2, I, dtype=torch.float64)
    ours.requires_grad_(False)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-10, atol=1e-12)
    xg = x.clone().requires_grad_()
    ours(xg)[0].sum().backward()
    xr = x.clone().requires_grad_()
    ref(xr)[0].sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-10, atol=1e-12)
    assert general_calls == []


def _train_three_ways(kind, ref, ours, x, hx, general_calls, monkeypatch):
    """Forward and backward (a fixed random projection of every output) with fresh leaf copies of x and hx (None:
    not given): ours through the fast path (asserted: no general-path layer call), torch.nn's, ours through the
    general path. Returns the three (outputs, gradients of x, the states and every parameter)."""
    def run(m):
        xs = x.clone().requires_grad_()
        hs = None if hx is None else tuple(h.clone().requires_grad_() for h in hx) if kind == "LSTM" else \
            hx.clone().requires_grad_()
        m.zero_grad(set_to_none=True)
        leaves = torch.utils._pytree.tree_leaves(m(xs) if hs is None else m(xs, hs))
        w = torch.Generator().manual_seed(3)
        sum((t * torch.randn(t.shape, generator=w, dtype=t.dtype)).sum() for t in leaves).backward()
        grads = [xs.grad] + ([] if hs is None else [h.grad for h in torch.utils._pytree.tree_leaves(hs)])
        return leaves, grads + [p.grad for p in m.parameters()]

    got = run(ours)
    assert general_calls == []
    want = run(ref)
    monkeypatch.setattr(fm, "_cpu_sequence", lambda *a: None)
    general = run(ours)
    assert general_calls
    return got, want, general


TRAIN = [({}, 5), ({"num_layers": 2}, 1), ({"bidirectional": True}, 4), ({"proj_size": 3}, 1),
         ({"num_layers": 2, "bidirectional": True, "proj_size": 3, "batch_first": True}, 6), ({"bias": False}, 3)]


@pytest.mark.parametrize("kind,kw,T", [(k, c, t) for k in ("LSTM", "GRU", "RNN") for c, t in TRAIN if _exists(k, c)],
                         ids=lambda v: v if isinstance(v, str) else _config_ids(v) if isinstance(v, dict) else f"T{v}")
def test_training_through_the_fast_path(kind, kw, T, general_calls, monkeypatch):
    """With a graph to record, anything but one step of one layer and direction without projection goes through
    the general path's autograd.Function straight from the fast path: outputs and every gradient (input, states,
    parameters) those of the general path, bitwise, and torch.nn's."""
    ref, ours = make_pair(kind, I, H, **kw)
    D = 2 if kw.get("bidirectional") else 1
    LD, B, P = kw.get("num_layers", 1) * D, 3, kw.get("proj_size") or H
    g = torch.Generator().manual_seed(T)
    x = torch.randn(*((B, T) if kw.get("batch_first") else (T, B)), I, generator=g, dtype=torch.float64)
    hx = _state(kind, LD, B, P, True, g)

    got, want, general = _train_three_ways(kind, ref, ours, x, hx, general_calls, monkeypatch)
    for a, b, c in zip(got[0] + got[1], want[0] + want[1], general[0] + general[1]):
        assert a.shape == b.shape == c.shape
        assert torch.equal(a, c)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class _Double(torch.nn.Module):
    def forward(self, w):
        return 2 * w


def _fallback_cases():
    def packed(m, x):
        return m(pack_padded_sequence(x, torch.tensor([4, 3, 1]), enforce_sorted=False))

    def dropout_training(m, x):
        m.dropout = 0.5
        m.train()
        return m(x)

    def parametrized(m, x):
        torch.nn.utils.parametrize.register_parametrization(m, "weight_hh_l0", _Double())
        return m(x)

    def weight_replaced(m, x):  # a WeightDrop-style module: the weight a plain tensor attribute
        w = m._parameters.pop("weight_hh_l0")
        m.weight_hh_l0 = w.detach() * 0.5
        return m(x)

    def subclass_property(m, x):  # a subclass whose weight is a property over the stored parameter
        class Halved(type(m)):
            @property
            def weight_hh_l0(self):
                return self._parameters["weight_hh_l0"] * 0.5

        m.__class__ = Halved
        return m(x)

    def reference_backend(m, x):
        m.backend = "reference"
        return m(x)

    def env_backend(m, x, monkeypatch):
        monkeypatch.setenv("FUSEDRNN_BACKEND", "reference")
        return m(x)

    def debug_nan(m, x, monkeypatch):
        monkeypatch.setenv("FUSEDRNN_DEBUG_NAN", "1")
        return m(x)

    def in_mode(mode):
        def run(m, x):
            with mode():
                return m(x)
        return run

    def autocast(m, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x.float())

    def hx_list(m, x):
        return m(x, [torch.zeros(2, 3, H, dtype=x.dtype), torch.zeros(2, 3, H, dtype=x.dtype)])

    def traced(m, x):
        return torch.jit.trace(m, (x,), check_trace=False)(x)

    return {"packed": packed, "dropout_training": dropout_training, "parametrized": parametrized,
            "weight_replaced": weight_replaced, "subclass_property": subclass_property,
            "reference_backend": reference_backend, "env_backend": env_backend, "debug_nan": debug_nan,
            "dispatch_mode": in_mode(PassDispatchMode), "function_mode": in_mode(PassFunctionMode),
            "autocast": autocast, "hx_list": hx_list, "jit_trace": traced}


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("case", list(_fallback_cases()))
def test_general_path_runs_where_the_fast_path_does_not_apply(case, general_calls, monkeypatch):
    """Each thing the fast path leaves to the general path does reach it (and the forward still works)."""
    fn = _fallback_cases()[case]
    _, ours = make_pair("LSTM", I, H, num_layers=2)
    if case == "autocast":
        ours.float()
    x = torch.randn(4, 3, I, dtype=torch.float64)
    with torch.no_grad():
        out = fn(ours, x, monkeypatch) if "monkeypatch" in fn.__code__.co_varnames else fn(ours, x)
    assert general_calls, case
    assert out is not None


def test_fast_path_declines_under_functorch_transforms():
    """Inside a functorch transform (vmap here; the module goes through the layer op's vmap rule) _cpu_sequence
    says no before computing anything."""
    _, ours = make_pair("GRU", I, H)
    seen = []

    def f(xi):
        seen.append(fm._cpu_sequence(ours, xi, None))
        return xi * 2

    x = torch.randn(4, 3, I, dtype=torch.float64)
    with torch.no_grad():
        assert fm._cpu_sequence(ours, x, None) is not None
        torch.func.vmap(f, in_dims=1)(x)
    assert seen == [None]


BAD_INPUTS = {
    "input_size": lambda x, h, c: ((x[..., :-1],), {}),
    "hx_batch": lambda x, h, c: ((x, (h[:, :2], c[:, :2])), {}),
    "cx_width": lambda x, h, c: ((x, (h, c[..., :-1])), {}),
    "hx_dtype": lambda x, h, c: ((x, (h.float(), c)), {}),
    "input_dtype": lambda x, h, c: ((x.float(), (h, c)), {}),
    "hx_2d_for_batched": lambda x, h, c: ((x, (h[0], c[0])), {}),
    "input_4d": lambda x, h, c: ((x[None],), {}),
    "empty_sequence": lambda x, h, c: ((x[:0],), {}),
}


@pytest.mark.parametrize("bad", list(BAD_INPUTS))
def test_bad_input_under_no_grad_errors_as_torch_nn(bad):
    """Bad input under no_grad (where the fast path is tried first) raises torch.nn's error: same type, same
    message."""
    ref, ours = make_pair("LSTM", I, H)
    x = torch.randn(4, 3, I, dtype=torch.float64)
    h, c = torch.randn(1, 3, H, dtype=torch.float64), torch.randn(1, 3, H, dtype=torch.float64)
    args, kwargs = BAD_INPUTS[bad](x, h, c)
    errors = []
    for m in (ref, ours):
        with torch.no_grad(), pytest.raises(Exception) as info:
            m(*args, **kwargs)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


def test_fast_path_sees_functional_call_weights():
    """torch.func.functional_call's weights (swapped into the module for the call) are the ones the fast path reads,
    as torch.nn's forward does."""
    ref, ours = make_pair("LSTM", I, H, num_layers=2)
    new = {k: torch.randn_like(v) for k, v in ref.state_dict().items()}
    x = torch.randn(4, 3, I, dtype=torch.float64)
    with torch.no_grad():
        got = torch.func.functional_call(ours, new, (x,))
        want = torch.func.functional_call(ref, new, (x,))
        before = ours(x)[0]
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got[0], before)


ONE_STEP = [{}, {"batch_first": True}, {"unbatched": True}, {"no_hx": True}, {"bias": False}]


@pytest.mark.parametrize("config", ONE_STEP, ids=_config_ids)
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_one_step_training_runs_as_the_cell_op(kind, config, general_calls, monkeypatch):
    """With a graph to record, one step of a one-layer, one-direction module (a decoder trained step by step) runs
    as the cells' op, not the general path: outputs and every gradient (input, states, parameters) those of the
    general path and torch.nn's, y and h_n separate tensors as torch.nn's."""
    kw = {k: v for k, v in config.items() if k not in ("unbatched", "no_hx")}
    ref, ours = make_pair(kind, I, H, **kw)
    batched, B = not config.get("unbatched"), 3
    g = torch.Generator().manual_seed(7)
    x = torch.randn(*(((B, 1) if kw.get("batch_first") else (1, B)) if batched else (1,)), I, generator=g,
                    dtype=torch.float64)
    hx = None if config.get("no_hx") else _state(kind, 1, B, H, batched, g)

    got, want, general = _train_three_ways(kind, ref, ours, x, hx, general_calls, monkeypatch)
    for a, b, c in zip(got[0] + got[1], want[0] + want[1], general[0] + general[1]):
        assert a.shape == b.shape == c.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14)
    y, hy = got[0][0], got[0][1]
    assert y.untyped_storage().data_ptr() != hy.untyped_storage().data_ptr()


def test_one_step_training_second_derivatives_as_torch_nn():
    """backward(create_graph=True) through a one-step call (the cell op's recomputed graph), then a gradient of the
    gradient: torch.nn's."""
    ref, ours = make_pair("GRU", I, H)
    x = torch.randn(1, 2, I, dtype=torch.float64)
    results = []
    for m in (ref, ours):
        xs = x.clone().requires_grad_()
        y, _ = m(xs)
        (gx,) = torch.autograd.grad((y ** 2).sum(), xs, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.pow(2).sum(), xs)
        results.append((gx.detach(), ggx))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_training_after_an_inference_mode_call(kind, backend):
    """A call under torch.inference_mode (a validation pass) and then a training call of the same shapes: the
    batch sizes the modules reuse between calls are never inference tensors, which autograd cannot save."""
    ref, ours = make_pair(kind, I, H, backend=backend)
    x = torch.randn(*((3, I) if kind.endswith("Cell") else (4, 3, I)), dtype=torch.float64)
    with torch.inference_mode():
        ours(x)
    for m in (ours, ref):
        out = m(x)
        torch.utils._pytree.tree_leaves(out)[0].sum().backward()
    torch.testing.assert_close(ours.weight_hh_l0.grad if not kind.endswith("Cell") else ours.weight_hh.grad,
                               ref.weight_hh_l0.grad if not kind.endswith("Cell") else ref.weight_hh.grad,
                               rtol=1e-10, atol=1e-12)


FWD_AD = [("LSTM", {}), ("LSTM", {"num_layers": 2, "bidirectional": True, "proj_size": 4}), ("GRU", {}),
          ("GRU", {"batch_first": True}), ("RNN", {"num_layers": 2}), ("LSTMCell", {}), ("GRUCell", {}),
          ("RNNCell", {})]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("kind,kw", FWD_AD, ids=[f"{k}-{_config_ids(c)}" for k, c in FWD_AD])
def test_forward_mode_ad_as_torch_nn(kind, kw, grad):
    """torch.autograd.forward_ad: tangents on the input and the state come out as torch.nn's (the layers run the
    reference's PyTorch ops then; the kernels have no forward derivative and used to drop the tangents silently),
    grad mode on or off; with it on, a backward through the same call gives torch.nn's parameter gradients."""
    import torch.autograd.forward_ad as fwAD
    ref, ours = make_pair(kind, I, H, **kw)
    cell = kind.endswith("Cell")
    D = 2 if kw.get("bidirectional") else 1
    LD, P = kw.get("num_layers", 1) * D, kw.get("proj_size") or H
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*((3,) if cell else (2, 3) if kw.get("batch_first") else (3, 2)), I, generator=g,
                    dtype=torch.float64)
    h = torch.randn(*((3, H) if cell else (LD, 2, P)), generator=g,
                    dtype=torch.float64)
    tx, th = torch.randn_like(x), torch.randn_like(h)
    results = []
    for m in (ref, ours):
        m.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grad), fwAD.dual_level():
            xd, hd = fwAD.make_dual(x, tx), fwAD.make_dual(h, th)
            state = (hd, torch.zeros(*h.shape[:-1], H, dtype=h.dtype)) if kind.startswith("LSTM") else hd
            out = torch.utils._pytree.tree_leaves(m(xd, state))
            primal = [fwAD.unpack_dual(o).primal for o in out]
            tangent = [fwAD.unpack_dual(o).tangent for o in out]
            if grad:
                sum(p.sum() for p in primal).backward()
        results.append((primal, tangent, [p.grad for p in m.parameters()] if grad else []))
    (p0, t0, g0), (p1, t1, g1) = results
    assert all(t is not None for t in t1)
    for a, b in zip(p0 + t0 + g0, p1 + t1 + g1):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
