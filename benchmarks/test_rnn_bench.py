"""pytest-benchmark suite over the same cases as `python -m fusedrnn.bench` (fusedrnn/bench/cases.py); see
benchmarks/README.md for how to run it.

One pytest-benchmark per (case, mode, implementation) of the fusedrnn.bench grid; the benchmark group is the
case and mode, so pytest-benchmark's table puts torch.nn and every backend of a case side by side.

Ids read `<case id>-<fwd|fwdbwd>-<torch|backend>`, e.g. `lstm-T100-B16-I256-H256-fp32-fwdbwd-cpu`; select with
-k (`-k "target"` is not an id part: use the case ids, or FUSEDRNN_BENCH_CELLS to narrow the grid).
"""
from __future__ import annotations

import os

import pytest
import torch

from fusedrnn.bench import harness, metrics
from fusedrnn.bench.cases import CELLS, build_grid



def bench_device() -> torch.device:
    d = os.environ.get("FUSEDRNN_BENCH_DEVICE")
    return torch.device(d if d else ("cuda" if torch.cuda.is_available() else "cpu"))


def bench_rounds() -> int:
    return int(os.environ.get("FUSEDRNN_BENCH_ROUNDS", "5"))


def _params():
    device = bench_device()
    preset = os.environ.get("FUSEDRNN_BENCH_PRESET", "quick")
    cells = [c for c in os.environ.get("FUSEDRNN_BENCH_CELLS", ",".join(CELLS)).split(",") if c]
    cases = build_grid(preset, device.type, cells)
    env = os.environ.get("FUSEDRNN_BENCH_BACKENDS")
    backends = [b for b in env.split(",") if b] if env is not None else harness.available_backends()
    out = []
    for case in cases:
        impls = [harness.TORCH] + [b for b in backends if (b != "reference" or case.reference)
                                   and harness.backend_supports(b, case, device)[0]]
        for mode in case.modes:
            for impl in impls:
                out.append(pytest.param(case, mode, impl, id=f"{case.id}-{mode}-{impl}"))
    return out


_MODULES: dict = {}


def _module(case, impl, device):
    """torch.nn and the fusedrnn modules of a case share weights (the backend loads torch.nn's state_dict)."""
    key = (case.id, impl)
    if any(k[0] != case.id for k in _MODULES):  # tests run case by case: keep only this case's modules
        _MODULES.clear()
    if key not in _MODULES:
        dtype = harness.dtype_of(case.dtype)
        ref_key = (case.id, harness.TORCH)
        if ref_key not in _MODULES:
            torch.manual_seed(0)
            _MODULES[ref_key] = harness.torch_factory(case, device, dtype)
        if impl != harness.TORCH:
            m = harness.fused_factory(impl)(case, device, dtype)
            m.load_state_dict(_MODULES[ref_key].state_dict())
            _MODULES[key] = m
    return _MODULES[key]


@pytest.mark.parametrize("case,mode,impl", _params())
def test_rnn(benchmark, case, mode, impl):
    device = bench_device()
    module = _module(case, impl, device)
    prepare = harness._prepare(impl, module, case, device, harness.dtype_of(case.dtype), mode)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    results = []

    def setup():  # fresh inputs for every round, outside the timed call
        fn = prepare()
        sync()
        return (fn,), {}

    def run(fn):
        results.append(fn())
        sync()

    benchmark.group = f"{case.id}-{mode}"
    benchmark.pedantic(run, setup=setup, rounds=bench_rounds(), warmup_rounds=1, iterations=1)
    flops = metrics.gemm_flops(case.cell, case.tokens, case.I, case.H, case.layers, case.D, case.proj, mode)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(case=case.as_dict(), mode=mode, impl=impl, tokens=case.tokens, flops=flops,
                                gflops=flops / median / 1e9, tokens_per_s=case.tokens / median)
    assert len(results) == bench_rounds() + 1
    if mode == "fwd":
        y = results[-1][0]
        assert y.shape == harness.output_shape(case) and bool(torch.isfinite(y).all())
    else:
        assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in module.parameters())
