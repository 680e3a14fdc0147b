"""The benchmark report's pieces (fusedrnn/bench), tested without timing anything real: a fake clock drives the
timing harness, errors and flops are checked on known inputs, and report/plots/JSON/--compare are generated into a
temporary folder."""
from __future__ import annotations

import copy
import io
import json
import os

import pytest
import torch

import fusedrnn

from fusedrnn.bench import cases as C
from fusedrnn.bench import harness, metrics, report, schema, timing
from fusedrnn.bench.compare import main as compare_main
from fusedrnn.bench.progress import Progress
from fusedrnn.bench.readme import readme_section


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Nothing here is timed for real; with one thread tiny ops do not stall on a busy machine's OpenMP barriers."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- timing --------------------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def advance(self, dt):
        self.now += dt


def test_quantile_and_summarize_known_values():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert timing.quantile(xs, 0.5) == 3.0
    assert timing.quantile(xs, 0.25) == 2.0
    assert timing.quantile([1.0, 2.0], 0.5) == 1.5
    s = timing.summarize(xs)
    assert (s["median"], s["q1"], s["q3"], s["iqr"], s["min"], s["max"], s["n"]) == (3.0, 2.0, 4.0, 2.0, 1.0, 5.0, 5)
    assert s["mean"] == 3.0
    with pytest.raises(ValueError):
        timing.summarize([])


def test_interleaved_rotates_order_and_times_only_the_call():
    clock = FakeClock()
    log = []

    def impl(name, dt):
        def prepare():
            clock.advance(100.0)  # preparing fresh inputs must not count
            log.append(("prep", name))

            def fn():
                log.append(("run", name))
                clock.advance(dt)
            return fn
        return prepare

    syncs = []
    out = timing.interleaved({"A": impl("A", 2.0), "B": impl("B", 1.0), "C": impl("C", 3.0)}, rounds=4, warmup=1,
                             clock=clock, sync=lambda: syncs.append(1))
    assert out == {"A": [2.0] * 4, "B": [1.0] * 4, "C": [3.0] * 4}
    runs = [n for kind, n in log if kind == "run"]
    assert runs[:3] == ["A", "B", "C"]  # warm-up
    assert runs[3:] == ["A", "B", "C", "B", "C", "A", "C", "A", "B", "A", "B", "C"]
    assert len(syncs) == 2 * len(runs)
    # every call gets its own prepare() (fresh inputs), right before it
    assert [k for k, _ in log] == ["prep", "run"] * len(runs)


def test_interleaved_without_rotation_is_abab():
    clock = FakeClock()
    order = []

    def impl(name):
        return lambda: (lambda: order.append(name))
    timing.interleaved({"A": impl("A"), "B": impl("B")}, rounds=3, warmup=0, clock=clock, rotate=False)
    assert order == ["A", "B", "A", "B", "A", "B"]


def test_interleaved_budget_stops_after_min_rounds():
    clock = FakeClock()

    def prepare():
        return lambda: clock.advance(1.0)
    rounds_seen = []
    out = timing.interleaved({"A": prepare, "B": prepare}, rounds=50, warmup=0, min_rounds=3, budget_s=2.5,
                             clock=clock, on_round=lambda r, n: rounds_seen.append(r))
    assert len(out["A"]) == 3 and len(out["B"]) == 3  # budget exceeded after round 2, but min_rounds is 3
    out = timing.interleaved({"A": prepare}, rounds=50, warmup=0, min_rounds=2, budget_s=10.0, clock=clock)
    assert len(out["A"]) == 11  # 11 s > 10 s budget
    assert rounds_seen == [1, 2, 3]


def test_ratio_samples_pairs_rounds():
    assert timing.ratio_samples([4.0, 6.0, 9.0], [2.0, 2.0]) == [2.0, 3.0]


# ---- metrics -------------------------------------------------------------------------------------------------

def test_rel_error_known_inputs():
    ref = torch.tensor([1.0, -4.0, 2.0])
    assert metrics.rel_error(torch.tensor([1.0, -4.0, 2.0]), ref) == 0.0
    assert metrics.rel_error(torch.tensor([1.5, -4.0, 2.0]), ref) == pytest.approx(0.5 / 4.0)
    assert metrics.rel_error(torch.tensor([1.0, -3.0, 2.0]), ref) == pytest.approx(1.0 / 4.0)
    assert metrics.rel_error(torch.tensor([1.0, float("nan"), 2.0]), ref) == float("inf")
    assert metrics.rel_error(torch.zeros(2), ref) == float("inf")  # shape mismatch
    assert metrics.rel_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert metrics.rel_error(torch.ones(3), torch.zeros(3)) == float("inf")
    assert metrics.rel_error(torch.empty(0), torch.empty(0)) == 0.0
    # computed in float64: a float16 tensor against a float64 reference
    assert metrics.rel_error(torch.tensor([1.0], dtype=torch.float16), torch.tensor([1.0], dtype=torch.float64)) == 0


def test_max_rel_error_takes_worst_and_missing_is_inf():
    ref = {"a": torch.tensor([2.0]), "b": torch.tensor([10.0])}
    worst, name, per = metrics.max_rel_error({"a": torch.tensor([2.2]), "b": torch.tensor([10.5])}, ref)
    assert name == "a" and worst == pytest.approx(0.1) and per["b"] == pytest.approx(0.05)
    worst, name, _ = metrics.max_rel_error({"a": torch.tensor([2.0])}, ref)
    assert name == "b" and worst == float("inf")


def test_gemm_flops():
    N, I, H = 7, 3, 5
    assert metrics.gemm_flops("lstm", N, I, H) == 2 * N * I * 4 * H + 2 * N * H * 4 * H
    assert metrics.gemm_flops("gru", N, I, H) == 2 * N * (I + H) * 3 * H
    assert metrics.gemm_flops("rnn", N, I, H, mode="fwdbwd") == 3 * 2 * N * (I + H) * H
    # 2 layers, bidirectional, projection P=2: layer 1 reads D*P = 4 features; recurrence reads P
    P = 2
    per_l0 = 2 * N * I * 4 * H + 2 * N * P * 4 * H + 2 * N * H * P
    per_l1 = 2 * N * (2 * P) * 4 * H + 2 * N * P * 4 * H + 2 * N * H * P
    assert metrics.gemm_flops("lstm", N, I, H, layers=2, D=2, proj=P) == 2 * (per_l0 + per_l1)
    with pytest.raises(ValueError):
        metrics.gemm_flops("lstm", N, I, H, mode="bwd")


def test_saved_for_backward_bytes_excludes_parameters_and_dedups():
    w = torch.randn(8, requires_grad=True)
    x = torch.randn(8, requires_grad=True)

    def f():
        return (x * w * x).sum()  # x saved twice (same storage), w saved once, x*w saved once
    total = metrics.saved_for_backward_bytes(f)
    no_w = metrics.saved_for_backward_bytes(f, [w])
    assert total - no_w == 8 * 4
    assert no_w == 2 * 8 * 4  # x and the intermediate x*w


def test_cpu_peak_bytes_sees_an_allocation():
    peak = metrics.cpu_peak_bytes(lambda: torch.empty(1 << 20, dtype=torch.uint8).fill_(1))
    assert peak is None or peak >= 1 << 20


# ---- cases ---------------------------------------------------------------------------------------------------

def test_case_ids_lengths_and_tokens():
    c = C.Case("lstm", 8, 4, 3, 5, layers=2, bidirectional=True, proj=2, packed=True)
    assert c.id == "lstm-T8-B4-I3-H5-P2-L2-bi-packed-fp32"
    L = c.lengths()
    assert L[0] == 8 and L == sorted(L, reverse=True) and min(L) == 2
    assert c.tokens == sum(L) and c.P == 2 and c.D == 2
    assert C.Case("gru", 8, 4, 3, 5).tokens == 32


def test_grids_hold_the_issue3_targets_and_unique_ids():
    full = C.build_grid("full", "cpu")
    ids = [c.id for c in full]
    assert len(ids) == len(set(ids))
    targets = {c.id: c.target for c in full if c.target}
    assert len(targets) == 11
    assert targets["lstm-T100-B1-I256-H256-fp32"] == C.Target(3.0, 2.0)
    assert targets["lstm-T100-B64-I512-H512-fp32"] == C.Target(1.0, 1.0)
    assert targets["lstm-T100-B16-I256-H256-L2-bi-fp32"] == C.Target(1.2, 1.2)
    assert targets["rnn-T200-B16-I256-H256-fp32"] == C.Target(2.0, 2.0)
    assert any(c.packed and c.target for c in full) and any(c.proj and c.target for c in full)
    batches = sorted(c.B for c in full if "batch" in c.groups and c.cell == "lstm")
    assert batches[0] == 1 and batches[-1] == 256
    gpu = C.build_grid("full", "cuda")
    assert {c.dtype for c in gpu} == {"float32", "float16", "bfloat16"}
    assert max(c.H for c in gpu if "hidden" in c.groups) == 2048
    gpu_targets = [c for c in gpu if c.target]
    assert {c.dtype for c in gpu_targets} == {"float16", "bfloat16"}
    assert all((c.T, c.B, c.H) == (1024, 16, 768) for c in gpu_targets)
    assert len([c for c in C.build_grid("quick", "cuda") if c.target]) == 2
    quick = C.build_grid("quick", "cpu")
    assert 1 <= sum(c.reference for c in quick) <= 2
    assert sum(1 for c in quick if c.target) == 11
    assert all(c.cell == "gru" for c in C.build_grid("quick", "cpu", cells=["gru"]))
    with pytest.raises(ValueError):
        C.build_grid("huge", "cpu")


# ---- the harness on tiny cases with a fake clock -------------------------------------------------------------

def _tiny_results(cases, clock, extra_factories=None, backends=("fake",), primary="fake"):
    """torch.nn takes 2 fake ms per forward, the 'fake' backend (a torch.nn module too) 1 ms."""
    def timed(dt):
        def factory(case, device, dtype):
            m = harness.torch_factory(case, device, dtype)
            m.register_forward_hook(lambda *a: clock.advance(dt))
            return m
        return factory
    factories = {"torch": timed(2e-3), "fake": timed(1e-3), **(extra_factories or {})}
    settings = harness.Settings(rounds=4, min_rounds=3, warmup=1, budget_s=None, clock=clock)
    return harness.run_suite(cases, list(backends), torch.device("cpu"), settings, factories=factories,
                             machine={"device": "cpu", "device_name": "test cpu", "date_utc": "2026-01-01 00:00 UTC",
                                      "cpu_count": 2, "threads": 2, "load_avg": [0.1, 0.1, 0.1]},
                             gemm_peak={"float32": {"n": 64, "dtype": "float32", "gflops": 10.0}},
                             primary=primary, config={"preset": "test", "backends": list(backends)})


TINY = [
    C.Case("lstm", 4, 3, 5, 6, groups=("batch", "target"), target=C.Target(1.5, 3.0)),
    C.Case("lstm", 4, 2, 5, 6, groups=("batch",)),
    C.Case("gru", 5, 3, 4, 4, layers=2, bidirectional=True, packed=True, groups=("variants",)),
    C.Case("lstm", 4, 3, 5, 6, proj=3, groups=("hidden",)),
    C.Case("lstm", 4, 3, 6, 6, groups=("hidden",)),
]


FAKE_PEAK = 12345


@pytest.fixture(scope="module")
def tiny_results():
    # the profiler costs ~0.5 s a session; its own test is test_cpu_peak_bytes_sees_an_allocation
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "cpu_peak_bytes", lambda fn: (fn(), FAKE_PEAK)[1])
        return _tiny_results(TINY, FakeClock())


def test_results_match_schema_and_numbers(tiny_results):
    res = tiny_results
    assert schema.validate(res) == []
    assert schema.validate(json.loads(json.dumps(res))) == []  # survives JSON
    assert len(res["rows"]) == 2 * len(TINY)
    r = res["rows"][0]
    assert r["case_id"] == TINY[0].id and r["mode"] == "fwd"
    nn, fk = r["impls"]["torch"], r["impls"]["fake"]
    assert nn["status"] == fk["status"] == "ok"
    assert nn["time"]["median"] == pytest.approx(2e-3) and fk["time"]["median"] == pytest.approx(1e-3)
    assert fk["time"]["n"] == 4
    assert fk["speedup"]["median"] == pytest.approx(2.0) and nn["speedup"] is None
    assert fk["tokens_per_s"] == pytest.approx(12 / 1e-3)
    assert fk["gflops"] == pytest.approx(r["flops"] / 1e-3 / 1e9)
    assert fk["peak_frac"] == pytest.approx(fk["gflops"] / 10.0)
    # same weights, same dtype: the same numbers as torch.nn, and float32-sized errors against float64
    assert fk["err_out"] == pytest.approx(nn["err_out"]) and fk["err_grad"] == pytest.approx(nn["err_grad"])
    assert 0 < nn["err_out"] < 1e-5 and 0 < nn["err_grad"] < 1e-5
    assert {"out.y", "out.hy", "out.cy", "grad.x", "grad.hx", "grad.cx", "grad.weight_hh_l0"} <= set(fk["errors"])
    # targets: 2.0x measured, 1.5x asked forward (met), 3.0x asked forward+backward (missed)
    assert (r["target"], r["met"]) == (1.5, True)
    assert (res["rows"][1]["target"], res["rows"][1]["met"]) == (3.0, False)
    bwd = res["rows"][1]["impls"]["fake"]
    assert bwd["peak_mem_bytes"] == FAKE_PEAK and nn["peak_mem_bytes"] == FAKE_PEAK
    assert bwd["saved_bytes"] > 0 and bwd["saved_bytes_per_token"] == pytest.approx(bwd["saved_bytes"] / 12)
    packed = [x for x in res["rows"] if x["case"]["packed"]][0]
    assert packed["tokens"] == TINY[2].tokens and packed["impls"]["fake"]["status"] == "ok"
    assert "grad.weight_hh_l1_reverse" in packed["impls"]["fake"]["errors"]


def test_errors_detect_a_wrong_backend():
    case = C.Case("gru", 3, 2, 4, 4)
    mods = {"torch": harness.torch_factory(case, "cpu", torch.float32)}
    bad = copy.deepcopy(mods["torch"])
    mods["bad"] = bad
    with torch.no_grad():
        bad.weight_hh_l0.mul_(1.01)  # a backend that computes something slightly different
    errs = harness.compute_errors(case, mods, torch.device("cpu"))
    assert errs["torch"]["err_out"] < 1e-5
    assert errs["bad"]["err_out"] > 1e-4 and errs["bad"]["err_grad"] > 1e-4


def test_failing_backends_are_reported_and_others_still_timed():
    clock = FakeClock()

    def broken_build(case, device, dtype):
        raise RuntimeError("not built")

    def broken_call(case, device, dtype):
        m = harness.torch_factory(case, device, dtype)
        state = {"calls": 0}

        def hook(*a):
            state["calls"] += 1
            if state["calls"] > 1:  # passes the error check, then fails while timed
                raise RuntimeError("kernel crashed")
        m.register_forward_hook(hook)
        return m
    res = _tiny_results(TINY[:1], clock, {"nobuild": broken_build, "crash": broken_call},
                        backends=("fake", "nobuild", "crash"))
    assert schema.validate(res) == []
    for r in res["rows"]:
        assert r["impls"]["nobuild"]["status"] == "error" and "not built" in r["impls"]["nobuild"]["message"]
        assert r["impls"]["crash"]["status"] == "error" and "kernel crashed" in r["impls"]["crash"]["message"]
        assert r["impls"]["fake"]["status"] == "ok" and r["impls"]["fake"]["speedup"]["median"] == pytest.approx(2)
    text = report.problems_list(res)
    assert "kernel crashed" in text and "not built" in text


def test_schema_validate_reports_missing_keys(tiny_results):
    res = copy.deepcopy(tiny_results)
    del res["rows"][0]["impls"]["fake"]["err_grad"]
    del res["gemm_peak"]
    res["schema_version"] = 0
    probs = schema.validate(res)
    assert any("err_grad" in p for p in probs) and any("gemm_peak" in p for p in probs)
    assert any("schema_version" in p for p in probs)


# ---- report, plots, compare, README --------------------------------------------------------------------------

def test_report_and_plots_in_tmp_dir(tiny_results, tmp_path):
    from fusedrnn.bench import plots

    made, note = plots.make_plots(tiny_results, str(tmp_path))
    pytest.importorskip("matplotlib")
    files = {f for _, f in made}
    assert {"speedup_batch_lstm_fwd.png", "speedup_batch_lstm_fwdbwd.png", "speedup_hidden_lstm_fwd.png",
            "errors.png"} <= files
    for f in files:
        with open(tmp_path / f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    text = report.write_report(tiny_results, str(tmp_path / "report.md"), made, note, "old -> new")
    assert (tmp_path / "report.md").read_text() == text
    assert "test cpu" in text and "2026-01-01" in text and "GEMM peak" in text
    assert "✅ met" in text and "❌ missed" in text and "1 of 2 measured targets met" in text
    # ceiling = 1 / torch.nn's fraction of the GEMM peak, per target row
    target_row = next(r for r in tiny_results["rows"] if r.get("target") is not None)
    want = 1 / target_row["impls"]["torch"]["peak_frac"]
    assert report.ceiling(target_row) == pytest.approx(want) and f"{want:.2f}x" in text and "Ceiling:" in text
    for f in files:
        assert f"]({f})" in text
    assert "LSTM T=4 B=3 I=5 H=6 fp32" in text and "GRU T=5 B=3 H=4 (2L, bi, packed) fp32" in text
    assert "old -> new" in text


def test_plots_without_matplotlib(monkeypatch, tiny_results, tmp_path):
    from fusedrnn.bench import plots

    monkeypatch.setattr(plots, "_mpl", lambda: None)
    made, note = plots.make_plots(tiny_results, str(tmp_path))
    assert made == [] and "matplotlib" in note
    text = report.write_report(tiny_results, str(tmp_path / "r.md"), made, note)
    assert "matplotlib is not installed" in text


def test_cpu_backend_line_names_the_loop_threads():
    """The header's cpu-backend line says how many threads the small-batch loops split into (torch's threads,
    capped at the usable CPUs), from what the extension reports; results from before the key omit it."""
    from fusedrnn.bench import machine
    line = report._cpu_backend({"capability": "AVX512", "gemm": "blas", "amx": False, "loop_threads": 3})
    assert line.endswith("AMX no, small-batch loops on 3 threads"), line
    assert "loops" not in report._cpu_backend({"capability": "AVX512", "gemm": "blas", "amx": False})
    info = machine.fusedrnn_cpu_info()
    if info is None:
        pytest.skip("the cpu extension is not built")
    from fusedrnn import cpu
    assert info["loop_threads"] == cpu.loop_threads() >= 1


def test_load_warning():
    res = {"machine": {"device": "cpu", "cpu_count": 2, "threads": 2, "load_avg": [4.0, 1, 1]}}
    assert "loaded" in report.load_warning(res)
    res["machine"]["load_avg"] = [2.1, 1, 1]
    assert report.load_warning(res) is None


def test_compare_text_and_cli(tiny_results, tmp_path, capsys):
    new = copy.deepcopy(tiny_results)
    for r in new["rows"]:
        r["impls"]["fake"]["time"]["median"] /= 2  # twice as fast
    text = report.compare(tiny_results, new)
    assert f"{2 * len(TINY)} faster by >5%" in text
    assert "-50.0%" in text and "+0.0%" in text
    assert "no (case, mode, implementation)" in report.compare(tiny_results, {"rows": []})
    (tmp_path / "a.json").write_text(json.dumps(tiny_results))
    (tmp_path / "b.json").write_text(json.dumps(new))
    assert compare_main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert "-50.0%" in capsys.readouterr().out


def test_readme_section_names_device_and_date(tiny_results):
    text = readme_section(tiny_results, "benchmarks/results/cpu/report.md")
    assert text.startswith("## Performance")
    assert "test cpu" in text and "2026-01-01 00:00 UTC" in text
    assert "2.00x" in text and "benchmarks/results/cpu/report.md" in text
    assert "loaded" not in text
    busy = copy.deepcopy(tiny_results)
    busy["machine"]["load_avg"] = [9.0, 9.0, 9.0]
    assert "machine was loaded" in readme_section(busy)


def test_progress_bar():
    clock = FakeClock()
    out = io.StringIO()
    p = Progress(4, stream=out, enabled=True, clock=clock)
    clock.advance(30)
    p.update(1, "lstm case")
    assert "[######..................] 1/4 0:30 elapsed, ~1:30 left  lstm case" in out.getvalue()
    p.update(4, "done")
    assert out.getvalue().endswith("\n")
    log = io.StringIO()
    q = Progress(2, stream=log, enabled=False, clock=clock)
    q.update(1, "a")
    q.update(1, "a fwd")
    assert log.getvalue().count("\n") == 1


def test_cli_list(capsys):
    from fusedrnn.bench.__main__ import main

    assert main(["--quick", "--list", "--device", "cpu", "--cells", "gru", "--backends", ""]) == 0
    out = capsys.readouterr().out
    assert "gru-T100-B1-I256-H256-fp32" in out and "lstm" not in out.split("cases")[0]
    assert main(["--list", "--cells", "lstm,foo"]) == 2
    assert main(["--list", "--device", "cpu", "--targets", "--backends", ""]) == 0
    lines = capsys.readouterr().out.splitlines()[:-1]
    assert len(lines) == 11 and all("target" in line.split() for line in lines), lines


def test_gemm_peak_after_the_run_rescales_peak_fractions_and_bounds_ceilings(tiny_results):
    """The better of the peaks measured before and after the run is kept and every peak_frac follows it; where
    torch.nn still ran above the peak (a machine whose speed drifted) the targets table gives no ceiling."""
    res = copy.deepcopy(tiny_results)
    row = next(r for r in res["rows"] if r.get("target") is not None)
    nn = row["impls"]["torch"]
    harness.apply_gemm_peak(res, {"float32": {"n": 64, "dtype": "float32", "gflops": nn["gflops"] * 2}})
    assert nn["peak_frac"] == pytest.approx(0.5) and report.ceiling(row) == pytest.approx(2.0)
    assert all(imp["peak_frac"] == pytest.approx(imp["gflops"] / (nn["gflops"] * 2))
               for r in res["rows"] for imp in r["impls"].values() if imp.get("gflops") is not None)
    harness.apply_gemm_peak(res, {"float32": {"n": 64, "dtype": "float32", "gflops": nn["gflops"] / 1.25}})
    assert nn["peak_frac"] == pytest.approx(1.25) and report.ceiling(row) is None
    assert schema.validate(res) == []


def _case(**kw):
    base = {"cell": "lstm", "T": 100, "B": 1, "I": 256, "H": 256, "layers": 1, "bidirectional": False, "proj": 0,
            "packed": False, "dtype": "float32", "tokens": 100}
    return {**base, **kw}


def test_floor_seconds_bounds_the_loop_by_streaming_the_recurrent_weights():
    """The floor: the GEMM flops at the peak, except that each layer's time loop takes at least T steps of its
    recurrent weights read at the measured bandwidth (two loops for forward+backward); without a bandwidth, or where
    the batch makes the loop's flops the larger bound, it is the GEMM peak's floor exactly."""
    peak = 400.0  # GFLOP/s
    c = _case()
    w = 4 * 256 * 256 * 4  # LSTM W_hh H256, float32: 1 MiB
    assert metrics.recurrent_bytes("lstm", 256, 0, "float32") == w
    assert metrics.recurrent_bytes("lstm", 512, 128, "bfloat16") == (4 * 512 * 128 + 512 * 128) * 2
    gemm_only = metrics.gemm_flops("lstm", 100, 256, 256, mode="fwd") / (peak * 1e9)
    assert metrics.floor_seconds(c, "fwd", peak) == pytest.approx(gemm_only)
    proj_s = 2 * 100 * 256 * 1024 / (peak * 1e9)  # the input projection at the peak
    assert metrics.floor_seconds(c, "fwd", peak, 100.0) == pytest.approx(proj_s + 100 * w / 100e9)
    # forward+backward: 3x the forward's flops (6 products the input projection's size here, I = H), of which the
    # two loops' products (forward, and the backward's by W_hh) wait on the steps: 4 at the peak, 2 loops of reads
    fb = metrics.floor_seconds(c, "fwdbwd", peak, 100.0)
    assert fb == pytest.approx(4 * proj_s + 2 * 100 * w / 100e9)
    # batch 64: the loop's flops (64 rows a step) outweigh the weights' bytes at 100 GB/s: the GEMM floor again
    c64 = _case(B=64, tokens=6400)
    assert metrics.floor_seconds(c64, "fwd", peak, 100.0) == pytest.approx(
        metrics.gemm_flops("lstm", 6400, 256, 256) / (peak * 1e9))
    # two directions and two layers: each layer's loop streams both directions' weights T times
    c2 = _case(layers=2, bidirectional=True)
    flops = metrics.gemm_flops("lstm", 100, 256, 256, layers=2, D=2)
    loop_flops = 2 * 2 * 2 * 100 * 1024 * 256
    assert metrics.floor_seconds(c2, "fwd", peak, 50.0) == pytest.approx(
        (flops - loop_flops) / (peak * 1e9) + 2 * 100 * 2 * w / 50e9)
    # the size a probe thread reads: every direction's weights shared by the threads, rounded up
    assert metrics.probe_bytes(c2, 2) == w and metrics.probe_bytes(c, 3) == -(-w // 3)


def test_ceiling_with_the_read_bandwidth_is_torch_time_over_the_floor(tiny_results):
    """With a cache read bandwidth in the results, a target row's ceiling is torch.nn's time over floor_seconds (never
    above the GEMM peak's ceiling); without one (a GPU, an older file) it is the GEMM peak's; the header says what
    was measured."""
    res = copy.deepcopy(tiny_results)
    row = next(r for r in res["rows"] if r.get("target") is not None)
    nn = row["impls"]["torch"]
    gemm_ceiling = report.ceiling(row, res)
    assert gemm_ceiling == pytest.approx(1 / nn["peak_frac"])
    size = metrics.probe_bytes(row["case"], 2)
    for gbs, bound in ((1e-3, True), (1e6, False)):  # a crawl: the weights bound the loop; a flood: the flops do
        res["cache_bandwidth"] = {"threads": 2, "sizes": {str(size): gbs}}
        c = report.ceiling(row, res)
        peak = res["gemm_peak"]["float32"]["gflops"]
        assert c == pytest.approx(nn["time"]["median"] / metrics.floor_seconds(row["case"], row["mode"], peak, gbs))
        assert (c < 0.99 * gemm_ceiling) if bound else (c == pytest.approx(gemm_ceiling))
    text = report.header_md(res)
    assert "cache read bandwidth" in text and "1000000 GB/s" in text and "2 threads" in text
    assert "read bandwidth (header)" in report.targets_table(res)
    assert "read bandwidth" not in report.targets_table(tiny_results)
    assert "| **cache read bandwidth** | - |" in report.header_md(tiny_results)


@pytest.mark.skipif("cpu" not in fusedrnn.available_backends(), reason="the cpu backend is not built")
def test_read_bandwidth_probe_and_the_better_of_two_runs():
    """fusedrnn.cpu.read_bandwidth: a buffer that stays in L1 reads faster than one of 64 MiB a thread (past any
    L2); machine.read_bandwidth measures each case's size a thread once; best_bandwidth keeps the faster of two
    runs size by size."""
    from fusedrnn import cpu as fcpu
    from fusedrnn.bench import machine

    small, big = fcpu.read_bandwidth(16 << 10), fcpu.read_bandwidth(64 << 20)
    assert 0 < big and small > 1.2 * big, (small, big)
    with pytest.raises(ValueError):
        fcpu.read_bandwidth(0)
    cases = [_case(H=64), _case(H=64, B=8), _case(cell="gru", H=32)]
    bw = machine.read_bandwidth(torch.device("cpu"), cases)
    threads = fcpu.loop_threads()
    assert bw["threads"] == threads
    assert set(bw["sizes"]) == {str(metrics.probe_bytes(c, threads)) for c in cases} and len(bw["sizes"]) == 2
    assert all(v > 0 for v in bw["sizes"].values())
    a = {"threads": 2, "sizes": {"1024": 10.0, "2048": 30.0}}
    b = {"threads": 2, "sizes": {"1024": 20.0, "2048": 5.0}}
    best = machine.best_bandwidth(a, b)
    assert best["sizes"] == {"1024": 20.0, "2048": 30.0} and best["sizes_start"] == a["sizes"]
    assert machine.best_bandwidth(None, b) is b and machine.read_bandwidth(torch.device("meta"), cases) is None


def test_gemm_peak_takes_the_faster_library_and_the_header_names_it(tiny_results, monkeypatch):
    """The CPU's GEMM peak is the faster of ATen's matmul (BLAS) and oneDNN's where torch has oneDNN (on AMD CPUs
    MKL's AVX2 path would understate it); the result says which, float64 (which oneDNN's matmul does not take)
    stays on BLAS, and the report's header names the library."""
    from fusedrnn.bench import machine
    p = machine.gemm_peak(torch.device("cpu"), torch.float32, n=128, reps=2)
    assert p["library"] in (("blas", "onednn") if torch.backends.mkldnn.is_available() else ("blas",))
    assert p["gflops"] >= p["gflops_median"] > 0
    assert machine.gemm_peak(torch.device("cpu"), torch.float64, n=64, reps=1)["library"] == "blas"
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert machine.gemm_peak(torch.device("cpu"), torch.float32, n=64, reps=1)["library"] == "blas"
    res = copy.deepcopy(tiny_results)
    res["gemm_peak"] = {"float32": {"n": 2048, "dtype": "float32", "gflops": 400.0, "gflops_median": 390.0,
                                    "library": "onednn"}}
    assert "float32 400 GFLOP/s (2048^3 matmul, onednn)" in report.header_md(res)
    assert schema.validate(res) == []


@pytest.mark.skipif("cpu" not in fusedrnn.available_backends(), reason="the cpu backend is not built")
def test_knob_ab_alternates_the_setting_and_restores_it(capsys, monkeypatch):
    """benchmarks/knob_ab.py: one line per case with the ratio of the two settings, alternating which runs first;
    "-" leaves the knob unset, and the variable is as it was afterwards; packed=1 feeds a PackedSequence with the
    bench's lengths."""
    import importlib.util
    import pathlib
    import sys
    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "knob_ab.py"
    spec = importlib.util.spec_from_file_location("knob_ab", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.parse_case("LSTM,5,3,8,proj_size=4") == ("LSTM", 5, 3, 8, {"proj_size": 4})
    seen, set_knob = [], mod.set_knob
    monkeypatch.setattr(mod, "set_knob", lambda name, v: (seen.append(v), set_knob(name, v)))
    monkeypatch.delenv("FUSEDRNN_CPU_CHUNK_ROWS", raising=False)
    monkeypatch.setattr(sys, "argv", ["knob_ab", "FUSEDRNN_CPU_CHUNK_ROWS", "1", "-",
                                      "GRU,4,2,8;LSTM,3,1,8;LSTM,8,3,8,packed=1",
                                      "--rounds", "2", "--mode", "fwdbwd", "--threads", str(torch.get_num_threads())])
    inputs, forward = [], fusedrnn.LSTM.forward
    monkeypatch.setattr(fusedrnn.LSTM, "forward", lambda self, x, hx=None: (inputs.append(x), forward(self, x, hx))[1])
    mod.main()
    lines = capsys.readouterr().out.strip().splitlines()
    packed = [x for x in inputs if isinstance(x, torch.nn.utils.rnn.PackedSequence)]
    assert packed and all(x.batch_sizes.tolist() == [3, 3, 2, 2, 2, 1, 1, 1] for x in packed)
    assert len(lines) == 3 and all("FUSEDRNN_CPU_CHUNK_ROWS=1 / -: ratio" in ln for ln in lines)
    assert seen[:4] == ["1", "-", "-", "1"]  # alternating order, round by round
    assert "FUSEDRNN_CPU_CHUNK_ROWS" not in os.environ
