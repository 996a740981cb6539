"""Two generations of real peers: which QEMU and which guest kernel a test guest uses.

=====================  ===============================  ==============================
generation             QEMU                             guest kernel
=====================  ===============================  ==============================
``qemu7.2-linux6.1``   the system's (Debian 12: 7.2)    :func:`fetch_kernel` (Debian's
                                                        ``linux-image-amd64``: 6.1)
``qemu11.1-linux7.3``  trixie-backports 11.1, from a    trixie-backports 7.3,
                       private trixie root              :func:`trixie_kernel`
=====================  ===============================  ==============================

The second generation is installed by ``scripts/install-trixie-peers.sh`` (as root; run
by ``scripts/install-deps.sh``) under the pyvirtio cache (:func:`cache_root`)::

    trixie-root/                     debootstrap --variant=minbase trixie + qemu-system-x86,
        .pyvirtio-trixie-root        qemu-utils from trixie-backports; stamp written last
    kernel-trixie/
        current.json                 the linux-image-KVER package, written last
        linux-image-7.3.4+deb13-amd64/
            unpacked                 the packages dpkg -x put under root/
            kernel.json              written by :func:`trixie_kernel` once indexed
            root/usr/lib/modules/7.3.4+deb13-amd64/{vmlinuz,vmlinux-*,kernel/...}

That QEMU needs trixie's libraries, so it runs chrooted into the root, in a private
mount namespace so that nothing it mounts shows on the host (the recipe of
``REAL_PEERS.md`` §5)::

    unshare -m --propagation private sh -c 'mount -t proc proc ROOT/proc &&
        mount --rbind /dev ROOT/dev && mount --bind /tmp ROOT/tmp &&
        exec chroot ROOT /usr/bin/qemu-system-x86_64 ARGS'

Every ``exec`` keeps the PID, so the process :class:`~pyvirtio.vm.qemu.GuestVM`
starts *is* QEMU (signals, ``PR_SET_PDEATHSIG`` and the exit status are QEMU's). QEMU
sees the host's ``/tmp`` and ``/dev`` at the same paths; any other directory a guest
needs (the kernel cache under ``~/.cache``) is bind-mounted read-only at its own path
(:meth:`QemuPeer.command`, ``share=``; the mount point, an empty directory, stays in
the root). Running it needs root (``unshare -m``, ``chroot``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pyvirtio.errors import ConfigurationError
from pyvirtio.vm.kernel import (
    GuestKernel,
    cache_root,
    fetch_kernel,
    finish_unpacked_kernel,
    locked,
    read_cached_kernel,
)

__all__ = [
    "GENERATIONS",
    "SETUP_SCRIPT",
    "SYSTEM_GENERATION",
    "TRIXIE_GENERATION",
    "TRIXIE_KERNEL_DIR",
    "TRIXIE_ROOT_DIR",
    "TRIXIE_ROOT_STAMP",
    "PeerGeneration",
    "QemuPeer",
    "peer_generation",
    "system_qemu",
    "trixie_kernel",
    "trixie_qemu",
    "trixie_root",
]

SETUP_SCRIPT = "scripts/install-trixie-peers.sh"
"""The set-up that installs the second generation (run as root)."""

TRIXIE_ROOT_DIR = "trixie-root"
"""The private trixie root, under :func:`cache_root`."""

TRIXIE_ROOT_STAMP = ".pyvirtio-trixie-root"
"""File in the root that the set-up writes last (QEMU's version line)."""

TRIXIE_KERNEL_DIR = "kernel-trixie"
"""The unpacked trixie-backports kernel, under :func:`cache_root`."""

SYSTEM_GENERATION = "qemu7.2-linux6.1"
"""The first generation: the system's QEMU and Debian 12's kernel (the default)."""

TRIXIE_GENERATION = "qemu11.1-linux7.3"
"""The second generation: trixie-backports' QEMU and kernel, from the private root."""

GENERATIONS: tuple[str, ...] = (SYSTEM_GENERATION, TRIXIE_GENERATION)
"""Every generation, oldest first."""

_CHROOT_QEMU = "/usr/bin/qemu-system-x86_64"
# $1 ROOT, $2 N, then N directories to bind read-only at their own path, then QEMU's
# arguments. /tmp and /dev are shared read-write (sockets, images, memfd, consoles).
_CHROOT_SCRIPT = r"""set -e
root=$1; n=$2; shift 2
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --rbind /dev "$root/dev"
mount --bind /tmp "$root/tmp"
while [ "$n" -gt 0 ]; do
    mkdir -p "$root$1"
    mount --bind "$1" "$root$1"
    mount -o remount,bind,ro "$root$1"
    n=$((n - 1)); shift
done
exec chroot "$root" "$@"
"""
_SHARED = (Path("/tmp"), Path("/dev"))


def _setup_hint() -> str:
    return f"run 'sudo bash {SETUP_SCRIPT}' (bash scripts/test.sh runs it)"


def trixie_root(cache: str | os.PathLike[str] | None = None) -> Path:
    """The private trixie root with QEMU 11.1; :class:`ConfigurationError` saying how to
    set it up when it is missing or half-built."""
    root = (Path(cache) if cache is not None else cache_root()) / TRIXIE_ROOT_DIR
    if not (root / TRIXIE_ROOT_STAMP).is_file() or not (root / _CHROOT_QEMU[1:]).is_file():
        raise ConfigurationError(
            f"QEMU 11.1 (trixie-backports) is not set up: no complete trixie root at {root}; "
            + _setup_hint()
        )
    return root


def trixie_kernel(cache: str | os.PathLike[str] | None = None) -> GuestKernel:
    """The trixie-backports guest kernel (Linux 7.3) that the set-up unpacked.

    The first call indexes its modules (``modules.dep`` from ``.modinfo``) and extracts
    the PVH ``vmlinux``, under a lock; later calls only read ``kernel.json``. Never
    touches apt or the network: a missing kernel raises :class:`ConfigurationError`
    naming the set-up script.
    """
    kdir = (Path(cache) if cache is not None else cache_root()) / TRIXIE_KERNEL_DIR
    current = kdir / "current.json"
    try:
        package = str(json.loads(current.read_text(encoding="utf-8"))["package"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(
            f"the trixie-backports guest kernel is not set up ({current}: {exc}); " + _setup_hint()
        ) from None
    pkg_dir = kdir / package
    if os.sep in package or package.startswith(".") or not (pkg_dir / "unpacked").is_file():
        raise ConfigurationError(
            f"the trixie-backports guest kernel {package!r} is not unpacked under {kdir}; "
            + _setup_hint()
        )
    with locked(kdir):
        kernel = read_cached_kernel(pkg_dir)
        if kernel is None:
            finish_unpacked_kernel(pkg_dir, package)
            kernel = read_cached_kernel(pkg_dir)
    if kernel is None:
        raise ConfigurationError(f"kernel cache {pkg_dir} is incomplete after indexing")
    return kernel


@dataclass(frozen=True)
class QemuPeer:
    """A QEMU to run guests with: the system's binary, or one chrooted into a root.

    :meth:`command` turns QEMU arguments into the full command line. ``label`` names
    the peer in test ids and reports (``qemu7.2``, ``qemu11.1``).
    """

    label: str
    """Short name of this QEMU, e.g. ``qemu11.1``."""
    binary: str = "qemu-system-x86_64"
    """The QEMU binary: looked up on ``PATH`` (no root) or a path inside ``root``."""
    root: Path | None = None
    """The private root QEMU runs chrooted into, ``None`` for the system's QEMU."""

    def command(
        self, args: Sequence[str], share: Iterable[str | os.PathLike[str]] = ()
    ) -> list[str]:
        """The command line that runs QEMU with ``args``.

        With a ``root``, each path in ``share`` that is not under ``/tmp`` or ``/dev``
        has its directory bind-mounted read-only into the root at the same path, so
        QEMU finds it where the arguments say (give absolute paths).
        """
        if self.root is None:
            exe = shutil.which(self.binary)
            if exe is None:
                raise ConfigurationError(
                    f"{self.binary} not found; install qemu-system-x86 (scripts/install-deps.sh)"
                )
            return [exe, *args]
        if os.geteuid() != 0:
            raise ConfigurationError(
                f"{self.label} runs chrooted into {self.root}: that needs root "
                "(unshare -m, mount, chroot)"
            )
        unshare = shutil.which("unshare")
        if unshare is None:
            raise ConfigurationError("'unshare' not found (Debian package util-linux)")
        binds: list[str] = []
        for item in share:
            directory = Path(item).resolve()
            if not directory.is_dir():
                directory = directory.parent
            if any(directory == s or s in directory.parents for s in _SHARED):
                continue
            if directory == self.root or self.root in directory.parents:
                continue  # already inside the root
            if directory in self.root.parents:
                raise ConfigurationError(
                    f"cannot share {directory} with the chroot: it contains the root itself"
                )
            if str(directory) not in binds:
                binds.append(str(directory))
        return [
            unshare, "-m", "--propagation", "private",
            "sh", "-c", _CHROOT_SCRIPT, "pyvirtio-chroot-qemu",
            str(self.root), str(len(binds)), *binds,
            self.binary, *args,
        ]  # fmt: skip

    def version(self, timeout: float = 60.0) -> str:
        """QEMU's ``--version`` first line (runs it)."""
        cmd = self.command(["--version"])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigurationError(f"{self.label}: cannot run {cmd[0]}: {exc}") from exc
        if proc.returncode != 0:
            raise ConfigurationError(
                f"{self.label}: '{self.binary} --version' failed ({proc.returncode}): "
                f"{proc.stderr.strip()[-2000:]}"
            )
        lines = proc.stdout.splitlines()
        return lines[0] if lines else ""


def system_qemu(binary: str = "qemu-system-x86_64") -> QemuPeer:
    """The system's QEMU (``qemu-system-x86`` of the host; 7.2 on Debian 12)."""
    return QemuPeer(label="qemu7.2", binary=binary)


def trixie_qemu(cache: str | os.PathLike[str] | None = None) -> QemuPeer:
    """QEMU 11.1 from trixie-backports, in the private root (:func:`trixie_root`)."""
    return QemuPeer(label="qemu11.1", binary=_CHROOT_QEMU, root=trixie_root(cache))


@dataclass(frozen=True)
class PeerGeneration:
    """A QEMU and a guest kernel that are tested together."""

    name: str
    """One of :data:`GENERATIONS`."""
    qemu: QemuPeer
    """The QEMU that runs the guest."""
    kernel: GuestKernel
    """The guest kernel (its drivers are the peer of pyvirtio's devices)."""


def peer_generation(name: str, cache: str | os.PathLike[str] | None = None) -> PeerGeneration:
    """The peers of generation ``name`` (see :data:`GENERATIONS`), ready to boot.

    The first generation may download Debian 12's kernel (:func:`fetch_kernel`); the
    second only reads what the set-up installed and raises
    :class:`ConfigurationError` naming the set-up script when it is missing.
    """
    if name == SYSTEM_GENERATION:
        kdir = Path(cache) / "kernel" if cache is not None else None
        return PeerGeneration(name, system_qemu(), fetch_kernel(kdir))
    if name == TRIXIE_GENERATION:
        return PeerGeneration(name, trixie_qemu(cache), trixie_kernel(cache))
    raise ConfigurationError(f"unknown peer generation {name!r}; known: {', '.join(GENERATIONS)}")
