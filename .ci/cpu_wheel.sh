#!/usr/bin/env bash
# CI job: build the CPU wheel (the documented command), install it into a fresh environment outside the source tree,
# and run .ci/smoke.py there (import; CPU forward and backward against torch.nn).
#   .ci/cpu_wheel.sh        Environment: FUSEDRNN_VENV (the build venv, default .venv), TORCH_SPEC (torch==2.13.0)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${FUSEDRNN_VENV:-$ROOT/.venv}/bin/python
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fusedrnn-wheel-ci.XXXXXX")
trap 'rm -rf "$WORK"' EXIT   # removed pass or fail
START=$(date +%s)
step() { echo "== [$(( $(date +%s) - START )) s] $*"; }

step "copy sources to $WORK/src"
mkdir -p "$WORK/src"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - --ignore-failed-read -cf -) | tar -xf - -C "$WORK/src"
step "build the wheel: pip wheel --no-build-isolation --no-deps -w dist ."
(cd "$WORK/src" && MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" .)
WHEEL=$(ls "$WORK"/dist/fusedrnn-*.whl)
echo "$WHEEL"
step "fresh environment with ${TORCH_SPEC:-torch==2.13.0} and the wheel"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" numpy
"$WORK/venv/bin/python" -m pip install -q --no-deps "$WHEEL"
step "smoke test from outside the sources"
(cd "$WORK" && "$WORK/venv/bin/python" "$ROOT/.ci/smoke.py")
step "done"
