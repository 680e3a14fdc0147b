"""The cpu backend's batch-1 matrix-vector products in both block heights (FUSEDRNN_CPU_MATVEC_ROWS: 8 weight rows
a block, the default on AMD Zen 4, or 16, AVX-512's default elsewhere): float32 layers and cells at batch 1, hidden
sizes that leave partial blocks and partial thread slices, with and without a projection, forward and every
gradient against torch.nn in float64."""
import pytest
import torch

import fusedrnn
from helpers import make_pair

pytestmark = pytest.mark.skipif("cpu" not in fusedrnn.available_backends(), reason="the cpu backend is not built")

TOL = 3e-5  # float32 against float64, relative to the largest magnitude


def _close(ours, ref):
    scale = max(ref.abs().max().item(), 1.0)
    err = (ours.double() - ref).abs().max().item() / scale
    assert err <= TOL, err


@pytest.mark.parametrize("rows", ["8", "16"])
@pytest.mark.parametrize("kind,kw", [("LSTM", {}), ("LSTM", {"proj_size": 24}), ("GRU", {}),
                                     ("RNN", {"nonlinearity": "relu"})])
@pytest.mark.parametrize("H", [40, 200])
def test_batch_one_layers_match_torch(kind, kw, H, rows, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_MATVEC_ROWS", rows)
    ref, _ = make_pair(kind, 9, H, **kw)
    ours = getattr(fusedrnn, kind)(9, H, backend="cpu", **kw)
    ours.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    x = torch.randn(7, 1, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    results = []
    for m, dt in ((ref, torch.float64), (ours, torch.float32)):
        xx = x.detach().to(dt).clone().requires_grad_()
        y, _ = m(xx)
        (y * torch.linspace(-1, 1, y.shape[-1], dtype=dt)).sum().backward()
        with torch.no_grad():
            y_inf, _ = m(x.to(dt))
        results.append([y, y_inf, xx.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*results):
        _close(b, a)


@pytest.mark.parametrize("rows", ["8", "16"])
@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_batch_one_cells_match_torch(kind, rows, monkeypatch):
    """A cell's step at batch 1: its input projection is one of these products too (layer.cpp, small_projection)."""
    monkeypatch.setenv("FUSEDRNN_CPU_MATVEC_ROWS", rows)
    ref, _ = make_pair(kind, 37, 72)
    ours = getattr(fusedrnn, kind)(37, 72, backend="cpu")
    ours.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    x = torch.randn(1, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    results = []
    for m, dt in ((ref, torch.float64), (ours, torch.float32)):
        xx = x.detach().to(dt).clone().requires_grad_()
        out = m(xx)
        h = out[0] if isinstance(out, tuple) else out
        (h * torch.linspace(-1, 1, h.shape[-1], dtype=dt)).sum().backward()
        results.append([h, xx.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*results):
        _close(b, a)
