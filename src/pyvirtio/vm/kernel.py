"""Debian's guest kernel for test VMs: downloaded, unpacked, never installed.

The kernel that boots the interop guests is the one Debian ships
(``linux-image-amd64`` depends on the current ``linux-image-6.*-amd64``). It is fetched
with ``apt-get download`` (no root needed), unpacked with ``dpkg -x`` into a cache
directory and reused from there: a second :func:`fetch_kernel` reads only the cache
and touches neither apt nor the network.

Cache layout (``$PYVIRTIO_CACHE/kernel/``, default ``~/.cache/pyvirtio/kernel/``)::

    current.json                     which package the last fetch resolved to
    linux-image-6.1.0-56-amd64/
        kernel.json                  written last: the unpack is complete
        root/boot/vmlinuz-6.1.0-56-amd64
        root/lib/modules/6.1.0-56-amd64/{kernel/..., modules.dep, modules.builtin}

Debian's 7.x kernels (trixie-backports, :func:`pyvirtio.vm.peers.trixie_kernel`) come
split in packages and keep the image in ``usr/lib/modules/<ver>/vmlinuz``, with no
``/boot``; :meth:`GuestKernel.from_root` finds either layout and
:func:`finish_unpacked_kernel` completes such an unpacked tree as a cache entry.

A kernel package carries no ``modules.dep`` (Debian runs ``depmod`` at install time),
so :class:`ModuleIndex` builds one from each module's ELF ``.modinfo`` section
(``depends=``) and the fetch stores it next to the modules, in depmod's format.
Modules may be plain ``.ko`` (Debian 12) or compressed ``.ko.xz``/``.ko.gz``/``.ko.zst``
(later Debian kernels): :func:`read_module_bytes` decompresses on the host, so the guest
only ever sees plain ``.ko`` files that busybox ``insmod`` loads as they are.

Boot speed: under TCG, decompressing the bzImage's xz payload takes the guest several
seconds. The fetch therefore also stores the uncompressed ``vmlinux`` when it carries
the PVH entry note (``CONFIG_PVH``, Debian has it), which QEMU boots directly;
:attr:`GuestKernel.boot_image` picks it (about 4 s to ``/init`` instead of about 9 s).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import importlib
import json
import lzma
import mmap
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pyvirtio.errors import ConfigurationError

__all__ = [
    "CACHE_ENV",
    "META_PACKAGE",
    "GuestKernel",
    "KernelModule",
    "ModuleIndex",
    "cache_root",
    "extract_vmlinux",
    "fetch_kernel",
    "finish_unpacked_kernel",
    "has_pvh_entry",
    "locked",
    "module_name",
    "read_cached_kernel",
    "read_modinfo",
    "read_module_bytes",
    "resolve_kernel_package",
]

CACHE_ENV = "PYVIRTIO_CACHE"
"""Environment variable that replaces ``~/.cache/pyvirtio`` as the cache root."""

META_PACKAGE = "linux-image-amd64"
"""Debian's meta package whose ``Depends:`` names the current kernel package."""

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
_KERNEL_JSON = "kernel.json"
_CURRENT_JSON = "current.json"
_DEPENDS_RE = re.compile(r"^\s*Depends:\s*(linux-image-\d[^\s<>]*)\s*$", re.MULTILINE)
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9.+-]+$")
_SUBPROCESS_TIMEOUT = 900.0
# A single kernel module larger than this is not a module we want to parse or copy.
_MAX_MODULE_BYTES = 256 << 20

# ELF64 little-endian layouts (x86_64 guest modules).
_ELF_IDENT = struct.Struct("<4sBBBBB7x")
_ELF64_SHOFF = struct.Struct("<Q")  # e_shoff at 0x28
_ELF64_SHINFO = struct.Struct("<HHH")  # e_shentsize, e_shnum, e_shstrndx at 0x3a
_ELF64_SHDR = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr
_ELF64_PHINFO = struct.Struct("<QQQIHHH")  # e_entry .. e_phnum at 0x18 (via e_phoff)
_ELF64_PHDR = struct.Struct("<IIQQQQQ")  # Elf64_Phdr
_ELF_NOTE = struct.Struct("<III")  # namesz, descsz, type
_PT_NOTE = 4
_XEN_ELFNOTE_PHYS32_ENTRY = 18
# x86 boot protocol (Documentation/x86/boot.rst): setup header fields.
_BZ_SETUP_SECTS = 0x1F1
_BZ_HDR_MAGIC = 0x202
_BZ_VERSION = 0x206
_BZ_PAYLOAD = struct.Struct("<II")  # payload_offset, payload_length at 0x248
_MAX_VMLINUX_BYTES = 1 << 30


def cache_root() -> Path:
    """The pyvirtio cache root: ``$PYVIRTIO_CACHE``, else ``$XDG_CACHE_HOME/pyvirtio``,
    else ``~/.cache/pyvirtio``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "pyvirtio"


def module_name(path_or_name: str | os.PathLike[str]) -> str:
    """Canonical module name: file name without ``.ko*``, ``-`` spelled ``_``.

    ``kernel/drivers/char/hw_random/virtio-rng.ko`` and ``virtio-rng`` both give
    ``virtio_rng``, the name the kernel itself uses.
    """
    name = os.path.basename(os.fspath(path_or_name))
    for suffix in sorted(_MODULE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def _zstd_decompress(data: bytes, path: Path) -> bytes:
    """Decompress zstd with whatever the host has: stdlib (3.14+), ``zstandard``, CLI."""
    for mod_name in ("compression.zstd", "zstandard"):
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        if mod_name == "zstandard":
            out = mod.ZstdDecompressor().decompress(data, max_output_size=_MAX_MODULE_BYTES)
        else:
            out = mod.decompress(data)
        return bytes(out)
    zstd = shutil.which("zstd")
    if zstd is None:
        raise ConfigurationError(
            f"{path} is zstd-compressed and this host has no zstd decompressor: "
            "install the 'zstd' package (apt-get install zstd)"
        )
    proc = subprocess.run(
        [zstd, "-q", "-d", "-c"], input=data, capture_output=True, check=False, timeout=120
    )
    if proc.returncode != 0:
        raise ConfigurationError(f"zstd could not decompress {path}: {proc.stderr.decode()!r}")
    return proc.stdout


def has_pvh_entry(elf: bytes | memoryview) -> bool:
    """True when an ELF64 kernel carries the ``XEN_ELFNOTE_PHYS32_ENTRY`` note, the PVH
    entry point that lets QEMU boot it uncompressed with ``-kernel``."""
    view = memoryview(elf)
    try:
        if bytes(view[:4]) != b"\x7fELF" or view[4] != 2 or view[5] != 1:
            return False
        _entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum = _ELF64_PHINFO.unpack_from(
            view, 0x18
        )
        for i in range(phnum):
            p_type, _f, p_offset, _va, _pa, p_filesz, _m = _ELF64_PHDR.unpack_from(
                view, phoff + i * phentsize
            )
            if p_type != _PT_NOTE:
                continue
            pos, end = p_offset, min(p_offset + p_filesz, len(view))
            while pos + _ELF_NOTE.size <= end:
                namesz, descsz, ntype = _ELF_NOTE.unpack_from(view, pos)
                name_at = pos + _ELF_NOTE.size
                name = bytes(view[name_at : name_at + namesz]).rstrip(b"\0")
                if name == b"Xen" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY:
                    return True
                pos = name_at + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    except (struct.error, IndexError):
        return False
    finally:
        view.release()
    return False


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed ELF ``vmlinux`` inside an x86 bzImage, or ``None`` when the
    payload cannot be located or uses a compression this host cannot undo.

    The payload is found through the setup header's ``payload_offset`` and
    ``payload_length`` (boot protocol 2.08+); xz, gzip and zstd payloads are handled.
    """
    try:
        if bzimage[_BZ_HDR_MAGIC : _BZ_HDR_MAGIC + 4] != b"HdrS":
            return None
        (version,) = struct.unpack_from("<H", bzimage, _BZ_VERSION)
        if version < 0x208:
            return None
        setup_sects = bzimage[_BZ_SETUP_SECTS] or 4
        pm_start = (setup_sects + 1) * 512
        off, length = _BZ_PAYLOAD.unpack_from(bzimage, 0x248)
    except (struct.error, IndexError):
        return None
    payload = bzimage[pm_start + off : pm_start + off + length]
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            out = dec.decompress(payload, max_length=_MAX_VMLINUX_BYTES)
            if not dec.eof:
                return None
        elif payload.startswith(b"\x1f\x8b"):
            gz = zlib.decompressobj(wbits=31)
            out = gz.decompress(payload, _MAX_VMLINUX_BYTES)
            if not gz.eof:
                return None
        elif payload.startswith(b"\x28\xb5\x2f\xfd"):
            # arch/x86/boot/compressed/Makefile builds it with 'zstd22_with_size': the
            # frame, then the uncompressed size as 4 little-endian bytes (size_append),
            # which zstd itself rejects as trailing garbage. Strip it, check it.
            (size,) = struct.unpack_from("<I", payload, len(payload) - 4)
            out = _zstd_decompress(payload[:-4], Path("vmlinuz"))
            if len(out) != size:
                return None
        else:
            return None
    except (lzma.LZMAError, zlib.error, ConfigurationError):
        return None
    return out if out.startswith(b"\x7fELF") else None


def read_module_bytes(path: str | os.PathLike[str]) -> bytes:
    """The plain ELF bytes of a kernel module, decompressing ``.xz``/``.gz``/``.zst``.

    Busybox ``insmod`` hands the file to ``init_module`` as it is, so compressed
    modules are decompressed here, on the host.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > _MAX_MODULE_BYTES:
            raise ConfigurationError(f"{p} is {size} bytes: too large for a kernel module")
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read kernel module {p}: {exc}") from exc
    name = p.name
    try:
        if name.endswith(".ko.xz"):
            data = lzma.decompress(data)
        elif name.endswith(".ko.gz"):
            data = gzip.decompress(data)
        elif name.endswith(".ko.zst"):
            data = _zstd_decompress(data, p)
    except (lzma.LZMAError, OSError, EOFError) as exc:
        raise ConfigurationError(f"cannot decompress kernel module {p}: {exc}") from exc
    if len(data) > _MAX_MODULE_BYTES:
        raise ConfigurationError(f"{p} decompresses to more than {_MAX_MODULE_BYTES} bytes")
    return data


def read_modinfo(data: bytes | memoryview | mmap.mmap) -> dict[str, list[str]]:
    """Parse the ``.modinfo`` section of an ELF64 little-endian kernel module.

    Returns every ``key=value`` entry, values grouped by key in file order (a module
    has one ``depends=`` and one ``name=``, and many ``alias=``). Raises
    :class:`ConfigurationError` when the bytes are not such a module.
    """
    view = memoryview(data)
    try:
        magic, ei_class, ei_data, _ver, _abi, _abiver = _ELF_IDENT.unpack_from(view, 0)
        if magic != b"\x7fELF" or ei_class != 2 or ei_data != 1:
            raise ConfigurationError("not an ELF64 little-endian file")
        (shoff,) = _ELF64_SHOFF.unpack_from(view, 0x28)
        shentsize, shnum, shstrndx = _ELF64_SHINFO.unpack_from(view, 0x3A)
        if shentsize < _ELF64_SHDR.size or shstrndx >= shnum:
            raise ConfigurationError("malformed ELF section header table")
        if shoff + shnum * shentsize > len(view):
            raise ConfigurationError("ELF section header table past end of file")
        headers = [_ELF64_SHDR.unpack_from(view, shoff + i * shentsize) for i in range(shnum)]
        str_off, str_size = headers[shstrndx][4], headers[shstrndx][5]
        if str_off + str_size > len(view):
            raise ConfigurationError("ELF section name table past end of file")
        names = bytes(view[str_off : str_off + str_size])
        for sh in headers:
            name_off = sh[0]
            end = names.find(b"\0", name_off)
            if name_off >= len(names) or end < 0 or names[name_off:end] != b".modinfo":
                continue
            off, size = sh[4], sh[5]
            if off + size > len(view):
                raise ConfigurationError(".modinfo section past end of file")
            info: dict[str, list[str]] = {}
            for entry in bytes(view[off : off + size]).split(b"\0"):
                key, sep, value = entry.decode("utf-8", "replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
            return info
    except struct.error as exc:
        raise ConfigurationError(f"truncated ELF file: {exc}") from exc
    finally:
        view.release()
    raise ConfigurationError("ELF file has no .modinfo section: not a kernel module")


def _modinfo_of_file(path: Path) -> dict[str, list[str]]:
    """``.modinfo`` of a module file; plain ``.ko`` files are mapped, not read whole."""
    if path.name.endswith(".ko"):
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ConfigurationError(f"{path} is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                return read_modinfo(mapped)
    return read_modinfo(read_module_bytes(path))


@dataclass(frozen=True)
class KernelModule:
    """One loadable module: canonical name, file, and the modules it depends on."""

    name: str
    path: Path
    depends: tuple[str, ...]


class ModuleIndex:
    """The modules of one kernel and their dependencies, as ``modules.dep`` tells.

    :meth:`load` reads ``modules.dep`` (depmod's, or the one :func:`fetch_kernel`
    generated); :meth:`scan` builds the same from the modules' ``.modinfo``.
    :meth:`load_order` turns module names into an ``insmod`` sequence where every
    dependency precedes its dependents.
    """

    def __init__(
        self,
        modules_dir: Path,
        modules: Mapping[str, KernelModule],
        builtin: Iterable[str] = (),
    ) -> None:
        self.modules_dir = modules_dir
        self._modules = dict(modules)
        self._builtin = frozenset(builtin)

    # -- construction ---------------------------------------------------------------

    @staticmethod
    def _read_builtin(modules_dir: Path) -> frozenset[str]:
        path = modules_dir / "modules.builtin"
        if not path.is_file():
            return frozenset()
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        return frozenset(module_name(line.strip()) for line in lines if line.strip())

    @classmethod
    def load(cls, modules_dir: str | os.PathLike[str]) -> ModuleIndex:
        """Index ``modules_dir`` from its ``modules.dep``, or by :meth:`scan` if absent."""
        mdir = Path(modules_dir)
        dep = mdir / "modules.dep"
        if not dep.is_file():
            return cls.scan(mdir)
        modules: dict[str, KernelModule] = {}
        for lineno, line in enumerate(dep.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            target, sep, rest = line.partition(":")
            if not sep:
                raise ConfigurationError(f"{dep}:{lineno}: malformed line {line!r}")
            name = module_name(target.strip())
            modules[name] = KernelModule(
                name=name,
                path=mdir / target.strip(),
                depends=tuple(module_name(d) for d in rest.split()),
            )
        return cls(mdir, modules, cls._read_builtin(mdir))

    @classmethod
    def scan(cls, modules_dir: str | os.PathLike[str]) -> ModuleIndex:
        """Index ``modules_dir`` by reading ``depends=`` from every module's ``.modinfo``."""
        mdir = Path(modules_dir)
        if not mdir.is_dir():
            raise ConfigurationError(f"{mdir} is not a kernel modules directory")
        modules: dict[str, KernelModule] = {}
        for dirpath, _dirnames, filenames in os.walk(mdir):
            for fname in sorted(filenames):
                if not fname.endswith(_MODULE_SUFFIXES):
                    continue
                path = Path(dirpath) / fname
                info = _modinfo_of_file(path)
                deps = [d for v in info.get("depends", []) for d in v.split(",") if d]
                name = module_name(info["name"][0]) if info.get("name") else module_name(fname)
                modules[name] = KernelModule(
                    name=name, path=path, depends=tuple(module_name(d) for d in deps)
                )
        if not modules:
            raise ConfigurationError(f"{mdir} holds no kernel modules")
        return cls(mdir, modules, cls._read_builtin(mdir))

    # -- queries --------------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and module_name(name) in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[KernelModule]:
        return iter(self._modules.values())

    def is_builtin(self, name: str) -> bool:
        """True when ``name`` is compiled into the kernel (nothing to load)."""
        return module_name(name) in self._builtin

    def get(self, name: str) -> KernelModule:
        """The module called ``name`` (``-`` or ``_`` spelling); ConfigurationError if none."""
        canon = module_name(name)
        try:
            return self._modules[canon]
        except KeyError:
            raise ConfigurationError(
                f"kernel module {name!r} not found under {self.modules_dir}"
            ) from None

    def load_order(self, names: Iterable[str]) -> list[KernelModule]:
        """The modules to ``insmod``, in order, to get every module in ``names``.

        Requested modules keep their relative order except that each one's
        dependencies (transitively) come first; each module appears once; built-in
        modules are skipped. An unknown name or a dependency cycle raises
        :class:`ConfigurationError`.
        """
        order: list[KernelModule] = []
        done: set[str] = set()
        for requested in names:
            canon = module_name(requested)
            if canon in done or (canon in self._builtin and canon not in self._modules):
                continue
            # Iterative depth-first post-order: dependencies before dependents.
            stack: list[tuple[str, int]] = [(canon, 0)]
            on_path: list[str] = [canon]
            while stack:
                name, i = stack[-1]
                mod = self.get(name)
                if i < len(mod.depends):
                    stack[-1] = (name, i + 1)
                    dep = mod.depends[i]
                    if dep in done or (dep in self._builtin and dep not in self._modules):
                        continue
                    if dep in on_path:
                        cycle = " -> ".join([*on_path, dep])
                        raise ConfigurationError(f"module dependency cycle: {cycle}")
                    stack.append((dep, 0))
                    on_path.append(dep)
                    continue
                stack.pop()
                on_path.pop()
                if name not in done:
                    done.add(name)
                    order.append(mod)
        return order

    def transitive_depends(self, name: str) -> list[str]:
        """All modules ``name`` needs, the one to load last first (depmod's order)."""
        canon = module_name(name)
        order = [m.name for m in self.load_order([canon]) if m.name != canon]
        return order[::-1]

    def write_modules_dep(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the index as a depmod-format ``modules.dep`` (paths relative to the
        modules directory, transitive dependencies, last-to-load first)."""
        out = Path(path) if path is not None else self.modules_dir / "modules.dep"
        lines = []
        for mod in sorted(self._modules.values(), key=lambda m: str(m.path)):
            rel = os.path.relpath(mod.path, self.modules_dir)
            deps = [
                os.path.relpath(self._modules[d].path, self.modules_dir)
                for d in self.transitive_depends(mod.name)
            ]
            lines.append(f"{rel}: {' '.join(deps)}".rstrip() + "\n")
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("".join(lines), encoding="utf-8")
        os.replace(tmp, out)
        return out


@dataclass(frozen=True)
class GuestKernel:
    """An unpacked guest kernel: image, modules directory and version."""

    version: str
    """Kernel release, e.g. ``6.1.0-56-amd64`` (the ``lib/modules`` directory name)."""
    vmlinuz: Path
    """The bootable image, passed to QEMU's ``-kernel``."""
    modules_dir: Path
    """``.../lib/modules/<version>``, holding ``kernel/`` and ``modules.dep``."""
    package: str = ""
    """The Debian package it came from, when known."""
    vmlinux: Path | None = None
    """The uncompressed image with a PVH entry note, when one was extracted."""

    @property
    def boot_image(self) -> Path:
        """The image to pass to ``-kernel``: ``vmlinux`` (PVH, no in-guest
        decompression) when available, else ``vmlinuz``."""
        return self.vmlinux if self.vmlinux is not None else self.vmlinuz

    @classmethod
    def from_root(cls, root: str | os.PathLike[str], package: str = "") -> GuestKernel:
        """Describe a kernel unpacked (``dpkg -x``) under ``root``."""
        r = Path(root)
        images = sorted((r / "boot").glob("vmlinuz-*"))
        if not images:
            # Debian's 7.x packages (linux-binary-KVER) keep the image next to the
            # modules: usr/lib/modules/KVER/vmlinuz, and no /boot at all.
            found = sorted(r.glob("usr/lib/modules/*/vmlinuz"))
            if len(found) == 1:
                mdir = found[0].parent
                return cls(version=mdir.name, vmlinuz=found[0], modules_dir=mdir, package=package)
        if len(images) != 1:
            raise ConfigurationError(
                f"expected exactly one boot/vmlinuz-* or usr/lib/modules/*/vmlinuz under {r}, "
                f"found {len(images)}"
            )
        version = images[0].name[len("vmlinuz-") :]
        for lib in ("lib", "usr/lib"):
            mdir = r / lib / "modules" / version
            if mdir.is_dir():
                return cls(version=version, vmlinuz=images[0], modules_dir=mdir, package=package)
        raise ConfigurationError(f"no lib/modules/{version} under {r}")

    def module_index(self) -> ModuleIndex:
        """Index of this kernel's modules (from ``modules.dep``, else by scanning)."""
        return ModuleIndex.load(self.modules_dir)


# -- fetching -------------------------------------------------------------------------


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    exe = shutil.which(cmd[0])
    if exe is None:
        raise ConfigurationError(
            f"{what}: '{cmd[0]}' not found; this needs Debian's apt/dpkg tools "
            "(run scripts/install-deps.sh on Debian 12)"
        )
    try:
        proc = subprocess.run(
            [exe, *cmd[1:]],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
            timeout=_SUBPROCESS_TIMEOUT,
            env={**os.environ, "LC_ALL": "C"},
        )
    except subprocess.TimeoutExpired as exc:
        raise ConfigurationError(f"{what}: '{' '.join(cmd)}' timed out") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise ConfigurationError(f"{what}: '{' '.join(cmd)}' failed ({proc.returncode}): {tail}")
    return proc.stdout


def resolve_kernel_package(meta_package: str = META_PACKAGE) -> str:
    """The ``linux-image-6.*`` package ``meta_package`` depends on (``apt-cache``, local)."""
    out = _run(["apt-cache", "depends", meta_package], "resolving the Debian kernel package")
    found = _DEPENDS_RE.findall(out)
    if not found:
        raise ConfigurationError(
            f"'apt-cache depends {meta_package}' names no linux-image-* package; are the "
            "apt lists present? (run 'apt-get update' or scripts/install-deps.sh)"
        )
    return str(found[0])


def _read_cached(pkg_dir: Path) -> GuestKernel | None:
    meta_path = pkg_dir / _KERNEL_JSON
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        vmlinux = str(meta.get("vmlinux") or "")
        kernel = GuestKernel(
            version=str(meta["version"]),
            vmlinuz=pkg_dir / str(meta["vmlinuz"]),
            modules_dir=pkg_dir / str(meta["modules_dir"]),
            package=str(meta["package"]),
            vmlinux=pkg_dir / vmlinux if vmlinux else None,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not kernel.vmlinuz.is_file() or not (kernel.modules_dir / "modules.dep").is_file():
        return None
    if kernel.vmlinux is not None and not kernel.vmlinux.is_file():
        return None
    return kernel


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory/.lock`` (created) for the block."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _write_json(path: Path, data: Mapping[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dict(data), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def fetch_kernel(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    package: str | None = None,
    refresh: bool = False,
) -> GuestKernel:
    """Return Debian's guest kernel, downloading and unpacking it the first time.

    ``cache_dir`` defaults to ``cache_root() / "kernel"``. With neither ``package`` nor
    ``refresh``, a kernel already in the cache is returned without running apt at all
    (so no network). Otherwise the package (default: what ``linux-image-amd64``
    depends on) is fetched with ``apt-get download``, unpacked with ``dpkg -x``, its
    ``modules.dep`` generated, and the ``.deb`` deleted. Concurrent callers serialise
    on a lock file. Failures raise :class:`ConfigurationError` saying what to fix.
    """
    cdir = Path(cache_dir) if cache_dir is not None else cache_root() / "kernel"
    if package is not None and not _PACKAGE_RE.match(package):
        raise ConfigurationError(f"{package!r} is not a Debian package name")
    with locked(cdir):
        current = cdir / _CURRENT_JSON
        if package is None and not refresh and current.is_file():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                name = str(json.loads(current.read_text(encoding="utf-8"))["package"])
                if _PACKAGE_RE.match(name):
                    cached = _read_cached(cdir / name)
                    if cached is not None:
                        return cached
        pkg = package if package is not None else resolve_kernel_package()
        pkg_dir = cdir / pkg
        kernel = None if refresh else _read_cached(pkg_dir)
        if kernel is None:
            kernel = _download_and_unpack(cdir, pkg)
        _write_json(current, {"package": pkg})
        return kernel


def finish_unpacked_kernel(pkg_dir: str | os.PathLike[str], package: str) -> GuestKernel:
    """Complete a kernel unpacked (``dpkg -x``) into ``pkg_dir/root`` as a cache entry.

    Writes ``modules.dep`` if the packages carry none (built from the modules'
    ``.modinfo``), the uncompressed PVH ``vmlinux`` when the image has one, and, last,
    ``pkg_dir/kernel.json``, which marks the entry complete for :func:`read_cached_kernel`.
    """
    work = Path(pkg_dir)
    kernel = GuestKernel.from_root(work / "root", package=package)
    if not (kernel.modules_dir / "modules.dep").is_file():
        ModuleIndex.scan(kernel.modules_dir).write_modules_dep()
    vmlinux_rel = ""
    elf = extract_vmlinux(kernel.vmlinuz.read_bytes())
    if elf is not None and has_pvh_entry(elf):
        vmlinux = kernel.vmlinuz.with_name(f"vmlinux-{kernel.version}")
        tmp = vmlinux.with_name(vmlinux.name + ".tmp")
        tmp.write_bytes(elf)
        os.replace(tmp, vmlinux)
        vmlinux_rel = str(vmlinux.relative_to(work))
    _write_json(
        work / _KERNEL_JSON,
        {
            "package": package,
            "version": kernel.version,
            "vmlinuz": str(kernel.vmlinuz.relative_to(work)),
            "vmlinux": vmlinux_rel,
            "modules_dir": str(kernel.modules_dir.relative_to(work)),
        },
    )
    return kernel


def read_cached_kernel(pkg_dir: str | os.PathLike[str]) -> GuestKernel | None:
    """The kernel of a complete cache entry ``pkg_dir`` (its ``kernel.json`` and the
    files it names exist), else ``None``."""
    return _read_cached(Path(pkg_dir))


def _download_and_unpack(cdir: Path, pkg: str) -> GuestKernel:
    pkg_dir = cdir / pkg
    work = Path(tempfile.mkdtemp(prefix=f".{pkg}-", dir=cdir))
    os.chmod(work, 0o755)
    try:
        download = ["apt-get", "download", "-q"]
        if os.geteuid() == 0:
            # apt drops to the _apt user, which cannot write to a root-owned cache dir.
            download += ["-o", "APT::Sandbox::User=root"]
        _run([*download, pkg], f"downloading {pkg}", cwd=work)
        debs = sorted(work.glob(f"{pkg}_*.deb"))
        if len(debs) != 1:
            raise ConfigurationError(f"apt-get download {pkg} produced {len(debs)} .deb files")
        root = work / "root"
        _run(["dpkg", "-x", str(debs[0]), str(root)], f"unpacking {debs[0].name}")
        debs[0].unlink()
        finish_unpacked_kernel(work, pkg)
        if pkg_dir.exists():
            shutil.rmtree(pkg_dir)
        os.replace(work, pkg_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    cached = _read_cached(pkg_dir)
    if cached is None:
        raise ConfigurationError(f"kernel cache {pkg_dir} is incomplete after unpacking")
    return cached
