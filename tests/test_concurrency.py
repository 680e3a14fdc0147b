"""Concurrency, for every available backend: one module called from 4 threads at once (each thread its own input,
forward and backward through torch.autograd.grad, so nothing is accumulated in shared .grad) gives the results of
single-threaded calls; and the cpu backend's kernels release the GIL (a Python thread keeps counting while a long
kernel runs)."""
import threading
import time

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from conftest import conformance_backends
from helpers import make_pair


@pytest.fixture
def two_threads():
    """torch on 2 threads for the test (the small-batch loops' usual split), restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def assert_sequence_matches(ref, ours, x):
    """torch.nn's module and ours on the same float64 sequence x (a weighted sum of y as the loss): y, x's gradient
    and every parameter's gradient agree to float64 rounding."""
    outs = []
    for m in (ref, ours):
        xx = x.clone().requires_grad_()
        y, _ = m(xx)
        (y * torch.linspace(-1, 1, y.shape[-1], dtype=torch.float64)).sum().backward()
        outs.append([y, xx.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)

N_THREADS = 4


def _work(module, x, lengths):
    """Packed input of its own lengths, outputs and gradients w.r.t. the input and every parameter."""
    x = x.clone().requires_grad_()
    out, hidden = module(pack_padded_sequence(x, lengths, enforce_sorted=False))
    hs = hidden if isinstance(hidden, tuple) else (hidden,)
    loss = out.data.square().sum() + sum(h.sum() for h in hs)
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    return [out.data.detach(), *(h.detach() for h in hs), *grads]


@pytest.mark.parametrize("backend", conformance_backends())
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_four_threads_give_single_thread_results(backend, kind):
    _, m = make_pair(kind, 5, 12, num_layers=2, bidirectional=True, backend=backend)
    g = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(12, 2 + k, 5, generator=g, dtype=torch.float64),
               [12 - 2 * j for j in range(2 + k)]) for k in range(N_THREADS)]
    expected = [_work(m, x, ls) for x, ls in inputs]
    results, errors = [None] * N_THREADS, []
    barrier = threading.Barrier(N_THREADS)

    def run(k):
        try:
            barrier.wait()
            for _ in range(2):  # two rounds after a common start, so the calls really overlap
                results[k] = _work(m, *inputs[k])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hangs"
    assert not errors, errors
    for k in range(N_THREADS):
        for i, (a, b) in enumerate(zip(results[k], expected[k])):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"thread {k} tensor {i}")


@pytest.mark.skipif("cpu" not in fusedrnn.available_backends(),
                    reason="the cpu backend (C++ extension) is not built: pip install --no-build-isolation -e .")
def test_cpu_kernels_release_the_gil():
    """While one long forward+backward runs on the cpu backend, a Python thread keeps counting at a good fraction
    of its solo rate. With the GIL held through the kernels it would count only in the short Python gaps."""
    _, m = make_pair("LSTM", 16, 64, backend="cpu", dtype=torch.float32)
    x = torch.randn(3000, 1, 16, requires_grad=True)
    stop, count = threading.Event(), [0]

    def counter():
        while not stop.is_set():
            count[0] += 1

    def solo_rate(seconds=0.2):
        stop.clear()
        count[0] = 0
        t = threading.Thread(target=counter)
        t.start()
        time.sleep(seconds)  # the main thread sleeps: the counter has the GIL to itself
        stop.set()
        t.join()
        return count[0] / seconds

    base = solo_rate()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # leave the second core to the counter
    try:
        m(x)[0].sum().backward()  # warm-up
        stop.clear()
        count[0] = 0
        t = threading.Thread(target=counter)
        t.start()
        time.sleep(0.01)
        t0, c0 = time.perf_counter(), count[0]
        for _ in range(3):
            out, _ = m(x)
            out.sum().backward()
        elapsed, counted = time.perf_counter() - t0, count[0] - c0
        stop.set()
        t.join()
    finally:
        torch.set_num_threads(threads_before)
    rate = counted / elapsed
    print(f"counter: {rate:.3g}/s while the kernels ran ({elapsed:.2f} s) vs {base:.3g}/s alone")
    assert rate >= 0.1 * base, f"counter ran at {rate / base:.1%} of its solo rate: the kernels hold the GIL"


def _usable_cpus():
    """The CPUs this process can use, as the cpu backend counts them: the affinity mask, capped by a cgroup CPU
    quota (v2 cpu.max, else v1 cfs quota / period), rounded up."""
    import os
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    def cap(quota, period):
        return min(n, -(-quota // period)) if quota > 0 and period > 0 else n

    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        return n if quota == "max" else cap(int(quota), int(period))
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as fq, open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as fp:
            return cap(int(fq.read()), int(fp.read()))
    except (OSError, ValueError):
        return n


@pytest.mark.skipif("cpu" not in fusedrnn.available_backends(), reason="the cpu backend is not built")
@pytest.mark.parametrize("torch_threads", [1, 2, 3, 8])
def test_small_batch_loops_never_use_more_threads_than_cpus(torch_threads, monkeypatch):
    """The barrier loops split into torch's intra-op threads but never more than the usable CPUs (with 8 threads
    on 2 CPUs every step waited for a descheduled thread: LSTM T100 B1 H256 forward 9x slower);
    FUSEDRNN_CPU_THREADS sets the CPU count instead."""
    from fusedrnn import cpu
    before = torch.get_num_threads()
    monkeypatch.delenv("FUSEDRNN_CPU_THREADS", raising=False)
    try:
        torch.set_num_threads(torch_threads)
        assert cpu.loop_threads() == min(torch_threads, _usable_cpus())
        monkeypatch.setenv("FUSEDRNN_CPU_THREADS", "1")
        assert cpu.loop_threads() == 1
        monkeypatch.setenv("FUSEDRNN_CPU_THREADS", "64")
        assert cpu.loop_threads() == torch_threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif("cpu" not in fusedrnn.available_backends(), reason="the cpu backend is not built")
@pytest.mark.parametrize("cpus", ["-", "3", "8"])
@pytest.mark.parametrize("kind,batch", [("LSTM", 1), ("GRU", 24), ("RNN", 3)])
def test_oversubscribed_threads_give_the_same_results(kind, batch, cpus, monkeypatch):
    """torch set to 8 threads: the small-batch loops (H 256: up to 8 hidden slices at batch 1 and 3, batch blocks
    at 24 on 3 threads; both directions) on as many threads as the CPUs allow, or on 3 or 8 whatever the machine
    has (FUSEDRNN_CPU_THREADS), match torch.nn in float64, forward and every gradient."""
    if cpus != "-":
        monkeypatch.setenv("FUSEDRNN_CPU_THREADS", cpus)
    before = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        ref, ours = make_pair(kind, 7, 256, bidirectional=True, backend="cpu")
        x = torch.randn(9, batch, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        assert_sequence_matches(ref, ours, x)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif("cpu" not in fusedrnn.available_backends(), reason="the cpu backend is not built")
@pytest.mark.parametrize("split", ["-", "hidden"])
@pytest.mark.parametrize("kind,H,batch", [("LSTM", 64, 1), ("GRU", 72, 8), ("RNN", 128, 3)])
def test_small_steps_on_one_thread_or_in_slices(kind, H, batch, split, monkeypatch):
    """A step whose product is small (W_hh of at most 16 Ki weights, up to 8 rows) runs on one thread, with no
    barrier, and a cell's input projection of so few weights too (layer_loops.h small_slices, layer.cpp
    small_projection); FUSEDRNN_CPU_SPLIT=hidden keeps the two hidden slices. Either way a bidirectional layer on
    variable lengths and a cell's step match torch.nn in float64, forward and every gradient."""
    if split != "-":
        monkeypatch.setenv("FUSEDRNN_CPU_SPLIT", split)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(2)
        ref, ours = make_pair(kind, H, H, bidirectional=True, backend="cpu")
        x = torch.randn(6, batch, H, dtype=torch.float64, generator=g)
        lengths = [6 - 5 * j // max(1, batch - 1) for j in range(batch)]
        ref_cell, ours_cell = make_pair(kind + "Cell", H, H, backend="cpu")
        xc = torch.randn(batch, H, dtype=torch.float64, generator=g)
        outs = []
        for m, cell in ((ref, ref_cell), (ours, ours_cell)):
            xx, xxc = x.clone().requires_grad_(), xc.clone().requires_grad_()
            y, _ = m(pack_padded_sequence(xx, lengths))
            h = cell(xxc)
            h = h[0] if isinstance(h, tuple) else h
            w = torch.linspace(-1, 1, y.data.shape[-1], dtype=torch.float64)
            ((y.data * w).sum() + (h * w[:H]).sum()).backward()
            outs.append([y.data, h, xx.grad, xxc.grad] + [p.grad for p in (*m.parameters(), *cell.parameters())])
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif("cpu" not in fusedrnn.available_backends(), reason="the cpu backend is not built")
@pytest.mark.parametrize("loop", ["-", "persistent"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_single_steps_and_unpacked_batches_on_gemm(kind, loop, monkeypatch, two_threads):
    """From batch 8, a single step (a cell's) and a short sequence whose W_hh stays unpacked (2N < P) run the
    forward as one GEMM call a step (layer_loops.h forward_steps_on_gemm); FUSEDRNN_CPU_LOOP=persistent keeps the
    persistent loop. Either way cells of 8 rows (W_hh unpacked) and 40 rows (packed, but one step), a bidirectional
    sequence of 2 steps x 12 rows (unpacked) and one of 3 steps x 16 rows at H 16 (packed, the loop's) match torch.nn
    in float64, forward and every gradient."""
    if loop != "-":
        monkeypatch.setenv("FUSEDRNN_CPU_LOOP", loop)
    g = torch.Generator().manual_seed(3)
    for batch, H in ((8, 64), (40, 64)):
        ref, ours = make_pair(kind + "Cell", H, H, backend="cpu")
        x = torch.randn(batch, H, dtype=torch.float64, generator=g)
        hx = torch.randn(batch, H, dtype=torch.float64, generator=g)
        outs = []
        for m in (ref, ours):
            xx, hh = x.clone().requires_grad_(), hx.clone().requires_grad_()
            h = m(xx, (hh, hh * 0.5) if kind == "LSTM" else hh)
            h = h[0] if isinstance(h, tuple) else h
            (h * torch.linspace(-1, 1, H, dtype=torch.float64)).sum().backward()
            outs.append([h, xx.grad, hh.grad] + [p.grad for p in m.parameters()])
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    for T, batch, H in ((2, 12, 128), (3, 16, 16)):
        ref, ours = make_pair(kind, H, H, bidirectional=True, backend="cpu")
        assert_sequence_matches(ref, ours, torch.randn(T, batch, H, dtype=torch.float64, generator=g))
