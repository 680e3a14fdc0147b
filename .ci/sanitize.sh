#!/usr/bin/env bash
# Sanitizer job: builds the C++ extension (fusedrnn._C) with -fsanitize=address,undefined in a private copy of the
# tree (build/sanitize/, so the normal in-place build stays untouched), then runs the C++ engineer's
# tests/test_cpu_kernels.py, test_cpu_cell_op.py, test_cpu_half.py, test_block_cache.py and a subset of the
# conformance / hostile / fuzz tests against it under ASan + UBSan.
#
#   .ci/sanitize.sh [extra pytest args]       # FUSEDRNN_SANITIZE_DIR overrides the work folder
#
# Needs: gcc with libasan/libubsan, the project's venv (.venv, or $FUSEDRNN_VENV) with torch, pytest, hypothesis.
# Python itself is not instrumented, so libasan is LD_PRELOADed; leak detection is off (CPython and torch keep
# allocations alive until exit by design); any ASan report or UBSan finding aborts the run with a nonzero status.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${FUSEDRNN_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
WORK="${FUSEDRNN_SANITIZE_DIR:-$ROOT/build/sanitize}"
SRC="$WORK/src"
start=$(date +%s)

LIBASAN="$(gcc -print-file-name=libasan.so)"
[ -f "$LIBASAN" ] || { echo "sanitize: libasan.so not found (install gcc's libasan)" >&2; exit 2; }
# libstdc++ preloaded too: python does not link it, and ASan's __cxa_throw interceptor must find the real one at
# start-up, or the first C++ exception (any TORCH_CHECK) aborts with "CHECK failed: ... real___cxa_throw".
PRELOAD="$LIBASAN $(gcc -print-file-name=libstdc++.so)"

# 1. A private copy of the sources (tracked and untracked-but-not-ignored files; never .venv, build/, *.so). Files
#    are extracted with the time of extraction (tar -m), but only those whose content changed since the last copy
#    replace it: the objects of a previous run are rebuilt exactly where a source changed. (With the sources' own
#    times, an edit made while a previous run was building looked older than that run's object, and ninja kept
#    the stale object.)
rm -rf "$WORK/incoming" && mkdir -p "$SRC" "$WORK/incoming"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) \
  | tar -m -xf - -C "$WORK/incoming"
(cd "$WORK/incoming" && find . -type f -print0) | while IFS= read -r -d '' f; do
  cmp -s "$WORK/incoming/$f" "$SRC/$f" || { mkdir -p "$(dirname "$SRC/$f")" && cp "$WORK/incoming/$f" "$SRC/$f"; }
done
rm -rf "$WORK/incoming"
rm -f "$SRC"/fusedrnn/_C*.so

# 2. The instrumented build. -O1 keeps stack traces readable; vptr checks need RTTI for every torch type, which
#    torch's own libraries do not provide instrumented, so they are off. setup.py's flags come after CFLAGS.
SAN="-fsanitize=address,undefined -fno-sanitize=vptr -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
echo "sanitize: building fusedrnn._C with $SAN in $SRC"
(
  cd "$SRC"
  CFLAGS="$SAN -O1" CXXFLAGS="$SAN -O1" LDFLAGS="-fsanitize=address,undefined" MAX_JOBS="${MAX_JOBS:-2}" \
    "$PY" setup.py -q build_ext --inplace --build-temp "$WORK/tmp" >"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log"; echo "sanitize: build failed (log: $WORK/build.log)" >&2; exit 2; }
)
ls "$SRC"/fusedrnn/_C*.so >/dev/null
# (nm's output read whole first: `nm | grep -q` under pipefail fails whenever grep exits before nm has written all)
syms=$(nm -D "$SRC"/fusedrnn/_C*.so)
grep -q __asan_ <<<"$syms" || { echo "sanitize: the extension is not instrumented" >&2; exit 2; }
built=$(date +%s)

# 3. The tests, with the instrumented copy first on the path.
TESTS=(tests/test_cpu_kernels.py
       tests/test_cpu_cell_op.py
       tests/test_cpu_half.py
       tests/test_block_cache.py
       "tests/test_conformance.py::test_long_packed_with_length_one_sequences"
       "tests/test_conformance.py::test_float32_against_float64"
       "tests/test_conformance.py::test_cells"
       tests/test_hostile.py::test_strided_views_as_input_and_state
       tests/test_hostile.py::test_op_level_stride_zero_and_transposed_arguments
       tests/test_hostile.py::test_inconsistent_packed_sequence)
[ -f "$SRC/tests/test_cpu_kernels.py" ] || TESTS=("${TESTS[@]:3}")
echo "sanitize: running ${TESTS[*]} $*"
cd "$SRC"
set +e
env LD_PRELOAD="$PRELOAD" \
    ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0:symbolize=1:${ASAN_OPTIONS:-}" \
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}" \
    PYTHONPATH="$SRC:$SRC/tests" FUSEDRNN_BACKEND=cpu OMP_NUM_THREADS=2 \
    "$PY" -c "import fusedrnn, sys; f = fusedrnn.__file__; print('sanitize: fusedrnn from', f); \
sys.exit(0 if f.startswith('$SRC') and 'cpu' in fusedrnn.available_backends() else 3)" &&
env LD_PRELOAD="$PRELOAD" \
    ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0:symbolize=1:${ASAN_OPTIONS:-}" \
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}" \
    PYTHONPATH="$SRC:$SRC/tests" FUSEDRNN_BACKEND=cpu OMP_NUM_THREADS=2 \
    "$PY" -m pytest -q -p no:cacheprovider -x -k "cpu or not reference" "${TESTS[@]}" "$@"
rc=$?
set -e
end=$(date +%s)
echo "sanitize: build $((built - start)) s, tests $((end - built)) s, exit status $rc"
exit $rc
