"""Number formatting shared by the report, the README section and --compare."""
from __future__ import annotations

import math

GROUP_TITLES = {
    "target": "Targets (CPU: issue 3; GPU: beat cuDNN on the ANCHORS.md case)",
    "defaults": "fastrnns defaults (T=100, B=64, I=H=512, 1 layer)",
    "batch": "Batch-size sweep",
    "hidden": "Hidden-size sweep",
    "seq": "Sequence-length sweep",
    "variants": "Multi-layer, bidirectional, projection, packed",
}
MODE_TITLES = {"fwd": "forward (no_grad)", "fwdbwd": "forward+backward"}
IMPL_TITLE = {"torch": "torch.nn"}


def impl_title(name: str) -> str:
    return IMPL_TITLE.get(name, name)


def ms(sec) -> str:
    if sec is None:
        return "-"
    v = sec * 1e3
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def num(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return str(v)
    return f"{v:.{digits}g}"


def big(v) -> str:
    """1.23M style for counts (tokens/s)."""
    if v is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}"


def mib(b) -> str:
    if b is None:
        return "-"
    return f"{b / 2 ** 20:.3g}"


def kib_mib(b: int) -> str:
    """A size with its unit: 96 KiB, 2.0 MiB."""
    return f"{b / 2 ** 20:.1f} MiB" if b >= 2 ** 20 else f"{b / 2 ** 10:.0f} KiB"


def err(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return str(v)
    return f"{v:.1e}"


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def speedup(s: dict | None) -> str:
    if not s:
        return "-"
    return f"{s['median']:.2f}x"


def case_label(case: dict) -> str:
    """Short human label: 'LSTM T=100 B=16 H=256 (2L bi, P=128, packed) fp32'."""
    extra = []
    if case["layers"] != 1:
        extra.append(f"{case['layers']}L")
    if case["bidirectional"]:
        extra.append("bi")
    if case["proj"]:
        extra.append(f"P={case['proj']}")
    if case["packed"]:
        extra.append("packed")
    io = f"H={case['H']}" if case["I"] == case["H"] else f"I={case['I']} H={case['H']}"
    s = f"{case['cell'].upper()} T={case['T']} B={case['B']} {io}"
    if extra:
        s += " (" + ", ".join(extra) + ")"
    short = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(case["dtype"], case["dtype"])
    return s + " " + short


def md_table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["l"] + ["r"] * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
