#!/usr/bin/env bash
# Build a Debian bookworm arm64 root that runs under qemu-user emulation, with a Python venv holding the
# device side of edgepack's dependencies (aarch64 wheels of numpy, onnxruntime, tuf, cryptography,
# tokenizers, paho-mqtt), for the linux-aarch64 smoke run in hardware_tests/test_qemu_aarch64.py.
#
#   sudo hardware_tests/qemu/setup_rootfs.sh [ROOTFS_DIR]     # default /var/cache/edgepack/aarch64-rootfs
#
# Idempotent: each stage leaves a marker in ROOTFS_DIR/.edgepack/ and is skipped when its marker is
# there, so a second run takes seconds; a changed requirements-aarch64.txt reinstalls the venv.
# Needs root, a reachable Debian mirror (EDGEPACK_DEBIAN_MIRROR, default http://deb.debian.org/debian)
# and PyPI (host pip). Wheels are downloaded on the host for the aarch64 platform and installed offline,
# because resolving and downloading with an emulated pip is many times slower on a small machine.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"

usage() {
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}
[[ ${1:-} == -h || ${1:-} == --help ]] && usage 0
(($# <= 1)) || usage 2

rootfs=${1:-${EDGEPACK_QEMU_ROOTFS:-$EDGEPACK_QEMU_DEFAULT_ROOTFS}}
[[ $rootfs == /* ]] || rootfs=$(pwd)/$rootfs
mirror=${EDGEPACK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
requirements=$here/requirements-aarch64.txt
host_python=${EDGEPACK_HOST_PYTHON:-python3}
markers=$rootfs/.edgepack
need_root "$@"

total_start=$(date +%s.%N)
stage_start=0
stage() {
    stage_start=$(date +%s.%N)
    log "stage: $*"
}
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
stage_done() {
    printf '[edgepack-qemu] stage %-14s %7s s\n' "$1" "$(elapsed "$stage_start")" >&2
}

# 1. Host tools. Skipped when all three are present, so the idempotent rerun does not touch apt.
stage host-packages
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null \
    || ! command -v update-binfmts >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends qemu-user-static binfmt-support debootstrap
fi
ensure_binfmt
stage_done host-packages

# 2. The root itself. Refuse to write into a non-empty directory we did not create: the cleanup path
# below deletes the directory, and a typo in ROOTFS_DIR must not cost anyone their files.
stage debootstrap
if [[ -e $rootfs && ! -d $markers ]] && [[ -n $(ls -A "$rootfs" 2>/dev/null) ]]; then
    die "$rootfs exists, is not empty and was not made by this script (no $markers/);" \
        "pick another ROOTFS_DIR or empty it"
fi
if [[ ! -e $markers/debootstrap.done ]]; then
    if [[ -d $markers ]]; then
        log "an earlier debootstrap of $rootfs did not finish; starting it again from scratch"
        rm -rf --one-file-system "$rootfs"
    fi
    mkdir -p "$markers"
    # Two stages: the first only unpacks (host tools), the second configures the packages by running
    # the root's own aarch64 dpkg and maintainer scripts, which is where qemu and binfmt come in.
    debootstrap --foreign --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,ca-certificates \
        "$suite" "$rootfs" "$mirror"
    install -m 0755 "$(command -v qemu-aarch64-static)" "$rootfs/usr/bin/qemu-aarch64-static"
    # The second stage mounts /proc and /sys itself; the private namespace drops them when it exits.
    unshare --mount --propagation private -- chroot "$rootfs" /debootstrap/debootstrap --second-stage
    # No mirror reachable from the device side is needed later; keep apt pointed at the one we used.
    echo "deb $mirror $suite main" > "$rootfs/etc/apt/sources.list"
    touch "$markers/debootstrap.done"
fi
arch=$(in_root "$rootfs" -- /bin/uname -m)
[[ $arch == aarch64 ]] || die "the root at $rootfs reports uname -m '$arch', expected aarch64"
stage_done debootstrap

# 3. aarch64 wheels, downloaded by the host's pip for the root's Python (bookworm: CPython 3.11, glibc
# 2.36, so manylinux up to 2_36 fits; onnxruntime and numpy ship manylinux_2_27/2_28 aarch64 wheels).
stage wheels
req_hash=$(sha256sum "$requirements" | cut -d' ' -f1)
if [[ "$(cat "$markers/venv.done" 2>/dev/null)" == "$req_hash" ]]; then
    log "venv already matches $requirements; not asking PyPI again"
else
    py_version=$(in_root "$rootfs" -- /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    py_tag=cp${py_version/./}
    wheel_dir=$rootfs$EDGEPACK_QEMU_WHEELS
    mkdir -p "$wheel_dir"
    platforms=()
    for tag in manylinux_2_28_aarch64 manylinux_2_27_aarch64 manylinux_2_17_aarch64 manylinux2014_aarch64 \
        linux_aarch64 any; do
        platforms+=(--platform "$tag")
    done
    "$host_python" -m pip download --quiet --disable-pip-version-check --dest "$wheel_dir" \
        --only-binary=:all: --python-version "$py_version" --implementation cp \
        --abi "$py_tag" --abi abi3 --abi none "${platforms[@]}" -r "$requirements" \
        2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
    cp "$requirements" "$rootfs/opt/edgepack/requirements.txt"
fi
stage_done wheels

# 4. The venv, installed offline from those wheels by the emulated pip.
stage venv
if [[ "$(cat "$markers/venv.done" 2>/dev/null)" != "$req_hash" ]]; then
    rm -f "$markers/venv.done"
    in_root "$rootfs" -- /usr/bin/python3 -m venv --clear "$EDGEPACK_QEMU_VENV"
    in_root "$rootfs" -- "$EDGEPACK_QEMU_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        --no-index --find-links "$EDGEPACK_QEMU_WHEELS" -r /opt/edgepack/requirements.txt
    echo "$req_hash" > "$markers/venv.done"
fi
stage_done venv

# 5. Proof that the emulated Python imports what a device needs.
stage check
in_root "$rootfs" -- "$EDGEPACK_QEMU_VENV/bin/python" -c '
import platform, numpy, onnxruntime, tuf, cryptography, tokenizers, paho.mqtt
print("machine", platform.machine(), "python", platform.python_version(), "numpy", numpy.__version__,
      "onnxruntime", onnxruntime.__version__, "providers", onnxruntime.get_available_providers())
'
stage_done check

printf '[edgepack-qemu] total %s s; root ready at %s (du: %s)\n' \
    "$(elapsed "$total_start")" "$rootfs" "$(du -sh --one-file-system "$rootfs" | cut -f1)" >&2
echo "$rootfs"
