#!/usr/bin/env bash
# enter_root.sh ROOTFS [--bind HOST_DIR:GUEST_DIR[:ro]]... -- CMD...
# Mounts what a program in the aarch64 root needs and execs CMD chrooted there. Only ever run through
# `in_root` (common.sh), i.e. already inside a private mount namespace: the mounts made here are never
# seen by the host and disappear with the process.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

rootfs=$1
shift
[[ -x $rootfs/bin/sh ]] || die "$rootfs does not look like a root filesystem (no /bin/sh);" \
    "build one with hardware_tests/qemu/setup_rootfs.sh"
mount -t proc proc "$rootfs/proc"
mount --rbind /sys "$rootfs/sys"
mount --rbind /dev "$rootfs/dev"
mount -t tmpfs tmpfs "$rootfs/tmp"

# qemu-user 7.2 (bookworm) passes the x86 host's /proc/cpuinfo through unchanged. The cpuinfo library
# inside the aarch64 onnxruntime then finds no ARM processor in it, walks the /sys cache topology with
# a NULL table and segfaults while the extension module loads (`import onnxruntime` dies with SIGSEGV).
# Show it the cpuinfo of the CPU qemu emulates instead: a Cortex-A72, the Raspberry Pi 4's core (see
# EDGEPACK_QEMU_CPU below), one entry per host core. A real aarch64 host keeps its own file.
if ! grep -q '^CPU implementer' /proc/cpuinfo; then
    for ((i = 0; i < $(nproc); i++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$i"
        printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n'
        printf 'CPU part\t: 0xd08\nCPU revision\t: 3\n\n'
    done > "$rootfs/tmp/.edgepack-cpuinfo"
    mount --bind "$rootfs/tmp/.edgepack-cpuinfo" "$rootfs/proc/cpuinfo"
fi

while [[ ${1:-} == --bind ]]; do
    IFS=: read -r host guest mode <<<"$2"
    [[ $host == /* && $guest == /* && -d $host ]] \
        || die "--bind wants EXISTING_HOST_DIR:GUEST_DIR[:ro] with absolute paths, got '$2'"
    mkdir -p "$rootfs$guest"
    mount --bind "$host" "$rootfs$guest"
    [[ ${mode:-} == ro ]] && mount -o remount,bind,ro "$rootfs$guest"
    shift 2
done
[[ ${1:-} == -- ]] && shift
(($# > 0)) || die "enter_root.sh: no command given"

# QEMU_CPU picks the emulated core and so the HWCAP bits the guest sees, which decide the kernels
# onnxruntime and numpy dispatch to. cortex-a72 (Raspberry Pi 4: NEON, no dotprod/i8mm/SVE) makes the
# smoke run take the code paths a Pi takes; EDGEPACK_QEMU_CPU=max shows the newest ones.
exec chroot "$rootfs" /usr/bin/env -i HOME=/root LANG=C.UTF-8 QEMU_CPU="${EDGEPACK_QEMU_CPU:-cortex-a72}" \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
