"""The cpu backend's cache of large buffers (csrc/cpu/block_cache.h): a layer's buffers of 32 MiB or more (the
training forward's reserve, y, the backward's grad_x) come from it and go back to it when freed, so a training loop
reuses them instead of mapping and zeroing fresh pages every step. Results are bitwise those without it, a block is
reused, the cache stays bounded and can be emptied, FUSEDRNN_CPU_CACHE=0 bypasses it, the tensors are ordinary
(resizable) ones, the profiler sees the blocks while they are in use, and the debug mode on a reused block gives
the plain mode's results."""
import pytest
import torch

import fusedrnn
from fusedrnn.bench import metrics

pytestmark = pytest.mark.skipif("cpu" not in fusedrnn.available_backends(), reason="the cpu backend is not built")

MIB = 1 << 20
# LSTM T500 B32 H128 float32: reserve [1, 16000, 640] = 41 MB (cached); y and grad_x 8 MB (not)
T, B, H = 500, 32, 128


@pytest.fixture
def cache():
    from fusedrnn import cpu
    cpu.empty_cache()
    yield cpu
    cpu.empty_cache()


def _forward(train=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T * B, H, generator=g, dtype=dtype)
    w = [torch.randn(4 * H, H, generator=g, dtype=dtype) * 0.1 for _ in range(2)]
    b = [torch.randn(4 * H, generator=g, dtype=dtype) * 0.1 for _ in range(2)]
    hx = torch.zeros(1, B, H, dtype=dtype)
    bs = torch.full((T,), B, dtype=torch.int64)
    return torch.ops.fusedrnn.cpu_rnn_forward("lstm", x, bs, hx, hx.clone(), w + b, True, 1, train)


def _train_step(m, x):
    x = x.clone().requires_grad_()
    y, (h, c) = m(x)
    (y.square().sum() + h.sum() + c.sum()).backward()
    out = [y.detach(), h.detach(), c.detach(), x.grad] + [p.grad.clone() for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    return out


def test_results_bitwise_the_same_with_and_without_the_cache(cache, monkeypatch):
    torch.manual_seed(0)
    m = fusedrnn.LSTM(H, H, backend="cpu")
    x = torch.randn(T, B, H)
    first, reused = _train_step(m, x), _train_step(m, x)  # the second step runs on the first's blocks
    assert cache.cache_info()["idle_blocks"] >= 1
    monkeypatch.setenv("FUSEDRNN_CPU_CACHE", "0")
    plain = _train_step(m, x)
    for a, b, c in zip(first, reused, plain):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_a_freed_reserve_is_the_next_ones_block(cache):
    reserve = _forward()[3]
    assert reserve.numel() * 4 >= 32 * MIB
    ptr, nbytes = reserve.data_ptr(), reserve.numel() * 4
    assert cache.cache_info()["idle_blocks"] == 0
    del reserve
    info = cache.cache_info()
    assert info["idle_blocks"] == 1 and info["idle_bytes"] == nbytes
    again = _forward(seed=1)[3]
    assert again.data_ptr() == ptr and cache.cache_info()["idle_blocks"] == 0
    del again
    assert cache.empty_cache() == nbytes
    assert cache.cache_info()["idle_bytes"] == 0 and cache.cache_info()["idle_blocks"] == 0


def test_inference_and_small_buffers_bypass_it(cache):
    y = _forward(train=False)[0]  # y 8 MB: under the cache's 32 MiB
    del y
    fusedrnn.LSTM(8, 8, backend="cpu")(torch.randn(5, 2, 8))[0].sum().backward()
    assert cache.cache_info()["idle_blocks"] == 0


def test_bounded_to_eight_idle_blocks(cache):
    reserves = [_forward(seed=s)[3] for s in range(10)]  # ten blocks in use at once
    assert len({r.data_ptr() for r in reserves}) == 10
    del reserves
    info, nbytes = cache.cache_info(), T * B * 5 * H * 4
    kept = min(8, info["limit_bytes"] // nbytes)  # (an eighth of the machine's memory, 2 GiB at most)
    assert info["limit_bytes"] <= 2 << 30
    assert info["idle_blocks"] == kept and info["idle_bytes"] == kept * nbytes


def test_switched_off(cache, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_CACHE", "0")
    reserve = _forward()[3]
    del reserve
    assert cache.cache_info()["idle_blocks"] == 0


def test_cached_tensors_are_ordinary_resizable_tensors(cache):
    reserve = _forward()[3]
    st = reserve.untyped_storage()
    assert st.resizable() and reserve.is_contiguous() and reserve.device.type == "cpu"
    before = reserve.clone()
    reserve.resize_(reserve.numel() + 1000)  # a new block from torch's allocator; the cached one goes back
    assert torch.equal(reserve[:before.numel()], before.flatten())
    assert cache.cache_info()["idle_blocks"] == 1


def test_the_profiler_counts_a_cached_block_while_it_is_used(cache):
    nbytes = T * B * 5 * H * 4
    fresh = metrics.cpu_peak_bytes(_forward)
    if fresh is None:
        pytest.skip("this torch build's profiler reports no allocation events")
    assert cache.cache_info()["idle_blocks"] == 1  # the reserve came back when the call's results were dropped
    reused = metrics.cpu_peak_bytes(_forward)
    assert fresh >= nbytes and reused >= nbytes
    assert abs(fresh - reused) < MIB


def test_debug_mode_on_a_reused_block(cache, monkeypatch):
    """A block that comes back holds the last call's values, plausible ones: the debug mode NaN-fills it as it
    fills a fresh one (fresh_buffer, common.h), and the results are those of the plain mode."""
    plain = [t.clone() for t in _forward(seed=1)]
    monkeypatch.setenv("FUSEDRNN_DEBUG_NAN", "1")
    first = _forward()[3]
    ptr = first.data_ptr()
    del first
    again = _forward(seed=1)
    assert again[3].data_ptr() == ptr
    for a, b in zip(again, plain):
        assert torch.equal(a, b)


_FORK_SCRIPT = """
import os, signal, sys, time
import torch
from fusedrnn import cpu
sys.path.insert(0, sys.argv[1])
from test_block_cache import _forward, T, B, H
_forward()  # one idle block (the results are dropped at once), inherited by the children
for _ in range(3):
    pid = os.fork()
    if pid == 0:  # child: one thread (libgomp's pool does not survive fork), a block from the cache, exit
        torch.set_num_threads(1)
        r = _forward(seed=2)[3]
        os._exit(0 if r.numel() == T * B * 5 * H and cpu.cache_info()["idle_blocks"] == 0 else 1)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            sys.exit("the forked child hangs")
        time.sleep(0.01)
    if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
        sys.exit(f"the forked child failed: status {status}")
    _forward(seed=3)  # the parent's cache still works after the fork
sys.exit(0 if cpu.cache_info()["idle_blocks"] == 1 else "the parent's cache lost its block")
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_fork_leaves_the_cache_usable_in_parent_and_child():
    """The cache's lock is taken around every fork (pthread_atfork), so a child forked while another thread is
    inside the cache does not inherit it locked. Here (in a process of its own, so that a hang cannot stall the
    suite) both sides use the cache after each of three forks: the child takes the block it inherited, the parent
    goes on (a fork handler that left the lock held would hang either)."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        r = subprocess.run([sys.executable, "-c", _FORK_SCRIPT, here], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("the forking process hangs")
    assert r.returncode == 0, r.stdout + r.stderr
