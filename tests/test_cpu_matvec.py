"""The cpu backend's batch-1 matrix-vector products in both block heights (FUSEDRNN_CPU_MATVEC_ROWS: 8 weight rows
a block, the default on Intel and AMD Zen 4, or 16, AVX-512's default on AMD Zen 5): float32 layers and cells at
batch 1, hidden sizes that leave partial blocks and partial thread slices, with and without a projection, forward
and every gradient against torch.nn in float64."""
import pytest
import torch

import fusedrnn
from conftest import assert_close_all
from helpers import make_pair

pytestmark = pytest.mark.skipif("cpu" not in fusedrnn.available_backends(), reason="the cpu backend is not built")


def _outputs_and_grads(ref, ours, x, run):
    """run(module, x) -> (outputs, weighted sum to differentiate) for torch.nn in float64 and ours in float32 (its
    parameters the float64 ones rounded): each one's outputs, then the gradients of x and of every parameter."""
    ours.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    results = []
    for m, dt in ((ref, torch.float64), (ours, torch.float32)):
        xx = x.detach().to(dt).clone().requires_grad_()
        outs, loss = run(m, xx)
        loss.backward()
        results.append(outs + [xx.grad] + [p.grad for p in m.parameters()])
    return results


@pytest.mark.parametrize("rows", ["8", "16"])
@pytest.mark.parametrize("kind,kw", [("LSTM", {}), ("LSTM", {"proj_size": 24}), ("GRU", {}),
                                     ("RNN", {"nonlinearity": "relu"})])
@pytest.mark.parametrize("H", [40, 200])
def test_batch_one_layers_match_torch(kind, kw, H, rows, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_MATVEC_ROWS", rows)
    ref, _ = make_pair(kind, 9, H, **kw)
    ours = getattr(fusedrnn, kind)(9, H, backend="cpu", **kw)
    x = torch.randn(7, 1, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def run(m, xx):
        y, _ = m(xx)
        with torch.no_grad():
            y_inf, _ = m(xx.detach())
        return [y, y_inf], (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum()

    ref_res, ours_res = _outputs_and_grads(ref, ours, x, run)
    assert_close_all(ours_res, ref_res, torch.float32)


@pytest.mark.parametrize("rows", ["8", "16"])
@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_batch_one_cells_match_torch(kind, rows, monkeypatch):
    """A cell's step at batch 1: its input projection is one of these products too (layer.cpp, small_projection)."""
    monkeypatch.setenv("FUSEDRNN_CPU_MATVEC_ROWS", rows)
    ref, _ = make_pair(kind, 37, 72)
    ours = getattr(fusedrnn, kind)(37, 72, backend="cpu")
    x = torch.randn(1, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def run(m, xx):
        out = m(xx)
        h = out[0] if isinstance(out, tuple) else out
        return [h], (h * torch.linspace(-1, 1, h.shape[-1], dtype=h.dtype)).sum()

    ref_res, ours_res = _outputs_and_grads(ref, ours, x, run)
    assert_close_all(ours_res, ref_res, torch.float32)
