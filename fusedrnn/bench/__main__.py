"""Command line: python -m fusedrnn.bench --help"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

from . import harness, machine, plots, report
from .cases import CELLS, build_grid
from .progress import Progress

PRESETS = {
    # rounds (max), min_rounds, warmup, budget_s of timed calls per (case, mode)
    "quick": dict(rounds=5, min_rounds=3, warmup=1, budget_s=2.0),
    "full": dict(rounds=15, min_rounds=5, warmup=2, budget_s=10.0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m fusedrnn.bench",
        description="Benchmark every available fusedrnn backend against torch.nn (cuDNN on CUDA, oneDNN/ATen on "
                    "the CPU): interleaved timing, GFLOP/s, memory, errors vs float64; writes report.md, "
                    "results.json and plots into --out.",
        epilog="Also: python -m fusedrnn.bench.readme RESULTS.json (README section), "
               "python -m fusedrnn.bench.compare OLD.json NEW.json.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small grid, few rounds (a few minutes on a 2-core CPU)")
    g.add_argument("--full", action="store_true", help="the whole grid (default)")
    p.add_argument("--device", default=None, help="cpu or cuda[:k] (default: cuda if available, else cpu)")
    p.add_argument("--backends", default=None,
                   help="comma-separated fusedrnn backends (default: all available); torch.nn always runs")
    p.add_argument("--cells", default=",".join(CELLS), help="comma-separated subset of lstm,gru,rnn")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated (default: float32 on CPU; float32,float16,bfloat16 on CUDA)")
    p.add_argument("--filter", default=None, help="only cases whose id contains this text (e.g. lstm-T100-B16)")
    p.add_argument("--targets", action="store_true",
                   help="only the cases with a speed target (CPU: issue 3's list; a few minutes on 2 cores)")
    p.add_argument("--out", default="bench-out", help="output folder (default: bench-out/)")
    p.add_argument("--compare", default=None, metavar="OLD_JSON", help="print the change against an earlier run")
    p.add_argument("--rounds", type=int, default=None, help="max interleaved rounds per case and mode")
    p.add_argument("--min-rounds", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed calls per case and mode after which rounds stop (>= min-rounds)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--reference-everywhere", action="store_true",
                   help="time the (slow) reference backend on every case, also in --quick")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--no-errors", action="store_true", help="skip the float64 error check")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # torch.nn says once per process that it falls back from oneDNN; the report shows the times instead
    warnings.filterwarnings("ignore", message=".*not supported with oneDNN.*")
    preset = "quick" if args.quick else "full"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    bad = [c for c in cells if c not in CELLS]
    if bad:
        print(f"error: unknown cell(s) {bad}; choose from {list(CELLS)}", file=sys.stderr)
        return 2
    dtypes = [d.strip() for d in args.dtypes.split(",")] if args.dtypes else None
    cases = build_grid(preset, device.type, cells, dtypes, reference_everywhere=args.reference_everywhere)
    if args.filter:
        cases = [c for c in cases if args.filter in c.id]
    if args.targets:
        cases = [c for c in cases if c.target]
    avail = harness.available_backends()
    if args.backends is None:  # those that run on this device (e.g. not triton on the CPU)
        backends = [b for b in avail if any(harness.backend_supports(b, c, device)[0] for c in cases)]
    else:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        missing = [b for b in backends if b not in avail]
        if missing:
            print(f"error: backend(s) {missing} not available here (available: {avail})", file=sys.stderr)
            return 2
    if args.list:
        for c in cases:
            print(c.id, ",".join(c.groups), "target" if c.target else "", "ref" if c.reference else "")
        print(f"{len(cases)} cases, backends {backends}")
        return 0
    if not harness.fused_api():
        print("note: fusedrnn.LSTM/GRU/RNN are not importable; measuring torch.nn only", file=sys.stderr)
    old = None
    if args.compare:
        with open(args.compare) as f:
            old = json.load(f)
    os.makedirs(args.out, exist_ok=True)
    settings_kw = dict(PRESETS[preset])
    for k, v in (("rounds", args.rounds), ("min_rounds", args.min_rounds), ("warmup", args.warmup),
                 ("budget_s", args.budget)):
        if v is not None:
            settings_kw[k] = v
    settings = harness.Settings(**settings_kw, memory=not args.no_memory, errors=not args.no_errors)
    t0 = time.perf_counter()
    info = machine.machine_info(device)
    print(f"fusedrnn bench ({preset}) on {info['device_name']} [{device}], torch {info['torch']}, "
          f"{info['threads']} threads; {len(cases)} cases; backends {backends or 'none'}", file=sys.stderr)
    dtypes_used = sorted({c.dtype for c in cases})
    peaks = {}
    for dt in dtypes_used:
        peaks[dt] = machine.gemm_peak(device, getattr(torch, dt))
        print(f"GEMM peak {dt}: {peaks[dt]['gflops']:.0f} GFLOP/s ({peaks[dt]['library']})", file=sys.stderr)
    case_dicts = [c.as_dict() for c in cases]
    bw = machine.read_bandwidth(device, case_dicts)
    if bw:
        vals = list(bw["sizes"].values())
        print(f"cache read bandwidth: {min(vals):.0f}-{max(vals):.0f} GB/s ({len(vals)} sizes, {bw['threads']} "
              f"threads)", file=sys.stderr)
    config = {"preset": preset, "device": str(device), "backends": backends, "cells": cells,
              "dtypes": dtypes_used, "argv": sys.argv[1:] if argv is None else list(argv), "filter": args.filter}
    prog = Progress(len(cases), enabled=None if not args.no_progress else False)
    if args.no_progress:
        prog = None
    json_path = os.path.join(args.out, "results.json")

    def checkpoint(partial):
        _dump(partial, json_path)

    res = harness.run_suite(cases, backends, device, settings, machine=info, gemm_peak=peaks, config=config,
                            progress=prog, seed=args.seed, checkpoint=checkpoint)
    res["machine"]["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    # The peak again after the run, the better of the two kept: a shared machine's speed drifts, and a peak measured
    # while it was slow would put torch.nn above 100% of it and every ceiling too low.
    for dt in dtypes_used:
        end = machine.gemm_peak(device, getattr(torch, dt))
        start = peaks[dt]
        best = dict(end if end["gflops"] > start["gflops"] else start)
        best["gflops_start"], best["gflops_end"] = start["gflops"], end["gflops"]
        peaks[dt] = best
        print(f"GEMM peak {dt} after the run: {end['gflops']:.0f} GFLOP/s; using {best['gflops']:.0f}",
              file=sys.stderr)
    harness.apply_gemm_peak(res, peaks)
    # The read bandwidth again too, the better kept size by size (the ceilings' other bound, floor_seconds).
    if bw:
        bw = machine.best_bandwidth(bw, machine.read_bandwidth(device, case_dicts))
        res["cache_bandwidth"] = bw
    _dump(res, json_path)
    made, note = ([], "plots skipped (--no-plots)") if args.no_plots else plots.make_plots(res, args.out)
    if note and not args.no_plots:
        print(note, file=sys.stderr)
    cmp_text = report.compare(old, res) if old is not None else None
    report.write_report(res, os.path.join(args.out, "report.md"), made, note, cmp_text)
    tgt = report.targets_table(res)
    if tgt:
        print("\n" + tgt.split("\n", 1)[0])
    if cmp_text:
        print("\n" + cmp_text)
    print(f"\nwrote {args.out}/report.md, results.json and {len(made)} plots in {time.perf_counter() - t0:.0f} s")
    return 0


def _dump(res: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
