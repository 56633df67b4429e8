#!/usr/bin/env bash
# Build (once, cached) the arm64 userland the device side is checked on under qemu-user:
#   CACHE/sysroot  Debian 12 arm64 CPython 3.11 (apt-get --download-only with a private apt
#                  configuration, then dpkg-deb -x; no dpkg --add-architecture, no binfmt_misc),
#                  a fake arm64 /proc/cpuinfo (onnxruntime parses it and crashes on the host's x86
#                  one), bytecode precompiled;
#   CACHE/site     the project's plain (device) install's dependencies: aarch64 wheels resolved
#                  from the km-edge wheel's own requirements (pyproject `dependencies`, no torch);
#   CACHE/pkg      the km-edge wheel of this checkout, built pure (KM_EDGE_NATIVE_BUILD=0: a wheel
#                  with the host's compiled kernel would be tagged x86 and refused for aarch64), plus
#                  its compiled rebuild kernel (device_runtime/_kmnative.c) cross-compiled for aarch64
#                  with setup.py's KERNEL_FLAGS (rebuilt on every run: it is the code under test).
# Rebuilt only when their inputs change (Debian packages, pyproject dependencies, pinned versions).
# Any missing piece (qemu, the cross compiler, dpkg-deb, the registries) ends it with one line on
# stderr and exit 1; every network step is under a timeout, so nothing hangs. Missing qemu-user-static
# and gcc-aarch64-linux-gnu are installed with apt-get when run as root.
#
# Environment: ARM64_CACHE (default REPO/.arm64), HOST_PYTHON (python with pip; default python3),
# ARM64_DEBIAN_MIRROR, ARM64_DEBIAN_SECURITY (default deb.debian.org), ARM64_QEMU (the qemu-user
# binary, default qemu-aarch64-static), ARM64_CC (the cross compiler, default aarch64-linux-gnu-gcc).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${ARM64_CACHE:-$REPO/.arm64}
mkdir -p "$CACHE/logs"
CACHE=$(cd "$CACHE" && pwd)
PY=${HOST_PYTHON:-python3}
MIRROR=${ARM64_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${ARM64_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
SUITE=bookworm                       # Debian 12: CPython 3.11, glibc 2.36
DEBS="python3.11 libstdc++6"         # libstdc++6: onnxruntime's C++ runtime
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
PYVER=3.11
# manylinux tags glibc 2.36 accepts (pip does not widen --platform by itself)
PLATFORMS=(--platform manylinux2014_aarch64)
for minor in $(seq 17 36); do PLATFORMS+=(--platform "manylinux_2_${minor}_aarch64"); done
WHEEL_FLAGS=(--only-binary=:all: "${PLATFORMS[@]}" --python-version "$PYVER" --implementation cp
             --abi cp311 --abi abi3 --abi none)
PIP_NET=(--timeout 20 --retries 1 --disable-pip-version-check)
SYSROOT=$CACHE/sysroot
QEMU=${ARM64_QEMU:-qemu-aarch64-static}
CROSS_CC=${ARM64_CC:-aarch64-linux-gnu-gcc}
export QEMU_CPU=cortex-a72           # qemu's default CPU model made onnxruntime ~15x slower (issue 11)

fail() { echo "test-arm64: $*" >&2; exit 1; }

# step NAME LOG SECONDS CMD...: run CMD under a timeout with its output in LOG; on failure one line
step() {
    local name=$1 log=$CACHE/logs/$2.log limit=$3 rc=0
    shift 3
    echo "test-arm64: $name"
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
        local why
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then why="no answer within ${limit} s (network down?)"
        else  # the first error line names the cause best (apt: "E: Failed to fetch ..."), else the last line
            why=$(grep -m 1 -E '^(E|ERROR): ' "$log" || grep -v '^\s*$' "$log" | tail -n 1)
            why=$(printf '%s' "$why" | tr -s ' \t' ' ' | cut -c1-240)
        fi
        fail "$name failed: $why (full log: $log)"
    fi
}

# need COMMAND PACKAGE: COMMAND, installing the Debian PACKAGE with apt-get (as root) when missing
need() {
    local command=$1 package=$2
    command -v "$command" >/dev/null && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        echo "test-arm64: apt-get install $package"
        if ! timeout 300 apt-get install -y -q "$package" >"$CACHE/logs/$package.log" 2>&1; then
            step "apt-get update (for $package)" "$package-update" 180 \
                apt-get -o Acquire::http::Timeout=20 -o Acquire::Retries=1 update -q
            step "apt-get install $package" "$package" 300 apt-get install -y -q "$package"
        fi
    else
        fail "$command not found: install $package (as root: apt-get install $package)"
    fi
    command -v "$command" >/dev/null || fail "$command still missing after installing $package"
}

# --- qemu, the cross compiler and dpkg-deb ------------------------------------------------------------
command -v dpkg-deb >/dev/null || fail "dpkg-deb not found: the arm64 stage needs a Debian or Ubuntu host"
need "$QEMU" qemu-user-static
need "$CROSS_CC" gcc-aarch64-linux-gnu
"$PY" -m pip --version >/dev/null 2>&1 || fail "$PY has no pip (set HOST_PYTHON to a Python with pip)"
HOST_PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

emulated() { timeout --kill-after=10 "${EMULATED_TIMEOUT:-300}" "$QEMU" -L "$SYSROOT" "$SYSROOT/usr/bin/python$PYVER" "$@"; }

# precompile bytecode (halves the emulated import time); the host's CPython makes the same .pyc
# when it is 3.11, else the emulated Python does it (slower, once)
precompile() {
    if [ "$HOST_PYVER" = "$PYVER" ]; then
        "$PY" -m compileall -q -j 0 "$@" >/dev/null 2>&1 || true
    else
        EMULATED_TIMEOUT=1800 emulated -m compileall -q "$@" >/dev/null 2>&1 || true
    fi
}

# --- the arm64 Debian userland ------------------------------------------------------------------------
sysroot_key="$SUITE $DEBS $MIRROR $SECURITY v1"
if [ ! -f "$SYSROOT/.complete" ] || [ "$(cat "$SYSROOT/.complete")" != "$sysroot_key" ]; then
    [ -r "$KEYRING" ] || fail "$KEYRING not found: install debian-archive-keyring"
    APT=$CACHE/apt
    mkdir -p "$APT/state/lists/partial" "$APT/cache/archives/partial" "$APT/parts"
    : >"$APT/status"
    cat >"$APT/sources.list" <<EOF
deb [arch=arm64 signed-by=$KEYRING] $MIRROR $SUITE main
deb [arch=arm64 signed-by=$KEYRING] $MIRROR $SUITE-updates main
deb [arch=arm64 signed-by=$KEYRING] $SECURITY $SUITE-security main
EOF
    cat >"$APT/apt.conf" <<EOF
APT::Architecture "arm64";
APT::Architectures { "arm64"; };
APT::Install-Recommends "false";
APT::Sandbox::User "root";
Dir::State "$APT/state";
Dir::State::status "$APT/status";
Dir::Cache "$APT/cache";
Dir::Etc::SourceList "$APT/sources.list";
Dir::Etc::SourceParts "$APT/parts";
Dir::Etc::Parts "$APT/parts";
Dir::Etc::PreferencesParts "$APT/parts";
Dir::Etc::Preferences "$APT/parts/none";
Acquire::Languages "none";
Acquire::http::Timeout "15";
Acquire::https::Timeout "15";
Acquire::Retries "1";
EOF
    export APT_CONFIG=$APT/apt.conf
    step "apt-get update (arm64 $SUITE from $MIRROR)" apt-update 150 apt-get update -q --error-on=any
    step "downloading arm64 $DEBS" apt-download 600 apt-get install -q -y --download-only $DEBS
    unset APT_CONFIG
    rm -rf "$SYSROOT.partial"
    mkdir -p "$SYSROOT.partial"
    for deb in "$APT"/cache/archives/*.deb; do
        dpkg-deb -x "$deb" "$SYSROOT.partial" || fail "dpkg-deb -x $deb failed"
    done
    mkdir -p "$SYSROOT.partial/proc"
    for cpu in 0 1 2 3; do  # a Raspberry Pi 4 class Cortex-A72
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$cpu"
        printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n'
    done >"$SYSROOT.partial/proc/cpuinfo"
    rm -rf "$SYSROOT"
    mv "$SYSROOT.partial" "$SYSROOT"
    machine=$(emulated -c 'import platform; print(platform.machine())' 2>&1 | tail -n 1) || true
    [ "$machine" = aarch64 ] || fail "the emulated Python does not start (got: ${machine:-nothing}); see $QEMU -L $SYSROOT"
    precompile "$SYSROOT/usr/lib/python$PYVER"
    echo "$sysroot_key" >"$SYSROOT/.complete"
    rm -rf "$APT"  # package lists and .debs: ~130 MB only needed to build the sysroot again
fi

# --- the plain install: km-edge wheel of this checkout + its dependencies as aarch64 wheels ----------
# setup.py's facts about the compiled kernel, read (not imported) so they are written once there:
# the switch that skips it, the extension's name and source, its compiler flags (one per line)
kernel_build=$("$PY" - "$REPO/setup.py" 2>&1 <<'PYEOF'
import ast, sys
tree = ast.parse(open(sys.argv[1]).read())
assigned = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}
calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Extension"]
if len(calls) != 1 or "BUILD_ENV" not in assigned:
    sys.exit("setup.py: expected one Extension(...) and BUILD_ENV; update tools/arm64/setup.sh")
args = {k.arg: k.value for k in calls[0].keywords}


def literal(node):  # a literal, or a module-level name bound to one
    return ast.literal_eval(assigned[node.id] if isinstance(node, ast.Name) else node)


sources, flags = literal(args["sources"]), literal(args["extra_compile_args"])
if len(sources) != 1:
    sys.exit(f"setup.py: the kernel has sources {sources}, expected one; update tools/arm64/setup.sh")
print("\n".join([literal(assigned["BUILD_ENV"]), literal(calls[0].args[0]), sources[0], *flags]))
PYEOF
) || fail "cannot read the kernel's build from setup.py: $(printf '%s' "$kernel_build" | tail -n 1)"
mapfile -t kernel_build <<<"$kernel_build"
NATIVE_BUILD_ENV=${kernel_build[0]} KERNEL_MODULE=${kernel_build[1]} KERNEL_SOURCE=${kernel_build[2]}
KERNEL_FLAGS=("${kernel_build[@]:3}")

rm -rf "$CACHE/wheel"
# the host's setuptools when it satisfies pyproject's build requirement (no network; a fresh venv
# of Python 3.11 has setuptools 65, too old), else pip's isolated build
ISOLATION=()
"$PY" - "$REPO/pyproject.toml" 2>/dev/null <<'PYEOF' && ISOLATION=(--no-build-isolation)
import re, sys, tomllib
from importlib.metadata import version
have = tuple(int(p) for p in re.findall(r"\d+", version("setuptools"))[:2])
for requirement in tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"]:
    match = re.fullmatch(r"setuptools\s*>=\s*(\d+)(?:\.(\d+))?", requirement.strip())
    if not match or have < (int(match[1]), int(match[2] or 0)):
        sys.exit(1)
PYEOF
step "building the km-edge wheel (pure: $NATIVE_BUILD_ENV=0)" wheel 300 \
    env "$NATIVE_BUILD_ENV=0" "$PY" -m pip wheel --no-deps "${ISOLATION[@]}" "${PIP_NET[@]}" \
    -q -w "$CACHE/wheel" "$REPO"
WHEEL=$(ls "$CACHE"/wheel/km_edge-*.whl)
case "$WHEEL" in
    *-py3-none-any.whl) ;;
    *) fail "the km-edge wheel $(basename "$WHEEL") is not pure (py3-none-any) although $NATIVE_BUILD_ENV=0: setup.py no longer honours it" ;;
esac
# numerics and image decoding pinned to the host's versions where the host has them, so the logits
# are compared between the same library versions on the two CPUs
"$PY" - "$CACHE/constraints.txt" <<'EOF'
import sys
from importlib import metadata
pins = []
for name in ("numpy", "onnxruntime", "onnx", "pillow"):
    try:
        pins.append(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
open(sys.argv[1], "w").write("".join(p + "\n" for p in pins))
EOF
deps=$("$PY" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"])' \
    "$REPO/pyproject.toml" 2>/dev/null) || deps=$(cat "$REPO/pyproject.toml")
site_key=$(printf '%s\n%s\n%s\n' "$deps" "$(cat "$CACHE/constraints.txt")" "${WHEEL_FLAGS[*]}" | sha256sum | cut -c1-16)
if [ ! -f "$CACHE/site/.complete" ] || [ "$(cat "$CACHE/site/.complete")" != "$site_key" ]; then
    # pip reports an unreachable index as a dependency conflict; say what it is instead
    index=${PIP_INDEX_URL:-$("$PY" -m pip config get global.index-url 2>/dev/null || true)}
    index=${index:-https://pypi.org/simple}
    unreachable=$("$PY" - "$index" 2>&1 <<'EOF'
import os, ssl, sys, urllib.request
url = sys.argv[1].rstrip("/") + "/numpy/"
context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
try:
    urllib.request.urlopen(url, timeout=20, context=context).read(1)
except Exception as exc:
    sys.exit(f"cannot reach the package index ({url}: {exc})")
EOF
) || fail "${unreachable:-cannot reach the package index $index}"
    step "downloading the aarch64 wheels of the device install from PyPI" pip-download 600 \
        "$PY" -m pip download "${WHEEL_FLAGS[@]}" "${PIP_NET[@]}" -c "$CACHE/constraints.txt" \
        -d "$CACHE/wheels" "$WHEEL"
    rm -rf "$CACHE/site.partial"
    step "installing the aarch64 wheels" pip-install 600 "$PY" -m pip install --no-index \
        --find-links "$CACHE/wheels" "${WHEEL_FLAGS[@]}" --disable-pip-version-check -q \
        -c "$CACHE/constraints.txt" --target "$CACHE/site.partial" "$WHEEL"
    # km-edge itself lives in pkg/ (reinstalled every run); site/ keeps only its dependencies
    rm -rf "$CACHE"/site.partial/km_edge "$CACHE"/site.partial/device_runtime "$CACHE"/site.partial/km_edge-*.dist-info
    precompile "$CACHE/site.partial"
    rm -rf "$CACHE/site"
    mv "$CACHE/site.partial" "$CACHE/site"
    echo "$site_key" >"$CACHE/site/.complete"
    rm -rf "$CACHE/wheels"
fi
rm -rf "$CACHE/pkg"
step "installing the km-edge wheel for arm64" pkg-install 120 "$PY" -m pip install --no-index --no-deps \
    "${WHEEL_FLAGS[@]}" --disable-pip-version-check -q --target "$CACHE/pkg" "$WHEEL"

# the compiled rebuild kernel for aarch64, where pip would have put it (device_runtime/native.py
# loads it by the interpreter's extension suffix), with the flags setup.py builds it with
KERNEL_LIB=$CACHE/pkg/${KERNEL_MODULE//.//}.cpython-${PYVER/./}-aarch64-linux-gnu.so
step "cross-compiling $KERNEL_SOURCE for aarch64 ($CROSS_CC ${KERNEL_FLAGS[*]} -fPIC -shared)" kernel 300 \
    "$CROSS_CC" "${KERNEL_FLAGS[@]}" -fPIC -shared -o "$KERNEL_LIB.partial" "$REPO/$KERNEL_SOURCE"
# an aarch64 shared object: ELF, 64-bit, little-endian, ET_DYN, EM_AARCH64 (`file` may be missing)
elf=$("$PY" - "$KERNEL_LIB.partial" <<'PYEOF'
import sys
head = open(sys.argv[1], "rb").read(20)
kind = (head[:4], head[4:6], int.from_bytes(head[16:18], "little"), int.from_bytes(head[18:20], "little"))
print("ok" if kind == (b"\x7fELF", b"\x02\x01", 3, 183) else f"not an aarch64 shared object (header {head.hex()})")
PYEOF
) || elf="unreadable"
[ "$elf" = ok ] || fail "the cross-compiled kernel $KERNEL_LIB.partial is $elf"
mv "$KERNEL_LIB.partial" "$KERNEL_LIB"
precompile "$CACHE/pkg"
