"""python -m fusedrnn.bench.readme RESULTS.json [--report-link PATH]: the README performance section (markdown)
built from a committed results.json, naming the device, the date and the commit it was measured on."""
from __future__ import annotations

import argparse
import json
import sys

from . import fmt
from .report import load_warning, targets_table


def _speedups_by_group(res: dict, group: str) -> list[list[str]]:
    out = []
    for r in res["rows"]:
        if group not in r["case"]["groups"]:
            continue
        nn = r["impls"].get("torch")
        if not nn or nn["status"] != "ok":
            continue
        row = [fmt.case_label(r["case"]), fmt.MODE_TITLES[r["mode"]], fmt.ms(nn["time"]["median"]) + " ms"]
        best = None
        for n, imp in r["impls"].items():
            if n in ("torch", "reference") or imp["status"] != "ok" or not imp.get("speedup"):
                continue
            if best is None or imp["speedup"]["median"] > best[1]["speedup"]["median"]:
                best = (n, imp)
        if best is None:
            row += ["-", "-", "-"]
        else:
            n, imp = best
            row += [f"{n}: {fmt.ms(imp['time']['median'])} ms", f"**{imp['speedup']['median']:.2f}x**",
                    f"{fmt.err(imp['err_grad'])} (torch.nn {fmt.err(nn['err_grad'])})"]
        out.append(row)
    return out


def readme_section(res: dict, report_link: str | None = None, title: str = "## Performance") -> str:
    m = res.get("machine", {})
    cfg = res.get("config", {})
    peaks = ", ".join(f"{k} {v['gflops']:.0f} GFLOP/s" for k, v in res.get("gemm_peak", {}).items())
    lines = [title, "",
             f"Measured on **{m.get('device_name')}** ({m.get('device')}, {m.get('threads')} threads; "
             f"GEMM peak {peaks or '?'}) on {m.get('date_utc')}, torch {m.get('torch')}"
             + (f", CUDA {m.get('cuda')}, cuDNN {m.get('cudnn')}" if m.get("cuda") and m.get("cudnn") else "")
             + f", fusedrnn {m.get('fusedrnn')} (git {m.get('git_commit')}), `{cfg.get('preset')}` preset. "
             "Speed-up = torch.nn time / fusedrnn time, median of interleaved rounds; err grad = largest relative "
             "error of any gradient against float64.", ""]
    w = load_warning(res)
    if w:
        lines += [w, ""]
    t = targets_table(res)
    if t:
        lines += ["**Targets**", "", t, ""]
    head = ["case", "mode", "torch.nn", "fusedrnn (best backend)", "speed-up", "err grad (vs torch.nn)"]
    for group in ("defaults", "variants"):
        rows = _speedups_by_group(res, group)
        if rows:
            lines += [f"**{fmt.GROUP_TITLES[group]}**", "", fmt.md_table(head, rows, ["l", "l", "r", "r", "r", "r"]),
                      ""]
    lines.append("Reproduce: `python -m fusedrnn.bench` (full grid) or `python -m fusedrnn.bench --quick`"
                 + (f"; full tables and plots: [{report_link}]({report_link})" if report_link else "") + ".")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusedrnn.bench.readme", description=__doc__)
    p.add_argument("results")
    p.add_argument("--report-link", default=None, help="relative link to the full report.md to mention")
    p.add_argument("--title", default="## Performance")
    a = p.parse_args(argv)
    with open(a.results) as f:
        res = json.load(f)
    sys.stdout.write(readme_section(res, a.report_link, a.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
