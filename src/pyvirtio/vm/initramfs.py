"""A busybox initramfs for test guests, written in pure Python (no root, no cpio tool).

The archive is the kernel's initramfs format: SVR4 "newc" cpio (magic ``070701``),
gzip-compressed. It holds a static busybox with its applet symlinks, the requested
kernel modules (plain ``.ko``, dependencies resolved from ``modules.dep``), any extra
files the caller supplies, and an ``/init`` that:

1. mounts ``/proc``, ``/sys`` and ``devtmpfs`` on ``/dev``;
2. loads the modules with ``insmod``, in order: the virtio core and transports first
   (:data:`TRANSPORT_MODULES`), then the requested drivers, each after its
   dependencies; a module that fails prints ``PYVIRTIO-INSMOD-FAILED <name>``;
3. prints :data:`READY_MARKER`, runs the caller's shell snippet (``/pyvirtio/check.sh``);
4. prints ``PYVIRTIO-GUEST-DONE rc=<exit status of the snippet>`` and ``poweroff -f``.

Device nodes ``/dev/console`` and ``/dev/null`` are in the archive itself, so the init
has a console before ``devtmpfs`` is mounted.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pyvirtio.errors import ConfigurationError
from pyvirtio.vm.kernel import GuestKernel, ModuleIndex, read_module_bytes

__all__ = [
    "DEFAULT_BUSYBOX",
    "DONE_MARKER",
    "GUEST_MODULE_DIR",
    "INSMOD_FAILED_MARKER",
    "READY_MARKER",
    "TRANSPORT_MODULES",
    "CpioWriter",
    "Initramfs",
    "build_initramfs",
    "busybox_applets",
    "render_init",
]

TRANSPORT_MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_mmio",
)
"""The virtio core and its transports, loaded before any device driver."""

READY_MARKER = "PYVIRTIO-GUEST-READY"
"""Printed by ``/init`` after the modules are loaded, before the caller's snippet."""

DONE_MARKER = "PYVIRTIO-GUEST-DONE"
"""Printed by ``/init`` after the snippet as ``PYVIRTIO-GUEST-DONE rc=<status>``."""

INSMOD_FAILED_MARKER = "PYVIRTIO-INSMOD-FAILED"
"""Printed by ``/init`` as ``PYVIRTIO-INSMOD-FAILED <module>`` for a failed insmod."""

DEFAULT_BUSYBOX = "/bin/busybox"
"""Where Debian's ``busybox-static`` puts its binary."""

GUEST_MODULE_DIR = "/lib/modules"
"""Where the modules sit in the guest (flat: ``/lib/modules/<name>.ko``)."""

_NEWC_MAGIC = b"070701"
_NEWC_TRAILER = "TRAILER!!!"
_CHECK_SCRIPT = "/pyvirtio/check.sh"
_PT_INTERP = 3
_ELF64_PHINFO = struct.Struct("<QHHHHHH")  # e_phoff .. e_shstrndx, at offset 0x20
_ELF64_PHDR_TYPE = struct.Struct("<I")


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


class CpioWriter:
    """Writes a newc (``070701``) cpio archive in memory.

    Paths are archive paths (leading ``/`` optional); parent directories are added
    automatically. Every entry gets uid/gid 0 and mtime 0, so equal inputs give equal
    archives. Call :meth:`finish` once to get the bytes (trailer included).
    """

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1
        self._names: set[str] = set()
        self._finished = False

    @staticmethod
    def _norm(path: str) -> str:
        p = PurePosixPath("/" + path.lstrip("/"))
        if ".." in p.parts:
            raise ConfigurationError(f"archive path {path!r} must not contain '..'")
        rel = str(p).lstrip("/")
        if not rel:
            raise ConfigurationError("empty archive path")
        return rel

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        if self._finished:
            raise ConfigurationError("cpio archive already finished")
        encoded = name.encode()
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (
            self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
            len(encoded) + 1, 0,
        )  # fmt: skip
        self._ino += 1
        header = _NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
        self._buf.write(header + encoded + b"\0")
        self._buf.write(b"\0" * _pad4(len(header) + len(encoded) + 1))
        self._buf.write(data)
        self._buf.write(b"\0" * _pad4(len(data)))

    def _parents(self, rel: str) -> None:
        parent = PurePosixPath(rel).parent
        missing = []
        while str(parent) not in (".", "") and str(parent) not in self._names:
            missing.append(str(parent))
            parent = parent.parent
        for d in reversed(missing):
            self._names.add(d)
            self._entry(d, stat.S_IFDIR | 0o755)

    def _claim(self, path: str) -> str:
        rel = self._norm(path)
        if rel in self._names:
            raise ConfigurationError(f"archive path {rel!r} added twice")
        self._parents(rel)
        self._names.add(rel)
        return rel

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self._norm(path) in self._names

    def add_directory(self, path: str, mode: int = 0o755) -> None:
        """Add a directory (no-op if it is already in the archive)."""
        rel = self._norm(path)
        if rel in self._names:
            return
        self._claim(rel)
        self._entry(rel, stat.S_IFDIR | (mode & 0o7777))

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file with contents ``data``."""
        rel = self._claim(path)
        self._entry(rel, stat.S_IFREG | (mode & 0o7777), bytes(data))

    def add_symlink(self, path: str, target: str) -> None:
        """Add a symbolic link ``path -> target``."""
        rel = self._claim(path)
        self._entry(rel, stat.S_IFLNK | 0o777, target.encode())

    def add_device(self, path: str, kind: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a device node; ``kind`` is ``"c"`` (character) or ``"b"`` (block)."""
        if kind not in ("c", "b"):
            raise ConfigurationError(f"device kind must be 'c' or 'b', not {kind!r}")
        rel = self._claim(path)
        ftype = stat.S_IFCHR if kind == "c" else stat.S_IFBLK
        self._entry(rel, ftype | (mode & 0o7777), rdev=(major, minor))

    def finish(self) -> bytes:
        """Append the trailer and return the archive bytes."""
        if not self._finished:
            self._entry(_NEWC_TRAILER, 0)
            self._finished = True
        return self._buf.getvalue()


def _check_static(busybox: Path) -> bytes:
    """Read ``busybox``; refuse a dynamically linked one (the guest has no libc)."""
    try:
        data = busybox.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read {busybox}: {exc}; install busybox-static (scripts/install-deps.sh)"
        ) from exc
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ConfigurationError(f"{busybox} is not a 64-bit ELF executable")
    try:
        phoff, _shoff, _flags, _ehsize, phentsize, phnum, _ = _ELF64_PHINFO.unpack_from(data, 0x20)
        for i in range(phnum):
            (p_type,) = _ELF64_PHDR_TYPE.unpack_from(data, phoff + i * phentsize)
            if p_type == _PT_INTERP:
                raise ConfigurationError(
                    f"{busybox} is dynamically linked; the guest needs a static busybox "
                    "(Debian package busybox-static)"
                )
    except struct.error as exc:
        raise ConfigurationError(f"{busybox} is a truncated ELF file") from exc
    return data


def busybox_applets(busybox: str | os.PathLike[str] = DEFAULT_BUSYBOX) -> list[str]:
    """Applet paths (``bin/sh``, ``sbin/insmod``, ...) from ``busybox --list-full``."""
    try:
        proc = subprocess.run(
            [os.fspath(busybox), "--list-full"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    except OSError as exc:
        raise ConfigurationError(f"cannot run {busybox}: {exc}") from exc
    if proc.returncode != 0:
        raise ConfigurationError(f"{busybox} --list-full failed: {proc.stderr.strip()}")
    return [line.strip() for line in proc.stdout.splitlines() if "/" in line.strip()]


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def render_init(
    module_names: Sequence[str],
    *,
    console_loglevel: int | None = 1,
    check_script: str = _CHECK_SCRIPT,
) -> str:
    """The ``/init`` shell script: mounts, ``insmod`` each module in order, run
    ``check_script``, print the markers, ``poweroff -f``.

    ``console_loglevel`` (``dmesg -n``) is applied after the modules are loaded, so
    kernel messages do not interleave with the snippet's output; ``None`` keeps the
    kernel's level. Module names are those of the ``.ko`` files under
    :data:`GUEST_MODULE_DIR`.
    """
    lines = [
        "#!/bin/sh",
        "export PATH=/sbin:/bin:/usr/sbin:/usr/bin",
        "mount -t proc proc /proc",
        "mount -t sysfs sysfs /sys",
        "mount -t devtmpfs devtmpfs /dev",
        # The kernel asks for modules by alias (request_module); there is no
        # modprobe database here, so tell it not to try.
        "echo > /proc/sys/kernel/modprobe",
    ]
    for name in module_names:
        path = f"{GUEST_MODULE_DIR}/{name}.ko"
        lines.append(f"insmod {_sh_quote(path)} || echo {INSMOD_FAILED_MARKER} {_sh_quote(name)}")
    if console_loglevel is not None:
        lines.append(f"dmesg -n {int(console_loglevel)}")
    lines += [
        f"echo {READY_MARKER}",
        f"sh {_sh_quote(check_script)}",
        f'echo "{DONE_MARKER} rc=$?"',
        "sync",
        "poweroff -f",
        # poweroff -f does not return; if it ever does, stop here rather than let
        # init exit (which panics the kernel; panic=-1 + -no-reboot ends QEMU anyway).
        "while :; do sleep 3600; done",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Initramfs:
    """A built initramfs: where it is, which modules ``/init`` loads (in order)."""

    path: Path
    modules: tuple[str, ...]
    size: int


def build_initramfs(
    output: str | os.PathLike[str],
    kernel: GuestKernel | ModuleIndex,
    script: str = "",
    *,
    modules: Sequence[str] = (),
    files: Mapping[str, bytes] | None = None,
    busybox: str | os.PathLike[str] = DEFAULT_BUSYBOX,
    with_transports: bool = True,
    console_loglevel: int | None = 1,
) -> Initramfs:
    """Write a gzip-compressed newc initramfs to ``output``.

    ``modules`` are driver names (``virtio_blk``, ``virtio-rng``, ``virtio_net``,
    ``sd_mod``...; ``-`` and ``_`` are equivalent); with ``with_transports`` the
    :data:`TRANSPORT_MODULES` are loaded first. Dependencies come from the kernel's
    ``modules.dep``; compressed modules are stored decompressed. ``script`` is the
    shell snippet run after the modules are loaded (its exit status is reported in
    the done marker). ``files`` maps extra guest paths to contents (mode 0644; use
    them for test patterns). Raises :class:`ConfigurationError` for an unknown module
    or a busybox that is not static.
    """
    index = kernel.module_index() if isinstance(kernel, GuestKernel) else kernel
    wanted = [*(TRANSPORT_MODULES if with_transports else ()), *modules]
    order = index.load_order(wanted)
    bb_path = Path(busybox)
    if not bb_path.is_file():
        resolved = shutil.which(os.fspath(busybox))
        if resolved is None:
            raise ConfigurationError(
                f"busybox not found at {busybox}; install busybox-static (scripts/install-deps.sh)"
            )
        bb_path = Path(resolved)
    bb_data = _check_static(bb_path)

    cpio = CpioWriter()
    for d in ("dev", "proc", "sys", "tmp", "run", "mnt", "root", "etc", "bin", "sbin"):
        cpio.add_directory(d, 0o1777 if d == "tmp" else 0o755)
    for d in ("usr/bin", "usr/sbin", GUEST_MODULE_DIR):
        cpio.add_directory(d)
    cpio.add_device("dev/console", "c", 5, 1, 0o600)
    cpio.add_device("dev/null", "c", 1, 3, 0o666)
    cpio.add_file("bin/busybox", bb_data, 0o755)
    for applet in busybox_applets(bb_path):
        if applet.lstrip("/") not in cpio:
            cpio.add_symlink(applet, "/bin/busybox")
    for mod in order:
        cpio.add_file(f"{GUEST_MODULE_DIR}/{mod.name}.ko", read_module_bytes(mod.path), 0o644)
    for path, data in (files or {}).items():
        cpio.add_file(path, data, 0o644)
    cpio.add_file(_CHECK_SCRIPT, script.encode(), 0o755)
    names = [m.name for m in order]
    cpio.add_file("init", render_init(names, console_loglevel=console_loglevel).encode(), 0o755)

    out = Path(output)
    compressed = gzip.compress(cpio.finish(), compresslevel=6, mtime=0)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(compressed)
    os.replace(tmp, out)
    return Initramfs(path=out, modules=tuple(names), size=len(compressed))
