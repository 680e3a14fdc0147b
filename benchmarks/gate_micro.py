"""Builds and runs benchmarks/gate_micro.cpp: the cpu backend's gate passes (ns a vector of hidden units, one core,
data in L1) and the worst error of its exp, sigmoid and tanh against double.

    python benchmarks/gate_micro.py [--build avx512|avx2] [--hidden 256]

It compiles the kernels exactly as setup.py does for that build (g++, the build's ATen flags, torch's headers).
"""
import argparse
import os
import subprocess
import sys
import tempfile

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = {"avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DGATE_AVX512"],
         "avx2": ["-mavx2", "-mfma", "-mf16c", "-DGATE_AVX2"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", choices=sorted(FLAGS), default="avx512")
    ap.add_argument("--hidden", type=int, default=256)
    args = ap.parse_args()
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "gate_micro")
        cmd = ["g++", "-O3", "-std=c++20", *FLAGS[args.build], "-I", os.path.join(ROOT, "csrc", "cpu"),
               *[f"-I{p}" for p in cpp_extension.include_paths()], os.path.join(ROOT, "benchmarks", "gate_micro.cpp"),
               "-o", exe, f"-L{lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}"]
        subprocess.run(cmd, check=True)
        return subprocess.run([exe, str(args.hidden)]).returncode


if __name__ == "__main__":
    sys.exit(main())
