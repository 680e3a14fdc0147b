#!/usr/bin/env python3
"""The quick start: sets up what fusedrnn needs, then runs the benchmark report or the tests.

    python3 dev.py bench [ARGS...]   # the benchmark report (python -m fusedrnn.bench ARGS, default --quick)
    python3 dev.py test  [ARGS...]   # the test suite (pytest ARGS)

Each run makes sure of: a virtual environment in .venv, a torch in it (FUSEDRNN_TORCH, default torch==2.13.0, the
CPU build where pip finds one), the packages in requirements-dev.txt, and the compiled extension (pip install
--no-build-isolation -e ., incremental). Only the Python standard library is needed to start it.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("FUSEDRNN_VENV", ROOT / ".venv"))
TORCH = os.environ.get("FUSEDRNN_TORCH", "torch==2.13.0")
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run(*cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def ensure_env() -> None:
    if not PY.exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    reqs = (ROOT / "requirements-dev.txt").read_text()
    stamp = VENV / ".fusedrnn-deps"
    want = hashlib.sha256((TORCH + "\n" + reqs).encode()).hexdigest()
    if not stamp.exists() or stamp.read_text() != want:
        run(PY, "-m", "pip", "install", "-q", "--upgrade", "pip")
        run(PY, "-m", "pip", "install", "-q", TORCH, "-r", ROOT / "requirements-dev.txt")
        stamp.write_text(want)
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 2)))
    run(PY, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", ROOT, env=env)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("bench", "test"):
        print(__doc__)
        return 2
    ensure_env()
    cmd, args = argv[0], argv[1:]
    if cmd == "bench":
        return subprocess.call([str(PY), "-m", "fusedrnn.bench", *(args or ["--quick"])], cwd=ROOT)
    return subprocess.call([str(PY), "-m", "pytest", *args], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
