"""report.md and the --compare text, both built from a results dict (schema.py)."""
from __future__ import annotations

from . import fmt, metrics
from .fmt import md_table


def header_md(res: dict) -> str:
    m, cfg = res.get("machine", {}), res.get("config", {})
    peaks = ", ".join(f"{k} {v['gflops']:.0f} GFLOP/s ({v['n']}^3 matmul"
                      f"{', ' + v['library'] if v.get('library') else ''})" for k, v in res.get("gemm_peak", {}).items())
    rows = [
        ["date", str(m.get("date_utc"))],
        ["device", f"{m.get('device')} — {m.get('device_name')}"],
        ["CPU", f"{m.get('cpu_model')}, {m.get('cpu_count')} cores, torch threads {m.get('threads')}"],
        ["load average (1/5/15 min)", f"start {_load(m.get('load_avg'))}; end {_load(m.get('load_avg_end'))}"],
        ["torch", str(m.get("torch"))],
        ["CUDA / cuDNN / Triton", f"{m.get('cuda')} / {m.get('cudnn')} / {m.get('triton')}"],
        ["fusedrnn", f"{m.get('fusedrnn')} (git {m.get('git_commit')})"],
        ["fusedrnn cpu backend", _cpu_backend(m.get("fusedrnn_cpu"))],
        ["GEMM peak", peaks or "-"],
        ["cache read bandwidth", _bandwidth(res.get("cache_bandwidth"))],
        ["preset", f"{cfg.get('preset')}; rounds {cfg.get('min_rounds')}..{cfg.get('rounds')} interleaved, "
                   f"warm-up {cfg.get('warmup')}, budget {cfg.get('budget_s')} s per case and mode"],
        ["backends", ", ".join(cfg.get("backends") or []) or "none (fusedrnn modules not importable)"],
        ["targets judged on", str(res.get("primary_backend"))],
        ["run time", f"{res.get('elapsed_s', 0):.0f} s"],
    ]
    return md_table(["", ""], [[f"**{a}**", b] for a, b in rows], ["l", "l"])


def _cpu_backend(c) -> str:
    if not c:
        return "-"
    return (f"{c.get('capability')} kernels, float32 input projections on {c.get('gemm')}"
            f"{' (and LSTM backward but small chunks, per-step products above batch 64)' if c.get('gemm') == 'onednn' else ''}, "
            f"AMX {'yes' if c.get('amx') else 'no'}"
            + (f", small-batch loops on {c['loop_threads']} threads" if c.get("loop_threads") else ""))


def _load(v) -> str:
    return ", ".join(f"{x:.2f}" for x in v) if v else "-"


def load_warning(res: dict) -> str | None:
    """A warning when other work shared the machine: with every core busy, multi-threaded CPU timings spike."""
    m = res.get("machine", {})
    if not str(m.get("device", "")).startswith("cpu"):
        return None
    cores, threads = m.get("cpu_count") or 0, m.get("threads") or 0
    loads = [v[0] for v in (m.get("load_avg"), m.get("load_avg_end")) if v]
    if not loads or not cores:
        return None
    # the run itself accounts for `threads` of the load
    other = max(loads) - threads
    if other > max(cores - threads, 0) + 0.5:
        return (f"> **Warning: the machine was loaded (1-min load average up to {max(loads):.1f} on {cores} cores "
                f"with {threads} torch threads). Absolute times are unreliable, interleaved ratios less so; rerun on an "
                f"idle machine, or with --threads 1 to avoid OpenMP stalls.**")
    return None


HOW_TO_READ = """Times are the median over interleaved rounds (torch.nn and every backend once per round, order rotated, fresh
inputs each call), with the interquartile range. Speed-up is torch.nn time / backend time, the median of the
per-round ratios (same round, same machine load). GFLOP/s counts GEMM flops only (input projection + recurrence
(+ projection); forward+backward = 3x forward); % peak is against the GEMM peak above. Peak MiB is the most memory
allocated during one call above the level before it; saved B/tok the bytes autograd keeps for backward per token
(parameters excluded). err out / err grad: largest max|a-ref|/max|ref| over the outputs (y, hy, cy) / over the
gradients (x, hx, cx, every parameter) against torch.nn in float64 with the same weights and inputs."""


def _impl_cells(imp: dict) -> list[str]:
    if imp["status"] != "ok":
        return [f"*{imp['status']}*"] + ["-"] * 10
    t = imp["time"]
    return [fmt.ms(t["median"]), f"{fmt.ms(t['q1'])}–{fmt.ms(t['q3'])}", fmt.big(imp["tokens_per_s"]),
            fmt.num(imp["gflops"]), fmt.pct(imp["peak_frac"]), fmt.speedup(imp["speedup"]),
            fmt.mib(imp["peak_mem_bytes"]),
            fmt.num(imp["saved_bytes_per_token"], 4) if imp.get("saved_bytes_per_token") is not None else "-",
            fmt.err(imp["err_out"]), fmt.err(imp["err_grad"])]


DETAIL_HEADER = ["case", "mode", "impl", "ms", "IQR ms", "tok/s", "GFLOP/s", "% peak", "speed-up", "peak MiB",
                 "saved B/tok", "err out", "err grad"]


def detail_table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        for name, imp in r["impls"].items():
            out.append([fmt.case_label(r["case"]), r["mode"], fmt.impl_title(name)] + _impl_cells(imp))
    return md_table(DETAIL_HEADER, out, ["l", "l", "l"] + ["r"] * 10)


def mark(met) -> str:
    return "-" if met is None else ("✅ met" if met else "❌ missed")


def targets_table(res: dict) -> str | None:
    primary = res.get("primary_backend")
    by_case: dict[str, dict] = {}
    for r in res["rows"]:
        if r.get("target") is not None:
            by_case.setdefault(r["case_id"], {"case": r["case"]})[r["mode"]] = r
    if not by_case:
        return None
    out = []
    for cid, d in by_case.items():
        cells = [fmt.case_label(d["case"])]
        for mode in ("fwd", "fwdbwd"):
            r = d.get(mode)
            if r is None:
                cells += ["-", "-", "-", "-"]
                continue
            imp = r["impls"].get(primary) if primary else None
            s = imp.get("speedup") if imp else None
            meas = (f"{s['median']:.2f}x ({s['q1']:.2f}–{s['q3']:.2f})" if s else
                    (f"*{imp['status']}*" if imp else "not run"))
            c = ceiling(r, res)
            cells += [f"{r['target']:.1f}x", meas, f"{c:.2f}x" if c else "-", mark(r.get("met"))]
        out.append(cells)
    judged = [d[m].get("met") for d in by_case.values() for m in ("fwd", "fwdbwd") if d.get(m)]
    met = sum(1 for x in judged if x)
    measured = sum(1 for x in judged if x is not None)
    unmeasured = len(judged) - measured
    head = ["case", "fwd target", f"fwd {primary}", "ceiling", "", "fwd+bwd target", f"fwd+bwd {primary}", "ceiling",
            ""]
    return (f"Speed-up of `{primary}` over torch.nn (median of per-round ratios, IQR in brackets): "
            f"**{met} of {measured} measured targets met**"
            + (f" ({unmeasured} of {len(judged)} not measured)" if unmeasured else "") + ". "
            + (CEILING_NOTE_BW if res.get("cache_bandwidth") else CEILING_NOTE) + "\n\n"
            + md_table(head, out, ["l"] + ["r", "r", "r", "l"] * 2))


CEILING_NOTE = ("Ceiling: the speed-up a backend would reach if its GEMMs ran at this machine's GEMM peak and "
                "everything else (gates, synchronisation, memory traffic) were free, i.e. 1 / torch.nn's fraction "
                "of the peak; a target above it cannot be met on this machine (\"-\": torch.nn ran above the peak "
                "measured before and after the run, so the peak bounds nothing there).")
CEILING_NOTE_BW = ("Ceiling: the speed-up a backend would reach if its GEMMs ran at this machine's GEMM peak, each "
                   "step of a time loop read the layer's recurrent weights no slower than the measured cache read "
                   "bandwidth (header), and everything else (gates, synchronisation) were free: torch.nn's time over "
                   "that floor (fusedrnn/bench/metrics.py, floor_seconds); a target above it cannot be met on this "
                   "machine (\"-\": torch.nn ran above the peak measured before and after the run, so the peak "
                   "bounds nothing there).")


def ceiling(row: dict, res: dict | None = None) -> float | None:
    """torch.nn's time over the least time any implementation doing the same GEMM flops could take on this machine
    (metrics.floor_seconds) for a (case, mode) row: with res's cache read bandwidth for the case's recurrent
    weights, the time loops are also bound by streaming them once a step; without it (a GPU, no extension, an
    older results file) the floor is the GEMM peak's alone and the ceiling 1 / (torch.nn's fraction of the peak).
    None where torch.nn ran above the measured peak (the machine was faster during the case than while the peak
    was measured: the peak bounds nothing)."""
    nn = row["impls"].get("torch")
    f = nn.get("peak_frac") if nn and nn.get("status") == "ok" else None
    if not f or f > 1.0:
        return None
    bw = (res or {}).get("cache_bandwidth")
    peak = ((res or {}).get("gemm_peak", {}).get(row["case"]["dtype"]) or {}).get("gflops")
    if not bw or not peak:
        return 1.0 / f
    gbs = bw["sizes"].get(str(metrics.probe_bytes(row["case"], bw["threads"])))
    floor = metrics.floor_seconds(row["case"], row["mode"], peak, gbs)
    return nn["time"]["median"] / floor


def _bandwidth(bw: dict | None) -> str:
    if not bw or not bw.get("sizes"):
        return "-"
    items = sorted((int(k), v) for k, v in bw["sizes"].items())
    lo, hi = min(v for _, v in items), max(v for _, v in items)
    sizes = fmt.kib_mib(items[0][0]) + (f"-{fmt.kib_mib(items[-1][0])}" if len(items) > 1 else "")
    rate = f"{lo:.0f} GB/s" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f} GB/s"
    return (f"{rate}, {bw['threads']} threads reading {sizes} each (the cases' recurrent weights "
            f"a thread; fusedrnn.cpu.read_bandwidth)")


def summary_table(res: dict) -> str | None:
    """One line per (case, mode) of the defaults group: every implementation's time and speed-up."""
    rows = [r for r in res["rows"] if "defaults" in r["case"]["groups"]]
    if not rows:
        return None
    impls = list(dict.fromkeys(n for r in rows for n in r["impls"]))
    out = []
    for r in rows:
        cells = [fmt.case_label(r["case"]), fmt.MODE_TITLES[r["mode"]]]
        for n in impls:
            imp = r["impls"].get(n)
            if imp is None or imp["status"] != "ok":
                cells.append("-" if imp is None else f"*{imp['status']}*")
            else:
                cells.append(fmt.ms(imp["time"]["median"]) + " ms" +
                             (f" ({fmt.speedup(imp['speedup'])})" if imp["speedup"] else ""))
        out.append(cells)
    return md_table(["case", "mode"] + [fmt.impl_title(n) for n in impls], out, ["l", "l"] + ["r"] * len(impls))


def problems_list(res: dict) -> str | None:
    lines = []
    for r in res["rows"]:
        for n, imp in r["impls"].items():
            if imp["status"] != "ok":
                lines.append(f"- {fmt.case_label(r['case'])} {r['mode']} **{fmt.impl_title(n)}**: {imp['status']}"
                             f"{': ' + imp['message'] if imp['message'] else ''}")
    return "\n".join(dict.fromkeys(lines)) if lines else None


def write_report(res: dict, path: str, plots: list[tuple[str, str]] | None = None, plot_note: str | None = None,
                 compare_text: str | None = None) -> str:
    """Write report.md to `path`; plots are (title, file name relative to the report). Returns the text."""
    parts = [f"# fusedrnn benchmark — {res.get('machine', {}).get('device_name', '?')}", "", header_md(res), "",
             HOW_TO_READ, ""]
    w = load_warning(res)
    if w:
        parts += [w, ""]
    if not res.get("fused_api"):
        parts += ["> **fusedrnn.LSTM/GRU/RNN were not importable: only torch.nn was measured.**", ""]
    t = targets_table(res)
    if t:
        parts += ["## " + fmt.GROUP_TITLES["target"], "", t, ""]
    s = summary_table(res)
    if s:
        parts += ["## " + fmt.GROUP_TITLES["defaults"], "", s, ""]
    if plots or plot_note:
        parts += ["## Plots", ""]
        if plot_note:
            parts += [f"_{plot_note}_", ""]
        for title, fname in plots or []:
            parts += [f"### {title}", "", f"![{title}]({fname})", ""]
    if compare_text:
        parts += ["## Change against the earlier run", "", "```", compare_text, "```", ""]
    groups = list(fmt.GROUP_TITLES)
    for g in groups:
        rows = [r for r in res["rows"] if g in r["case"]["groups"]]
        if rows:
            parts += [f"## Details: {fmt.GROUP_TITLES[g]}", "", detail_table(rows), ""]
    rest = [r for r in res["rows"] if not set(r["case"]["groups"]) & set(groups)]
    if rest:
        parts += ["## Details: other cases", "", detail_table(rest), ""]
    p = problems_list(res)
    if p:
        parts += ["## Not measured", "", p, ""]
    text = "\n".join(parts)
    with open(path, "w") as f:
        f.write(text)
    return text


# ---- --compare ---------------------------------------------------------------------------------------------

def compare(old: dict, new: dict) -> str:
    """Per (case, mode, impl) present in both runs: time old -> new and speed-up old -> new."""
    idx = {(r["case_id"], r["mode"]): r for r in old.get("rows", [])}
    lines = []
    faster = slower = 0
    for r in new.get("rows", []):
        o = idx.get((r["case_id"], r["mode"]))
        if o is None:
            continue
        for n, imp in r["impls"].items():
            oi = o["impls"].get(n)
            if not oi or oi["status"] != "ok" or imp["status"] != "ok":
                continue
            t0, t1 = oi["time"]["median"], imp["time"]["median"]
            change = t1 / t0 - 1
            faster += change < -0.05
            slower += change > 0.05
            sp = ""
            if oi.get("speedup") and imp.get("speedup"):
                sp = f"  speed-up {oi['speedup']['median']:.2f}x -> {imp['speedup']['median']:.2f}x"
            lines.append(f"{r['case_id']:<40} {r['mode']:<6} {fmt.impl_title(n):<10} "
                         f"{fmt.ms(t0):>8} -> {fmt.ms(t1):>8} ms  {100 * change:+6.1f}%{sp}")
    om, nm = old.get("machine", {}), new.get("machine", {})
    head = "\n".join(f"{k}: {m.get('date_utc')} git {m.get('git_commit')} {m.get('device_name')}, "
                     f"{m.get('threads')} threads, load {_load(m.get('load_avg'))}" for k, m in (("old", om), ("new", nm)))
    if not lines:
        return head + "\nno (case, mode, implementation) measured in both runs"
    return (head + f"\n{len(lines)} measurements in both runs: {faster} faster by >5%, {slower} slower by >5%\n"
            + "\n".join(lines))
