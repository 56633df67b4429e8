#!/usr/bin/env bash
# `make test-arm64`: the device side on linux/arm64 under qemu-user, judged against x86.
#   1. setup.sh: the cached arm64 userland + this checkout's plain (device) install for aarch64,
#      with the compiled rebuild kernel cross-compiled for it;
#   2. fixture.py on the host (x86, torch): the demo base, packs and signed-but-wrong packs, made
#      with this checkout's km-edge (cached until the code changes);
#   3. device_check.py on x86 (this checkout, with the kernel its install built: `make test`'s
#      `pip install -e`, or `python setup.py build_ext --inplace`) and then on emulated arm64, each
#      in a fresh copy of the device folder;
#   4. compare.py: every promise on each side (the compiled kernel rebuilds, within 1e-6 of numpy
#      and the definition), and arm64 = x86 (logits within 1e-4, identical refusals of packs
#      tampered on arm64), after checking itself on deliberately broken results.
# Environment: HOST_PYTHON (the project's venv python, with torch), ARM64_CACHE (default .arm64),
# ARM64_TIMEOUT (seconds for the emulated run, default 1200); setup.sh documents the rest.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
TOOLS=$REPO/tools/arm64
export ARM64_CACHE=${ARM64_CACHE:-$REPO/.arm64}
mkdir -p "$ARM64_CACHE"
CACHE=$(cd "$ARM64_CACHE" && pwd)
export ARM64_CACHE=$CACHE
export HOST_PYTHON=${HOST_PYTHON:-python3}
PY=$HOST_PYTHON
started=$SECONDS
# CPU_NOW: CPU seconds (user + sys) of finished child processes, from bash's `times` run in this
# shell (a subshell would start from zero)
cpu() {
    times >"$CACHE/.times"
    CPU_NOW=$(tail -n 1 "$CACHE/.times" | awk '{ s = 0; for (i = 1; i <= 2; i++) { split($i, t, /[ms]/); s += t[1] * 60 + t[2] } printf "%.0f", s }')
}
stage() {
    cpu
    echo "test-arm64: $1 ($((SECONDS - stage_started)) s wall, $((CPU_NOW - stage_cpu)) s CPU)"
    stage_started=$SECONDS stage_cpu=$CPU_NOW
}
fail() { echo "test-arm64: $*" >&2; exit 1; }
stage_started=$SECONDS stage_cpu=0

# the x86 side runs this checkout, whose compiled kernel its install builds in place; without it
# compare.py would fail after minutes of emulation, so say so now
why=$(PYTHONPATH=$REPO "$PY" - "$PY" "$REPO" 2>&1 <<'PYEOF'
import os, sys
from device_runtime import native
if native.REASON and native.PATH is None and os.environ.get(native.ENV, "1").strip() != "0":
    print(f"{native.REASON}; build it in place: {sys.argv[1]} -m pip install -e {sys.argv[2]} (as make "
          f"test does), or cd {sys.argv[2]} && {sys.argv[1]} setup.py build_ext --inplace")
elif native.REASON:
    print(native.REASON)
PYEOF
) || fail "this checkout's device_runtime does not import with $PY: $(printf '%s' "$why" | tail -n 1)"
[ -z "$why" ] || fail "the x86 side would rebuild kernels with numpy, not the compiled kernel: $why"

bash "$TOOLS/setup.sh"
stage "arm64 userland and device install ready in $CACHE"

# the fixture depends on the code that makes and reads packs: rebuilt when any of it changes
key=$(cd "$REPO" && find device_runtime km_edge -name '*.py' -print0 | sort -z | xargs -0 cat \
      | cat - tools/arm64/fixture.py tools/arm64/device_check.py pyproject.toml | sha256sum | cut -c1-16)
FIXTURE=$CACHE/fixture/$key
if [ ! -d "$FIXTURE" ]; then
    rm -rf "$CACHE/fixture"
    mkdir -p "$CACHE/fixture"
    rc=0
    PYTHONPATH=$REPO timeout --kill-after=10 1800 "$PY" "$TOOLS/fixture.py" "$FIXTURE" || rc=$?
    [ "$rc" -eq 0 ] || fail "making the x86 fixture failed (exit $rc; above)"
    stage "x86 fixture made (demo base, packs, hostile packs)"
else
    stage "x86 fixture reused ($FIXTURE)"
fi

RUN=$CACHE/run
rm -rf "$RUN"
mkdir -p "$RUN/home-x86" "$RUN/home-arm64"
cp -a "$FIXTURE/device" "$RUN/x86"
cp -a "$FIXTURE/device" "$RUN/arm64"

# x86: the same script with this checkout's code; HOME is fresh so no device state is shared
rc=0
env HOME="$RUN/home-x86" XDG_STATE_HOME="$RUN/home-x86/state" PYTHONPATH="$REPO" \
    timeout --kill-after=10 600 "$PY" "$TOOLS/device_check.py" "$RUN/x86" "$RUN/x86.json" || rc=$?
[ "$rc" -eq 0 ] || fail "the device checks failed on x86 (exit $rc; above)"
stage "device checks ran on x86"

# arm64: emulated CPython 3.11 with only the plain install on its path (not this checkout)
SYSROOT=$CACHE/sysroot
rc=0
env -i PATH=/usr/bin:/bin LANG=C.UTF-8 HOME="$RUN/home-arm64" XDG_STATE_HOME="$RUN/home-arm64/state" \
    QEMU_CPU=cortex-a72 PYTHONPATH="$CACHE/pkg:$CACHE/site" \
    timeout --kill-after=10 "${ARM64_TIMEOUT:-1200}" \
    "${ARM64_QEMU:-qemu-aarch64-static}" -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" -s \
    "$TOOLS/device_check.py" "$RUN/arm64" "$RUN/arm64.json" || rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    fail "the emulated arm64 device checks did not finish within ${ARM64_TIMEOUT:-1200} s"
fi
[ "$rc" -eq 0 ] || fail "the device checks failed on emulated arm64 (exit $rc; above)"
stage "device checks ran on emulated arm64"

PYTHONPATH=$REPO "$PY" "$TOOLS/compare.py" "$RUN/x86.json" "$RUN/arm64.json" "$CACHE/pkg"
cpu
echo "test-arm64: passed in $((SECONDS - started)) s wall, $CPU_NOW s CPU"
