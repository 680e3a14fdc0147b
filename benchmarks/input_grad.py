"""Forward+backward when the input needs no gradient (a first layer on raw features: speech frames, sensor series)
against when it does, torch.nn and fusedrnn, interleaved in one process.

    python benchmarks/input_grad.py [--cases "lstm,100,16,256;gru,100,16,256"] [--rounds 15] [--threads 2]

A case is cell,T,B,H (I = H, one layer, hx left as zeros, loss y.sum()). Each round times the four variants (torch.nn
and fusedrnn, x with and without requires_grad) in rotating order. Printed per case, from the medians: torch.nn /
fusedrnn for each variant (above 1: fusedrnn faster), and each library's time without x's gradient over its time
with it (fusedrnn's backward skips grad_x's GEMM, a quarter of its products at I = H; docs/design.md, Backward).
"""
import argparse
import statistics
import time

import torch

import fusedrnn

DEFAULT_CASES = "lstm,100,16,256;gru,100,16,256;lstm,500,32,128;rnn,200,16,256"
KINDS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


def run_case(kind, T, B, H, rounds):
    torch.manual_seed(0)
    ref = getattr(torch.nn, KINDS[kind])(H, H)
    ours = getattr(fusedrnn, KINDS[kind])(H, H)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, H)
    variants = [(lib, x_grad) for lib in ("torch", "fusedrnn") for x_grad in (True, False)]

    def timed(lib, x_grad):
        m = ref if lib == "torch" else ours
        t0 = time.perf_counter()
        y, _ = m(x.detach().requires_grad_(x_grad))
        y.sum().backward()
        dt = time.perf_counter() - t0
        m.zero_grad(set_to_none=True)
        return dt

    times = {v: [] for v in variants}
    for v in variants:  # warm-up
        timed(*v)
    for r in range(rounds):
        for v in variants[r % 4:] + variants[:r % 4]:
            times[v].append(timed(*v))
    med = {v: statistics.median(t) for v, t in times.items()}
    return (med["torch", True] / med["fusedrnn", True], med["torch", False] / med["fusedrnn", False],
            med["fusedrnn", False] / med["fusedrnn", True], med["torch", False] / med["torch", True])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads, {a.rounds} rounds, forward+backward, loss y.sum()")
    print("case                  torch.nn/fusedrnn: x grad  x no grad    no grad / grad: fusedrnn  torch.nn")
    for spec in a.cases.split(";"):
        kind, T, B, H = spec.split(",")
        with_g, without, ours_ratio, torch_ratio = run_case(kind, int(T), int(B), int(H), a.rounds)
        print(f"{kind:5s} T{T:<4s} B{B:<3s} H{H:<4s}                {with_g:5.2f}x    {without:5.2f}x"
              f"                    {ours_ratio:5.2f}     {torch_ratio:5.2f}")


if __name__ == "__main__":
    main()
