"""Build of fusedrnn: the CPU extension `fusedrnn._C` (always) and, when a CUDA engineer fills
`_cuda_extensions()`, the CUDA extension.

    pip install --no-build-isolation -e .        # MAX_JOBS=N caps the parallel compile jobs (ninja)

The CPU kernels (csrc/cpu/kernels_impl.h) are compiled three times: with the compiler's baseline flags, with AVX2+FMA
and with AVX-512 (the last two x86-64 only); the driver picks one at run time from at::get_cpu_capability(), as ATen
does for its own kernels, so the wheel runs on any CPU of the architecture. csrc/cpu/kernels_amx.cpp (bfloat16 on AMX
tiles, x86-64 only) is compiled with AMX's flags and runs only where the CPU has AMX-BF16. Nothing is downloaded here.
"""
import os
import platform
import re
import shutil

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")

CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas"]
# Per-file instruction-set flags (see FusedrnnBuild); everything else stays baseline. The AVX-512 set is ATen's own.
ISA_SOURCES = {
    "avx2": (["csrc/cpu/kernels_avx2.cpp"], ["-mavx2", "-mfma", "-mf16c"]),
    "avx512": (["csrc/cpu/kernels_avx512.cpp"], ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                                                 "-mf16c"]),
    "amx": (["csrc/cpu/kernels_amx.cpp"], ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                                           "-mamx-tile", "-mamx-bf16"]),
}


def _version() -> str:
    """`__version__` from fusedrnn/__init__.py, read by regex (the package is not imported at build time)."""
    with open(os.path.join(ROOT, "fusedrnn", "__init__.py"), encoding="utf-8") as f:
        m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', f.read(), re.M)
    if not m:
        raise RuntimeError("fusedrnn/__init__.py has no __version__ = '...' line")
    return m.group(1)


def _cpu_extension():
    sources = ["csrc/fusedrnn.cpp", "csrc/cpu/layer.cpp", "csrc/cpu/layer_backward.cpp", "csrc/cpu/cell.cpp",
               "csrc/cpu/kernels_default.cpp"]
    if not IS_X86:  # compiled without their flags they provide no kernels (nullptr tables)
        sources += [src for srcs, _ in ISA_SOURCES.values() for src in srcs]
    return CppExtension(
        name="fusedrnn._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": list(CXX_FLAGS)},
        extra_link_args=["-fopenmp"],
        depends=[os.path.join("csrc", p)
                 for p in ("common.h", "cpu/kernels.h", "cpu/kernels_impl.h", "cpu/kernels_products.h", "cpu/layer.h",
                           "cpu/layer_loops.h", "cpu/machine.h")],
    )


# ==== CUDA extension: to be filled by the CUDA engineer ==============================================================
def _cuda_extensions():
    """Extensions for the CUDA backend (csrc/cuda). Build them when `torch.version.cuda` is set and nvcc exists
    (never decided by torch.cuda.is_available(), which is False on build machines); FUSEDRNN_FORCE_CUDA=1 turns a
    missing nvcc into an error; honour TORCH_CUDA_ARCH_LIST. Returns a list of CUDAExtension, empty when skipped.

    The toolkit root comes from CUDA_HOME / CUDA_PATH, else from nvcc's own report (`nvcc -dryrun` prints the folder
    it runs from, which sees through wrapper scripts such as a /usr/local/bin/nvcc that execs the real one), else
    from the resolved nvcc path. torch.utils.cpp_extension guesses CUDA_HOME at import as dirname(dirname(which
    nvcc)), wrong for such a wrapper, so the root found here is handed to it. TORCH_CUDA_ARCH_LIST defaults to
    "8.0;8.6;9.0+PTX" (sm_80, sm_86, sm_90 machine code, PTX for later GPUs); MAX_JOBS caps ninja's parallel jobs
    as usual.
    No --use_fast_math: the kernels are memory-bound and the recurrence feeds exp/tanh results back every step."""
    import glob
    import subprocess
    import sys

    import torch
    import torch.utils.cpp_extension as cpp_ext

    force = os.environ.get("FUSEDRNN_FORCE_CUDA", "") == "1"

    def skip(why):
        if force:
            raise RuntimeError(f"FUSEDRNN_FORCE_CUDA=1 but the CUDA extension cannot be built: {why}")
        print(f"fusedrnn setup: not building the CUDA extension: {why}", file=sys.stderr)
        return []

    def is_root(path):
        return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and \
            os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))

    def toolkit_root():
        for var in ("CUDA_HOME", "CUDA_PATH"):
            if is_root(os.environ.get(var)):
                return os.path.realpath(os.environ[var])
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            return None
        try:
            report = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                    capture_output=True, text=True, timeout=60)
            for line in (report.stdout + report.stderr).splitlines():
                m = re.match(r"#\$ _HERE_=(.+)$", line.strip())
                if m and is_root(os.path.dirname(m.group(1).strip())):
                    return os.path.realpath(os.path.dirname(m.group(1).strip()))
        except (OSError, subprocess.SubprocessError):
            pass
        guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        return guess if is_root(guess) else None

    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)")
    root = toolkit_root()
    if root is None:
        return skip("no CUDA toolkit found (set CUDA_HOME to the toolkit root, or put nvcc on PATH)")
    os.environ["CUDA_HOME"] = root
    cpp_ext.CUDA_HOME = root
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;9.0+PTX")

    # torch's CUDA headers include cuBLAS/cuSPARSE headers that a minimal toolkit may lack; torch's own pip
    # dependencies (site-packages/nvidia/*/include) carry them. -isystem puts them after the toolkit's -I.
    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden", "-Wall", "-Wno-unused-function"]
    if not os.path.isfile(os.path.join(root, "include", "cublas_v2.h")):
        site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
        for inc in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))):
            if os.path.isfile(os.path.join(inc, "cublas_v2.h")) or os.path.isfile(os.path.join(inc, "cusparse.h")):
                cxx += ["-isystem", inc]
    nvcc = ["-O3", "-std=c++17", "-lineinfo"]
    cuda_dir = os.path.join("csrc", "cuda")
    return [cpp_ext.CUDAExtension(
        name="fusedrnn._C_cuda",
        # one kernel file per cell family, compiled in parallel; torch headers only in torch_ops.cpp
        sources=[os.path.join(cuda_dir, f) for f in
                 ("torch_ops.cpp", "lstm_kernels.cu", "gru_kernels.cu", "rnn_kernels.cu")],
        include_dirs=[os.path.join(ROOT, "csrc", "cuda")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        depends=[os.path.join(cuda_dir, f) for f in ("kernels.h", "device_utils.cuh")],
    )]
# =====================================================================================================================


class FusedrnnBuild(BuildExtension):
    """BuildExtension plus the per-file instruction-set flags: each ISA_SOURCES group is compiled (through the same
    ninja path, MAX_JOBS honoured) with its flags into its own objects, which are then linked into fusedrnn._C."""

    def build_extension(self, ext):
        if ext.name == "fusedrnn._C" and IS_X86:
            cflags = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args
            extra = []
            for isa, (srcs, flags) in ISA_SOURCES.items():
                extra += self.compiler.compile(
                    srcs,
                    output_dir=os.path.join(self.build_temp, isa),
                    include_dirs=ext.include_dirs,
                    extra_postargs={"cxx": list(cflags) + flags} if self.use_ninja else list(cflags) + flags,
                    depends=ext.depends,
                )
            ext.extra_objects = [o for o in (ext.extra_objects or []) if o not in extra] + extra
        super().build_extension(ext)


def _use_ninja() -> bool:
    return shutil.which("ninja") is not None


def _local_version() -> str:
    """PEP 440 local label naming what the compiled parts were built against, e.g. `cu130torch2.14` or `cputorch2.13`
    (FUSEDRNN_LOCAL_VERSION="" drops it, for an upload to an index that refuses local versions)."""
    if "FUSEDRNN_LOCAL_VERSION" in os.environ:
        return os.environ["FUSEDRNN_LOCAL_VERSION"]
    import torch

    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    cuda = "cu" + torch.version.cuda.replace(".", "") if _cuda_extensions() else "cpu"
    return f"{cuda}torch{torch_mm}"


def _write_build_info() -> None:
    """fusedrnn/_build_info.py records the torch the extensions are compiled against, so that importing them under
    another torch gives a clear error naming both versions instead of an undefined-symbol trace."""
    import torch

    with open(os.path.join(ROOT, "fusedrnn", "_build_info.py"), "w", encoding="utf-8") as f:
        f.write("# Written by setup.py at build time; not tracked.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\nCUDA_VERSION = {torch.version.cuda!r}\n")


_write_build_info()
_LOCAL = _local_version()

setup(
    name="fusedrnn",
    version=_version() + (f"+{_LOCAL}" if _LOCAL else ""),
    packages=find_packages(include=["fusedrnn", "fusedrnn.*"]),
    ext_modules=[_cpu_extension()] + _cuda_extensions(),
    cmdclass={"build_ext": FusedrnnBuild.with_options(use_ninja=_use_ninja())},
    zip_safe=False,
)
