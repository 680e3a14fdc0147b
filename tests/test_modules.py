"""The modules behave as torch.nn's: construction and its errors, parameters and state_dict, copying and pickling,
parametrizations, dropout, empty batches, forward errors, backend selection."""
import copy
import io
import os
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import fusedrnn
from conftest import assert_close_all
from helpers import make_pair, outputs_and_grads, sequence_input

SEQ = ["LSTM", "GRU", "RNN"]
CELLS = ["LSTMCell", "GRUCell", "RNNCell"]


def _outcome(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the point is to compare whatever each raises
        return type(e), str(e)
    return None


@pytest.mark.parametrize("kind", SEQ)
def test_isinstance_rnnbase_but_not_torch_class(kind):
    m = getattr(fusedrnn, kind)(3, 4)
    assert isinstance(m, nn.RNNBase)
    assert not isinstance(m, (nn.LSTM, nn.GRU, nn.RNN))


BAD_CONSTRUCTION = [
    ("LSTM", (0, 4), {}), ("LSTM", (3, 0), {}), ("LSTM", (3, 4), {"num_layers": 0}), ("LSTM", (3.0, 4), {}),
    ("LSTM", (3, "4"), {}), ("LSTM", (3, 4), {"bias": 1}), ("LSTM", (3, 4), {"batch_first": "yes"}),
    ("LSTM", (3, 4), {"dropout": 1.5}), ("LSTM", (3, 4), {"dropout": -0.1}), ("LSTM", (3, 4), {"dropout": True}),
    ("LSTM", (3, 4), {"proj_size": 4}), ("LSTM", (3, 4), {"proj_size": 5}), ("LSTM", (3, 4), {"proj_size": -1}),
    ("GRU", (3, 4), {"proj_size": 2}), ("RNN", (3, 4), {"proj_size": 2}),
    ("RNN", (3, 4), {"nonlinearity": "sigmoid"}), ("RNN", (3, 4, 1, "gelu"), {}), ("GRU", (-1, 4), {}),
]


@pytest.mark.parametrize("kind,args,kwargs", BAD_CONSTRUCTION)
def test_construction_errors_match_torch(kind, args, kwargs):
    want = _outcome(lambda: getattr(nn, kind)(*args, **kwargs))
    assert want is not None
    assert _outcome(lambda: getattr(fusedrnn, kind)(*args, **kwargs)) == want


@pytest.mark.parametrize("kind,kwargs", [
    ("LSTM", {"num_layers": 3, "bidirectional": True, "proj_size": 2, "bias": False}),
    ("GRU", {"num_layers": 2, "batch_first": True, "dropout": 0.3}), ("RNN", {"nonlinearity": "relu"}),
    ("LSTMCell", {}), ("GRUCell", {"bias": False}), ("RNNCell", {"nonlinearity": "relu"})])
def test_parameters_init_and_state_dict_round_trip(kind, kwargs):
    torch.manual_seed(7)
    ref = getattr(nn, kind)(5, 6, **kwargs)
    torch.manual_seed(7)
    ours = getattr(fusedrnn, kind)(5, 6, **kwargs)
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ref) == list(sd_ours)
    for k in sd_ref:  # same names, shapes and the same default initialisation
        assert torch.equal(sd_ref[k], sd_ours[k]), k
    other = getattr(nn, kind)(5, 6, **kwargs)
    other.load_state_dict(ours.state_dict())
    ours.load_state_dict(other.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), sd_ref.values()))
    assert repr(ours) == repr(ref)


@pytest.mark.parametrize("kind", SEQ)
def test_copy_pickle_to_double_flatten(kind):
    m = getattr(fusedrnn, kind)(3, 4, num_layers=2)
    m.flatten_parameters()
    x = torch.randn(5, 2, 3)
    y = m(x)[0]
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert torch.equal(clone(x)[0], y)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x)[0], y)
    md = copy.deepcopy(m).double()
    assert md.weight_ih_l0.dtype == torch.float64
    torch.testing.assert_close(md(x.double())[0], y.double(), rtol=1e-5, atol=1e-6)
    mt = copy.deepcopy(m).to(torch.float64)
    assert mt(x.double())[0].dtype == torch.float64


@pytest.mark.parametrize("name", ["weight_hh_l0", "weight_hr_l0"])
def test_weight_norm_parametrization_is_read_every_forward(name):
    ref, ours = make_pair("LSTM", 3, 5, proj_size=2)
    for m in (ref, ours):
        torch.nn.utils.parametrizations.weight_norm(m, name)
    make = sequence_input("padded", 4, 2, 3, False, torch.float64)
    o_ref, g_ref = outputs_and_grads(ref, make)
    o_ours, g_ours = outputs_and_grads(ours, make)
    assert_close_all(o_ours, o_ref, torch.float64, "outputs")
    assert_close_all(g_ours, g_ref, torch.float64, "grads")
    with torch.no_grad():  # change the underlying parameters: the next forward must see them
        for m in (ref, ours):
            getattr(m.parametrizations, name).original0.mul_(0.5)
    x = make()[0]
    assert not torch.allclose(ours(x)[0], o_ours[0])
    torch.testing.assert_close(ours(x)[0], ref(x)[0])


def test_functional_call_uses_given_weights():
    ref, ours = make_pair("GRU", 3, 4)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    params = {k: v * 2 for k, v in ref.named_parameters()}
    torch.testing.assert_close(torch.func.functional_call(ours, params, (x,))[0],
                               torch.func.functional_call(ref, params, (x,))[0])


def test_dropout_between_layers_training_only_and_changeable():
    ref, ours = make_pair("LSTM", 3, 8, num_layers=3, dropout=0.5)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0])  # no dropout in eval
    ours.train()
    a, b = ours(x)[0], ours(x)[0]
    assert not torch.equal(a, b)  # dropout active in training, fresh masks each call
    assert not torch.allclose(a, ref(x)[0].detach())
    ours.dropout = 0.0  # changeable at run time
    ref.dropout = 0.0
    ref.train()
    torch.testing.assert_close(ours(x)[0], ref(x)[0])
    one = fusedrnn.GRU(3, 8, num_layers=1)
    one.dropout = 0.9  # with one layer there is nothing between layers to drop
    one.train()
    torch.testing.assert_close(one(x.float())[0], one(x.float())[0])


@pytest.mark.parametrize("kind", SEQ + CELLS)
def test_batch_size_zero_forward_backward(kind):
    ref, ours = make_pair(kind, 3, 4)
    x = torch.randn(0, 3, dtype=torch.float64) if kind in CELLS else torch.randn(5, 0, 3, dtype=torch.float64)
    make = lambda: (lambda leaf: (leaf, [leaf]))(x.clone().requires_grad_())  # noqa: E731
    o_ref, g_ref = outputs_and_grads(ref, make)
    o_ours, g_ours = outputs_and_grads(ours, make)
    assert [o.shape for o in o_ours] == [o.shape for o in o_ref]
    assert_close_all(g_ours, g_ref, torch.float64, "grads")


@pytest.mark.parametrize("kind", SEQ)
def test_sequence_length_zero_raises_like_torch(kind):
    ref, ours = make_pair(kind, 3, 4)
    x = torch.randn(0, 2, 3, dtype=torch.float64)
    want = _outcome(lambda: ref(x))
    assert want is not None and _outcome(lambda: ours(x)) == want


def _bad_forward_inputs(kind):
    d = torch.float64
    x = torch.randn(5, 2, 3, dtype=d)
    h = torch.zeros(1, 2, 4, dtype=d)
    c = torch.zeros(1, 2, 4, dtype=d)
    hx = (lambda a, b: (a, b)) if kind == "LSTM" else (lambda a, b: a)
    cases = {
        "4d input": (torch.randn(5, 2, 3, 1, dtype=d), None),
        "1d input": (torch.randn(3, dtype=d), None),
        "input_size": (torch.randn(5, 2, 7, dtype=d), None),
        "hx 2d for batched": (x, hx(h[0], c[0])),
        "hx 3d for unbatched": (x[:, 0], hx(h, c)),
        "hx batch": (x, hx(torch.zeros(1, 3, 4, dtype=d), c)),
        "hx layers": (x, hx(torch.zeros(2, 2, 4, dtype=d), c)),
        "hx size": (x, hx(torch.zeros(1, 2, 5, dtype=d), c)),
        "input dtype": (x.float(), None),
        "integer input": (x.long(), None),
        "hx dtype": (x, hx(h.float(), c)),
        "hx device": (x, hx(h.to("meta"), c)),
        "input device": (x.to("meta"), None),
    }
    if kind == "LSTM":
        cases["cx batch"] = (x, (h, torch.zeros(1, 3, 4, dtype=d)))
        cases["cx size"] = (x, (h, torch.zeros(1, 2, 5, dtype=d)))
        cases["hx a tensor, not a pair"] = (x, h)  # torch.nn indexes it: its IndexError, not a tuple's
        cases["hx a pair of one"] = (x, (h,))
    return cases


@pytest.mark.parametrize("kind", SEQ)
def test_forward_errors_match_torch(kind):
    ref, ours = make_pair(kind, 3, 4)
    for name, (x, hx) in _bad_forward_inputs(kind).items():
        want = _outcome(lambda: ref(x, hx))
        got = _outcome(lambda: ours(x, hx))
        assert want is not None and got is not None, name
        assert got[0] is want[0], (name, got, want)
        assert got[1] == want[1], (name, got, want)


@pytest.mark.parametrize("kind", CELLS)
def test_cell_forward_errors_match_torch(kind):
    ref, ours = make_pair(kind, 3, 4)
    d = torch.float64
    h = torch.zeros(2, 4, dtype=d)
    two = kind == "LSTMCell"
    hx = (lambda a: (a, a)) if two else (lambda a: a)
    cases = [(torch.randn(2, 5, dtype=d), None), (torch.randn(2, 3, 1, dtype=d), None),
             (torch.randn(2, 3, dtype=d), hx(torch.zeros(3, 4, dtype=d))),
             (torch.randn(2, 3, dtype=d), hx(torch.zeros(2, 5, dtype=d))),
             (torch.randn(2, 3, dtype=d), hx(torch.zeros(2, 4, 1, dtype=d))),
             (torch.randn(2, 3), hx(h)), (torch.randn(2, 3, dtype=d), hx(h.float())),
             (torch.randn(3, dtype=d), hx(h))]
    for x, hxv in cases:
        want = _outcome(lambda: ref(x, hxv))
        assert want is not None and _outcome(lambda: ours(x, hxv)) == want, (x.shape, want)


@pytest.mark.parametrize("data_rows,batch_sizes", [(5, [2, 1, 2]), (6, [2, 2, 1]), (4, [2, 2, 0]), (5, [])])
def test_inconsistent_packed_sequence_is_a_clear_error(data_rows, batch_sizes):
    m = fusedrnn.LSTM(3, 4)
    p = PackedSequence(torch.randn(data_rows, 3), torch.tensor(batch_sizes, dtype=torch.int64))
    with pytest.raises((ValueError, RuntimeError), match="batch_sizes|sequence length"):
        m(p)


def test_backend_selection_and_errors(monkeypatch):
    assert "reference" in fusedrnn.available_backends()
    with pytest.raises(ValueError, match="unknown fusedrnn backend 'nope'"):
        fusedrnn.LSTM(3, 4, backend="nope")
    with pytest.raises(TypeError):
        fusedrnn.GRU(3, 4, backend=3)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    ref, ours = make_pair("LSTM", 3, 4, backend="reference")
    torch.testing.assert_close(ours(x)[0], ref(x)[0])
    monkeypatch.setenv("FUSEDRNN_BACKEND", "reference")
    auto = fusedrnn.LSTM(3, 4).double()
    auto.load_state_dict(ref.state_dict())
    torch.testing.assert_close(auto(x)[0], ref(x)[0])
    monkeypatch.setenv("FUSEDRNN_BACKEND", "nope")
    with pytest.raises(RuntimeError, match="unknown fusedrnn backend 'nope'"):
        auto(x)


def test_explicit_backend_that_is_not_available_says_how_to_get_it():
    from fusedrnn import backends
    missing = [n for n in ("cpu", "cuda", "triton") if n not in fusedrnn.available_backends()]
    if not missing:
        backends.note_missing("imaginary", "build it with FUSEDRNN_IMAGINARY=1")
        missing = ["imaginary"]
    for name in missing:
        m = fusedrnn.LSTM(3, 4, backend=name)
        with pytest.raises(RuntimeError, match=f"backend '{name}' is not available: .+"):
            m(torch.randn(2, 1, 3))


def test_explicit_backend_that_cannot_run_the_input_is_an_error_not_a_fallback():
    from fusedrnn import backends
    m = fusedrnn.GRU(3, 4, backend="reference")
    with pytest.raises(RuntimeError, match="does not support"):
        backends.resolve("reference", torch.device("cpu"), torch.int64, "gru", False)
    assert m(torch.randn(2, 1, 3))[0].shape == (2, 1, 4)


def test_env_var_is_read_at_call_time(monkeypatch):
    monkeypatch.delenv("FUSEDRNN_BACKEND", raising=False)
    from fusedrnn.backends import resolve
    assert resolve("auto", torch.device("cpu"), torch.float64, "lstm", False) in fusedrnn.available_backends()
    monkeypatch.setenv("FUSEDRNN_BACKEND", "reference")
    assert resolve("auto", torch.device("cpu"), torch.float64, "lstm", False) == "reference"
    assert os.environ["FUSEDRNN_BACKEND"] == "reference"


def test_auto_on_cuda_runs_only_gpu_verified_backends(monkeypatch):
    """Backends whose kernels have not yet run on a GPU (fusedrnn.backends.GPU_VERIFIED) are never picked by auto."""
    from fusedrnn import backends
    monkeypatch.delenv("FUSEDRNN_BACKEND", raising=False)
    got = backends.resolve("auto", torch.device("cuda"), torch.float32, "lstm", False)
    assert got in backends.GPU_VERIFIED + ("reference",)
    assert "cuda" not in backends.GPU_VERIFIED and "triton" not in backends.GPU_VERIFIED


def test_env_reads_follow_os_environ(monkeypatch):
    """fusedrnn._env.env (the per-call reads of FUSEDRNN_BACKEND and FUSEDRNN_DEBUG_NAN, from os.environ's own
    dict) sees what os.environ.get sees as variables are set, changed and removed, non-ASCII values included."""
    from fusedrnn._env import env
    name = "FUSEDRNN_TEST_ENV_READ"
    monkeypatch.delenv(name, raising=False)
    assert env(name, "dflt") == "dflt" == os.environ.get(name, "dflt")
    for value in ("1", "", "caf\u00e9", "x" * 300):
        monkeypatch.setenv(name, value)
        assert env(name, "dflt") == value == os.environ.get(name, "dflt")
    monkeypatch.delenv(name)
    assert env(name) == ""
    monkeypatch.setenv("FUSEDRNN_BACKEND", "reference")  # the modules' auto now runs the reference, read per call
    m = fusedrnn.LSTMCell(3, 4)
    assert fusedrnn.backends.resolve(m.backend, torch.device("cpu"), torch.float32, "lstm", False) == "reference"
    monkeypatch.setenv("FUSEDRNN_BACKEND", "no-such-backend")
    with pytest.raises(RuntimeError, match="no-such-backend"):
        m(torch.randn(2, 3))
