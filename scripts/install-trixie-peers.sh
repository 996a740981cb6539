#!/bin/sh
# Install the second generation of real peers into a private Debian trixie root
# (Debian 12 or 13, as root), leaving the system QEMU alone:
#
#   <cache>/trixie-root/     debootstrap --variant=minbase trixie, plus from
#                            trixie-backports: qemu-system-x86 (QEMU 11.1), qemu-utils
#   <cache>/kernel-trixie/   the trixie-backports guest kernel (Linux 7.3), unpacked
#                            with dpkg -x, never installed
#
# <cache> is pyvirtio's cache root, as pyvirtio.vm.kernel.cache_root() computes it:
# $PYVIRTIO_CACHE, else $XDG_CACHE_HOME/pyvirtio, else $HOME/.cache/pyvirtio.
# pyvirtio.vm.peers runs that QEMU with
#   unshare -m --propagation private sh -c 'mount ... && exec chroot ROOT qemu-system-x86_64'
# (docs/architecture.md, "Real peers, two generations").
#
# Idempotent: each part writes a stamp when it is complete; a second run finds the
# stamps and changes nothing (no network). A half-built root (no stamp) is deleted
# and rebuilt. Recipe: /work/shared/interop/REAL_PEERS.md section 5.
set -eu

say() { echo "install-trixie-peers: $*"; }
die() {
    echo "install-trixie-peers: error: $*" >&2
    exit 1
}

[ "$(id -u)" -eq 0 ] || die "must run as root (try: sudo $0)"
command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script is for Debian 12/13"

if [ -n "${PYVIRTIO_CACHE:-}" ]; then
    CACHE=$PYVIRTIO_CACHE
elif [ -n "${XDG_CACHE_HOME:-}" ]; then
    CACHE=$XDG_CACHE_HOME/pyvirtio
else
    [ -n "${HOME:-}" ] || die "neither PYVIRTIO_CACHE nor HOME is set"
    CACHE=$HOME/.cache/pyvirtio
fi
ROOT=$CACHE/trixie-root
ROOT_STAMP=$ROOT/.pyvirtio-trixie-root
KDIR=$CACHE/kernel-trixie
KERNEL_STAMP=$KDIR/current.json
PACKAGES="qemu-system-x86 qemu-utils"

# The Debian mirror this machine uses (the only one reachable): the first URIs: line
# of deb822 sources, else the first 'deb' line of sources.list. Security mirrors are
# skipped: they carry no trixie-backports.
find_mirror() {
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri=$(awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }' "$f" \
            | grep -v -- '-security' | head -n 1)
        if [ -n "$uri" ]; then
            echo "$uri"
            return 0
        fi
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        uri=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { print $i; break } }' "$f" \
            | grep -v -- '-security' | head -n 1)
        if [ -n "$uri" ]; then
            echo "$uri"
            return 0
        fi
    done
    return 1
}

# Nothing may be mounted under the root when it is deleted: a leftover rbind of /dev
# would make 'rm -rf' delete the host's device nodes. Runs in a private mount
# namespace never leak here, but check anyway.
assert_unmounted() {
    if awk -v r="$1" '$2 == r || index($2, r "/") == 1 { found = 1 } END { exit !found }' /proc/self/mounts; then
        die "something is mounted under $1 (see /proc/self/mounts); unmount it first"
    fi
}

# Run a command inside ROOT with proc and /dev mounted, in a private mount namespace
# (the mounts vanish with the process; nothing shows on the host).
in_root() {
    unshare -m --propagation private sh -c '
        root=$1; shift
        mount -t proc proc "$root/proc" && mount --rbind /dev "$root/dev" &&
        exec chroot "$root" "$@"' in_root "$ROOT" env -i \
        PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive "$@"
}

start=$(date +%s)
MIRROR=""

# Host tools: debootstrap builds the root; zstd unpacks the 7.3 kernel image's payload
# (pyvirtio.vm.kernel.extract_vmlinux, for a PVH boot without in-guest decompression).
host_missing=""
command -v debootstrap >/dev/null 2>&1 || host_missing="$host_missing debootstrap"
command -v zstd >/dev/null 2>&1 || host_missing="$host_missing zstd"
if [ -n "$host_missing" ]; then
    say "installing on the host:$host_missing"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086 # word splitting of the package list is intended
    if ! apt-get install -y -q --no-install-recommends $host_missing; then
        apt-get update -q || die "apt-get update failed"
        # shellcheck disable=SC2086
        apt-get install -y -q --no-install-recommends $host_missing \
            || die "apt-get install$host_missing failed"
    fi
fi

mirror() {
    if [ -z "$MIRROR" ]; then
        MIRROR=$(find_mirror) || die "no Debian mirror found in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
        MIRROR=${MIRROR%/}
        say "Debian mirror: $MIRROR"
    fi
}

# -- 1. the trixie root with QEMU 11.1 -----------------------------------------------
if [ -f "$ROOT_STAMP" ] && [ -x "$ROOT/usr/bin/qemu-system-x86_64" ]; then
    say "trixie root ready: $ROOT ($(cat "$ROOT_STAMP"))"
else
    mirror
    if [ -e "$ROOT" ]; then
        say "removing half-built root $ROOT (no stamp)"
        assert_unmounted "$ROOT"
        rm -rf --one-file-system "$ROOT" || die "cannot remove $ROOT"
    fi
    mkdir -p "$CACHE"
    say "debootstrap --variant=minbase trixie $ROOT $MIRROR (takes a few minutes)"
    log=$CACHE/trixie-debootstrap.log
    if ! debootstrap --variant=minbase trixie "$ROOT" "$MIRROR" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        [ -f "$ROOT/debootstrap/debootstrap.log" ] && tail -n 30 "$ROOT/debootstrap/debootstrap.log" >&2
        die "debootstrap failed (full log: $log)"
    fi
    cat >"$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR trixie main
deb $MIRROR trixie-backports main
EOF
    rm -f "$ROOT/etc/apt/sources.list.d/debian.sources"
    # Keep the root small: no documentation, no man pages.
    cat >"$ROOT/etc/dpkg/dpkg.cfg.d/01-pyvirtio-nodoc" <<EOF
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/locale/*
EOF
    [ -s "$ROOT/etc/resolv.conf" ] || cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
    say "apt-get update in the root"
    in_root apt-get update -q >"$CACHE/trixie-apt.log" 2>&1 \
        || { tail -n 30 "$CACHE/trixie-apt.log" >&2; die "apt-get update in $ROOT failed"; }
    say "installing from trixie-backports: $PACKAGES"
    # shellcheck disable=SC2086 # word splitting of the package list is intended
    in_root apt-get install -y -q --no-install-recommends -t trixie-backports $PACKAGES \
        >>"$CACHE/trixie-apt.log" 2>&1 \
        || { tail -n 30 "$CACHE/trixie-apt.log" >&2; die "apt-get install $PACKAGES in $ROOT failed"; }
    in_root apt-get clean
    version=$(in_root /usr/bin/qemu-system-x86_64 --version | head -n 1) \
        || die "qemu-system-x86_64 does not run in $ROOT"
    in_root /usr/bin/qemu-img --version >/dev/null || die "qemu-img does not run in $ROOT"
    echo "$version" >"$ROOT_STAMP"
    say "trixie root built: $ROOT ($version, $(du -sh "$ROOT" | cut -f1))"
fi

# -- 2. the trixie-backports guest kernel ---------------------------------------------
# linux-image-amd64/trixie-backports depends on linux-image-KVER, which is itself
# empty and depends on linux-binary-KVER (usr/lib/modules/KVER/vmlinuz),
# linux-modules-KVER (the .ko.xz modules) and linux-base-KVER (config,
# modules.builtin). Download every linux-{image,binary,modules,base}-KVER package of
# that tree and dpkg -x them into one directory; then pyvirtio.vm.peers.trixie_kernel()
# indexes the modules (there is no modules.dep: depmod runs at install time) and
# extracts the PVH vmlinux, as fetch_kernel() does for Debian 12's kernel.
kernel_deps() {
    in_root apt-cache depends "$1" \
        | awk '/^ *Depends: linux-(image|binary|modules|base)-[0-9]/ { print $2 }'
}
if [ -f "$KERNEL_STAMP" ] && pkg=$(sed -n 's/.*"package": *"\([^"]*\)".*/\1/p' "$KERNEL_STAMP") \
    && [ -n "$pkg" ] && [ -f "$KDIR/$pkg/unpacked" ]; then
    say "guest kernel ready: $KDIR/$pkg"
else
    pkg=$(kernel_deps linux-image-amd64/trixie-backports | head -n 1)
    [ -n "$pkg" ] || die "'apt-cache depends linux-image-amd64/trixie-backports' in $ROOT names no kernel package"
    pkgs=$pkg
    for dep in $(kernel_deps "$pkg/trixie-backports"); do
        case " $pkgs " in *" $dep "*) ;; *) pkgs="$pkgs $dep" ;; esac
    done
    mkdir -p "$KDIR"
    work=$(mktemp -d "$KDIR/.unpack-XXXXXX")
    dl=$ROOT/tmp/pyvirtio-kernel-download
    rm -rf "$dl"
    mkdir -p "$dl"
    say "downloading $pkgs"
    # shellcheck disable=SC2046 # one argument per package is intended
    in_root sh -c 'cd /tmp/pyvirtio-kernel-download && apt-get download -q -o APT::Sandbox::User=root "$@"' \
        download $(for p in $pkgs; do printf '%s/trixie-backports ' "$p"; done) \
        || { rm -rf "$work" "$dl"; die "apt-get download $pkgs failed"; }
    for deb in "$dl"/*.deb; do
        [ -f "$deb" ] || { rm -rf "$work" "$dl"; die "apt-get download produced no .deb"; }
        say "unpacking $(basename "$deb")"
        dpkg -x "$deb" "$work/root" || { rm -rf "$work" "$dl"; die "dpkg -x $deb failed"; }
    done
    rm -rf "$dl"
    ls "$work"/root/usr/lib/modules/*/vmlinuz "$work"/root/boot/vmlinuz-* 2>/dev/null | grep -q . \
        || { rm -rf "$work"; die "no vmlinuz in the kernel packages $pkgs"; }
    echo "$pkgs" >"$work/unpacked"
    rm -rf "${KDIR:?}/$pkg"
    mv "$work" "$KDIR/$pkg"
    printf '{"package": "%s"}\n' "$pkg" >"$KERNEL_STAMP.tmp"
    mv "$KERNEL_STAMP.tmp" "$KERNEL_STAMP"
    say "guest kernel unpacked: $KDIR/$pkg ($(du -sh "$KDIR/$pkg" | cut -f1))"
fi

# Index the modules and extract vmlinux now (pure Python, stdlib only; the first test
# would do it otherwise). Instant when already done.
SRC=$(cd "$(dirname "$0")/.." && pwd)/src
command -v python3 >/dev/null 2>&1 || die "python3 not found"
PYTHONPATH=$SRC${PYTHONPATH:+:$PYTHONPATH} PYVIRTIO_CACHE=$CACHE python3 -c '
from pyvirtio.vm.peers import trixie_kernel
k = trixie_kernel()
print(f"install-trixie-peers: guest kernel {k.version}: {k.boot_image}")
' || die "indexing the guest kernel under $KDIR failed"

say "ok in $(($(date +%s) - start)) s"
