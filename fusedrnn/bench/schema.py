"""results.json layout. Bump SCHEMA_VERSION on any change that renames or removes a key.

Top level (a dict):
    schema            "fusedrnn-bench"
    schema_version    int (this file's SCHEMA_VERSION)
    machine           dict: date_utc, device, device_name, cpu_model, cpu_count, threads, torch, cuda, cudnn,
                      triton, git_commit, fusedrnn (version), fusedrnn_cpu ({capability, gemm, amx,
                      loop_threads} or null), load_avg, ...
    gemm_peak         {dtype name: {n, dtype, gflops, gflops_median, library[, gflops_start, gflops_end]}}  best
                      n^3 matmul, the better of the measurements before and after the run; library: what ran
                      it, the faster of "blas" and "onednn" on the CPU ("cublas" on a GPU; absent in older files)
    cache_bandwidth   (CPU runs with the extension built; absent elsewhere and in older files) {threads, sizes:
                      {str(bytes a thread): GB/s}, sizes_start, sizes_end}: fusedrnn.cpu.read_bandwidth at each
                      case's recurrent weights a thread (metrics.probe_bytes), the better of the measurements before
                      and after the run; the ceilings' bound on the time loops (metrics.floor_seconds)
    config            dict: preset, device, backends (timed), cells, dtypes, rounds, min_rounds, warmup,
                      budget_s, argv
    fused_api         bool: fusedrnn.LSTM/GRU/RNN were importable (else only torch.nn was measured)
    primary_backend   the backend the targets are judged on (what `auto` picks for the device), or null
    elapsed_s         wall time of the run
    rows              list, one per (case, mode):
        case_id, mode ("fwd" | "fwdbwd"), case (Case.as_dict(): cell, T, B, I, H, layers, bidirectional, proj,
        packed, dtype, groups, target {fwd, fwdbwd} | null, reference, modes, id, tokens), tokens, flops,
        target (float | null: the speed-up asked for in this mode),
        impls: {impl name ("torch" = torch.nn, else a fusedrnn backend): {
            status       "ok" | "error" | "unsupported"
            message      str (why, when not ok)
            time         {median, q1, q3, iqr, min, max, mean, n, samples} seconds per call
            tokens_per_s, gflops, peak_frac (gflops / gemm_peak of the dtype)
            speedup      {median, q1, q3, min, max, of_medians} of torch.nn time / this time, per round
                         (null for torch)
            peak_mem_bytes          peak bytes allocated during one call (CUDA allocator / CPU profiler); null
                                    if unmeasurable
            saved_bytes, saved_bytes_per_token   (fwdbwd only) storages saved for backward, parameters excluded
            err_out, err_out_worst  largest max|a-ref|/max|ref| over y, hy, cy vs float64 torch.nn, and which
            err_grad, err_grad_worst  same over the gradients of x, hx, cx and every parameter
            errors       {tensor name: relative error ("out.y", "grad.weight_hh_l0", ...)}
                         (an error is Infinity for NaN output or a shape mismatch; written as JSON Infinity,
                         which Python's json reads back)
        }}
        met           bool | null: speedup of primary_backend >= target
        wall_s        seconds the whole case (error check, memory, timing; all modes) took in this run
"""
from __future__ import annotations

SCHEMA = "fusedrnn-bench"
SCHEMA_VERSION = 1

TOP_KEYS = ("schema", "schema_version", "machine", "gemm_peak", "config", "fused_api", "primary_backend",
            "elapsed_s", "rows")
ROW_KEYS = ("case_id", "mode", "case", "tokens", "flops", "target", "impls", "met")
IMPL_KEYS = ("status", "message", "time", "tokens_per_s", "gflops", "peak_frac", "speedup", "peak_mem_bytes",
             "saved_bytes", "saved_bytes_per_token", "err_out", "err_out_worst", "err_grad", "err_grad_worst",
             "errors")
TIME_KEYS = ("median", "q1", "q3", "iqr", "min", "max", "mean", "n", "samples")


def validate(results: dict) -> list[str]:
    """Problems with a results dict (missing keys, wrong version); an empty list when it matches this schema."""
    problems = []
    for k in TOP_KEYS:
        if k not in results:
            problems.append(f"missing top-level key {k!r}")
    if results.get("schema") != SCHEMA:
        problems.append(f"schema is {results.get('schema')!r}, expected {SCHEMA!r}")
    if results.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version is {results.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    for i, row in enumerate(results.get("rows", [])):
        for k in ROW_KEYS:
            if k not in row:
                problems.append(f"rows[{i}] missing {k!r}")
        for name, imp in row.get("impls", {}).items():
            for k in IMPL_KEYS:
                if k not in imp:
                    problems.append(f"rows[{i}].impls[{name!r}] missing {k!r}")
            if imp.get("status") == "ok":
                for k in TIME_KEYS:
                    if k not in (imp.get("time") or {}):
                        problems.append(f"rows[{i}].impls[{name!r}].time missing {k!r}")
    return problems
