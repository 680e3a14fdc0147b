"""torch.func over the modules, as over torch.nn's: grad and vjp (meta-learning), vmap (batches of sequences,
ensembles over stacked weights), per-sample gradients (vmap of grad), jacrev, jacfwd, hessian and grad of grad; and
torch.autograd's vectorised gradients (is_grads_batched, jacobian / hessian with vectorize=True).
The oracle is torch.nn: its own transform where torch.nn runs it, else torch.nn called once per vmapped entry."""
import pytest
import torch
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, stack_module_state, vjp, vmap

import fusedrnn
from conftest import conformance_backends
from helpers import NN_CLASS, flatten_out, make_pair

I, H, T, B, V = 3, 4, 5, 2, 3
# (kind, constructor arguments): every module, with the layer options that change the op's arguments
CONFIGS = [("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "relu"}),
           ("LSTM", {"num_layers": 2, "bidirectional": True, "batch_first": True}), ("LSTM", {"proj_size": 2}),
           ("GRU", {"num_layers": 2, "bias": False}), ("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {})]
IDS = [k + "-" + "-".join(f"{a}{v}" for a, v in kw.items()) for k, kw in CONFIGS]


def _state(kind, kw, lead, g):
    """An initial state for one call on inputs with leading dims `lead` ((B,) or () for cells; (B,) or () plus
    layers for sequences), as a tensor or an (h, c) tuple."""
    if kind.endswith("Cell"):
        h = torch.randn(*lead, H, generator=g, dtype=torch.float64)
        return (h, torch.randn(*lead, H, generator=g, dtype=torch.float64)) if kind == "LSTMCell" else h
    L = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    h = torch.randn(L, *lead, kw.get("proj_size") or H, generator=g, dtype=torch.float64)
    return (h, torch.randn(L, *lead, H, generator=g, dtype=torch.float64)) if kind == "LSTM" else h


def _entries(kind, kw, batched, g):
    """V inputs and states stacked along dim 0 (each entry batched with B rows, or unbatched)."""
    lead = (B,) if batched else ()
    if kind.endswith("Cell"):
        shape = (*lead, I)
    else:
        shape = ((B, T) if kw.get("batch_first") else (T, B)) if batched else (T,)
        shape = (*shape, I)
    x = torch.randn(V, *shape, generator=g, dtype=torch.float64)
    hs = [_state(kind, kw, lead, g) for _ in range(V)]
    hx = tuple(torch.stack(p) for p in zip(*hs)) if isinstance(hs[0], tuple) else torch.stack(hs)
    return x, hx


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("no_grad", [False, True], ids=["grad", "no_grad"])
@pytest.mark.parametrize("backend", conformance_backends())
@pytest.mark.parametrize("kind,kw", CONFIGS, ids=IDS)
def test_vmap_matches_torch_nn_per_entry(kind, kw, backend, no_grad, batched):
    """vmap over the input and the state gives each entry's torch.nn result (torch.nn itself refuses vmap here:
    no batching rule for its layers), under grad mode and no_grad."""
    ref, ours = make_pair(kind, I, H, backend=backend, **kw)
    x, hx = _entries(kind, kw, batched, torch.Generator().manual_seed(1))
    with torch.set_grad_enabled(not no_grad):
        got = vmap(lambda xi, hi: tuple(flatten_out(ours(xi, hi))), in_dims=0)(x, hx)
    with torch.no_grad():
        want = [torch.stack(o) for o in zip(*(
            flatten_out(ref(x[v], tuple(h[v] for h in hx) if isinstance(hx, tuple) else hx[v])) for v in range(V)))]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _loss(module, kind):
    """A loss of every output, nonlinear so that second derivatives are not zero."""
    return lambda p, z: sum((o * o.cos()).sum() for o in flatten_out(functional_call(module, p, (z,))))


@pytest.mark.parametrize("backend", conformance_backends())
@pytest.mark.parametrize("kind,kw", CONFIGS, ids=IDS)
def test_per_sample_grads_match_torch_nn(kind, kw, backend):
    """vmap(grad(loss)) over a batch of inputs (per-sample gradients, as differential privacy trains): every
    parameter's and the input's gradient per sample equals torch.nn's autograd on that sample alone."""
    ref, ours = make_pair(kind, I, H, backend=backend, **kw)
    x, _ = _entries(kind, kw, False, torch.Generator().manual_seed(2))
    params = {k: v.detach() for k, v in ours.named_parameters()}
    gp, gx = vmap(grad(_loss(ours, kind), argnums=(0, 1)), in_dims=(None, 0))(params, x)
    names = [k for k, _ in ref.named_parameters()]
    assert set(gp) == set(names)
    for v in range(V):
        xv = x[v].clone().requires_grad_()
        want = torch.autograd.grad(_loss(ref, kind)(dict(ref.named_parameters()), xv), [xv, *ref.parameters()])
        torch.testing.assert_close(gx[v], want[0], rtol=1e-9, atol=1e-10)
        for k, w in zip(names, want[1:]):
            torch.testing.assert_close(gp[k][v], w, rtol=1e-9, atol=1e-10, msg=k)


@pytest.mark.parametrize("backend", conformance_backends())
@pytest.mark.parametrize("kind,kw", CONFIGS, ids=IDS)
def test_jacobians_hessian_and_grad_of_grad_match_torch_nn(kind, kw, backend):
    """jacrev, jacfwd, jvp, hessian, and grad of grad in the parameters, each as torch.nn's own transform gives it
    (float64 on the CPU, where torch.nn's layers are composite and run them all)."""
    ref, ours = make_pair(kind, I, H, backend=backend, **kw)
    x, _ = _entries(kind, kw, False, torch.Generator().manual_seed(3))
    x = x[0]
    params = {k: v.detach() * 1.5 for k, v in ref.named_parameters()}
    w = "weight_hh" if kind.endswith("Cell") else "weight_hh_l0"

    def transforms(m):
        f = lambda z: _loss(m, kind)(params, z)  # noqa: E731
        first = lambda z: flatten_out(functional_call(m, params, (z,)))[0]  # noqa: E731
        return [jacrev(first)(x), jacfwd(first)(x), *jvp(first, (x,), (x.cos(),)), hessian(f)(x),
                grad(lambda z: grad(lambda p: _loss(m, kind)(p, z))(params)[w].sin().sum())(x),
                jacrev(jacrev(f))(x)]

    for a, b in zip(transforms(ours), transforms(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", conformance_backends())
@pytest.mark.parametrize("kind,kw", CONFIGS, ids=IDS)
def test_batched_gradients_of_torch_autograd_match_torch_nn(kind, kw, backend):
    """torch.autograd's own vectorised paths, which run the backward under torch's older vmap:
    torch.autograd.grad(is_grads_batched=True) in the input and every parameter, and torch.autograd.functional's
    jacobian and hessian with vectorize=True, as torch.nn gives them."""
    ref, ours = make_pair(kind, I, H, backend=backend, **kw)
    x = _entries(kind, kw, True, torch.Generator().manual_seed(5))[0][0]
    got = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_()
        ys = flatten_out(m(xi))
        cot = [torch.randn(4, *y.shape, generator=torch.Generator().manual_seed(6), dtype=y.dtype) for y in ys]
        grads = torch.autograd.grad(ys, [xi, *m.parameters()], cot, is_grads_batched=True)
        first = lambda z: flatten_out(m(z))[0]  # noqa: E731
        got.append([*grads, torch.autograd.functional.jacobian(first, x, vectorize=True),
                    torch.autograd.functional.hessian(lambda z: first(z).tanh().sum(), x, vectorize=True)])
    for a, b in zip(*got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ["LSTM", "GRUCell"])
def test_vmap_over_stacked_weights_runs_each_model(kind):
    """An ensemble (torch.func.stack_module_state, vmap over the weights; torch.func's model-ensembling recipe):
    each model's outputs, and with grad inside the vmap each model's parameter gradients, for a shared input and
    for one input per model."""
    kw = {"num_layers": 2, "bidirectional": True} if kind == "LSTM" else {}
    pairs = [make_pair(kind, I, H, seed=s, **kw) for s in range(V)]
    params, buffers = stack_module_state([o for _, o in pairs])
    base = getattr(fusedrnn, kind)(I, H, **kw).double().to("meta")
    g = torch.Generator().manual_seed(4)
    shape = (B, I) if kind.endswith("Cell") else (T, B, I)
    shared, own = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(V, *shape, generator=g,
                                                                                    dtype=torch.float64)

    def loss(p, b, z):
        return sum((o * o.cos()).sum() for o in flatten_out(functional_call(base, (p, b), (z,))))

    for z, dim in ((shared, None), (own, 0)):
        out = vmap(lambda p, b, zz: flatten_out(functional_call(base, (p, b), (zz,)))[0], in_dims=(0, 0, dim))(
            params, buffers, z)
        grads = vmap(grad(loss), in_dims=(0, 0, dim))(params, buffers, z)
        for v, (ref, _) in enumerate(pairs):
            zv = z if dim is None else z[v]
            torch.testing.assert_close(out[v], flatten_out(ref(zv))[0], rtol=1e-10, atol=1e-12)
            want = torch.autograd.grad(sum((o * o.cos()).sum() for o in flatten_out(ref(zv))), list(ref.parameters()))
            for (k, _), wv in zip(ref.named_parameters(), want):
                torch.testing.assert_close(grads[k][v], wv, rtol=1e-9, atol=1e-10, msg=k)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "LSTMCell"])
def test_vmap_over_an_empty_dimension(kind):
    """vmap over zero entries gives empty results shaped as one entry's, with and without a gradient."""
    _, ours = make_pair(kind, I, H)
    x = torch.randn(0, B, I, dtype=torch.float64) if kind.endswith("Cell") else torch.randn(0, T, B, I,
                                                                                            dtype=torch.float64)
    one = flatten_out(ours(torch.zeros(x.shape[1:], dtype=torch.float64)))
    got = vmap(lambda z: tuple(flatten_out(ours(z))))(x)
    assert [tuple(t.shape) for t in got] == [(0, *t.shape) for t in one]
    params = {k: v.detach() for k, v in ours.named_parameters()}
    gp = vmap(grad(lambda p, z: flatten_out(functional_call(ours, p, (z,)))[0].sum()), in_dims=(None, 0))(params, x)
    assert all(gp[k].shape == (0, *p.shape) for k, p in params.items())


@pytest.mark.parametrize("kind", list(NN_CLASS))
@pytest.mark.parametrize("backend", conformance_backends())
def test_torch_func_grad_and_vjp_match_torch_nn(kind, backend):
    """torch.func over functional_call, as meta-learning code (MAML) does with torch.nn.LSTM: grad in the
    parameters and the input, and vjp, agree with torch.nn's. (The custom op's generated autograd.Function is refused
    by torch.func in torch 2.11-2.13, pytorch/pytorch#170834; the modules' eager Function takes its place.)"""
    ref, ours = make_pair(kind, 5, 6, backend=backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, generator=g, dtype=torch.float64) if kind.endswith("Cell") else \
        torch.randn(4, 2, 5, generator=g, dtype=torch.float64)
    params = {k: v.detach() * 1.5 for k, v in ref.named_parameters()}
    want, got = (grad(_loss(m, kind), argnums=(0, 1))(params, x) for m in (ref, ours))
    assert set(got[0]) == set(want[0])
    for k in want[0]:
        torch.testing.assert_close(got[0][k], want[0][k], rtol=1e-9, atol=1e-10, msg=k)
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-10)

    def first(module):
        return lambda z: flatten_out(functional_call(module, params, (z,)))[0]

    (yr, vjp_r), (yo, vjp_o) = vjp(first(ref), x), vjp(first(ours), x)
    torch.testing.assert_close(yo, yr, rtol=1e-9, atol=1e-10)
    cot = torch.randn(yr.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(vjp_o(cot)[0], vjp_r(cot)[0], rtol=1e-9, atol=1e-10)


def test_plain_calls_after_transforms():
    """Nothing a transform made outlives it: after hessian and vmap, plain training and inference calls of the same
    shapes give torch.nn's results (a batch-sizes tensor cached inside jvp was its dead wrapper)."""
    from fusedrnn import fast_path
    ref, ours = make_pair("GRU", I, H)
    x = torch.randn(T, B, I, dtype=torch.float64)
    fast_path._STEPS.clear()  # (the shapes' first call is inside the transforms)
    for _ in range(2):
        hessian(lambda z: ours(z)[0].sum())(x)
        vmap(lambda z: ours(z)[0])(x.unsqueeze(0))
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yr = ours(xo)[0], ref(xr)[0]
    yo.sum().backward()
    yr.sum().backward()
    torch.testing.assert_close(yo, yr, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-10, atol=1e-12)
