"""The report header (what ran where) and the GEMM peak every case's GFLOP/s is compared with."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(path: str | None = None) -> str | None:
    path = path or os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def fusedrnn_version() -> str | None:
    try:
        import fusedrnn

        return getattr(fusedrnn, "__version__", None)
    except Exception:  # noqa: BLE001 - the package may be half-built; the header then says so
        return None


def fusedrnn_cpu_info() -> dict | None:
    """The cpu backend's choices on this machine: kernel build, what its float32 input projections run on, AMX, and
    the threads its small-batch loops split into (torch's, capped at the CPUs the process can use)."""
    try:
        from fusedrnn import cpu

        return {"capability": cpu.capability(), "gemm": cpu.gemm_library(), "amx": cpu.amx_available(),
                "loop_threads": cpu.loop_threads()}
    except Exception:  # noqa: BLE001 - the extension is not built: the header says so
        return None


def machine_info(device: torch.device) -> dict:
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "device_name": cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None,
        "triton": None,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "git_commit": git_commit(),
        "fusedrnn": fusedrnn_version(),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    info["fusedrnn_cpu"] = fusedrnn_cpu_info()
    if torch.cuda.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - not installed (CPU wheels) or broken: report as absent
        pass
    return info


def _best_times(fn, sync, reps: int) -> list[float]:
    fn()
    sync()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def gemm_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 5) -> dict:
    """Best GFLOP/s of an n^3 matmul (the machine's GEMM peak in practice): 2048 on the CPU, 8192 on a GPU.

    On the CPU the faster of ATen's matmul (BLAS: MKL in torch's x86 wheels) and oneDNN's (mkldnn_linear on oneDNN
    tensors, where torch has oneDNN): on AMD CPUs MKL takes its AVX2 path, and oneDNN's AVX-512 matmul ran 2.3x as
    fast on an EPYC Zen 5 (2 threads, 400 against 172 GFLOP/s), so MKL alone would understate the peak there.
    `library` says which one set it."""
    if n is None:
        n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    found = {"blas" if device.type == "cpu" else "cublas": _best_times(lambda: torch.matmul(a, b), sync, reps)}
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        try:
            am, bm = a.to_mkldnn(), b.to_mkldnn()
            found["onednn"] = _best_times(lambda: torch.ops.aten.mkldnn_linear(am, bm, None), sync, reps)
        except (RuntimeError, NotImplementedError):  # a dtype or CPU this build's oneDNN does not take
            pass
    library, times = min(found.items(), key=lambda kv: min(kv[1]))
    flops = 2.0 * n ** 3
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "gflops": flops / min(times) / 1e9,
            "gflops_median": flops / sorted(times)[len(times) // 2] / 1e9, "library": library}


def read_bandwidth(device: torch.device, cases: list[dict]) -> dict | None:
    """The cache read bandwidth of the CPU's small-batch loop threads at each case's size of recurrent weights a
    thread (metrics.probe_bytes): {"threads", "sizes": {str(bytes a thread): GB/s}}, from
    fusedrnn.cpu.read_bandwidth (each thread reads its own buffer of that size, from wherever it stays: a step
    streams W_hh from there). None on a GPU or where the extension is not built: the ceilings are then the GEMM
    peak's alone."""
    if device.type != "cpu":
        return None
    try:
        from fusedrnn import cpu as fcpu

        if fcpu._C is None:
            return None
        threads = fcpu.loop_threads()
    except Exception:  # noqa: BLE001 - fusedrnn not importable or not built: no probe
        return None
    from .metrics import probe_bytes

    sizes = sorted({probe_bytes(c, threads) for c in cases})
    return {"threads": threads, "sizes": {str(n): fcpu.read_bandwidth(n) for n in sizes}}


def best_bandwidth(start: dict | None, end: dict | None) -> dict | None:
    """The faster of two read_bandwidth() results size by size (a shared machine's speed drifts; a bandwidth
    measured while it was slow would set every floor too high), with both measurements kept."""
    if not start or not end:
        return start or end
    sizes = {}
    for k, a in start["sizes"].items():
        b = end["sizes"].get(k, a)
        sizes[k] = max(a, b)
    return {"threads": start["threads"], "sizes": sizes, "sizes_start": start["sizes"], "sizes_end": end["sizes"]}
