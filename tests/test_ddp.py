"""Distributed data parallel training with fusedrnn modules: two CPU processes (gloo, 127.0.0.1 only) each train on
half of every batch; the result must equal one process training on the whole batch (mean loss).

One spawn serves both tests: DDP, then FSDP2 `fully_shard` (parameters sharded across the two ranks, gathered
around each forward/backward) in the same worker, because starting processes is the slow part."""
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import fusedrnn

STEPS, B, T, I, H = 3, 8, 6, 4, 5


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = fusedrnn.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True, backend="reference")
        self.head = nn.Linear(2 * H, 1)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


def _data():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(B, T, I, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    ys = [torch.randn(B, 1, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    return xs, ys


def _fresh_model():
    torch.manual_seed(0)
    return _Model().double()


def _train(model, xs, ys, rows):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        loss = ((model(x[rows]) - y[rows]) ** 2).mean()
        loss.backward()
        opt.step()


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        xs, ys = _data()
        half = slice(rank * B // world, (rank + 1) * B // world)
        ddp = DDP(_fresh_model())
        _train(ddp, xs, ys, half)
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in ddp.module.state_dict().items()},
                       os.path.join(out_dir, "ddp.pt"))
        result = {}
        try:
            from torch.distributed.fsdp import fully_shard
            model = _fresh_model()
            fully_shard(model.rnn)
            fully_shard(model)
            _train(model, xs, ys, half)
            full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                    for k, v in model.state_dict().items()}
            result = {"ok": True, "state": full}
        except Exception as e:  # reported to the test, which fails with the reason
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "fsdp.pt"))
        # Both ranks are done with every collective before either leaves: gloo aborts a process whose peer closes
        # the connection while it still has work in flight.
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # The results are on disk and no collective is in flight on either rank. Leave without tearing the process group
    # down: gloo's teardown at exit aborted rank 0 in two CI runs ("terminate called without an active exception"),
    # the second with the barrier above already in place, while about 80 runs on a 2-core machine here never did. That
    # teardown is torch.distributed's, not the code under test; os._exit skips it and the interpreter's finalisation.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    xs, ys = _data()
    single = _fresh_model()
    _train(single, xs, ys, slice(0, B))
    return single.state_dict(), torch.load(out / "ddp.pt"), torch.load(out / "fsdp.pt")


def _assert_same(ours, want):
    assert ours.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(ours[k], want[k], rtol=1e-10, atol=1e-12, msg=k)


def test_ddp_two_processes_equal_one_process_on_the_whole_batch(distributed_results):
    single, ddp, _ = distributed_results
    start = _fresh_model().state_dict()
    assert any(not torch.equal(single[k], start[k]) for k in start)  # training moved the weights
    _assert_same(ddp, single)


def test_fsdp2_fully_shard_two_processes_equal_one_process(distributed_results):
    single, _, fsdp = distributed_results
    assert fsdp["ok"], fsdp.get("error")
    _assert_same(fsdp["state"], single)
