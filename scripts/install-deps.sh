#!/bin/sh
# Install the host tools pyvirtio's guest and interop tests need (Debian 12, as root),
# then the second generation of real peers (scripts/install-trixie-peers.sh).
#
#   qemu-system-x86  QEMU (TCG) that boots the Linux test guest
#   qemu-utils       qemu-img, qemu-storage-daemon (vhost-user-blk peer)
#   busybox-static   the guest's userland (must be static: the initramfs has no libc)
#   cpio             inspecting initramfs images (pyvirtio writes them itself)
#   fio              block benchmarks
#   linux-libc-dev   Linux's uapi headers (virtio_*.h): the spec tables are checked
#                    against them
#   dpdk, dpdk-dev   DPDK 22.11: dpdk-testpmd (in dpdk-dev on Debian 12, not in
#                    dpdk), the vhost-user net peer of tests/interop/test_dpdk_net.py
#                    and bench/net.py, both directions (pyvirtio.vm.testpmd)
#   librte-net-vhost23 librte-net-virtio23 librte-mempool-ring23
#                    the PMD plugins testpmd loads for --vdev net_vhost /
#                    net_virtio_user and its mbuf pool (only Recommends of dpdk, which
#                    --no-install-recommends leaves out)
#
# Idempotent: when everything is installed and the apt lists can resolve the guest
# kernel package (linux-image-amd64, downloaded later by pyvirtio.vm.kernel, never
# installed), it changes nothing and does not run 'apt-get update'.
set -eu

PACKAGES="qemu-system-x86 qemu-utils busybox-static cpio fio linux-libc-dev
dpdk dpdk-dev librte-net-vhost23 librte-net-virtio23 librte-mempool-ring23"
KERNEL_META="linux-image-amd64"

die() {
    echo "install-deps: error: $*" >&2
    exit 1
}

if [ "$(id -u)" -ne 0 ]; then
    die "must run as root (try: sudo $0)"
fi
command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script is for Debian 12"
command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found: this script is for Debian 12"

missing=""
for pkg in $PACKAGES; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [ "$status" != "install ok installed" ]; then
        missing="$missing $pkg"
    fi
done

# The guest kernel is resolved with 'apt-cache depends linux-image-amd64': that needs
# apt lists that know the package.
kernel_known() {
    apt-cache depends "$KERNEL_META" 2>/dev/null | grep -q 'Depends: linux-image-[0-9]'
}

updated=no
apt_update() {
    if [ "$updated" = no ]; then
        echo "install-deps: apt-get update"
        apt-get update -q || die "apt-get update failed (network or sources.list?)"
        updated=yes
    fi
}

if ! kernel_known; then
    apt_update
    kernel_known || die "apt knows no '$KERNEL_META' package after apt-get update"
fi

if [ -n "$missing" ]; then
    echo "install-deps: installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086 # word splitting of the package list is intended
    if ! apt-get install -y -q --no-install-recommends $missing; then
        # Stale lists give 404s: refresh once and retry.
        apt_update
        # shellcheck disable=SC2086
        apt-get install -y -q --no-install-recommends $missing \
            || die "apt-get install failed for:$missing"
    fi
fi

# Check what the tests will actually run.
for tool in qemu-system-x86_64 qemu-img qemu-storage-daemon cpio fio dpdk-testpmd; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' still missing after installation"
done
[ -x /bin/busybox ] || die "/bin/busybox missing after installing busybox-static"
/bin/busybox true || die "/bin/busybox does not run"
command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1 \
    || die "apt-get/dpkg needed to fetch the guest kernel"

# The second generation of peers (QEMU 11.1 + Linux 7.3 from trixie-backports) in a
# private trixie root under the pyvirtio cache; idempotent, cached.
sh "$(dirname "$0")/install-trixie-peers.sh" || die "setting up the trixie peers failed"

echo "install-deps: ok ($(qemu-system-x86_64 --version | head -n 1))"
