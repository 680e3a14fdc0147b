#!/usr/bin/env bash
# compute-sanitizer over small forward + backward runs of every mode, both directions, packed, fp32 and bf16
# (`python tests/test_cuda.py --sanitize-cases`). Needs a GPU and fusedrnn built with its CUDA extension.
#
#   csrc/cuda/sanitize.sh [TOOL ...]        default: memcheck racecheck synccheck
# Environment: PYTHON (python), COMPUTE_SANITIZER (found on PATH or under CUDA_HOME otherwise).
# PyTorch's caching allocator is switched off so that every tensor is its own allocation and memcheck sees an
# out-of-bounds access even when it lands inside a pooled block.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python}
CS=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}
[ -x "$CS" ] || { echo "compute-sanitizer not found (set COMPUTE_SANITIZER)" >&2; exit 2; }
TOOLS=("$@")
[ ${#TOOLS[@]} -gt 0 ] || TOOLS=(memcheck racecheck synccheck)
status=0
for tool in "${TOOLS[@]}"; do
  echo "== compute-sanitizer --tool $tool"
  if PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$CS" --tool "$tool" --error-exitcode 3 \
      "$PY" "$ROOT/tests/test_cuda.py" --sanitize-cases; then
    echo "== $tool: clean"
  else
    echo "== $tool: FAILED" >&2
    status=1
  fi
done
exit $status
