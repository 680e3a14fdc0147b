"""Long sequences, for every available backend: T = 20,000 (CI) and T = 100,000 (slow) forward and backward complete,
with an autograd graph whose size does not depend on T (no recursion, no stack growth: one node per layer, not per
step), memory saved for backward linear in T, and results that agree with torch.nn on the same sequence.
B = 1, I = H = 8 (the reference backend runs a Python loop per step: this is its worst case)."""
import inspect
import sys
import time

import pytest
import torch

from conftest import TOLERANCE, conformance_backends, rel_err
from helpers import make_pair
from test_memory import saved_bytes

I, H = 8, 8


def _graph_nodes(t: torch.Tensor) -> int:
    """Number of autograd nodes reachable from t.grad_fn (iteratively: no recursion here either)."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    return len(seen)


def _run_long(backend, T, kind="LSTM", check_torch=True):
    ref, ours = make_pair(kind, I, H, backend=backend, dtype=torch.float32)
    x = torch.randn(T, 1, I, generator=torch.Generator().manual_seed(0)).requires_grad_()
    ours(x[:3])[0].sum().backward()  # warm-up at the normal limit: lazy imports (sympy...) recurse legitimately
    x.grad = None
    limit = sys.getrecursionlimit()
    # Python recursion per step would fail loudly: the limit is far below T, but leaves room for the dispatcher
    sys.setrecursionlimit(len(inspect.stack()) + 1000)
    try:
        t0 = time.perf_counter()
        out, _ = ours(x)
        nodes = _graph_nodes(out)
        out.sum().backward()
        elapsed = time.perf_counter() - t0
    finally:
        sys.setrecursionlimit(limit)
    print(f"{backend} {kind} T={T}: forward+backward {elapsed:.2f} s, {nodes} autograd nodes")
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    if check_torch:  # torch.nn on the same sequence, in float64, checked at the float32 tolerance
        ref = ref.double()
        x64 = x.detach().double().requires_grad_()
        o64, _ = ref(x64)
        o64.sum().backward()
        assert rel_err(out, o64) <= TOLERANCE[torch.float32]
        assert rel_err(x.grad, x64.grad) <= 10 * TOLERANCE[torch.float32]  # summed over 20k steps
    return nodes, elapsed


@pytest.mark.parametrize("backend", conformance_backends(dtype=torch.float32))
def test_t20000_forward_backward(backend):
    nodes_long, _ = _run_long(backend, 20_000)
    nodes_short, _ = _run_long(backend, 10, check_torch=False)
    assert nodes_long == nodes_short, "the autograd graph grows with T"


@pytest.mark.slow
@pytest.mark.parametrize("backend", conformance_backends(dtype=torch.float32))
@pytest.mark.parametrize("kind", ["LSTM"])
def test_t100000_forward_backward(backend, kind):
    nodes_long, _ = _run_long(backend, 100_000, kind, check_torch=False)
    assert nodes_long == _run_long(backend, 10, kind, check_torch=False)[0]


@pytest.mark.parametrize("backend", conformance_backends(dtype=torch.float32))
def test_saved_memory_linear_in_T(backend):
    _, m = make_pair("GRU", I, H, backend=backend, dtype=torch.float32)
    sizes = {T: saved_bytes(m, torch.randn(T, 1, I, requires_grad=True)) for T in (1000, 10_000)}
    ratio = sizes[10_000] / sizes[1000]
    assert 9.5 <= ratio <= 10.5, f"saved bytes for backward: {sizes}, ratio {ratio:.2f} for 10x the steps"
