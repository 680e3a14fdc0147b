"""FUSEDRNN_DEBUG_NAN=1 (fusedrnn/debug.py): every output and workspace buffer starts as NaN, so an element a kernel
never writes shows up. Re-runs a representative subset of the conformance suite with the mode on, for every available
backend, and checks the switch itself and the op layer's unwritten-output check."""
import math

import pytest
import torch

import test_conformance as conf
from conftest import conformance_backends
from fusedrnn import backends, debug
from fusedrnn.reference import ReferenceBackend


@pytest.fixture
def nan_mode(monkeypatch):
    monkeypatch.setenv(debug.ENV_VAR, "1")
    assert debug.nan_fill_enabled()


def test_switch_is_read_at_call_time(monkeypatch):
    like = torch.zeros(3, dtype=torch.float64)
    monkeypatch.delenv(debug.ENV_VAR, raising=False)
    assert not debug.nan_fill_enabled()
    monkeypatch.setenv(debug.ENV_VAR, "0")
    assert not debug.nan_fill_enabled()
    monkeypatch.setenv(debug.ENV_VAR, "1")
    assert debug.nan_fill_enabled()
    t = debug.empty((2, 5), like)
    assert t.shape == (2, 5) and t.dtype == torch.float64 and torch.isnan(t).all()
    assert torch.isnan(debug.empty_like(torch.zeros(4, 2, dtype=torch.float32))).all()
    ints = debug.empty((3,), like, dtype=torch.int64)  # no NaN for integers: allocated, left alone
    assert ints.dtype == torch.int64 and ints.shape == (3,)
    assert debug.empty((2,), torch.zeros(1, device="meta")).device.type == "meta"


# Representative subset: every cell family, packed and padded, bidirectional, projection, cells, float32.
SEQ_SUBSET = [
    (("LSTM", {}), 2, True, True, False),
    (("LSTM", {"proj_size": conf.PROJ}), 1, True, False, True),
    (("GRU", {}), 2, True, True, True),
    (("RNN", {"nonlinearity": "tanh"}), 1, False, True, False),
    (("RNN", {"nonlinearity": "relu"}), 2, True, False, False),
]


@pytest.mark.parametrize("backend", conformance_backends())
@pytest.mark.parametrize("cell,layers,bidirectional,bias,batch_first", SEQ_SUBSET,
                         ids=lambda v: conf._id(v) if isinstance(v, tuple) else str(v))
def test_sequence_conformance_with_nan_fill(nan_mode, backend, cell, layers, bidirectional, bias, batch_first):
    conf.test_sequence_modules(backend, cell, layers, bidirectional, bias, batch_first)


@pytest.mark.parametrize("backend", conformance_backends())
@pytest.mark.parametrize("kind,kw", [("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {"nonlinearity": "relu"})])
def test_cells_with_nan_fill(nan_mode, backend, kind, kw):
    conf.test_cells(backend, kind, kw, True, True)


@pytest.mark.parametrize("backend", conformance_backends())
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_length_one_sequences_with_nan_fill(nan_mode, backend, kind):
    conf.test_long_packed_with_length_one_sequences(backend, kind)


@pytest.mark.parametrize("backend", conformance_backends(dtype=torch.float32))
def test_float32_with_nan_fill(nan_mode, backend):
    conf.test_float32_against_float64(backend, "LSTM", {"proj_size": conf.PROJ})


class _ForgetfulBackend(ReferenceBackend):
    """The reference, except that its forward leaves the last row of y and its backward one weight-gradient element
    as allocated: the bug the debug mode exists to catch."""
    name = "forgetful"

    def forward(self, mode, x, *args):
        y, hy, cy, reserve = super().forward(mode, x, *args)
        y2 = debug.empty_like(y)
        y2[:-1] = y[:-1]
        return y2, hy, cy, reserve

    def backward(self, *args):
        gx, ghx, gcx, gws = super().backward(*args)
        g0 = debug.empty_like(gws[0])
        g0.view(-1)[1:] = gws[0].reshape(-1)[1:]
        return gx, ghx, gcx, [g0, *gws[1:]]


def _run_forgetful(monkeypatch, what):
    monkeypatch.setitem(backends._BACKENDS, "forgetful", _ForgetfulBackend())
    mode, T, B, I, H = "gru", 3, 2, 2, 3
    x = torch.randn(T * B, I, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(3 * H, I, dtype=torch.float64, requires_grad=True),
          torch.randn(3 * H, H, dtype=torch.float64, requires_grad=True)]
    hx = torch.zeros(1, B, H, dtype=torch.float64)
    bs = torch.full((T,), B, dtype=torch.int64)
    if what == "backward":  # forward through the honest reference, backward through the forgetful one
        y, _, _, reserve = torch.ops.fusedrnn.rnn_layer(mode, x, bs, hx, None, ws, False, 1, True, "reference")
        return torch.ops.fusedrnn.rnn_layer_backward(mode, torch.ones_like(y), torch.zeros_like(hx),
                                                     torch.zeros(0, dtype=torch.float64), x.detach(), bs, hx, None,
                                                     [w.detach() for w in ws], False, 1, y.detach(),
                                                     reserve.detach(), "forgetful")
    return torch.ops.fusedrnn.rnn_layer(mode, x, bs, hx, None, ws, False, 1, True, "forgetful")


@pytest.mark.parametrize("what,output", [("forward", "y"), ("backward", r"grad_weights\[0\]")])
def test_unwritten_output_is_reported_in_debug_mode(monkeypatch, nan_mode, what, output):
    with pytest.raises(RuntimeError, match=rf"backend 'forgetful' left \d+ element.*{output}.*unwritten"):
        _run_forgetful(monkeypatch, what)


def test_without_debug_mode_the_forgetful_backend_goes_unnoticed_by_the_op(monkeypatch):
    monkeypatch.delenv(debug.ENV_VAR, raising=False)
    out = _run_forgetful(monkeypatch, "forward")  # no check, no fill: the op returns whatever was there
    assert out[0].shape == (6, 3)


def test_nan_inputs_do_not_trigger_the_check(nan_mode):
    """NaN that comes from the inputs is propagation, not an unwritten element: no error, NaN in the output."""
    H = 3
    x = torch.randn(4, 2, dtype=torch.float64)
    x[1, 0] = math.nan
    ws = [torch.randn(H, 2, dtype=torch.float64), torch.randn(H, H, dtype=torch.float64)]
    y = torch.ops.fusedrnn.rnn_layer("rnn_tanh", x, torch.tensor([2, 2]), torch.zeros(1, 2, H, dtype=torch.float64),
                                     None, ws, False, 1, False, "reference")[0]
    assert torch.isnan(y[1]).all() and not torch.isnan(y[0]).any()
