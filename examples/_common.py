"""Shared bits of the examples: command line, the torch.nn speed comparison, the loss report."""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import fusedrnn


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test, a few seconds)")
    p.add_argument("--steps", type=int, default=None, help="training steps (overrides the default of the mode)")
    p.add_argument("--backend", default="auto", help="fusedrnn backend: auto, reference, cpu, cuda, triton")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


def to_torch_nn(model: nn.Module) -> nn.Module:
    """A copy of `model` with every fusedrnn module replaced by the torch.nn module of the same configuration and
    weights: the baseline for the speed comparison (the reverse of fusedrnn.convert)."""
    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in list(parent._modules.items()):
            for kind in ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"):
                if type(child) is getattr(fusedrnn, kind):
                    kw = {}
                    if kind in ("RNN", "RNNCell"):
                        kw["nonlinearity"] = child.nonlinearity
                    if kind.endswith("Cell"):
                        new = getattr(nn, kind)(child.input_size, child.hidden_size, child.bias, **kw)
                    else:
                        if kind == "LSTM":
                            kw["proj_size"] = child.proj_size
                        new = getattr(nn, kind)(child.input_size, child.hidden_size, child.num_layers, bias=child.bias,
                                                batch_first=child.batch_first, dropout=child.dropout,
                                                bidirectional=child.bidirectional, **kw)
                    new.load_state_dict(child.state_dict())
                    parent._modules[name] = new.to(next(child.parameters()).device).train(child.training)
    return twin


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def speedup(model: nn.Module, step, device, reps: int = 5) -> str:
    """Times `step(m)` (one forward + backward of a batch) for the fusedrnn model and its torch.nn twin, alternating
    the two so that machine load hits both alike; returns the report line with the ratio of the medians."""
    baseline = to_torch_nn(model)
    times = {"fusedrnn": [], "torch.nn": []}
    for m in (model, baseline):  # warm-up (first-call allocations, kernel selection)
        step(m)
    for _ in range(reps):
        for name, m in (("fusedrnn", model), ("torch.nn", baseline)):
            _sync(device)
            t0 = time.perf_counter()
            step(m)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    ours, ref = statistics.median(times["fusedrnn"]), statistics.median(times["torch.nn"])
    return (f"speed-up over torch.nn: {ref / ours:.2f}x (train step: fusedrnn {ours * 1e3:.1f} ms, "
            f"torch.nn {ref * 1e3:.1f} ms, median of {reps} interleaved)")


def report_loss(first: float, last: float) -> None:
    verdict = "decreased" if last < first else "did NOT decrease"
    print(f"loss {verdict}: {first:.4f} -> {last:.4f}")


def banner(name: str, backend: str, device) -> None:
    from fusedrnn.backends import resolve
    used = resolve(backend, torch.device(device), torch.float32, "lstm", False)
    print(f"{name}: fusedrnn {fusedrnn.__version__}, backend {used!r} on {device}, torch {torch.__version__}")
