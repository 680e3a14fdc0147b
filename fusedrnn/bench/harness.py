"""Runs the cases: builds torch.nn and fusedrnn modules with the same weights, checks errors against a float64
torch.nn, measures memory, then times all implementations interleaved.

An implementation is named "torch" (torch.nn: cuDNN on CUDA, oneDNN/ATen on the CPU) or by a fusedrnn backend
name. `factories` maps a name to `factory(case, device, dtype) -> nn.Module`; by default "torch" builds
torch.nn.LSTM/GRU/RNN and any other name builds fusedrnn.LSTM/GRU/RNN(..., backend=name).
"""
from __future__ import annotations

import copy
import time
from typing import Callable

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import metrics, timing
from .cases import Case
from .schema import SCHEMA, SCHEMA_VERSION

TORCH = "torch"
OP_MODE = {"lstm": "lstm", "gru": "gru", "rnn": "rnn_tanh"}
NN_CLASS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


def _module_kwargs(case: Case) -> dict:
    kw = dict(input_size=case.I, hidden_size=case.H, num_layers=case.layers, bidirectional=case.bidirectional)
    if case.proj:
        kw["proj_size"] = case.proj
    return kw


def torch_factory(case: Case, device, dtype) -> nn.Module:
    return getattr(nn, NN_CLASS[case.cell])(**_module_kwargs(case)).to(device=device, dtype=dtype)


def fused_api():
    """The fusedrnn package if its public modules exist (None while they are not built / importable)."""
    try:
        import fusedrnn
    except Exception:  # noqa: BLE001 - a broken or half-written package means: measure torch.nn only
        return None
    if all(hasattr(fusedrnn, n) for n in ("LSTM", "GRU", "RNN", "available_backends")):
        return fusedrnn
    return None


def fused_factory(backend: str) -> Callable:
    def factory(case: Case, device, dtype) -> nn.Module:
        fr = fused_api()
        if fr is None:
            raise RuntimeError("fusedrnn.LSTM/GRU/RNN are not importable")
        return getattr(fr, NN_CLASS[case.cell])(**_module_kwargs(case), backend=backend).to(device=device,
                                                                                           dtype=dtype)
    return factory


def available_backends() -> list[str]:
    fr = fused_api()
    return list(fr.available_backends()) if fr is not None else []


def backend_supports(name: str, case: Case, device: torch.device) -> tuple[bool, str]:
    """Whether fusedrnn backend `name` claims to run this case (its `supports()`), and why not."""
    try:
        from fusedrnn import backends as B

        b = B.get_backend(name)
        ok = b.supports(device, dtype_of(case.dtype), OP_MODE[case.cell], bool(case.proj))
        return ok, "" if ok else f"backend {name} does not support this case on {device.type}"
    except Exception as e:  # noqa: BLE001 - unknown backend: let the factory raise the real error
        return True, str(e)


def default_primary(device: torch.device, backends: list[str]) -> str | None:
    """The backend targets are judged on: what `auto` would pick for the device among those benchmarked."""
    order = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}.get(device.type, ())
    try:
        from fusedrnn.backends import AUTO_ORDER

        order = AUTO_ORDER.get(device.type, order)
    except Exception:  # noqa: BLE001
        pass
    for n in order:
        if n in backends:
            return n
    return backends[0] if backends else None


# ---- inputs and calls ----------------------------------------------------------------------------------------

def batch_sizes_of(lengths: list[int]) -> torch.Tensor:
    T = max(lengths)
    return torch.tensor([sum(1 for L in lengths if L > t) for t in range(T)], dtype=torch.int64)


def make_inputs(case: Case, device, dtype, *, x_grad: bool, h_grad: bool = False,
                gen: torch.Generator | None = None) -> dict:
    """Fresh random inputs: x ([T, B, I], or PackedSequence data [N, I]), hx [L*D, B, P], cx [L*D, B, H]."""
    def rnd(*shape):
        if gen is None:  # timing: straight on the device
            return torch.randn(*shape, device=device, dtype=dtype)
        # error check: reproducible values, the same whatever the device
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    LD = case.layers * case.D
    if case.packed:
        bs = batch_sizes_of(case.lengths())
        data = rnd(int(bs.sum()), case.I).requires_grad_(x_grad)
        x = PackedSequence(data, bs)
        leaf = data
    else:
        x = rnd(case.T, case.B, case.I).requires_grad_(x_grad)
        leaf = x
    hx = rnd(LD, case.B, case.P).requires_grad_(h_grad)
    cx = rnd(LD, case.B, case.H).requires_grad_(h_grad) if case.cell == "lstm" else None
    return {"x": x, "x_leaf": leaf, "hx": hx, "cx": cx}


def call(module: nn.Module, case: Case, inp: dict):
    """Run the module; returns (y as a tensor, hy, cy or None)."""
    if case.cell == "lstm":
        out, (hy, cy) = module(inp["x"], (inp["hx"], inp["cx"]))
    else:
        out, hy = module(inp["x"], inp["hx"])
        cy = None
    y = out.data if isinstance(out, PackedSequence) else out
    return y, hy, cy


def output_shape(case: Case) -> tuple:
    width = case.D * case.P
    return (case.tokens, width) if case.packed else (case.T, case.B, width)


def cast_inputs(inp: dict, device, dtype) -> dict:
    """Same values in another dtype, as new leaves with the same requires_grad."""
    def c(t):
        return None if t is None else t.detach().to(device=device, dtype=dtype).requires_grad_(t.requires_grad)

    leaf = c(inp["x_leaf"])
    x = PackedSequence(leaf, inp["x"].batch_sizes) if isinstance(inp["x"], PackedSequence) else leaf
    return {"x": x, "x_leaf": leaf, "hx": c(inp["hx"]), "cx": c(inp["cx"])}


def forward_backward(module: nn.Module, case: Case, inp: dict, grads: dict) -> tuple[dict, dict]:
    """Outputs {y, hy, cy} and gradients {x, hx, cx, <parameter names>} of sum(out * grads[out])."""
    y, hy, cy = call(module, case, inp)
    outs = {"y": y, "hy": hy}
    if cy is not None:
        outs["cy"] = cy
    loss = sum((outs[k] * grads[k].to(outs[k].dtype)).sum() for k in outs)
    wrt = {"x": inp["x_leaf"], "hx": inp["hx"]}
    if inp["cx"] is not None:
        wrt["cx"] = inp["cx"]
    wrt.update(dict(module.named_parameters()))
    g = torch.autograd.grad(loss, list(wrt.values()), allow_unused=True)
    return ({k: v.detach() for k, v in outs.items()},
            {k: (gv if gv is not None else torch.zeros_like(t)) for (k, t), gv in zip(wrt.items(), g)})


def compute_errors(case: Case, modules: dict[str, nn.Module], device, seed: int = 0) -> dict[str, dict]:
    """Output and gradient errors of every module vs a float64 torch.nn holding the same (rounded) weights."""
    dtype = dtype_of(case.dtype)
    gen = torch.Generator().manual_seed(seed)
    inp = make_inputs(case, device, dtype, x_grad=True, h_grad=True, gen=gen)
    y_shape = output_shape(case)
    LD = case.layers * case.D
    grads = {"y": torch.randn(*y_shape, generator=gen), "hy": torch.randn(LD, case.B, case.P, generator=gen)}
    if case.cell == "lstm":
        grads["cy"] = torch.randn(LD, case.B, case.H, generator=gen)
    grads = {k: v.to(device) for k, v in grads.items()}
    ref_mod = copy.deepcopy(modules[TORCH]).to(dtype=torch.float64)
    ref_out, ref_grad = forward_backward(ref_mod, case, cast_inputs(inp, device, torch.float64), grads)
    res = {}
    for name, m in modules.items():
        try:
            out, grad = forward_backward(m, case, cast_inputs(inp, device, dtype), grads)
            eo, wo, po = metrics.max_rel_error(out, ref_out)
            eg, wg, pg = metrics.max_rel_error(grad, ref_grad)
            res[name] = {"err_out": eo, "err_out_worst": wo, "err_grad": eg, "err_grad_worst": wg,
                         "errors": {**{f"out.{k}": v for k, v in po.items()}, **{f"grad.{k}": v for k, v in pg.items()}}}
        except Exception as e:  # noqa: BLE001 - reported in the row, the run goes on
            res[name] = {"error": f"{type(e).__name__}: {e}"}
    return res


# ---- one case ------------------------------------------------------------------------------------------------

class Settings:
    """How hard to time: rounds (max), min_rounds, warmup calls, budget_s per (case, mode) of timed calls."""

    def __init__(self, rounds=7, min_rounds=3, warmup=1, budget_s=10.0, clock=time.perf_counter, memory=True,
                 errors=True):
        self.rounds, self.min_rounds, self.warmup, self.budget_s = rounds, min_rounds, warmup, budget_s
        self.clock, self.memory, self.errors = clock, memory, errors

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "min_rounds": self.min_rounds, "warmup": self.warmup,
                "budget_s": self.budget_s}


def _empty_impl(status="ok", message="") -> dict:
    return {"status": status, "message": message, "time": None, "tokens_per_s": None, "gflops": None,
            "peak_frac": None, "speedup": None, "peak_mem_bytes": None, "saved_bytes": None,
            "saved_bytes_per_token": None, "err_out": None, "err_out_worst": None, "err_grad": None,
            "err_grad_worst": None, "errors": {}}


def run_case(case: Case, impl_names: list[str], device: torch.device, settings: Settings,
             factories: dict[str, Callable], gemm_peak_gflops: float | None, primary: str | None,
             seed: int = 0, on_step: Callable[[str], None] | None = None) -> list[dict]:
    """All rows (one per mode) of one case."""
    t_case = time.perf_counter()
    dtype = dtype_of(case.dtype)
    impls: dict[str, dict] = {}
    modules: dict[str, nn.Module] = {}
    torch.manual_seed(seed)
    modules[TORCH] = factories[TORCH](case, device, dtype)
    for name in impl_names:
        if name == TORCH:
            continue
        ok, why = backend_supports(name, case, device) if name not in factories or factories[name] is None \
            else (True, "")
        if not ok:
            impls[name] = _empty_impl("unsupported", why)
            continue
        try:
            m = (factories.get(name) or fused_factory(name))(case, device, dtype)
            m.load_state_dict(modules[TORCH].state_dict())
            modules[name] = m
        except Exception as e:  # noqa: BLE001
            impls[name] = _empty_impl("error", f"{type(e).__name__}: {e}")
    errs = compute_errors(case, modules, device, seed) if settings.errors else {}
    for name, e in errs.items():
        if "error" in e:
            impls[name] = _empty_impl("error", "while checking errors: " + e["error"])
            modules.pop(name, None)
            if name == TORCH:
                raise RuntimeError(f"torch.nn failed on {case.id}: {e['error']}")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    rows = []
    for mode in case.modes:
        flops = metrics.gemm_flops(case.cell, case.tokens, case.I, case.H, case.layers, case.D, case.proj, mode)
        row_impls = {n: dict(v) for n, v in impls.items()}
        preps = {n: _prepare(n, m, case, device, dtype, mode) for n, m in modules.items()}
        mem = {}
        for n, m in modules.items():
            mem[n] = _memory(m, case, device, dtype, mode, preps[n]) if settings.memory else {}
        if on_step:
            on_step(mode)
        live = dict(preps)
        times: dict[str, list[float]] = {}
        while live:
            try:
                # the memory measurement already made one untimed call of each
                warmup = max(settings.warmup - 1, 0) if settings.memory else settings.warmup
                times.update(timing.interleaved(live, rounds=settings.rounds, warmup=warmup,
                                                min_rounds=settings.min_rounds, budget_s=settings.budget_s,
                                                clock=settings.clock, sync=sync))
                break
            except _ImplFailed as f:  # drop the failing implementation, time the others again
                if f.name == TORCH:
                    raise RuntimeError(f"torch.nn failed on {case.id} {mode}: {f.message}") from None
                row_impls[f.name] = _empty_impl("error", f.message)
                live.pop(f.name)
        for n in live:
            r = _empty_impl()
            r.update(mem.get(n, {}))
            if n in errs:
                r.update(errs[n])
            st = timing.summarize(times[n])
            r["time"] = st
            r["tokens_per_s"] = case.tokens / st["median"]
            r["gflops"] = flops / st["median"] / 1e9
            r["peak_frac"] = r["gflops"] / gemm_peak_gflops if gemm_peak_gflops else None
            if n != TORCH and TORCH in times:
                ratios = timing.ratio_samples(times[TORCH], times[n])
                rs = timing.summarize(ratios)
                r["speedup"] = {k: rs[k] for k in ("median", "q1", "q3", "min", "max")}
                r["speedup"]["of_medians"] = timing.summarize(times[TORCH])["median"] / st["median"]
            row_impls[n] = r
        target = case.target.for_mode(mode) if case.target else None
        met = None
        if target is not None and primary and row_impls.get(primary, {}).get("speedup"):
            met = row_impls[primary]["speedup"]["median"] >= target
        order = [TORCH] + [n for n in impl_names if n != TORCH]
        rows.append({"case_id": case.id, "mode": mode, "case": case.as_dict(), "tokens": case.tokens,
                     "flops": flops, "target": target, "met": met,
                     "impls": {n: row_impls[n] for n in order if n in row_impls}})
    for r in rows:  # what the case cost the run, checks and timing together
        r["wall_s"] = time.perf_counter() - t_case
    return rows


class _ImplFailed(Exception):
    def __init__(self, name, message):
        super().__init__(message)
        self.name, self.message = name, message


def _prepare(name: str, module: nn.Module, case: Case, device, dtype, mode: str) -> Callable:
    """prepare() for timing: fresh inputs (and output grad), cleared parameter grads; returns the call to time."""

    def prepare():
        if mode == "fwd":
            inp = make_inputs(case, device, dtype, x_grad=False)

            def fn():
                with torch.no_grad():
                    return call(module, case, inp)
        else:
            inp = make_inputs(case, device, dtype, x_grad=True)
            gy = torch.randn(*output_shape(case), device=device, dtype=dtype)
            module.zero_grad(set_to_none=True)

            def fn():
                y, _, _ = call(module, case, inp)
                y.backward(gy)

        def guarded():
            try:
                return fn()
            except Exception as e:  # noqa: BLE001
                raise _ImplFailed(name, f"{type(e).__name__}: {e}") from e
        return guarded

    return prepare


def _memory(module, case, device, dtype, mode, prepare) -> dict:
    out = {}
    try:
        fn = prepare()
        if device.type == "cuda":
            out["peak_mem_bytes"] = metrics.cuda_peak_bytes(fn, device)
        else:
            out["peak_mem_bytes"] = metrics.cpu_peak_bytes(fn)
        if mode == "fwdbwd":
            inp = make_inputs(case, device, dtype, x_grad=True)
            saved = metrics.saved_for_backward_bytes(lambda: call(module, case, inp), list(module.parameters()))
            out["saved_bytes"] = saved
            out["saved_bytes_per_token"] = saved / case.tokens
    except Exception:  # noqa: BLE001 - the timing run reports the failure with its message
        pass
    return out


# ---- the whole run -------------------------------------------------------------------------------------------

def apply_gemm_peak(res: dict, peaks: dict) -> None:
    """Sets res's GEMM peaks ({dtype name: gemm_peak() dict}) and every row's peak_frac from them (in place)."""
    res["gemm_peak"] = peaks
    for r in res["rows"]:
        peak = (peaks.get(r["case"]["dtype"]) or {}).get("gflops")
        for imp in r["impls"].values():
            if imp.get("gflops") is not None:
                imp["peak_frac"] = imp["gflops"] / peak if peak else None


def run_suite(cases: list[Case], backends: list[str], device: torch.device, settings: Settings, *,
              factories: dict[str, Callable] | None = None, machine: dict | None = None,
              gemm_peak: dict | None = None, primary: str | None = None, config: dict | None = None,
              progress=None, seed: int = 0, checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Run every case; returns the results dict (see schema.py). `backends` are fusedrnn backend names; torch.nn
    is always measured. The reference backend is timed only on cases with `reference=True`."""
    t0 = time.perf_counter()
    factories = dict(factories or {})
    factories.setdefault(TORCH, torch_factory)
    for b in backends:
        factories.setdefault(b, None)
    if primary is None:
        primary = default_primary(device, backends)
    gemm_peak = gemm_peak or {}
    rows = []

    def result():
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "machine": machine or {},
                "gemm_peak": gemm_peak, "config": {**(config or {}), **settings.as_dict()},
                "fused_api": fused_api() is not None, "primary_backend": primary,
                "elapsed_s": time.perf_counter() - t0, "rows": list(rows)}
    for i, case in enumerate(cases):
        names = [TORCH] + [b for b in backends if b != "reference" or case.reference]
        peak = (gemm_peak.get(case.dtype) or {}).get("gflops")
        if progress:
            progress.update(i, case.id)
        try:
            new = run_case(case, names, device, settings, factories, peak, primary, seed,
                           on_step=(lambda m, c=case: progress.update(i, f"{c.id} {m}")) if progress else None)
        except Exception as e:  # noqa: BLE001 - torch.nn itself failed: keep the rest of the run
            new = [{"case_id": case.id, "mode": m, "case": case.as_dict(), "tokens": case.tokens,
                    "flops": metrics.gemm_flops(case.cell, case.tokens, case.I, case.H, case.layers, case.D,
                                                case.proj, m),
                    "target": case.target.for_mode(m) if case.target else None, "met": None,
                    "impls": {TORCH: _empty_impl("error", f"{type(e).__name__}: {e}")}} for m in case.modes]
        rows.extend(new)
        if checkpoint:  # a partial results.json survives an interrupted run
            checkpoint(result())
    if progress:
        progress.update(len(cases), "done")
    return result()
