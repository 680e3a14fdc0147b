"""Shared test configuration: which backends the suites run on, the per-dtype tolerance table, markers.

No device is queried at import: GPU tests use the `requires_cuda` marker, evaluated when a test runs.
"""
import pytest
import torch

import fusedrnn
from fusedrnn.backends import get_backend

# One tolerance table for the project: the largest error relative to the reference's magnitude
# (max |ours - ref| / max |ref|, per tensor) allowed for outputs and every gradient, when the reference ran in
# float64. Low precision (fp16/bf16) uses the flash-attention rule instead (see `assert_low_precision`).
TOLERANCE = {torch.float64: 1e-8, torch.float32: 2e-5}


def conformance_backends(device="cpu", dtype=torch.float64):
    """Backends the full conformance suite runs on for this device: every available one that supports it.
    Triton on the CPU runs only under its interpreter, which is far too slow for the full grid: tests/test_triton.py
    holds it to the same comparisons on a smaller grid."""
    out = []
    for name in fusedrnn.available_backends():
        if name == "triton" and torch.device(device).type == "cpu":
            continue
        b = get_backend(name)
        if b.supports(torch.device(device), dtype, "lstm", False):
            out.append(name)
    return out


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| (absolute error where the reference is all zeros), in float64."""
    ours, ref = ours.detach().double(), ref.detach().double()
    if ref.numel() == 0:
        return 0.0
    scale = ref.abs().max().item()
    return (ours - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_close_all(ours, ref, dtype, what=""):
    """Each pair (ours[i], ref[i]) must agree to TOLERANCE[dtype]; NaN anywhere fails."""
    assert len(ours) == len(ref), (len(ours), len(ref))
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape, f"{what}[{i}]: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        assert not torch.isnan(a).any() or torch.isnan(b).any(), f"{what}[{i}]: NaN in ours only"
        err = rel_err(a, b)
        assert err <= TOLERANCE[dtype], f"{what}[{i}]: relative error {err:.3g} > {TOLERANCE[dtype]:g}"


def assert_low_precision(ours, torch_same_dtype, ref64, what=""):
    """Flash-attention rule: our error against the fp64 result is at most 2x torch.nn's in the same dtype
    (plus a floor of a few ulps of that dtype, for tensors where torch.nn happens to be exact)."""
    for i, (a, t, r) in enumerate(zip(ours, torch_same_dtype, ref64)):
        floor = 4 * torch.finfo(a.dtype).eps
        e_ours, e_torch = rel_err(a, r), rel_err(t, r)
        assert e_ours <= 2 * e_torch + floor, f"{what}[{i}]: ours {e_ours:.3g} vs torch.nn {e_torch:.3g}"


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running; excluded from the CI profile with -m 'not slow'")


def pytest_runtest_setup(item):
    if item.get_closest_marker("requires_cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
