"""The benchmark grid: what a case is, the presets, and the CPU targets of issue 3.

A `Case` is one module configuration (cell, sizes, layers, directions, projection, packing, dtype); every case is
timed in the modes listed in `Case.modes` ("fwd": forward under no_grad, "fwdbwd": forward + backward).
Letters as in docs/design.md: T steps, B batch, I input size, H hidden size, P projection size (0 = none).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MODES = ("fwd", "fwdbwd")
CELLS = ("lstm", "gru", "rnn")
DTYPE_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


@dataclass(frozen=True)
class Target:
    """Speed-up over torch.nn that the fused backend should reach (issue 3), per mode."""

    fwd: float
    fwdbwd: float

    def for_mode(self, mode: str) -> float:
        return self.fwd if mode == "fwd" else self.fwdbwd


@dataclass(frozen=True)
class Case:
    cell: str  # "lstm", "gru", "rnn" (tanh)
    T: int
    B: int
    I: int
    H: int
    layers: int = 1
    bidirectional: bool = False
    proj: int = 0  # LSTM proj_size, 0 = none
    packed: bool = False  # variable-length PackedSequence input (lengths from `lengths()`)
    dtype: str = "float32"
    groups: tuple = ()  # which tables/plots the case belongs to: "defaults", "batch", "hidden", "seq", ...
    target: Target | None = None
    reference: bool = True  # time the pure-PyTorch reference backend on this case
    modes: tuple = MODES

    @property
    def id(self) -> str:
        s = f"{self.cell}-T{self.T}-B{self.B}-I{self.I}-H{self.H}"
        if self.proj:
            s += f"-P{self.proj}"
        if self.layers != 1:
            s += f"-L{self.layers}"
        if self.bidirectional:
            s += "-bi"
        if self.packed:
            s += "-packed"
        return s + "-" + DTYPE_SHORT.get(self.dtype, self.dtype)

    @property
    def D(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def P(self) -> int:
        return self.proj if self.proj else self.H

    def lengths(self) -> list[int]:
        """Sequence lengths, longest first: all T, or for packed input evenly spread from T down to T/4."""
        if not self.packed or self.B == 1:
            return [self.T] * self.B
        lo = max(1, self.T // 4)
        return [self.T - (self.T - lo) * j // (self.B - 1) for j in range(self.B)]

    @property
    def tokens(self) -> int:
        return sum(self.lengths())

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["groups"] = list(self.groups)
        d["modes"] = list(self.modes)
        d["target"] = dataclasses.asdict(self.target) if self.target else None
        d["id"] = self.id
        d["tokens"] = self.tokens
        return d


def _tc(cell, T, B, H, fwd, fwdbwd, **kw) -> Case:
    return Case(cell, T, B, H, H, groups=("target",), target=Target(fwd, fwdbwd), **kw)


# Issue 3: CPU targets (speed-up of the fused CPU backend over torch.nn, forward / forward+backward), float32.
CPU_TARGETS = (
    _tc("lstm", 100, 1, 256, 3.0, 2.0),
    _tc("lstm", 100, 16, 256, 1.2, 1.2),
    _tc("lstm", 500, 32, 128, 1.5, 1.5),
    _tc("lstm", 100, 64, 512, 1.0, 1.0),
    _tc("gru", 100, 1, 256, 2.0, 2.0),
    _tc("gru", 100, 16, 256, 2.0, 2.0),
    _tc("gru", 500, 32, 128, 2.0, 2.0),
    _tc("rnn", 200, 16, 256, 2.0, 2.0),
    Case("lstm", 100, 16, 512, 512, proj=128, groups=("target",), target=Target(2.0, 2.0)),
    _tc("lstm", 100, 16, 256, 2.0, 2.0, packed=True),
    _tc("lstm", 100, 16, 256, 1.2, 1.2, layers=2, bidirectional=True),
)


# GPU anchor (ANCHORS.md): FlashRNN's H100 figure, B=16, T=1024, I=H=768; cuDNN fp16 is the bar, the goal is to beat it.
GPU_TARGETS = tuple(
    Case("lstm", 1024, 16, 768, 768, dtype=dt, groups=("target",), target=Target(1.0, 1.0))
    for dt in ("float16", "bfloat16")
)


def _merge(cases: list[Case]) -> list[Case]:
    """Drop duplicate configurations, uniting their groups (and keeping a target / reference flag if any has one)."""
    out: dict[str, Case] = {}
    for c in cases:
        key = c.id
        if key in out:
            o = out[key]
            groups = tuple(dict.fromkeys(o.groups + c.groups))
            out[key] = dataclasses.replace(o, groups=groups, target=o.target or c.target,
                                           reference=o.reference or c.reference)
        else:
            out[key] = c
    return list(out.values())


def build_grid(preset: str, device: str, cells=CELLS, dtypes=None, reference_everywhere=None) -> list[Case]:
    """The list of cases for a preset ("quick" or "full") on a device type ("cpu" or "cuda")."""
    gpu = device == "cuda"
    if dtypes is None:
        dtypes = ("float32", "float16", "bfloat16") if gpu else ("float32",)
    cells = tuple(cells)
    cases: list[Case] = []
    if preset == "quick":
        # Small sweeps for the plots, the issue-3 targets (CPU) and the fastrnns default; the slow pure-PyTorch
        # reference is timed only on two small cases (its errors are still checked on those).
        for dt in dtypes:
            for cell in cells:
                for B in (1, 16, 64):
                    cases.append(Case(cell, 100, B, 256, 256, dtype=dt, groups=("batch",), reference=False))
                for H in (128, 256, 512):
                    cases.append(Case(cell, 100, 16, H, H, dtype=dt, groups=("hidden",), reference=False))
            if "lstm" in cells:
                cases.append(Case("lstm", 100, 64, 512, 512, dtype=dt, groups=("defaults",), reference=False))
        targets = GPU_TARGETS if gpu else CPU_TARGETS
        cases += [dataclasses.replace(c, reference=False) for c in targets if c.cell in cells and c.dtype in dtypes]
        small = [c for c in cases if c.T == 100 and c.B == 16 and c.H == 128 and not c.packed and c.layers == 1]
        for c in small[:2]:
            cases.append(dataclasses.replace(c, reference=True))
        if reference_everywhere:
            cases = [dataclasses.replace(c, reference=True) for c in cases]
        return _merge(cases)
    if preset != "full":
        raise ValueError(f"unknown preset {preset!r}; use 'quick' or 'full'")
    # Full run: fastrnns defaults (T=100, B=64, I=H=512, 1 layer) and sweeps around them.
    base_T, base_B, base_H = 100, 64, 512
    hiddens = (128, 256, 512, 1024, 2048) if gpu else (128, 256, 512, 1024)
    seq_B, seq_H = (64, 512) if gpu else (16, 256)
    seqs = (10, 50, 100, 200, 500, 1000)
    for dt in dtypes:
        for cell in cells:
            cases.append(Case(cell, base_T, base_B, base_H, base_H, dtype=dt, groups=("defaults",)))
            for B in (1, 2, 4, 8, 16, 32, 64, 128, 256):
                cases.append(Case(cell, base_T, B, base_H, base_H, dtype=dt, groups=("batch",)))
            for H in hiddens:
                cases.append(Case(cell, base_T, base_B, H, H, dtype=dt, groups=("hidden",)))
            for T in seqs:
                cases.append(Case(cell, T, seq_B, seq_H, seq_H, dtype=dt, groups=("seq",)))
            # variants: multi-layer, bidirectional, both, packed variable-length, projection (LSTM)
            v = dict(dtype=dt, groups=("variants",))
            cases.append(Case(cell, 100, 16, 256, 256, layers=2, **v))
            cases.append(Case(cell, 100, 16, 256, 256, layers=4, **v))
            cases.append(Case(cell, 100, 16, 256, 256, bidirectional=True, **v))
            cases.append(Case(cell, 100, 16, 256, 256, layers=2, bidirectional=True, **v))
            cases.append(Case(cell, 100, 16, 256, 256, packed=True, **v))
            cases.append(Case(cell, 100, 64, 512, 512, packed=True, **v))
            if cell == "lstm":
                cases.append(Case(cell, 100, 16, 512, 512, proj=128, **v))
                cases.append(Case(cell, 100, 64, 1024, 1024, proj=256, **v))
                cases.append(Case(cell, 100, 16, 256, 256, proj=64, layers=2, bidirectional=True, **v))
    targets = GPU_TARGETS if gpu else CPU_TARGETS
    cases += [c for c in targets if c.cell in cells and c.dtype in dtypes]
    return _merge(cases)
