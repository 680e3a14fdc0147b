"""Hostile inputs, for every available backend: each gives torch.nn's result or a clear Python exception, never a
crash, a hang or a wrong answer.

- NaN / Inf in the input, h0 or a weight: the same NaN (and Inf) pattern as torch.nn, in outputs and gradients, and
  the same values elsewhere.
- Strided views as input and h0: expanded (stride 0), sliced (non-contiguous), transposed, overlapping (as_strided),
  with a storage offset, non-unit innermost stride.
- h0 on another dtype or device (meta), inputs of integer / bool / complex dtype, input on the meta device.
- Hand-built PackedSequence objects with inconsistent batch sizes or indices.
- Sizes whose element counts pass 2**31 (on the meta device: shapes only, nothing allocated).
"""
import math

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fusedrnn
from conftest import TOLERANCE, conformance_backends, rel_err
from helpers import flatten_out, make_pair

T, B, I, H = 5, 3, 4, 6
F64 = torch.float64
KINDS = [("LSTM", {}), ("LSTM", {"proj_size": 3}), ("GRU", {}), ("RNN", {"nonlinearity": "tanh"}),
         ("RNN", {"nonlinearity": "relu"})]
VIEW_KINDS = [("LSTM", {"proj_size": 3}), ("GRU", {}), ("RNN", {"nonlinearity": "relu"})]
BACKENDS = conformance_backends()


def _kid(v):
    return v[0] + "".join(f"-{k}{w}" for k, w in v[1].items()) if isinstance(v, tuple) else str(v)


def _outcome(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - compared against what torch.nn raises
        return type(e), str(e)
    return None


def _run(module, make):
    """make() -> (input, hx or None, leaves). Forward, then backward of a fixed projection of every output.
    Returns outputs + gradients w.r.t. the leaves and every parameter."""
    inp, hx, leaves = make()
    out = module(inp) if hx is None else module(inp, hx)
    outs = flatten_out(out)
    g = torch.Generator().manual_seed(11)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=F64).to(o.dtype)).sum() for o in outs)
    wrt = list(leaves) + list(module.parameters())
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(w) if gr is None else gr for gr, w in zip(grads, wrt)]
    return [o.detach() for o in outs] + list(grads)


def assert_same_pattern_and_close(ours, ref, what, tol=TOLERANCE[F64]):
    """Same shapes, NaN at exactly the same places, the same infinities, finite values within `tol`."""
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape, f"{what}[{i}]: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        na, nb = torch.isnan(a), torch.isnan(b)
        assert torch.equal(na, nb), f"{what}[{i}]: NaN pattern differs: {int(na.sum())} NaN in ours at " \
                                    f"{na.nonzero()[:4].tolist()}..., {int(nb.sum())} in torch.nn at " \
                                    f"{nb.nonzero()[:4].tolist()}..."
        ia, ib = torch.isinf(a), torch.isinf(b)
        assert torch.equal(ia, ib) and torch.equal(a[ia], b[ib]), f"{what}[{i}]: infinities differ"
        fin = torch.isfinite(b)
        err = rel_err(a[fin], b[fin])
        assert err <= tol, f"{what}[{i}]: relative error {err:.3g} on the finite elements"


# ---- NaN and Inf ------------------------------------------------------------------------------------------------

POISON = [("x", math.nan), ("x", math.inf), ("x", -math.inf), ("h0", math.nan), ("h0", math.inf),
          ("weight_hh_l0", math.nan), ("weight_ih_l0", math.inf), ("bias_hh_l0", -math.inf),
          ("weight_hh_l1_reverse", math.nan)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS, ids=_kid)
@pytest.mark.parametrize("where,value", POISON, ids=[f"{w}={v}" for w, v in POISON])
def test_nan_and_inf_propagate_as_in_torch(backend, kind, where, value):
    name, kw = kind
    ref, ours = make_pair(name, I, H, num_layers=2, bidirectional=True, backend=backend, **kw)
    if where.startswith(("weight", "bias")):
        for m in (ref, ours):
            with torch.no_grad():
                getattr(m, where).view(-1)[1] = value
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=g, dtype=F64)
    P = kw.get("proj_size", H)
    h0 = torch.randn(4, B, P, generator=g, dtype=F64)
    c0 = torch.randn(4, B, H, generator=g, dtype=F64)
    if where == "x":
        x[2, 1, 0] = value
    if where == "h0":
        h0[1, 2, 0] = value

    def make():
        xl, hl, cl = (t.clone().requires_grad_() for t in (x, h0, c0))
        return xl, ((hl, cl) if name == "LSTM" else hl), [xl, hl] + ([cl] if name == "LSTM" else [])
    got, want = _run(ours, make), _run(ref, make)
    n_out = 3 if name == "LSTM" else 2
    assert_same_pattern_and_close(got[:n_out], want[:n_out], f"{backend} {where}={value} outputs")
    assert_same_pattern_and_close(got[n_out:], want[n_out:], f"{backend} {where}={value} grads")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_cells_nan_and_inf(backend, kind, value):
    ref, ours = make_pair(kind, I, H, backend=backend)
    x = torch.randn(B, I, dtype=F64, generator=torch.Generator().manual_seed(2))
    x[1, 2] = value

    def make():
        xl = x.clone().requires_grad_()
        return xl, None, [xl]
    assert_same_pattern_and_close(_run(ours, make), _run(ref, make), f"{backend} {kind}")


# ---- strided views ------------------------------------------------------------------------------------------------

def _x_view(how):
    """(leaf factory, view function): the view has shape [T, B, I] and the layout named by `how`."""
    g = torch.Generator().manual_seed(3)
    if how == "expanded_time":
        return torch.randn(1, B, I, generator=g, dtype=F64), lambda b: b.expand(T, B, I)
    if how == "expanded_batch":
        return torch.randn(T, 1, I, generator=g, dtype=F64), lambda b: b.expand(T, B, I)
    if how == "expanded_feature":  # after the modules' reshape to [T*B, I] this is still stride 0 in I
        return torch.randn(T, B, 1, generator=g, dtype=F64), lambda b: b.expand(T, B, I)
    if how == "sliced":
        return torch.randn(T, 2 * B, I, generator=g, dtype=F64), lambda b: b[:, ::2]
    if how == "transposed":
        return torch.randn(B, T, I, generator=g, dtype=F64), lambda b: b.transpose(0, 1)
    if how == "inner_stride":
        return torch.randn(T, B, 2 * I, generator=g, dtype=F64), lambda b: b[..., ::2]
    if how == "overlapping":  # element [t, b, i] at t*I + b + i: rows share memory
        return torch.randn(T * I + B + I, generator=g, dtype=F64), lambda b: b.as_strided((T, B, I), (I, 1, 1))
    if how == "offset":
        return torch.randn(7 + T * B * I, generator=g, dtype=F64), lambda b: b[7:].view(T, B, I)
    raise ValueError(how)


def _h_view(how, P):
    g = torch.Generator().manual_seed(4)
    L = 2
    if how == "contiguous":
        return torch.randn(L, B, P, generator=g, dtype=F64), lambda b: b
    if how == "expanded":
        return torch.randn(1, 1, P, generator=g, dtype=F64), lambda b: b.expand(L, B, P)
    if how == "transposed":
        return torch.randn(B, L, P, generator=g, dtype=F64), lambda b: b.transpose(0, 1)
    if how == "overlapping":
        return torch.randn(L + B + P, generator=g, dtype=F64), lambda b: b.as_strided((L, B, P), (1, 1, 1))
    if how == "offset":
        return torch.randn(3 + L * B * P, generator=g, dtype=F64), lambda b: b[3:].view(L, B, P)
    raise ValueError(how)


X_VIEWS = ["expanded_time", "expanded_batch", "expanded_feature", "sliced", "transposed", "inner_stride",
           "overlapping", "offset"]
H_VIEWS = ["contiguous", "expanded", "transposed", "overlapping", "offset"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", VIEW_KINDS, ids=_kid)
@pytest.mark.parametrize("x_how,h_how", [(x, "contiguous") for x in X_VIEWS] +
                         [("sliced", h) for h in H_VIEWS[1:]] + [("overlapping", "overlapping")])
def test_strided_views_as_input_and_state(backend, kind, x_how, h_how):
    name, kw = kind
    ref, ours = make_pair(name, I, H, num_layers=2, backend=backend, **kw)
    xb, xv = _x_view(x_how)
    hb, hv = _h_view(h_how, kw.get("proj_size", H))
    cb, cv = _h_view(h_how, H)

    def make():
        xl, hl, cl = (t.clone().requires_grad_() for t in (xb, hb, cb))
        x, h, c = xv(xl), hv(hl), cv(cl * 0.5)
        return x, ((h, c) if name == "LSTM" else h), [xl, hl] + ([cl] if name == "LSTM" else [])
    assert_same_pattern_and_close(_run(ours, make), _run(ref, make), f"{backend} x={x_how} h={h_how}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_with_strided_views(backend, kind):
    ref, ours = make_pair(kind, I, H, backend=backend)
    g = torch.Generator().manual_seed(5)
    xb = torch.randn(1, I, generator=g, dtype=F64)
    hb = torch.randn(H, B, generator=g, dtype=F64)

    def make():
        xl, hl = xb.clone().requires_grad_(), hb.clone().requires_grad_()
        x, h = xl.expand(B, I), hl.t()  # stride-0 batch, transposed state
        return x, ((h, h.flip(1) * 0.5) if kind == "LSTMCell" else h), [xl, hl]
    assert_same_pattern_and_close(_run(ours, make), _run(ref, make), f"{backend} {kind}")


def test_op_level_stride_zero_and_transposed_arguments():
    """The layer op itself with x of stride 0 in I, transposed hx and non-contiguous weights, every backend against
    the reference on contiguous copies."""
    g = torch.Generator().manual_seed(6)
    Tn, Bn, In, Hn = 4, 2, 3, 5
    x = torch.randn(Tn * Bn, 1, generator=g, dtype=F64).expand(Tn * Bn, In)
    hx = torch.randn(Bn, 1, Hn, generator=g, dtype=F64).transpose(0, 1)
    cx = torch.randn(1, Bn, 2 * Hn, generator=g, dtype=F64)[..., ::2]
    ws = [torch.randn(In, 4 * Hn, generator=g, dtype=F64).t(), torch.randn(Hn, 4 * Hn, generator=g, dtype=F64).t(),
          torch.randn(8 * Hn, generator=g, dtype=F64)[::2], torch.randn(4 * Hn, generator=g, dtype=F64)]
    bs = torch.full((Tn,), Bn, dtype=torch.int64)
    want = torch.ops.fusedrnn.rnn_layer("lstm", x.contiguous(), bs, hx.contiguous(), cx.contiguous(),
                                        [w.contiguous() for w in ws], True, 1, True, "reference")
    for backend in BACKENDS:
        got = torch.ops.fusedrnn.rnn_layer("lstm", x, bs, hx, cx, ws, True, 1, True, backend)
        for a, b in zip(got, want):
            assert rel_err(a, b) <= TOLERANCE[F64], backend


# ---- dtypes and devices ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_wrong_dtype_or_device_raises_as_torch(backend, kind):
    ref, ours = make_pair(kind, I, H, backend=backend)
    cell = kind.endswith("Cell")
    shape = (B, I) if cell else (T, B, I)
    hshape = (B, H) if cell else (1, B, H)
    x = torch.randn(*shape, dtype=F64)
    h = torch.randn(*hshape, dtype=F64)

    def state(hh, cc=None):
        return (hh, h if cc is None else cc) if kind.startswith("LSTM") else hh
    cases = {"hx float32": (x, state(h.float())), "hx meta": (x, state(h.to("meta"))),
             "hx int": (x, state(h.long())), "input int": (x.long(), None), "input bool": (x > 0, None),
             "input float32": (x.float(), None), "input complex": (x.to(torch.complex128), None),
             "input meta": (x.to("meta"), None)}
    if kind.startswith("LSTM"):
        cases["cx meta"] = (x, (h, h.to("meta")))
        cases["cx float32"] = (x, (h, h.float()))
    for what, (inp, hx) in cases.items():
        want = _outcome(lambda: ref(inp) if hx is None else ref(inp, hx))
        got = _outcome(lambda: ours(inp) if hx is None else ours(inp, hx))
        if want is None:  # torch.nn LSTM accepts a float32 c0 with float64 weights (it casts); we refuse clearly
            assert what == "cx float32" and got is not None and "dtype" in got[1], (what, got)
            continue
        assert got is not None, f"{what}: torch.nn raises {want}, ours returned a result"
        # the same exception type as torch.nn, with a message; where torch.nn's comes from deep inside a kernel
        # (a meta or complex tensor reaching ATen) ours is the clearer check that fires first
        assert got[0] is want[0] or got[0] in (ValueError, TypeError), (what, got, want)
        assert got[1], what
        if what.startswith(("hx float32", "hx int", "input int", "input bool", "input float32")):
            assert got == want, (what, got, want)


def test_module_on_the_meta_device_gives_shapes():
    """A whole model on the meta device (as with torch.device('meta') initialisation): shapes, no compute."""
    for kind, kw in KINDS:
        m = getattr(fusedrnn, kind)(I, H, num_layers=2, bidirectional=True, device="meta", **kw)
        out, hidden = m(torch.empty(T, B, I, device="meta"))
        P = kw.get("proj_size", H)
        assert out.device.type == "meta" and out.shape == (T, B, 2 * P)
        hs = hidden if isinstance(hidden, tuple) else (hidden,)
        assert hs[0].shape == (4, B, P)


# ---- hand-built PackedSequence objects ----------------------------------------------------------------------------

BAD_PACKED = {
    # batch_sizes
    "batch_sizes increasing": ([1, 2, 2], None, None),
    "batch_sizes with a zero": ([2, 2, 0, 1], None, None),
    "batch_sizes negative": ([2, 2, 2, -1, 1], None, None),
    "batch_sizes sum too large": ([7], None, None),
    "batch_sizes sum too small": ([2, 2], None, None),
    "batch_sizes empty": ([], None, None),
    "batch_sizes int32": (torch.tensor([2, 2, 2], dtype=torch.int32), None, None),
    "batch_sizes 2-D": (torch.tensor([[2, 2, 2]]), None, None),
    "batch_sizes float": (torch.tensor([2.0, 2.0, 2.0]), None, None),
    # indices
    "sorted_indices not a permutation": ([2, 2, 2], [0, 0], [0, 1]),
    "sorted_indices out of range": ([2, 2, 2], [0, 5], [0, 1]),
    "sorted_indices negative": ([2, 2, 2], [-1, 0], [1, 0]),
    "sorted_indices too long": ([2, 2, 2], [0, 1, 2], [0, 1, 2]),
    "sorted_indices too short": ([2, 2, 2], [0], [0]),
    "unsorted_indices not the inverse": ([2, 2, 2], [1, 0], [0, 1]),
    "unsorted_indices wrong length": ([2, 2, 2], [1, 0], [1, 0, 2]),
    "indices float": ([2, 2, 2], [1.0, 0.0], [1, 0]),
    "indices 2-D": ([2, 2, 2], [[1, 0]], [[1, 0]]),
}


def _packed(bs, si, ui):
    t = (lambda v: v if v is None or isinstance(v, torch.Tensor) else torch.tensor(v))
    bs = t(bs) if not (isinstance(bs, list) and not bs) else torch.zeros(0, dtype=torch.int64)
    # PackedSequence.__new__ checks nothing; build the tuple directly, as a careless user (or a bad collate) might
    return PackedSequence.__new__(PackedSequence, torch.randn(6, I, dtype=F64), bs, t(si), t(ui))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("case", list(BAD_PACKED))
@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
def test_inconsistent_packed_sequence(backend, kind, case, with_hx):
    """A clear Python exception (ValueError, RuntimeError, TypeError, IndexError), or torch.nn's exact result."""
    ref, ours = make_pair(kind, I, H, backend=backend)
    p = _packed(*BAD_PACKED[case])
    hx = None
    if with_hx:
        h = torch.randn(1, 2, H, dtype=F64)
        hx = (h, h) if kind == "LSTM" else h
    try:
        got = ours(p, hx)
    except (ValueError, RuntimeError, TypeError, IndexError) as e:
        assert str(e), case  # says something
        return
    want = ref(p, hx)  # we returned a result: it must be torch.nn's
    for a, b in zip(flatten_out(got), flatten_out(want)):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-12), case


@pytest.mark.parametrize("case", ["sorted_indices not a permutation", "sorted_indices out of range",
                                  "unsorted_indices not the inverse", "unsorted_indices wrong length"])
def test_bad_indices_are_errors_not_silent_garbage(case):
    """torch.nn returns mixed-up or wrongly-sized states for these (it uses the indices unchecked); we refuse."""
    m = fusedrnn.GRU(I, H).double()
    with pytest.raises(ValueError, match="PackedSequence.(un)?sorted_indices"):
        m(_packed(*BAD_PACKED[case]))


def test_valid_hand_built_packed_sequence_still_works():
    ref, ours = make_pair("LSTM", I, H)
    x = torch.randn(4, 3, I, dtype=F64)
    p = pack_padded_sequence(x, [2, 4, 1], enforce_sorted=False)
    hand = PackedSequence.__new__(PackedSequence, p.data, p.batch_sizes, p.sorted_indices, p.unsorted_indices)
    for a, b in zip(flatten_out(ours(hand)), flatten_out(ref(p))):
        assert rel_err(a, b) <= TOLERANCE[F64]


# ---- sizes past 2**31 elements -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,kw", [("LSTM", {}), ("LSTM", {"proj_size": 2}), ("GRU", {"bidirectional": True}),
                                     ("RNN", {})])
def test_sizes_past_int32_on_meta(kind, kw):
    """N*I, N*G*H and the reserve pass 2**31 elements; on the meta device the whole forward and backward run
    (shape functions only): no int32 overflow in the op layer's shape math, nothing allocated."""
    Tm, Bm, Im, Hm = 3, 2**15, 2**16 + 1, 2**14 + 3
    assert Tm * Bm * Im > 2**31 and Tm * Bm * 4 * Hm > 2**31
    m = getattr(fusedrnn, kind)(Im, Hm, device="meta", **kw)
    x = torch.empty(Tm, Bm, Im, device="meta", requires_grad=True)
    out, hidden = m(x)
    D = 2 if kw.get("bidirectional") else 1
    P = kw.get("proj_size", 0) or Hm
    assert out.shape == (Tm, Bm, D * P)
    out.sum().backward()
    assert x.grad.shape == x.shape and m.weight_ih_l0.grad.shape == m.weight_ih_l0.shape
    # packed rows past 2**31 as well
    bs = torch.tensor([2**31 + 5, 3], dtype=torch.int64)
    p = PackedSequence.__new__(PackedSequence, torch.empty(2**31 + 8, 2, device="meta"), bs, None, None)
    small = getattr(fusedrnn, kind)(2, 3, device="meta", **{k: (1 if k == "proj_size" else v) for k, v in kw.items()})
    assert small(p)[0].data.shape[0] == 2**31 + 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_unallocatable_size_is_a_clear_error(backend):
    """A size nobody can allocate fails with a Python exception before any kernel runs (no crash, no hang)."""
    m = fusedrnn.RNN(1, 1, backend=backend).double()
    x = torch.zeros(1, 1, 1, dtype=F64).expand(2**50, 1, 1)  # stride 0; 2**50 steps: past any address space
    with pytest.raises((RuntimeError, MemoryError)):
        m(x)
