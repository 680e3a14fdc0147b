"""A/B of a CPU override that the kernels read at every call (FUSEDRNN_CPU_LOOP, _SPLIT, _DIRS, _PACK, _CHUNK_ROWS):

    python benchmarks/knob_ab.py FUSEDRNN_CPU_CHUNK_ROWS 512 - "LSTM,500,32,128;GRU,100,16,256" [--rounds 30]
        [--mode fwd|fwdbwd] [--threads 2] [--dtype float32|bfloat16|float16|float64]

A case is cell,T,B,H[,key=value...] (I = H; extra keys go to the constructor, e.g. proj_size=64, except packed=1:
a PackedSequence with the lengths of the bench's packed cases, T down to T/4). A value of "-"
leaves the variable unset (the built-in choice). Each round calls the module once with each value, the order
alternating, and the per-round time ratio (first value / second) is what is reported: its median and quartiles.
On a shared machine whose speed drifts, ratios of neighbouring calls resolve a few per cent where separate runs
(or absolute times) do not.
"""
import argparse
import os
import statistics
import time

import torch

import fusedrnn
from fusedrnn.bench.cases import Case


def parse_case(text):
    cell, T, B, H, *extra = text.split(",")
    kw = {k: int(v) for k, v in (e.split("=") for e in extra)}
    return cell, int(T), int(B), int(H), kw


def set_knob(name, value):
    if value == "-":
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("knob")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("cases")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--mode", choices=["fwd", "fwdbwd"], default="fwd")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default="float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    before = os.environ.get(args.knob, "-")
    try:
        run(args)
    finally:
        set_knob(args.knob, before)


def run(args):
    for text in args.cases.split(";"):
        cell, T, B, H, kw = parse_case(text)
        packed = bool(kw.pop("packed", 0))
        torch.manual_seed(0)
        dtype = getattr(torch, args.dtype)
        m = getattr(fusedrnn, cell)(H, H, backend="cpu", **kw).to(dtype)
        x = torch.randn(T, B, H, dtype=dtype)
        if packed:
            lengths = Case(cell.lower(), T, B, H, H, packed=True).lengths()
            x = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths))

        def call():
            if args.mode == "fwd":
                with torch.no_grad():
                    m(x)
            else:
                xx = x.detach().requires_grad_() if not packed else x._replace(data=x.data.detach().requires_grad_())
                y = m(xx)[0]
                (y.data if packed else y).sum().backward()
                m.zero_grad(set_to_none=True)

        times = {args.a: [], args.b: []}
        for r in range(args.rounds + 2):  # the first two rounds warm up
            for v in (args.a, args.b) if r % 2 == 0 else (args.b, args.a):
                set_knob(args.knob, v)
                t0 = time.perf_counter()
                call()
                if r >= 2:
                    times[v].append(time.perf_counter() - t0)
        ratios = sorted(a / b for a, b in zip(times[args.a], times[args.b]))
        q = len(ratios) // 4
        print(f"{text:30s} {args.mode} {args.knob}={args.a} / {args.b}: ratio {statistics.median(ratios):.3f} "
              f"(IQR {ratios[q]:.3f}-{ratios[-1 - q]:.3f}; {statistics.median(times[args.a]) * 1e3:.2f} / "
              f"{statistics.median(times[args.b]) * 1e3:.2f} ms)", flush=True)


if __name__ == "__main__":
    main()
