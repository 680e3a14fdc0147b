"""PNG plots for report.md: speed-up over torch.nn vs batch size and vs hidden size (per cell and mode), and
fusedrnn's error against torch.nn's in the same dtype. matplotlib is optional: without it `make_plots` returns no
plots and a note saying how to get them."""
from __future__ import annotations

import os

from . import fmt

MISSING_NOTE = "plots skipped: matplotlib is not installed (pip install matplotlib)"


def _mpl():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def _null_formatter():
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


def _sweep_series(rows, group, key, cell, mode):
    """{(backend, dtype): [(x, median, q1, q3)]} for the rows of a sweep group."""
    series: dict[tuple, list] = {}
    for r in rows:
        c = r["case"]
        if group not in c["groups"] or c["cell"] != cell or r["mode"] != mode:
            continue
        for n, imp in r["impls"].items():
            s = imp.get("speedup")
            if n == "torch" or imp["status"] != "ok" or not s:
                continue
            series.setdefault((n, c["dtype"]), []).append((c[key], s["median"], s["q1"], s["q3"]))
    return {k: sorted(v) for k, v in series.items()}


def _speedup_plot(plt, rows, group, key, label, cell, mode, path) -> bool:
    series = _sweep_series(rows, group, key, cell, mode)
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for (backend, dtype), pts in series.items():
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1] for p in pts], marker="o", label=f"{backend} {dtype}")
        ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], alpha=0.2)
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="torch.nn")
    ax.set_xscale("log", base=2)
    ticks = sorted({p[0] for pts in series.values() for p in pts})
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(_null_formatter())
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] / 2, ticks[0] * 2)
    ax.set_xlabel(label)
    ax.set_ylabel("speed-up over torch.nn")
    ax.set_title(f"{cell.upper()} {fmt.MODE_TITLES[mode]}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _error_plot(plt, rows, path) -> bool:
    """Scatter of (torch.nn error, backend error) per case: output and gradient errors, log-log, y=x and y=2x."""
    pts: dict[tuple, list] = {}
    for r in rows:
        if r["mode"] != r["case"]["modes"][0]:  # errors are per case, stored in every mode's row
            continue
        ref = r["impls"].get("torch")
        if not ref or ref["status"] != "ok" or ref.get("err_out") is None:
            continue
        for n, imp in r["impls"].items():
            if n == "torch" or imp["status"] != "ok" or imp.get("err_out") is None:
                continue
            for kind in ("out", "grad"):
                a, b = ref[f"err_{kind}"], imp[f"err_{kind}"]
                if a and b and a > 0 and b > 0 and a != float("inf") and b != float("inf"):
                    pts.setdefault((n, kind), []).append((a, b))
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 5))
    lo = min(min(p) for v in pts.values() for p in v)
    hi = max(max(p) for v in pts.values() for p in v)
    lo, hi = lo / 2, hi * 2
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, label="same error")
    ax.plot([lo, hi], [2 * lo, 2 * hi], color="r", lw=0.8, ls="--", label="2x torch.nn (limit)")
    markers = {"out": "o", "grad": "^"}
    for (n, kind), v in pts.items():
        ax.scatter([p[0] for p in v], [p[1] for p in v], marker=markers[kind], label=f"{n} {kind}", alpha=0.7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(_null_formatter())
    ax.yaxis.set_minor_formatter(_null_formatter())
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("torch.nn relative error (same dtype) vs float64")
    ax.set_ylabel("fusedrnn relative error vs float64")
    ax.set_title("Error per case: fusedrnn vs torch.nn")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def make_plots(res: dict, out_dir: str) -> tuple[list[tuple[str, str]], str | None]:
    """Write the PNGs into out_dir; returns ([(title, file name)], note or None)."""
    plt = _mpl()
    if plt is None:
        return [], MISSING_NOTE
    rows = res["rows"]
    made = []
    cells = list(dict.fromkeys(r["case"]["cell"] for r in rows))
    for group, key, label in (("batch", "B", "batch size B"), ("hidden", "H", "hidden size H (= input size)"),
                              ("seq", "T", "sequence length T")):
        for cell in cells:
            for mode in ("fwd", "fwdbwd"):
                name = f"speedup_{group}_{cell}_{mode}.png"
                if _speedup_plot(plt, rows, group, key, label, cell, mode, os.path.join(out_dir, name)):
                    made.append((f"Speed-up vs {label}: {cell.upper()} {fmt.MODE_TITLES[mode]}", name))
    if _error_plot(plt, rows, os.path.join(out_dir, "errors.png")):
        made.append(("Errors: fusedrnn vs torch.nn (same dtype, against float64)", "errors.png"))
    note = None if made else "no plots: no backend was measured against torch.nn on a sweep"
    return made, note
