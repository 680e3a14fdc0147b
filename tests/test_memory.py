"""Memory, for every available backend:

- no growth over 1000 forward+backward iterations of a small model: the resident set size (/proc/self/statm) and
  the number of gc-tracked objects (tensors, lists, autograd contexts...) are compared between iteration 800 and
  1000, with a small slack; a companion test shows the check catches a leak of one small tensor per iteration
  (tracemalloc is not used: it slows the reference backend's Python loop several times over);
- bytes saved for backward per token, against torch.nn's (torch.autograd.graph.saved_tensors_hooks, unique storages,
  parameters excluded): ours must not exceed SAVED_BYTES_BOUND times torch.nn's.
"""
import gc
import os

import pytest
import torch

import fusedrnn

from conftest import conformance_backends
from helpers import make_pair

PAGE = os.sysconf("SC_PAGE_SIZE")
RSS_SLACK = 1 << 20        # 1 MiB over the last 200 iterations (allocator noise); one leaked y is 200 * 4 KiB
OBJECT_SLACK = 100         # gc-tracked objects
SAVED_BYTES_BOUND = 1.5    # ours / torch.nn's saved bytes per token


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _snapshot():
    gc.collect()
    return _rss(), len(gc.get_objects())


def _iterations(model, x, n, keep=None):
    """n forward+backward iterations; returns the snapshots 200 iterations before n and at n."""
    snaps = {}
    for it in range(n):
        out, _ = model(x)
        loss = out.square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if keep is not None:
            keep.append(out.detach().clone())  # the deliberate leak of the companion test
        if it + 1 in (n - 200, n):
            snaps[it + 1] = _snapshot()
    return snaps[n - 200], snaps[n]


def _growth(backend, n, leak=False):
    """(RSS growth, object-count growth) over iterations n-200..n."""
    torch.manual_seed(0)
    _, model = make_pair("LSTM", 8, 16, backend=backend, dtype=torch.float64)
    x = torch.randn(8, 4, 8, dtype=torch.float64, requires_grad=True)
    a, b = _iterations(model, x, n, [] if leak else None)
    return b[0] - a[0], b[1] - a[1]


@pytest.fixture
def one_thread():
    """The growth tests measure memory, not speed: one intra-op thread keeps the allocator's pattern simple and the
    reference backend's many small ops from waiting on busy OpenMP workers on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rss_windows(backend, first=1000, window=200, last=2000):
    """RSS growth over each `window` iterations from `first` to `last`, and the object-count growth over the first
    window after `first`."""
    torch.manual_seed(0)
    _, model = make_pair("LSTM", 8, 16, backend=backend, dtype=torch.float64)
    x = torch.randn(8, 4, 8, dtype=torch.float64, requires_grad=True)
    marks = set(range(first, last + 1, window))
    snaps = []
    for it in range(last):
        out, _ = model(x)
        out.square().mean().backward()
        model.zero_grad(set_to_none=True)
        if it + 1 in marks:
            snaps.append(_snapshot())
    rss = [b[0] - a[0] for a, b in zip(snaps, snaps[1:])]
    return rss, snaps[1][1] - snaps[0][1]


@pytest.mark.parametrize("backend", conformance_backends())
def test_no_growth_over_1000_iterations(one_thread, backend):
    # The allocator's footprint settles after a warm-up whose length depends on the heap the earlier tests left
    # (measured: +1.7 MiB, +0.6 MiB, then 0 per 500 iterations after a fragmenting suite); a leak never settles.
    # So after 1000 iterations some 200-iteration window up to iteration 2000 must be flat within the slack.
    rss, objects = _rss_windows(backend)
    assert min(rss) <= RSS_SLACK, f"RSS grew in every 200-iteration window from 1000 to 2000: {[r // 1024 for r in rss]} KiB"
    assert objects <= OBJECT_SLACK, f"{objects} more gc-tracked objects over iterations 1000-1200"


def test_the_growth_check_catches_a_small_leak(one_thread):
    """One retained output per iteration ([8, 4, 16] float64: a tensor object and 4 KiB) is caught by the object
    count (the RSS may not move: the allocator reuses memory freed during the warm-up)."""
    rss, objects = _growth("reference", 300, leak=True)
    # 200 leaked tensors; some of the window's other objects come and go (alone 199 seen, in the full suite once
    # 181: objects of earlier tests freed in the window), above the slack either way, which is what the check needs
    assert objects > OBJECT_SLACK + 50, objects


# ---- bytes saved for backward ---------------------------------------------------------------------------------------

def saved_bytes(module, x):
    """Bytes of the unique storages the autograd graph of module(x) saves, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                storages[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = module(x)
    del out
    return sum(storages.values())


# T=64, B=4: 256 tokens; I=H=32, two layers.
SAVED_CASES = [("LSTM", {}), ("LSTM", {"proj_size": 16}), ("GRU", {}), ("RNN", {}),
               ("LSTM", {"bidirectional": True})]


def saved_per_token(kind, kw, backend, dtype=torch.float32, T=64, B=4, I=32, H=32):
    ref, ours = make_pair(kind, I, H, num_layers=2, backend=backend, dtype=dtype, **kw)
    x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)
    return saved_bytes(ours, x) / (T * B), saved_bytes(ref, x) / (T * B)


@pytest.mark.parametrize("backend", conformance_backends(dtype=torch.float32))
@pytest.mark.parametrize("kind,kw", SAVED_CASES, ids=lambda v: v if isinstance(v, str) else
                         "".join(f"{k}{w}" for k, w in v.items()) or "plain")
def test_saved_bytes_per_token_within_bound_of_torch(backend, kind, kw):
    ours, theirs = saved_per_token(kind, kw, backend)
    print(f"{backend} {kind} {kw}: saved for backward {ours:.0f} B/token, torch.nn {theirs:.0f} B/token "
          f"({ours / theirs:.2f}x)")
    assert ours > 0 and theirs > 0
    assert ours <= SAVED_BYTES_BOUND * theirs, f"{ours:.0f} B/token vs torch.nn's {theirs:.0f}"


def test_saved_bytes_count_unique_storages():
    """The counter itself: a tensor saved twice counts once, parameters not at all."""
    x = torch.randn(3, 4, requires_grad=True)

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) * x * x, None  # saves x (three times), lin(x), lin(x) * x and the weight
    assert saved_bytes(Twice(), x) == 3 * x.untyped_storage().nbytes()


# ---- peak memory of one call ----------------------------------------------------------------------------------------

def _peak_case_id(case):
    return case.id


def _target_cases():
    """Issue 3's cases, and small ones of the benchmark grid where fixed workspaces weigh most (a packed copy of
    W_hh in the backward, a gathered H_prev, a copy of an expanded grad_y once put these at 1.2-1.5x torch.nn; GRU's
    recurrent-side gate gradients held apart from the input side's, at 1.0-1.09x)."""
    from fusedrnn.bench.cases import CPU_TARGETS, Case
    return CPU_TARGETS + (Case("rnn", 100, 4, 512, 512), Case("rnn", 10, 16, 256, 256), Case("lstm", 10, 16, 256, 256),
                          Case("gru", 50, 16, 256, 256), Case("gru", 100, 4, 512, 512), Case("gru", 10, 16, 256, 256),
                          # short sequences of large batches, where a backward chunk of 512 rows was the whole
                          # sequence (1.04-1.18x torch.nn's before chunks were bounded by a quarter of the rows)
                          Case("gru", 10, 80, 256, 256), Case("gru", 10, 64, 256, 256), Case("gru", 20, 32, 256, 256),
                          Case("rnn", 10, 80, 512, 512), Case("rnn", 5, 128, 64, 64), Case("gru", 50, 4, 64, 64))


@pytest.mark.skipif("cpu" not in fusedrnn.available_backends(), reason="the cpu backend is not built")
@pytest.mark.parametrize("case", _target_cases(), ids=_peak_case_id)
def test_cpu_peak_memory_of_forward_backward_not_above_torch(case):
    """The most memory allocated during one forward+backward of the `cpu` backend (profiler
    allocation events, as the benchmark reports it) is no more than torch.nn's on the same input and loss."""
    from fusedrnn.bench.metrics import cpu_peak_bytes
    kind = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}[case.cell]
    kw = dict(num_layers=case.layers, bidirectional=case.bidirectional)
    if case.proj:
        kw["proj_size"] = case.proj
    ref, ours = make_pair(kind, case.I, case.H, backend="cpu", dtype=torch.float32, **kw)
    x = torch.randn(case.T, case.B, case.I)
    lengths = case.lengths()

    def fwd_bwd(module):
        inp = x.detach().requires_grad_()
        if case.packed:
            inp = torch.nn.utils.rnn.pack_padded_sequence(inp, lengths)
        out, _ = module(inp)
        (out.data if case.packed else out).sum().backward()

    peaks = []
    for module in (ref, ours):
        fwd_bwd(module)  # first call: one-time allocations (kernels, thread pools) stay out of the reading
        module.zero_grad(set_to_none=True)
        peaks.append(cpu_peak_bytes(lambda: fwd_bwd(module)))
        module.zero_grad(set_to_none=True)
    theirs, mine = peaks
    if theirs is None:
        pytest.skip("this torch build's profiler reports no allocation events")
    print(f"{case.id}: peak {mine / 2**20:.2f} MiB, torch.nn {theirs / 2**20:.2f} MiB ({mine / theirs:.2f}x)")
    assert 0 < mine <= theirs, f"peak {mine / 2**20:.2f} MiB > torch.nn's {theirs / 2**20:.2f} MiB"


@pytest.mark.skipif("cpu" not in fusedrnn.available_backends(), reason="the cpu backend is not built")
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_cpu_peak_memory_of_a_loss_on_h_n_alone_not_above_torch(kind):
    """A classifier's loss on the last hidden state alone leaves y's gradient undefined: the backward gets it as
    one zero expanded to y's shape, never a zero tensor as large as y (before: RNN T100 B16 H256 5.80 MiB against
    torch.nn's 5.21, LSTM 19.0 against 16.5 with a loss on y). Peak no more than torch.nn's, nor more than with a
    loss on y (within a KiB)."""
    from fusedrnn.bench.metrics import cpu_peak_bytes
    ref, ours = make_pair(kind, 256, 256, backend="cpu", dtype=torch.float32)
    x = torch.randn(100, 16, 256)

    def fwd_bwd(module, use):
        y, state = module(x.detach().requires_grad_())
        h = state[0] if isinstance(state, tuple) else state
        (h if use == "h" else y).sum().backward()

    peaks = {}
    for name, module in (("torch", ref), ("ours", ours)):
        for use in ("h", "y"):
            fwd_bwd(module, use)
            module.zero_grad(set_to_none=True)
            peaks[name, use] = cpu_peak_bytes(lambda: fwd_bwd(module, use))
            module.zero_grad(set_to_none=True)
    if peaks["torch", "h"] is None:
        pytest.skip("this torch build's profiler reports no allocation events")
    print({k: round(v / 2**20, 2) for k, v in peaks.items()})
    assert peaks["ours", "h"] <= peaks["torch", "h"]
    assert peaks["ours", "h"] <= peaks["ours", "y"] + 1024  # (the losses' scalars differ by a few bytes)


@pytest.mark.skipif("cpu" not in fusedrnn.available_backends(), reason="the cpu backend is not built")
@pytest.mark.parametrize("kind,T,B,H", [("LSTM", 2000, 8, 128), ("GRU", 1000, 16, 128), ("RNN", 4000, 4, 256)])
def test_cpu_inference_workspace_bounded_and_not_above_torch(kind, T, B, H):
    """Inference (no_grad) runs the input projections time chunk by time chunk, in a buffer of about 4 MiB (a few
    hundred KiB more for small inputs: at least 512 rows), never the whole sequence's: the peak allocated during one
    call, less the outputs, stays under 6 MiB on sequences whose projections take 16-32 MiB, and under torch.nn's
    peak on the same call."""
    from fusedrnn.bench.metrics import cpu_peak_bytes
    ref, ours = make_pair(kind, H, H, backend="cpu", dtype=torch.float32)
    x = torch.randn(T, B, H)
    peaks = []
    for module in (ref, ours):
        with torch.no_grad():
            module(x)  # one-time allocations stay out of the reading
            peaks.append(cpu_peak_bytes(lambda: module(x)))
    theirs, mine = peaks
    if theirs is None:
        pytest.skip("this torch build's profiler reports no allocation events")
    outputs = (T * B * H + 2 * B * H) * 4
    extra = mine - outputs
    print(f"{kind} T{T} B{B} H{H}: peak {mine / 2**20:.2f} MiB ({extra / 2**20:.2f} beyond the outputs), "
          f"torch.nn {theirs / 2**20:.2f} MiB")
    assert extra <= 6 * 2**20, f"{extra / 2**20:.2f} MiB beyond the outputs"
    assert mine <= theirs


@pytest.mark.skipif("cpu" not in fusedrnn.available_backends(), reason="the cpu backend is not built")
@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell"])
def test_cpu_decoder_loop_memory_per_step_not_above_torch(kind):
    """A seq2seq decoder: a cell called step by step, every h kept, one backward at the end. What each step adds to
    the peak of forward+backward (the peak at 40 steps less the peak at 20) is no more than torch.nn's cell adds
    (within 3%; LSTMCell B32 H256: 0.219 MiB a step, torch.nn's 0.2185; it was 0.25 while the cell returned the
    layer's hy, a second copy of h beside the y its backward keeps)."""
    from fusedrnn.bench.metrics import cpu_peak_bytes
    ref, ours = make_pair(kind, 256, 256, backend="cpu", dtype=torch.float32)
    B = 32
    xs = torch.randn(40, B, 256, generator=torch.Generator().manual_seed(0))

    def loop(module, steps):
        h = torch.zeros(B, 256)
        state = (h, torch.zeros(B, 256)) if kind == "LSTMCell" else h
        outs = []
        for t in range(steps):
            state = module(xs[t], state)
            outs.append(state[0] if kind == "LSTMCell" else state)
        torch.stack(outs).sum().backward()
        module.zero_grad(set_to_none=True)

    growth = {}
    for name, module in (("torch", ref), ("ours", ours)):
        loop(module, 5)
        peaks = [cpu_peak_bytes(lambda: loop(module, steps)) for steps in (20, 40)]
        if peaks[0] is None:
            pytest.skip("this torch build's profiler reports no allocation events")
        growth[name] = (peaks[1] - peaks[0]) / 20
    print({k: round(v / 2**20, 4) for k, v in growth.items()})
    assert 0 < growth["ours"] <= 1.03 * growth["torch"], growth


# Peak of one cell step's forward+backward from a zero state with an input that needs no gradient (the first step
# of a decoder fed precomputed features), ours / torch.nn's, B128 H128: at most these. Before the backward skipped
# the gradients nobody asked for and allocated its results after the loop's workspaces, LSTMCell / GRUCell /
# RNNCell: 1.60 / 1.63 / 1.40 (zero states passed as hx); this test now measures 1.33 / 1.46 / 1.00 with the GEMMs on
# BLAS. What remains for LSTM and GRU is the step's reserve, which the graph node holds until its backward returns,
# while torch.nn's unfused step frees its gate values as its own nodes finish.
ONE_STEP_PEAK_BOUND = {"LSTMCell": 1.36, "GRUCell": 1.48, "RNNCell": 1.01}
# With the GEMMs on oneDNN's matmul (the default on AMD CPUs with AVX-512), oneDNN's own transient buffers come on
# top (AMD EPYC Zen 4, 2 threads: 1.60 / 1.46 / 1.20, from the profiler's allocation events: 64 KiB a forward input
# projection, and in LSTM's backward a copy of the step's [B, 4H] gate gradients for each weight-gradient product,
# its transposed left operand). Kept: the layers' peaks stay far below torch.nn's there (0.35-0.92x over the bench's
# targets) and oneDNN's backward is 5-8% faster on that CPU (layer_backward.cpp, bwd_onednn).
ONE_STEP_PEAK_BOUND_ONEDNN = {"LSTMCell": 1.63, "GRUCell": 1.48, "RNNCell": 1.23}


@pytest.mark.skipif("cpu" not in fusedrnn.available_backends(), reason="the cpu backend is not built")
@pytest.mark.parametrize("library", ["blas", "default"])
@pytest.mark.parametrize("kind", sorted(ONE_STEP_PEAK_BOUND))
def test_cpu_one_cell_step_peak_memory(kind, library, monkeypatch):
    from fusedrnn import cpu
    from fusedrnn.bench.metrics import cpu_peak_bytes
    if library == "blas":
        monkeypatch.setenv("FUSEDRNN_CPU_GEMM", "blas")
        bound = ONE_STEP_PEAK_BOUND[kind]
    else:
        monkeypatch.delenv("FUSEDRNN_CPU_GEMM", raising=False)
        if cpu.gemm_library() == "blas":
            pytest.skip("the GEMMs run on BLAS here by default: the blas case covers it")
        bound = ONE_STEP_PEAK_BOUND_ONEDNN[kind]
    ref, ours = make_pair(kind, 128, 128, backend="cpu", dtype=torch.float32)
    x = torch.randn(128, 128, generator=torch.Generator().manual_seed(0))

    def step(module):
        out = module(x)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        module.zero_grad(set_to_none=True)

    peaks = []
    for module in (ref, ours):
        step(module)
        peaks.append(cpu_peak_bytes(lambda: step(module)))
    theirs, mine = peaks
    if theirs is None:
        pytest.skip("this torch build's profiler reports no allocation events")
    print(f"{kind}: peak {mine / 2**10:.1f} KiB, torch.nn {theirs / 2**10:.1f} KiB ({mine / theirs:.3f}x)")
    assert 0 < mine <= bound * theirs
