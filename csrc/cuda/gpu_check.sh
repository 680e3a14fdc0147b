#!/usr/bin/env bash
# Everything the CUDA backend needs checked on a GPU, in one call (for a lent GPU machine, run from the repository
# root): build with the CUDA extension, the CUDA tests, compute-sanitizer memcheck, a first timing against cuDNN.
# Steps go on after a failure, and the script exits non-zero if any failed. Logs under $OUT (or a fresh folder in /tmp).
#
#   csrc/cuda/gpu_check.sh            env: PYTHON (python3), MAX_JOBS (16), TORCH_CUDA_ARCH_LIST (the GPU's own)
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
LOGS=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/fusedrnn-gpu-check.XXXXXX")}
mkdir -p "$LOGS"
status=0
run() {  # run NAME CMD...: log to $LOGS/NAME.log, print its tail
  local name=$1; shift
  echo "== $name: $*"
  if "$@" > "$LOGS/$name.log" 2>&1; then echo "== $name: ok"; else echo "== $name: FAILED"; status=1; fi
  tail -n 25 "$LOGS/$name.log"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
export MAX_JOBS=${MAX_JOBS:-16}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
fi
run build env FUSEDRNN_FORCE_CUDA=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
run tests "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py
run memcheck env PYTHON="$PY" bash csrc/cuda/sanitize.sh memcheck
run timing "$PY" tests/test_cuda.py --time
exit $status
