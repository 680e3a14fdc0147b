#!/usr/bin/env bash
# CI job for the CUDA backend on a machine without a GPU: create a venv with a CUDA build of torch, build the CUDA
# extension fusedrnn._C_cuda (sm_80, sm_90 + PTX by default) and a wheel, and import both. No GPU is needed: the
# extension loads without a driver; running the kernels is tests/test_cuda.py's job on a GPU runner.
#
#   .ci/cuda_build.sh [VENV]     (default: a fresh venv in the work folder; an existing one is reused)
# Environment: TORCH_SPEC (torch==2.14.1), MAX_JOBS (2), TORCH_CUDA_ARCH_LIST (8.0;8.6;9.0+PTX), CUDA_HOME (found from
# nvcc otherwise), FUSEDRNN_CI_WORK (a folder for the copy of the sources, the build and the wheel; default mktemp).
# The sources are copied out of the checkout first, so nothing is built inside it (no build/, dist/ or .so there).
# Disk: a CUDA torch is 5.5 GB. A work folder this script made itself is removed when it exits, pass or fail, and its
# own build venv is removed before the fresh one is made, so at most one CUDA torch is on disk at a time. A folder
# given in FUSEDRNN_CI_WORK and a VENV given as the argument are kept.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${FUSEDRNN_CI_WORK:-}" ]; then
  WORK=$FUSEDRNN_CI_WORK
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/fusedrnn-cuda-ci.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
fi
VENV=${1:-$WORK/venv}
export MAX_JOBS=${MAX_JOBS:-2}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;8.6;9.0+PTX}
export FUSEDRNN_FORCE_CUDA=1   # a missing toolkit is an error here, not a silent CPU-only build
START=$(date +%s)
step() { echo "== [$(( $(date +%s) - START )) s] $*"; }

step "venv $VENV (${TORCH_SPEC:-torch==2.14.1})"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q "${TORCH_SPEC:-torch==2.14.1}" ninja numpy pytest setuptools
"$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda); \
sys.exit(0 if torch.version.cuda else 'this torch has no CUDA: set TORCH_SPEC to a CUDA build')"
command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"

step "copy sources to $WORK/src"
SRC="$WORK/src"
rm -rf "$SRC" && mkdir -p "$SRC"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - --ignore-failed-read -cf - ) | tar -xf - -C "$SRC"

step "build_ext (MAX_JOBS=$MAX_JOBS, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
cd "$SRC"
"$PY" setup.py -q build_ext --inplace
ls fusedrnn/_C_cuda*.so

step "import from the build tree"
"$PY" - <<'PYEOF'
import torch
import fusedrnn._C_cuda  # noqa: F401
import fusedrnn
from fusedrnn import backends
assert "cuda" in fusedrnn.available_backends(), backends._MISSING
for op in ("cuda_rnn_forward", "cuda_rnn_backward"):
    print(getattr(torch.ops.fusedrnn, op).default._schema)
b = backends.get_backend("cuda")
assert b.supports(torch.device("cuda"), torch.bfloat16, "lstm", True)
assert not b.supports(torch.device("cuda"), torch.float64, "lstm", False)
assert not b.supports(torch.device("cpu"), torch.float32, "gru", False)
print("gpu visible:", torch.cuda.is_available())
PYEOF
# machine code per architecture (cuobjdump sits beside the real nvcc, which a wrapper on PATH may hide)
BIN=$(nvcc -dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1 || true)
if [ -x "${BIN:-}/cuobjdump" ]; then
  "$BIN/cuobjdump" --list-elf fusedrnn/_C_cuda*.so | grep -o 'sm_[0-9a]*' | sort | uniq -c
  "$BIN/cuobjdump" --list-ptx fusedrnn/_C_cuda*.so | grep -o 'sm_[0-9a]*' | sort | uniq -c | sed 's/$/ (PTX)/'
fi

step "wheel"
"$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" .
WHEEL=$(ls "$WORK"/dist/fusedrnn-*.whl)
"$PY" -c "import sys, zipfile; n = zipfile.ZipFile(sys.argv[1]).namelist(); \
assert any(x.startswith('fusedrnn/_C_cuda') for x in n), n; print(sys.argv[1])" "$WHEEL"

step "install the wheel into a fresh environment and smoke-test it from outside the sources"
[ -n "${1:-}" ] || rm -rf "$VENV"   # our own build venv: not needed any more, and the fresh one needs the room
rm -rf "$WORK/venv-wheel" && python3 -m venv "$WORK/venv-wheel"
"$WORK/venv-wheel/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.14.1}" numpy
"$WORK/venv-wheel/bin/python" -m pip install -q --no-deps "$WHEEL"
(cd "$WORK" && "$WORK/venv-wheel/bin/python" "$ROOT/.ci/smoke.py" --cuda)

step "done"
