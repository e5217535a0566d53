#!/usr/bin/env bash
# Run a command inside the emulated linux-aarch64 root built by setup_rootfs.sh.
#
#   sudo hardware_tests/qemu/run_in_aarch64.sh ROOTFS_DIR [--data HOST_DIR] -- CMD...
#
# The project source is bind-mounted read-only at /edgepack (PYTHONPATH=/edgepack), the working
# directory is /edgepack, and the venv's bin/ comes first on PATH, so `python -m device_agent ...`
# runs the agent on the aarch64 Python with the aarch64 wheels. --data mounts HOST_DIR read-write at
# /data, for bundles, keys and results to pass in and out. First prints `uname -m` (aarch64) on
# stderr. The command runs with a clean environment; these pass through when set on the host:
# EDGEPACK_QEMU_CPU (emulated core, default cortex-a72) and any EDGEPACK_* variable.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"

usage() {
    sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit "${1:-0}"
}
[[ ${1:-} == -h || ${1:-} == --help ]] && usage 0
(($# >= 3)) || usage 2
rootfs=$1
shift
[[ $rootfs == /* ]] || rootfs=$(pwd)/$rootfs
binds=(--bind "$(cd "$here/../.." && pwd):$EDGEPACK_QEMU_SRC:ro")
if [[ $1 == --data ]]; then
    data=$(cd "$2" 2>/dev/null && pwd) || die "--data: '$2' is not a directory"
    binds+=(--bind "$data:/data")
    shift 2
fi
[[ $1 == -- ]] || usage 2
shift
(($# > 0)) || usage 2
need_root
[[ -x $rootfs$EDGEPACK_QEMU_VENV/bin/python ]] || die "no venv at $rootfs$EDGEPACK_QEMU_VENV;" \
    "build the root first: sudo $here/setup_rootfs.sh $rootfs"
ensure_binfmt

env_words=(PYTHONPATH="$EDGEPACK_QEMU_SRC" PYTHONDONTWRITEBYTECODE=1 VIRTUAL_ENV="$EDGEPACK_QEMU_VENV"
    PATH="$EDGEPACK_QEMU_VENV/bin:/usr/local/bin:/usr/bin:/bin")
while IFS='=' read -r name _; do
    [[ $name == EDGEPACK_* && $name != EDGEPACK_QEMU_CPU ]] && env_words+=("$name=${!name}")
done < <(env)

echo "uname -m: $(in_root "$rootfs" -- /bin/uname -m)" >&2
# `cd` needs a shell; the command itself is exec'd, so its exit code is the script's.
in_root "$rootfs" "${binds[@]}" -- "${env_words[@]}" /bin/sh -c 'cd "$0" && exec "$@"' \
    "$EDGEPACK_QEMU_SRC" "$@"
