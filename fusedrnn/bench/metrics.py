"""What each case reports besides time: GEMM flop count, relative errors, memory (saved for backward, peak)."""
from __future__ import annotations

import contextlib
import os
import sys

import torch

GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def gemm_flops(cell: str, tokens: int, I: int, H: int, layers: int = 1, D: int = 1, proj: int = 0,
               mode: str = "fwd") -> int:
    """GEMM flops of one call (2 per multiply-add), elementwise work not counted.

    Per layer and direction, for N = `tokens` rows: input projection 2*N*I_l*G*H, recurrence 2*N*P*G*H and, with a
    projection, 2*N*H*P, where I_l = I for layer 0 and D*P above it. Forward + backward counts 3x the forward
    (the backward does two GEMMs of the same size per forward GEMM: one for the input grad, one for the weight grad).
    """
    G = GATES[cell]
    P = proj if proj else H
    total = 0
    for layer in range(layers):
        i_l = I if layer == 0 else D * P
        per_dir = 2 * tokens * i_l * G * H + 2 * tokens * P * G * H
        if proj:
            per_dir += 2 * tokens * H * P
        total += D * per_dir
    if mode == "fwdbwd":
        total *= 3
    elif mode != "fwd":
        raise ValueError(f"unknown mode {mode!r}")
    return total


ELEM_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def recurrent_bytes(cell: str, H: int, proj: int, dtype: str) -> int:
    """Bytes of one direction's recurrent weights, which every step of a layer's loop has to read: W_hh [G*H, P]
    and, with a projection, W_hr [P, H], in the layer's dtype (the least any implementation could stream)."""
    P = proj if proj else H
    return (GATES[cell] * H * P + (H * P if proj else 0)) * ELEM_BYTES[dtype]


def probe_bytes(case: dict, threads: int) -> int:
    """Bytes a thread streams a step when the threads share a layer's recurrent weights (every direction's) evenly:
    the buffer size a thread of the cache read-bandwidth probe (fusedrnn.cpu.read_bandwidth) reads."""
    D = 2 if case["bidirectional"] else 1
    total = D * recurrent_bytes(case["cell"], case["H"], case["proj"], case["dtype"])
    return -(-total // max(1, threads))


def floor_seconds(case: dict, mode: str, peak_gflops: float, read_gbs: float | None = None) -> float:
    """The least time a call can take on this machine: every GEMM flop at the GEMM peak and, where read_gbs (the
    threads' measured read bandwidth for the recurrent weights' size) is given, each layer's time loop no faster
    than streaming its recurrent weights once a step (twice for forward+backward: the backward's loop multiplies
    by them again). Everything else (gates, synchronisation) counts as free, so the time is a floor and
    torch.nn's time over it bounds any implementation's speed-up.

    Per layer the loop's products (2 * tokens * (G*H*P + H*P with a projection) per direction and loop) are the
    flops that wait on the previous step; its floor is the larger of those flops at the peak and T steps (the
    longest sequence) of D directions' weight bytes at read_gbs. (Max of the sums, not the sum of per-step maxima:
    a lower floor, so still a bound, where packed steps have fewer rows.) The remaining flops (input projections,
    the backward's weight and input gradients) run at the peak."""
    cell, H, proj, dtype = case["cell"], case["H"], case["proj"], case["dtype"]
    D = 2 if case["bidirectional"] else 1
    P = proj if proj else H
    loops = 1 if mode == "fwd" else 2
    peak = peak_gflops * 1e9
    total = gemm_flops(cell, case["tokens"], case["I"], H, case["layers"], D, proj, mode)
    loop_flops = loops * D * 2 * case["tokens"] * (GATES[cell] * H * P + (H * P if proj else 0))
    loop_s = loop_flops / peak
    if read_gbs:
        loop_s = max(loop_s, loops * case["T"] * D * recurrent_bytes(cell, H, proj, dtype) / (read_gbs * 1e9))
    return (total - case["layers"] * loop_flops) / peak + case["layers"] * loop_s


def rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a - ref| / max|ref| (computed in float64); 0 for two empty tensors, inf on shape mismatch or NaN."""
    if a.shape != ref.shape:
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    a64 = a.detach().to(torch.float64).cpu()
    r64 = ref.detach().to(torch.float64).cpu()
    diff = (a64 - r64).abs().max().item()
    scale = r64.abs().max().item()
    if diff != diff:  # NaN anywhere
        return float("inf")
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def max_rel_error(named: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str | None, dict]:
    """Largest rel_error over the tensors of `ref` (missing in `named` counts as inf): (worst, its name, all)."""
    per = {}
    for k, r in ref.items():
        per[k] = rel_error(named[k], r) if k in named and named[k] is not None else float("inf")
    if not per:
        return 0.0, None, per
    worst = max(per, key=lambda k: per[k])
    return per[worst], worst, per


@contextlib.contextmanager
def _quiet_stderr():
    """The Kineto profiler prints start/stop lines on fd 2; hide them so they do not break the progress bar."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def cpu_peak_bytes(fn) -> int | None:
    """Peak of bytes allocated (net, above the level at entry) on the CPU while fn() runs, from the profiler's
    allocation events; None where this torch build does not expose them."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
        events = prof.profiler.kineto_results.events()
        mem = sorted((e for e in events if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")),
                     key=lambda e: e.start_ns())
    except Exception:  # noqa: BLE001 - profiler internals vary across torch versions
        return None
    cur = peak = 0
    for e in mem:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def cuda_peak_bytes(fn, device) -> int:
    """torch.cuda.max_memory_allocated during fn(), above the allocation at entry."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def saved_for_backward_bytes(fn, exclude: list[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn() runs (fn builds the graph), not
    counting storages shared with `exclude` (the parameters: they exist whether or not a backward follows)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            ptr = s.data_ptr()
            if ptr not in skip:
                seen[ptr] = s.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. fake/sparse)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
