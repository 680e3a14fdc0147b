"""Determinism: repeated runs give bitwise-identical outputs and gradients, for every available backend on the CPU,
and on a GPU under torch.use_deterministic_algorithms(True)."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from conftest import conformance_backends
from helpers import make_pair

CASES = [("LSTM", {"proj_size": 4}), ("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "relu"})]


def _once(module, x, lengths, h0):
    xl = x.clone().requires_grad_()
    inp = pack_padded_sequence(xl, lengths, enforce_sorted=False) if lengths else xl
    out, hidden = module(inp, h0)
    outs = [out.data if lengths else out] + list(hidden if isinstance(hidden, tuple) else (hidden,))
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype, device=o.device).view(o.shape)).sum()
               for o in outs)
    grads = torch.autograd.grad(loss, [xl, *module.parameters()])
    return [o.detach() for o in outs] + list(grads)


def _check_repeatable(backend, kind, kw, dtype, device, B, packed):
    _, m = make_pair(kind, 6, 8, num_layers=2, bidirectional=True, backend=backend, dtype=dtype, **kw)
    m = m.to(device)
    g = torch.Generator().manual_seed(0)
    T = 5
    x = torch.randn(T, B, 6, generator=g, dtype=torch.float64).to(device, dtype)
    lengths = [max(1, T - j % T) for j in range(B)] if packed else None
    P = kw.get("proj_size", 0) or 8
    h = torch.randn(4, B, P, generator=g, dtype=torch.float64).to(device, dtype)
    h0 = (h, torch.randn(4, B, 8, generator=g, dtype=torch.float64).to(device, dtype)) if kind == "LSTM" else h
    first = _once(m, x, lengths, h0)
    for run in range(2):
        again = _once(m, x, lengths, h0)
        for i, (a, b) in enumerate(zip(again, first)):
            assert torch.equal(a, b), f"{backend}: run {run + 2} differs from run 1 in tensor {i} " \
                                      f"(max diff {(a - b).abs().max().item():.3g})"


@pytest.mark.parametrize("backend", conformance_backends(dtype=torch.float32))
@pytest.mark.parametrize("kind,kw", CASES, ids=lambda v: v if isinstance(v, str) else str(v))
@pytest.mark.parametrize("dtype,B,packed", [(torch.float64, 3, True), (torch.float32, 16, False)],
                         ids=["f64-B3-packed", "f32-B16-padded"])
def test_cpu_repeatable_bitwise(backend, kind, kw, dtype, B, packed):
    """B=3 and B=16 take different kernel paths in the cpu backend (small-batch threads vs per-step GEMM)."""
    _check_repeatable(backend, kind, kw, dtype, "cpu", B, packed)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("backend", conformance_backends(device="cuda", dtype=torch.float32))
@pytest.mark.parametrize("kind,kw", CASES, ids=lambda v: v if isinstance(v, str) else str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_gpu_repeatable_bitwise_under_deterministic_algorithms(backend, kind, kw, dtype):
    from fusedrnn.backends import get_backend
    if not get_backend(backend).supports(torch.device("cuda"), dtype, kind.lower() if kind != "RNN" else
                                         "rnn_" + kw.get("nonlinearity", "tanh"), "proj_size" in kw):
        pytest.skip(f"backend {backend} does not take {kind} {kw} in {dtype} (resolve() refuses it by design)")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for B, packed in ((3, True), (64, False)):
            _check_repeatable(backend, kind, kw, dtype, "cuda", B, packed)
    finally:
        torch.use_deterministic_algorithms(prev)
