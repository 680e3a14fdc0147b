"""Speed ratios torch.nn / fusedrnn (backend='cpu') on the CPU, float32: forward under no_grad and forward+backward.

    python benchmarks/cpu_ratios.py [--threads 2] [--reps 15] [--only lstm] [--memory]

Calls of the two implementations are interleaved (A B A B ...) and each side's median is taken, so a machine whose
load changes during the run shifts both alike; the ratio is what to read, not the absolute times. --memory adds the
peak resident-set growth of one forward+backward per side, each measured in a fresh subprocess.
(Superseded by the project's bench suite, python -m fusedrnn.bench.)
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import fusedrnn

# name, cls, T, B, I, H, extra kwargs, packed (random lengths)
CONFIGS = [
    ("lstm T100 B1 H256", "LSTM", 100, 1, 256, 256, {}, False),
    ("lstm T100 B16 H256", "LSTM", 100, 16, 256, 256, {}, False),
    ("lstm T500 B32 H128", "LSTM", 500, 32, 128, 128, {}, False),
    ("lstm T100 B64 H512", "LSTM", 100, 64, 512, 512, {}, False),
    ("gru T100 B1 H256", "GRU", 100, 1, 256, 256, {}, False),
    ("gru T100 B16 H256", "GRU", 100, 16, 256, 256, {}, False),
    ("gru T500 B32 H128", "GRU", 500, 32, 128, 128, {}, False),
    ("rnn_tanh T200 B16 H256", "RNN", 200, 16, 256, 256, {}, False),
    ("lstm proj T100 B16 H512 P128", "LSTM", 100, 16, 256, 512, {"proj_size": 128}, False),
    ("lstm packed T100 B16 H256", "LSTM", 100, 16, 256, 256, {}, True),
    ("lstm 2-layer bidir T100 B16 H256", "LSTM", 100, 16, 256, 256, {"num_layers": 2, "bidirectional": True}, False),
]


def build(cfg, seed=0):
    name, cls, T, B, I, H, kw, packed = cfg
    torch.manual_seed(seed)
    ref = getattr(torch.nn, cls)(I, H, **kw)
    ours = getattr(fusedrnn, cls)(I, H, backend="cpu", **kw)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I)
    if packed:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(T // 10, T + 1, (B,), generator=g).sort(descending=True).values
        lengths[0] = T
        x = torch.nn.utils.rnn.pack_padded_sequence(x, lengths)
    return ref, ours, x


def output_sum(out):
    y, h = out
    y = y.data if isinstance(y, torch.nn.utils.rnn.PackedSequence) else y
    hs = h if isinstance(h, tuple) else (h,)
    return y.sum() + sum(t.sum() for t in hs)


def fwd(model, x):
    with torch.no_grad():
        model(x)


def fwd_bwd(model, x):
    if isinstance(x, torch.Tensor):
        x = x.detach().requires_grad_()
    output_sum(model(x)).backward()
    model.zero_grad(set_to_none=True)


def interleaved(fn, a, b, x, reps):
    fn(a, x), fn(b, x)  # warm-up
    ta, tb = [], []
    for _ in range(reps):
        for m, acc in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn(m, x)
            acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def peak_rss_child(index, side, threads):
    """Peak RSS growth (MiB) of one forward+backward, in a fresh process."""
    code = (f"import sys; sys.argv=['x']; import torch; torch.set_num_threads({threads});"
            f"import benchmarks.cpu_ratios as b; b._child({index}, {side!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return float(out.stdout.strip().splitlines()[-1])


def _child(index, side):
    ref, ours, x = build(CONFIGS[index])
    model = ref if side == "torch" else ours
    fwd(model, x)  # load kernels / libraries before the baseline reading
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fwd_bwd(model, x)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--only", default="", help="substring of config names to run")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, fusedrnn {fusedrnn.__version__}, threads {torch.get_num_threads()}, "
          f"kernels {fusedrnn.cpu.capability()}")
    print(f"{'config':34s} {'fwd nn ms':>9s} {'ours ms':>8s} {'ratio':>6s} | {'f+b nn ms':>9s} {'ours ms':>8s} "
          f"{'ratio':>6s}" + (" | peak MiB nn / ours" if args.memory else ""))
    rows = []
    for i, cfg in enumerate(CONFIGS):
        if args.only not in cfg[0]:
            continue
        ref, ours, x = build(cfg)
        reps = max(3, args.reps // 3) if cfg[3] >= 64 else args.reps
        f_nn, f_us = interleaved(fwd, ref, ours, x, reps)
        b_nn, b_us = interleaved(fwd_bwd, ref, ours, x, reps)
        line = (f"{cfg[0]:34s} {f_nn * 1e3:9.2f} {f_us * 1e3:8.2f} {f_nn / f_us:6.2f} | {b_nn * 1e3:9.2f} "
                f"{b_us * 1e3:8.2f} {b_nn / b_us:6.2f}")
        row = {"config": cfg[0], "fwd_nn_ms": f_nn * 1e3, "fwd_ours_ms": f_us * 1e3, "fwd_ratio": f_nn / f_us,
               "fb_nn_ms": b_nn * 1e3, "fb_ours_ms": b_us * 1e3, "fb_ratio": b_nn / b_us}
        if args.memory:
            m_nn, m_us = peak_rss_child(i, "torch", args.threads), peak_rss_child(i, "ours", args.threads)
            line += f" | {m_nn:7.1f} / {m_us:7.1f}"
            row.update(peak_mib_nn=m_nn, peak_mib_ours=m_us)
        print(line, flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
