"""Interleaved timing: several rounds, each running every implementation once (ABAB...), medians and spreads.

Nothing here knows about RNNs: an implementation is a `prepare()` callable that, outside the timed region, builds
fresh inputs and returns the zero-argument callable to time. `clock` and `sync` are injectable so the logic is
tested with a fake clock.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method) of a non-empty list."""
    s = sorted(xs)
    if not s:
        raise ValueError("quantile of an empty list")
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(times: list[float]) -> dict:
    """Median, quartiles, IQR, min, max, mean and count of a list of seconds."""
    if not times:
        raise ValueError("no samples")
    q1, q3 = quantile(times, 0.25), quantile(times, 0.75)
    return {
        "median": statistics.median(times),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "min": min(times),
        "max": max(times),
        "mean": statistics.fmean(times),
        "n": len(times),
        "samples": list(times),
    }


def interleaved(
    impls: dict[str, Callable[[], Callable[[], object]]],
    *,
    rounds: int = 5,
    warmup: int = 1,
    min_rounds: int = 3,
    budget_s: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
    sync: Callable[[], None] | None = None,
    rotate: bool = True,
    on_round: Callable[[int, int], None] | None = None,
) -> dict[str, list[float]]:
    """Time every implementation `rounds` times, interleaved, after `warmup` untimed calls each.

    impls: name -> prepare(); prepare() runs untimed (fresh inputs, cleared grads) and returns fn; fn() is timed.
    Round r runs the implementations in order rotated by r (A B C, B C A, ...) when `rotate`, so none always runs
    first or right after a given other. `sync()` (e.g. torch.cuda.synchronize) is called before starting and
    before stopping the clock. With `budget_s`, rounds stop once `min_rounds` are done and the time spent in timed
    calls exceeds the budget. Returns name -> list of seconds per call, in round order.
    """
    names = list(impls)
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for name in names:
            fn = impls[name]()
            sync()
            fn()
            sync()
    out: dict[str, list[float]] = {n: [] for n in names}
    spent = 0.0
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)] if rotate and names else names
        for name in order:
            fn = impls[name]()
            sync()
            t0 = clock()
            fn()
            sync()
            dt = clock() - t0
            out[name].append(dt)
            spent += dt
        if on_round:
            on_round(r + 1, rounds)
        if budget_s is not None and r + 1 >= min_rounds and spent > budget_s:
            break
    return out


def ratio_samples(base: list[float], other: list[float]) -> list[float]:
    """Per-round speed-ups base/other (same round, so a load burst hits both); pairs up to the shorter list."""
    return [b / o for b, o in zip(base, other) if o > 0]
