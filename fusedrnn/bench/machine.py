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
    """The cpu backend's choices on this machine: kernel build, what its float32 input projections run on, AMX."""
    try:
        from fusedrnn import cpu

        return {"capability": cpu.capability(), "gemm": cpu.gemm_library(), "amx": cpu.amx_available()}
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


def gemm_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 5) -> dict:
    """Best GFLOP/s of an n^3 matmul (the machine's GEMM peak in practice): 2048 on the CPU, 8192 on a GPU."""
    if n is None:
        n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.matmul(a, b)
    sync()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        times.append(time.perf_counter() - t0)
    flops = 2.0 * n ** 3
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "gflops": flops / min(times) / 1e9,
            "gflops_median": flops / sorted(times)[len(times) // 2] / 1e9}
