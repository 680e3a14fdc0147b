"""Fuzzed equivalence: hypothesis draws a module (LSTM / GRU / RNN tanh|relu / the cells), its flags (layers,
direction, proj_size, bias, batch_first), the input (padded, unbatched, packed with drawn lengths: length 1,
all equal, ties, sorted or not), sizes down to 1, an optional initial state, a scale and a dtype; every available
backend must give torch.nn's outputs and gradients (input, h0/c0, every parameter) and the reference backend's:
float64 within TOLERANCE[float64] of torch.nn in float64; float32 within TOLERANCE[float32] of the float64 results.

Profiles (tests/_hypothesis_profiles.py): HYPOTHESIS_PROFILE=ci (default) | release | dev.
A failure prints the shrunk case, the constructor call and a line that reruns it:
    PYTHONPATH=.:tests python -c "import test_fuzz as f; f.run_case(f.Case(...))"
"""
from __future__ import annotations

import dataclasses

import _hypothesis_profiles  # noqa: F401  (registers and loads the profile)
import torch
from hypothesis import given, note
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from conftest import TOLERANCE, assert_close_all, conformance_backends, rel_err
from helpers import outputs_and_grads

DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str                 # LSTM GRU RNN LSTMCell GRUCell RNNCell
    I: int
    H: int
    nonlinearity: str = "tanh"
    layers: int = 1
    bidirectional: bool = False
    proj: int = 0
    bias: bool = True
    batch_first: bool = False
    inp: str = "padded"       # sequences: padded | packed | unbatched; cells: batched | unbatched
    T: int = 1
    B: int = 1
    lengths: tuple = ()       # packed only, in batch order
    enforce_sorted: bool = False
    with_hx: bool = False
    dtype: str = "float64"
    scale: float = 1.0
    seed: int = 0

    @property
    def is_cell(self) -> bool:
        return self.kind.endswith("Cell")

    def ctor(self) -> tuple[tuple, dict]:
        kw = {"bias": self.bias}
        if self.kind in ("RNN", "RNNCell"):
            kw["nonlinearity"] = self.nonlinearity
        if not self.is_cell:
            kw.update(num_layers=self.layers, bidirectional=self.bidirectional, batch_first=self.batch_first)
            if self.proj:
                kw["proj_size"] = self.proj
        return (self.I, self.H), kw

    def ctor_repr(self, backend: str) -> str:
        args, kw = self.ctor()
        return f"fusedrnn.{self.kind}({', '.join(map(repr, args))}, " + \
            ", ".join(f"{k}={v!r}" for k, v in kw.items()) + f", backend={backend!r}).to(torch.{self.dtype})"


def _modules(case: Case, backend: str):
    """torch.nn module in float64 and our module in case.dtype, same parameters."""
    args, kw = case.ctor()
    torch.manual_seed(case.seed)
    ref = getattr(nn, case.kind)(*args, **kw).double()
    ours = getattr(fusedrnn, case.kind)(*args, backend=backend, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours.to(DTYPES[case.dtype])


def _data(case: Case):
    """(input base tensor, hx or None) in float64; the input factories cast them."""
    g = torch.Generator().manual_seed(case.seed + 1)
    D = 2 if case.bidirectional else 1
    P = case.proj or case.H
    if case.is_cell:
        shape = (case.B, case.I) if case.inp == "batched" else (case.I,)
        hshape = shape[:-1] + (case.H,)
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * case.scale
        hx = None
        if case.with_hx:
            h = torch.randn(*hshape, generator=g, dtype=torch.float64)
            hx = (h, torch.randn(*hshape, generator=g, dtype=torch.float64)) if case.kind == "LSTMCell" else h
        return x, hx
    if case.inp == "unbatched":
        shape, hb = (case.T, case.I), ()
    else:
        shape = (case.B, case.T, case.I) if case.batch_first else (case.T, case.B, case.I)
        hb = (case.B,)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * case.scale
    hx = None
    if case.with_hx:
        h = torch.randn(case.layers * D, *hb, P, generator=g, dtype=torch.float64)
        hx = (h, torch.randn(case.layers * D, *hb, case.H, generator=g, dtype=torch.float64)) \
            if case.kind == "LSTM" else h
    return x, hx


def _factory(case: Case, x: torch.Tensor, dtype: torch.dtype):
    def make():
        leaf = x.to(dtype).requires_grad_()
        if case.inp == "packed":
            return pack_padded_sequence(leaf, list(case.lengths), batch_first=case.batch_first,
                                        enforce_sorted=case.enforce_sorted), [leaf]
        return leaf, [leaf]
    return make


def _cast_hx(hx, dtype):
    if hx is None:
        return None
    return tuple(h.to(dtype) for h in hx) if isinstance(hx, tuple) else hx.to(dtype)


def run_case(case: Case, backends=None) -> None:
    """Every backend (default: all available for case.dtype) against torch.nn and the reference backend."""
    dtype = DTYPES[case.dtype]
    backends = conformance_backends(dtype=dtype) if backends is None else backends
    x, hx = _data(case)
    ref_nn, ref_ours = _modules(dataclasses.replace(case, dtype="float64"), "reference")
    o_nn, g_nn = outputs_and_grads(ref_nn, _factory(case, x, torch.float64), hx)
    o_ref, g_ref = outputs_and_grads(ref_ours, _factory(case, x, torch.float64), hx)
    assert_close_all(o_ref, o_nn, torch.float64, "reference float64 vs torch.nn outputs")
    assert_close_all(g_ref, g_nn, torch.float64, "reference float64 vs torch.nn grads")
    same_dtype_nn = None
    if dtype != torch.float64:  # torch.nn's own error in this dtype, for tensors that cancel (see _assert_close)
        nn_lp = _modules(case, "reference")[0].to(dtype)
        same_dtype_nn = outputs_and_grads(nn_lp, _factory(case, x, dtype), _cast_hx(hx, dtype))
    for backend in backends:
        if backend == "reference" and dtype == torch.float64:
            continue  # just checked
        _, ours = _modules(case, backend)
        o, g = outputs_and_grads(ours, _factory(case, x, dtype), _cast_hx(hx, dtype))
        for oracle, (oo, go) in (("torch.nn", (o_nn, g_nn)), ("reference", (o_ref, g_ref))):
            what = f"{backend} {case.dtype} vs {oracle} float64"
            _assert_close(o, oo, dtype, same_dtype_nn and same_dtype_nn[0], what + " outputs")
            _assert_close(g, go, dtype, same_dtype_nn and same_dtype_nn[1], what + " grads")


def _assert_close(ours, ref64, dtype, torch_same_dtype, what):
    """float64: TOLERANCE[float64]. Lower precision: TOLERANCE[dtype], or, for a tensor whose values cancel (a GRU
    output (1 - z) n with z ~ 1, a sum of large terms of both signs) so that torch.nn itself misses that bound in the
    same dtype, at most 2x torch.nn's own error plus a few ulps (the flash-attention rule of tests/conftest.py)."""
    if torch_same_dtype is None:
        return assert_close_all(ours, ref64, dtype, what)
    assert len(ours) == len(ref64) == len(torch_same_dtype), what
    for i, (a, r, t) in enumerate(zip(ours, ref64, torch_same_dtype)):
        assert a.shape == r.shape, f"{what}[{i}]: shape {tuple(a.shape)} vs {tuple(r.shape)}"
        assert not torch.isnan(a).any() or torch.isnan(r).any(), f"{what}[{i}]: NaN in ours only"
        err = rel_err(a, r)
        bound = max(TOLERANCE[dtype], 2 * rel_err(t, r) + 4 * torch.finfo(dtype).eps)
        assert err <= bound, f"{what}[{i}]: relative error {err:.3g} > {bound:.3g} (torch.nn {dtype}: " \
                             f"{rel_err(t, r):.3g})"


def _note(case: Case) -> None:
    for backend in conformance_backends(dtype=DTYPES[case.dtype]):
        note(case.ctor_repr(backend))
    note(f'reproduce: PYTHONPATH=.:tests python -c "import test_fuzz as f; f.run_case(f.{case!r})"')


@st.composite
def _lengths(draw, T: int, B: int):
    how = draw(st.sampled_from(["random", "all_T", "all_equal", "with_ones"]))
    if how == "all_T":
        return (T,) * B
    if how == "all_equal":
        return (draw(st.integers(1, T)),) * B
    ls = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    if how == "with_ones":
        ls[draw(st.integers(0, B - 1))] = 1
    return tuple(ls)


@st.composite
def sequence_cases(draw):
    kind = draw(st.sampled_from(["LSTM", "GRU", "RNN"]))
    H = draw(st.integers(1, 6))
    T, B = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    inp = draw(st.sampled_from(["padded", "packed", "unbatched"]))
    lengths, enforce_sorted = (), False
    if inp == "packed":
        enforce_sorted = draw(st.booleans())
        lengths = draw(_lengths(T, B))
        if enforce_sorted:
            lengths = tuple(sorted(lengths, reverse=True))
    return Case(
        kind=kind, I=draw(st.integers(1, 5)), H=H,
        nonlinearity=draw(st.sampled_from(["tanh", "relu"])) if kind == "RNN" else "tanh",
        layers=draw(st.integers(1, 3)), bidirectional=draw(st.booleans()),
        proj=draw(st.integers(0, H - 1)) if kind == "LSTM" and H > 1 and draw(st.booleans()) else 0,
        bias=draw(st.booleans()), batch_first=draw(st.booleans()), inp=inp, T=T, B=B, lengths=lengths,
        enforce_sorted=enforce_sorted, with_hx=draw(st.booleans()),
        dtype=draw(st.sampled_from(["float64", "float32"])), scale=draw(st.sampled_from([0.5, 1.0, 3.0])),
        seed=draw(st.integers(0, 2**16)))


@st.composite
def cell_cases(draw):
    kind = draw(st.sampled_from(["LSTMCell", "GRUCell", "RNNCell"]))
    return Case(
        kind=kind, I=draw(st.integers(1, 5)), H=draw(st.integers(1, 6)),
        nonlinearity=draw(st.sampled_from(["tanh", "relu"])) if kind == "RNNCell" else "tanh",
        bias=draw(st.booleans()), inp=draw(st.sampled_from(["batched", "unbatched"])), B=draw(st.integers(1, 5)),
        with_hx=draw(st.booleans()), dtype=draw(st.sampled_from(["float64", "float32"])),
        scale=draw(st.sampled_from([0.5, 1.0, 3.0])), seed=draw(st.integers(0, 2**16)))


@given(sequence_cases())
def test_fuzz_sequence_modules(case):
    _note(case)
    run_case(case)


@given(cell_cases())
def test_fuzz_cells(case):
    _note(case)
    run_case(case)


def test_repro_line_round_trips():
    """The printed reproduction is valid: eval(repr(case)) is the same case, and run_case passes on a known case."""
    case = Case(kind="LSTM", I=2, H=3, layers=2, bidirectional=True, proj=2, inp="packed", T=4, B=3,
                lengths=(4, 1, 1), with_hx=True, dtype="float32", seed=5)
    assert eval(repr(case)) == case  # noqa: S307 - our own repr
    run_case(case)
    assert "proj_size=2" in case.ctor_repr("reference")
