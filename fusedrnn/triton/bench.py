"""Benchmark hook for the triton backend on CUDA: `python -m fusedrnn.triton.bench` (or `run(configs)` from code).

Times one layer, forward and forward+backward, of fusedrnn (backend="triton") against torch.nn (cuDNN) with the same
parameters, using CUDA events. Each config: (mode, T, B, I, H, dtype). `device="cpu"` (under TRITON_INTERPRET, against
torch.nn on the CPU, wall-clock timing) exists only to smoke-test this file without a GPU.
"""
from __future__ import annotations

import time

import torch

DEFAULT_CONFIGS = [
    ("lstm", 1024, 16, 768, 768, torch.bfloat16),
    ("lstm", 256, 64, 512, 512, torch.float16),
    ("gru", 256, 64, 512, 512, torch.float16),
    ("lstm", 128, 32, 1024, 1024, torch.float32),
]


def _time_ms(fn, warmup: int, iters: int, device: str = "cuda") -> float:
    for _ in range(warmup):
        fn()
    if device != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def run(configs=None, warmup: int = 3, iters: int = 10, device: str = "cuda") -> list[dict]:
    """One dict per config: triton/cudnn forward and forward+backward times (ms) and the max relative difference of
    the outputs (a sanity check that both computed the same thing)."""
    import fusedrnn

    rows = []
    for mode, T, B, I, H, dtype in configs or DEFAULT_CONFIGS:
        kind, kw = {"lstm": ("LSTM", {}), "gru": ("GRU", {}), "rnn_tanh": ("RNN", {"nonlinearity": "tanh"}),
                    "rnn_relu": ("RNN", {"nonlinearity": "relu"})}[mode]
        ref = getattr(torch.nn, kind)(I, H, **kw).to(device, dtype)
        ours = getattr(fusedrnn, kind)(I, H, backend="triton", **kw).to(device, dtype)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(T, B, I, device=device, dtype=dtype, requires_grad=True)
        row = {"mode": mode, "T": T, "B": B, "I": I, "H": H, "dtype": str(dtype).replace("torch.", "")}
        for name, m in (("triton", ours), ("cudnn", ref)):
            with torch.no_grad():
                row[f"{name}_fwd_ms"] = _time_ms(lambda: m(x), warmup, iters, device)

            def fwdbwd():
                m(x)[0].sum().backward()
            row[f"{name}_fwdbwd_ms"] = _time_ms(fwdbwd, warmup, iters, device)
        with torch.no_grad():
            a, b = ours(x)[0].float(), ref(x)[0].float()
        row["max_rel_err_vs_cudnn"] = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        rows.append(row)
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
