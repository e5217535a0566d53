# shellcheck shell=bash
# Shared by setup_rootfs.sh and run_in_aarch64.sh; sourced, never run.
#
# Why chroot + binfmt_misc and not `qemu-aarch64-static -L ROOT python3`: the agent (and dpkg during
# debootstrap's second stage, and pip) start child processes. qemu-user only translates the one process
# it was started with; an aarch64 child is run by the kernel, which needs a binfmt_misc entry pointing at
# qemu. Debian's qemu-user-static registers that entry with the F (fix-binary) flag, so the interpreter
# is opened once on the host and works inside any chroot without being copied in (we copy it in anyway,
# for kernels or setups that register without F).

EDGEPACK_QEMU_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
EDGEPACK_QEMU_DEFAULT_ROOTFS=/var/cache/edgepack/aarch64-rootfs
# Where inside the root the venv, the offline wheels and the project source live.
EDGEPACK_QEMU_VENV=/opt/edgepack/venv
EDGEPACK_QEMU_WHEELS=/opt/edgepack/wheels
EDGEPACK_QEMU_SRC=/edgepack

die() {
    echo "error: $*" >&2
    exit 1
}

log() {
    echo "[edgepack-qemu] $*" >&2
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap, chroot and mount need it); try: sudo $0 $*"
}

# Make sure the kernel will hand aarch64 ELF binaries to qemu. Fails with what to do when it cannot.
ensure_binfmt() {
    if [[ ! -e /proc/sys/fs/binfmt_misc/status ]]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
            || die "binfmt_misc is not mounted and cannot be mounted here (a container without" \
                "CAP_SYS_ADMIN?). Run on a host or VM where 'mount -t binfmt_misc binfmt_misc" \
                "/proc/sys/fs/binfmt_misc' works, or register qemu-aarch64 on the container's host."
    fi
    if [[ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then
        command -v update-binfmts >/dev/null || die "qemu-aarch64 is not registered in binfmt_misc and" \
            "update-binfmts is missing: apt-get install binfmt-support qemu-user-static"
        update-binfmts --import qemu-aarch64 >/dev/null 2>&1 || true
        update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    fi
    if [[ "$(head -n1 /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null)" != "enabled" ]]; then
        echo 1 > /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null || true
    fi
    [[ "$(head -n1 /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null)" == "enabled" ]] \
        || die "could not register/enable qemu-aarch64 in /proc/sys/fs/binfmt_misc;" \
            "see 'update-binfmts --display qemu-aarch64'"
}

# in_root ROOTFS [--bind HOST_DIR:GUEST_DIR[:ro]]... -- CMD...
# Run CMD chrooted in ROOTFS inside a private mount namespace (enter_root.sh does the mounting), so
# /proc, /sys, /dev, a fresh /tmp and the bind mounts vanish when CMD exits, even if it is killed:
# nothing to clean up, and two runs at once do not see each other's mounts. CMD may start with
# NAME=VALUE words (it runs under `env -i`, so nothing leaks in from the host's environment).
in_root() {
    unshare --mount --propagation private -- /bin/bash "$EDGEPACK_QEMU_DIR/enter_root.sh" "$@"
}
