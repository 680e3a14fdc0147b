"""What this fusedrnn install can run: `python -m fusedrnn.info` prints it, `fusedrnn.info.collect()` returns it.

Paste the output into bug reports. Nothing here raises: a query that fails (no GPU, no driver, a backend that does
not import) is reported as such, because the point is to describe broken installs too.
"""
from __future__ import annotations

import importlib
import platform
import re
import shutil
import subprocess
import sys

import torch


def _safe(fn, default=None):
    try:
        return fn()
    except Exception as e:  # a broken driver or install is information, not a crash
        return default if default is not None else f"error: {type(e).__name__}: {e}"


def _cuda_extension_archs() -> dict:
    """Architectures compiled into fusedrnn._C_cuda: from the module's own attribute when it has one, else from
    `cuobjdump --list-elf` on the shared library when the CUDA toolkit is on PATH."""
    try:
        mod = importlib.import_module("fusedrnn._C_cuda")
    except ImportError as e:
        return {"present": False, "reason": str(e), "archs": None}
    for attr in ("CUDA_ARCH_LIST", "cuda_arch_list", "arch_list"):
        val = getattr(mod, attr, None)
        if val is not None:
            return {"present": True, "path": getattr(mod, "__file__", None),
                    "archs": sorted(val() if callable(val) else val)}
    path = getattr(mod, "__file__", None)
    archs = None
    if path and shutil.which("cuobjdump"):
        out = _safe(lambda: subprocess.run(["cuobjdump", "--list-elf", path], capture_output=True, text=True,
                                           timeout=30).stdout, default="")
        archs = sorted(set(re.findall(r"sm_\d+a?", out))) or None
    return {"present": True, "path": path,
            "archs": archs if archs is not None else "unknown (cuobjdump not on PATH)"}


def collect() -> dict:
    """Versions, backends and devices as a JSON-serialisable dict (the benchmark report header can reuse it).

    Keys: fusedrnn, torch, python, platform, cuda (torch's CUDA version or None), cudnn, cpu_capability,
    backends {name: {"usable": bool, "reason": str}}, auto (backend `auto` picks for float32 LSTM per device),
    gpus [names], torch_cuda_archs, fusedrnn_cuda_ext."""
    import fusedrnn
    from fusedrnn import backends as reg

    info = {
        "fusedrnn": fusedrnn.__version__,
        "fusedrnn_path": fusedrnn.__file__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "cudnn": _safe(lambda: torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None,
        "cpu_capability": _safe(torch.backends.cpu.get_cpu_capability),
        "num_threads": torch.get_num_threads(),
    }
    b = {}
    for name, backend in reg._BACKENDS.items():
        usable = bool(_safe(backend.available, default=False))
        b[name] = {"usable": usable, "reason": "" if usable else _safe(backend.why_unavailable)}
    for name, why in reg._MISSING.items():
        b.setdefault(name, {"usable": False, "reason": why})
    info["backends"] = b
    devices = ["cpu"]
    cuda_ok = bool(_safe(torch.cuda.is_available, default=False))
    if cuda_ok:
        devices.append("cuda")
    info["auto"] = {d: _safe(lambda d=d: reg.resolve("auto", torch.device(d), torch.float32, "lstm", False))
                    for d in devices}
    info["cuda_available"] = cuda_ok
    info["gpus"] = ([_safe(lambda i=i: f"{torch.cuda.get_device_name(i)} (sm_%d%d)"
                           % torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
                    if cuda_ok else [])
    info["torch_cuda_archs"] = _safe(torch.cuda.get_arch_list) if torch.version.cuda else []
    info["fusedrnn_cuda_ext"] = _cuda_extension_archs()
    return info


def format_info(info: dict) -> str:
    lines = [
        f"fusedrnn        {info['fusedrnn']}  ({info['fusedrnn_path']})",
        f"torch           {info['torch']}",
        f"python          {info['python']}  on {info['platform']}",
        f"CUDA (torch)    {info['cuda'] or 'none (CPU-only torch build)'}",
        f"cuDNN           {info['cudnn'] or 'none'}",
        f"CPU capability  {info['cpu_capability']}  ({info['num_threads']} threads)",
        "backends:",
    ]
    for name, b in info["backends"].items():
        lines.append(f"  {name:<10} {'usable' if b['usable'] else 'NOT usable: ' + str(b['reason'])}")
    lines.append("auto picks      " + ", ".join(f"{d}: {n}" for d, n in info["auto"].items()))
    lines.append("GPUs            " + (", ".join(info["gpus"]) if info["gpus"] else "none visible"))
    lines.append(f"torch archs     {' '.join(info['torch_cuda_archs']) or 'none'}")
    ext = info["fusedrnn_cuda_ext"]
    if ext["present"]:
        archs = ext["archs"]
        lines.append(f"fusedrnn._C_cuda archs  {' '.join(archs) if isinstance(archs, list) else archs}")
    else:
        lines.append(f"fusedrnn._C_cuda  not built ({ext['reason']})")
    return "\n".join(lines)


def main() -> None:
    print(format_info(collect()))


if __name__ == "__main__":
    main()
