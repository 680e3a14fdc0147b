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
