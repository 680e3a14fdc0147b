"""Cells in a decoder loop: torch.nn's LSTMCell / GRUCell / RNNCell against fusedrnn's, step by step.

    python benchmarks/cell_steps.py [--cases "LSTMCell,1,256;RNNCell,1,64"] [--steps 100] [--rounds 15]
        [--threads 2] [--mode fwd|fwdbwd|both]

A case is cell,B,H (I = H). Each round runs `steps` steps of a loop that feeds each step's h (and c) to the next,
once with torch.nn's cell and once with ours (same weights), in alternating order; forward+backward adds one
backward through the whole loop (loss: the sum of every step's h). Printed: the median time a step of each and the
median of the per-round ratios torch.nn / fusedrnn (above 1: fusedrnn faster). A cell's step is small, so what
these measure is mostly each library's fixed cost a call (argument checks, dispatch, allocation, autograd), and the
matrix-vector products once H is large. Ratios of neighbouring runs resolve a few per cent on a machine whose speed
drifts; absolute times do not.
"""
import argparse
import statistics
import time

import torch

import fusedrnn

DEFAULT_CASES = ("LSTMCell,1,256;LSTMCell,1,64;LSTMCell,32,128;GRUCell,1,256;GRUCell,1,64;GRUCell,32,128;"
                 "RNNCell,1,256;RNNCell,1,64;RNNCell,32,128")


def run_case(kind, B, H, steps, rounds, grad):
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(H, H)
    ours = getattr(fusedrnn, kind)(H, H)
    ours.load_state_dict(ref.state_dict())
    xs = [torch.randn(B, H) for _ in range(steps)]

    def loop(m):
        h, total = None, 0.0
        for x in xs:
            h = m(x, h)
            if grad:
                total = total + (h[0] if isinstance(h, tuple) else h).sum()
        if grad:
            total.backward()
            m.zero_grad(set_to_none=True)

    def timed(m):
        with torch.enable_grad() if grad else torch.no_grad():
            t0 = time.perf_counter()
            loop(m)
            return time.perf_counter() - t0

    for m in (ref, ours):  # warm-up
        timed(m)
    t_ref, t_ours, ratios = [], [], []
    for r in range(rounds):
        if r % 2:
            a, b = timed(ref), timed(ours)
        else:
            b, a = timed(ours), timed(ref)
        t_ref.append(a / steps * 1e6)
        t_ours.append(b / steps * 1e6)
        ratios.append(a / b)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    print(f"{kind:9s} B{B:<3d} H{H:<4d} {'fwd+bwd' if grad else 'fwd':8s} torch.nn {statistics.median(t_ref):7.1f} us "
          f"fusedrnn {statistics.median(t_ours):7.1f} us a step  speed-up {statistics.median(ratios):.2f}x "
          f"({q[0]:.2f}-{q[2]:.2f})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", choices=["fwd", "fwdbwd", "both"], default="both")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    backend = fusedrnn.backends.resolve("auto", torch.device("cpu"), torch.float32, "lstm", False)
    print(f"torch {torch.__version__}, {args.threads} threads, fusedrnn backend {backend}, {args.steps} steps a "
          f"loop, {args.rounds} rounds")
    for text in args.cases.split(";"):
        kind, B, H = text.split(",")
        for grad in ((False, True) if args.mode == "both" else (args.mode == "fwdbwd",)):
            run_case(kind, int(B), int(H), args.steps, args.rounds, grad)


if __name__ == "__main__":
    main()
