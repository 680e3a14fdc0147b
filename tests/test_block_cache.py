"""The cpu backend's block cache (csrc/cpu/block_cache.h): a layer's buffers of 64 KiB or more (the training
forward's reserve and y, the backward's weight gradients and grad_x, the loops' workspaces) come from it and go back
to it when freed, so a training loop reuses them instead of mapping and zeroing fresh pages every step. Results are
bitwise those without it, a block is reused (a reserve, weight gradients freed by zero_grad), small buffers bypass
it, the cache stays bounded and can be emptied, FUSEDRNN_CPU_CACHE=0 bypasses it, the tensors are ordinary
(resizable) ones, the profiler sees the blocks while they are in use, and the debug mode on a reused block gives
the plain mode's results."""
import pytest
import torch

import fusedrnn
from fusedrnn.bench import metrics

pytestmark = pytest.mark.skipif("cpu" not in fusedrnn.available_backends(), reason="the cpu backend is not built")

MIB = 1 << 20
# LSTM T500 B32 H128 float32: reserve [1, 16000, 640] = 41 MB; y and grad_x 8 MB
T, B, H = 500, 32, 128


@pytest.fixture
def cache():
    from fusedrnn import cpu
    cpu.empty_cache()
    yield cpu
    cpu.empty_cache()


def _forward(train=True, dtype=torch.float32, seed=0, T=T, B=B, H=H):
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


@pytest.mark.parametrize("T,B,H", [(T, B, H), (100, 1, 256)])  # (1 MiB weight gradients)
def test_results_bitwise_the_same_with_and_without_the_cache(cache, monkeypatch, T, B, H):
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
    ptr, nbytes = reserve.data_ptr(), reserve.numel() * 4
    before = cache.cache_info()  # (the call's workspaces and the dropped y are back already)
    del reserve
    info = cache.cache_info()
    assert info["idle_blocks"] == before["idle_blocks"] + 1 and info["idle_bytes"] == before["idle_bytes"] + nbytes
    again = _forward(seed=1)[3]
    assert again.data_ptr() == ptr
    del again
    assert cache.empty_cache() >= nbytes
    assert cache.cache_info()["idle_bytes"] == 0 and cache.cache_info()["idle_blocks"] == 0


def test_freed_weight_gradients_are_the_next_steps_blocks(cache):
    """A training loop's zero_grad(set_to_none=True) frees the weight gradients (1 MiB each here): they go back to
    the cache, and the next backward takes its gradients from it (the cache holds as much after each step: no
    block more) rather than from fresh pages."""
    torch.manual_seed(0)
    m = fusedrnn.LSTM(256, 256, backend="cpu")
    x = torch.randn(20, 1, 256)
    assert sum(p.numel() * 4 >= cache.cache_info()["min_block_bytes"] for p in m.parameters()) == 2
    after = []
    for _ in range(3):
        m(x)[0].sum().backward()
        held = cache.cache_info()
        m.zero_grad(set_to_none=True)
        now = cache.cache_info()
        assert now["idle_blocks"] == held["idle_blocks"] + 2 and now["idle_bytes"] >= held["idle_bytes"] + (2 << 20)
        after.append((now["idle_blocks"], now["idle_bytes"]))
    assert after[0] == after[1] == after[2]


def test_small_buffers_bypass_it(cache):
    fusedrnn.LSTM(8, 8, backend="cpu")(torch.randn(5, 2, 8))[0].sum().backward()  # every buffer under 64 KiB
    assert cache.cache_info()["idle_blocks"] == 0


def test_bounded_in_blocks(cache):
    info = cache.cache_info()
    most = info["max_idle_blocks"]
    small = dict(T=20, B=4, H=64)  # reserve [1, 80, 320] float32: 100 KiB
    nbytes = 20 * 4 * 5 * 64 * 4
    assert nbytes >= info["min_block_bytes"]
    reserves = [_forward(seed=s, **small)[3] for s in range(most + 6)]  # more blocks in use at once than it keeps
    assert len({r.data_ptr() for r in reserves}) == most + 6
    del reserves
    info = cache.cache_info()
    assert info["limit_bytes"] <= 2 << 30  # (an eighth of the machine's memory, 2 GiB at most)
    assert info["idle_blocks"] == min(most, info["limit_bytes"] // nbytes)


def test_bounded_in_bytes(cache):
    """The least recently returned blocks go first once the idle bytes would pass the limit (an eighth of the
    machine's memory, 2 GiB at most: reached here before the block bound, 53 reserves of 41 MB at most)."""
    info = cache.cache_info()
    nbytes = T * B * 5 * H * 4
    n = info["limit_bytes"] // nbytes + 1
    assert n <= info["max_idle_blocks"]
    reserves = [_forward(seed=s)[3] for s in range(n)]
    del reserves
    info = cache.cache_info()
    assert info["idle_bytes"] <= info["limit_bytes"]


def test_switched_off(cache, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_CACHE", "0")
    reserve = _forward()[3]
    del reserve
    assert cache.cache_info()["idle_blocks"] == 0


def test_cached_tensors_are_ordinary_resizable_tensors(cache):
    reserve = _forward()[3]
    st = reserve.untyped_storage()
    assert st.resizable() and reserve.is_contiguous() and reserve.device.type == "cpu"
    before, idle = reserve.clone(), cache.cache_info()["idle_blocks"]
    reserve.resize_(reserve.numel() + 1000)  # a new block from torch's allocator; the cached one goes back
    assert torch.equal(reserve[:before.numel()], before.flatten())
    assert cache.cache_info()["idle_blocks"] == idle + 1


def test_the_profiler_counts_a_cached_block_while_it_is_used(cache):
    nbytes = T * B * 5 * H * 4
    fresh = metrics.cpu_peak_bytes(_forward)
    if fresh is None:
        pytest.skip("this torch build's profiler reports no allocation events")
    assert cache.cache_info()["idle_blocks"] >= 1  # the reserve came back when the call's results were dropped
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
        os._exit(0 if r.numel() == T * B * 5 * H else 1)
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
sys.exit(0 if cpu.cache_info()["idle_blocks"] >= 1 else "the parent's cache lost its blocks")
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
