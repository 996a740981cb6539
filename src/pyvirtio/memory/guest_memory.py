"""Guest memory: guest-physical ranges mapped onto shared ``mmap``s.

Only this package touches the ``mmap``/``memoryview`` of guest RAM directly; every
other layer holds guest-physical addresses and asks :class:`GuestMemory` for a
bounds-checked read, write or view. An access that leaves guest RAM (or wraps past
2^64) raises :class:`~pyvirtio.errors.GuestMemoryError`; nothing outside the mapped
regions is ever touched.

Regions are memfd-backed by default so that another process (the other side of a
two-process loopback, a vhost-user back-end) can map the very same pages from the fd.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import ctypes.util
import fcntl
import mmap
import os
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from pyvirtio.errors import GuestMemoryError

_U64_LIMIT = 1 << 64
_LE16 = struct.Struct("<H")
_LE32 = struct.Struct("<I")
_LE64 = struct.Struct("<Q")
_PAGE = mmap.PAGESIZE
# <linux/falloc.h>
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc: ctypes.CDLL | None = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) (:func:`os.posix_fallocate` cannot punch holes)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _libc.fallocate.restype = ctypes.c_int
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass(eq=False)
class MemoryRegion:
    """One contiguous range of guest-physical memory backed by a mapping.

    ``fd`` is the file (normally a memfd) the range is mapped from and
    ``mmap_offset`` where in that file the range begins; together they let another
    process map the same memory. ``userspace_addr`` is the front-end's own virtual
    address of the range (vhost-user ring addresses are expressed in it).
    """

    guest_phys_addr: int
    size: int
    fd: int
    mmap_offset: int = 0
    userspace_addr: int = 0
    owns_fd: bool = True
    _map: mmap.mmap | None = field(default=None, repr=False)
    _view: memoryview | None = field(default=None, repr=False)

    @property
    def end(self) -> int:
        """One past the last guest-physical address of the region."""
        return self.guest_phys_addr + self.size

    def map(self) -> None:
        """Map the region (idempotent)."""
        if self._map is not None:
            return
        # mmap offsets must be page-aligned; map from the page below and slice.
        base = self.mmap_offset - self.mmap_offset % _PAGE
        skip = self.mmap_offset - base
        self._map = mmap.mmap(
            self.fd,
            self.size + skip,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=base,
        )
        self._view = memoryview(self._map)[skip : skip + self.size]

    @property
    def view(self) -> memoryview:
        """A writable view of the whole region."""
        if self._view is None:
            self.map()
        assert self._view is not None
        return self._view

    def close(self) -> None:
        """Unmap the region and close its fd if owned.

        If views handed out earlier are still alive the mapping cannot be released
        yet; it is then left to the garbage collector (never an error).
        """
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        if self.owns_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def u16_words(view: memoryview) -> memoryview:
    """``view`` as an array of 16-bit little-endian words, each read or written with
    one (atomic) load or store.

    Ring indexes, flags and event fields are shared with another process (the other
    side of the queue) while it runs. ``struct``'s ``"<H"`` packs and unpacks byte by
    byte, so the other side can see half an update: an ``idx`` going from 0x58ff to
    0x5900 read as 0x5800. A typed view does each access as one aligned 16-bit load
    or store (the spec aligns these fields to 2 bytes or more). Index ``i`` is the
    word at byte offset ``2 * i``. Needs a little-endian host (x86-64, AArch64).
    """
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI host
        raise GuestMemoryError("pyvirtio's ring access needs a little-endian host")
    return view[: len(view) & ~1].cast("H")


def create_memfd(size: int, name: str = "pyvirtio-guest-ram") -> int:
    """Create a memfd of ``size`` bytes that can be shared with another process.

    It is sealed against shrinking (``F_SEAL_SHRINK``): a peer it is shared with
    cannot truncate it under our mappings (an access past the end of a mapped file is
    SIGBUS), and a peer that checks for the seal (as pyvirtio's back-ends do) accepts it.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def seal_against_shrinking(fd: int) -> str | None:
    """Make sure ``fd`` can no longer shrink; None if so, else why it cannot be.

    A file another process shares with us can be truncated under our mapping, and the
    next access to the vanished pages kills us with SIGBUS. A memfd already sealed
    with ``F_SEAL_SHRINK`` (QEMU's ``memory-backend-memfd`` seals by default) is
    fine; one that allows sealing gets the seal now. Anything else - a memfd created
    without ``MFD_ALLOW_SEALING``, one sealed with ``F_SEAL_SEAL`` but not against
    shrinking, a regular file (``memory-backend-file`` on /dev/shm or hugetlbfs) -
    cannot be protected, and the reason is returned.
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return "it is not a memfd (files cannot be sealed against shrinking)"
    if seals & fcntl.F_SEAL_SHRINK:
        return None
    if seals & fcntl.F_SEAL_SEAL:
        return "it is a memfd that does not allow sealing (no MFD_ALLOW_SEALING, or F_SEAL_SEAL)"
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError as e:
        return f"F_ADD_SEALS failed: {e}"
    return None


class GuestMemory:
    """A set of non-overlapping guest-physical regions.

    Accessors (``read``, ``write``, ``view``, ``views``, ``read_le16`` ...) check every
    range against the regions; a range that spans two adjacent mapped regions works
    for ``read``/``write``/``views`` (``view`` needs one region, for zero-copy).
    """

    def __init__(self, regions: Iterable[MemoryRegion] = ()) -> None:
        self._regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        self._last: MemoryRegion | None = None
        for r in regions:
            self.add_region(r)

    # -- construction -------------------------------------------------------

    @classmethod
    def create(cls, size: int, *, base: int = 0, name: str = "pyvirtio-guest-ram") -> GuestMemory:
        """Guest RAM of ``size`` bytes at guest-physical ``base``, memfd-backed."""
        return cls.create_layout([(base, size)], name=name)

    @classmethod
    def create_layout(
        cls, layout: Sequence[tuple[int, int]], *, name: str = "pyvirtio-guest-ram"
    ) -> GuestMemory:
        """Guest RAM made of several ``(base, size)`` regions, each its own memfd."""
        mem = cls()
        for base, size in layout:
            fd = create_memfd(size, name)
            region = MemoryRegion(guest_phys_addr=base, size=size, fd=fd)
            try:
                mem.add_region(region)
            except BaseException:
                region.close()
                raise
        return mem

    def add_region(self, region: MemoryRegion) -> None:
        """Add and map ``region``; it must not overlap or wrap."""
        if region.size <= 0:
            raise GuestMemoryError(f"region at {region.guest_phys_addr:#x} has size 0")
        if region.guest_phys_addr < 0 or region.end > _U64_LIMIT:
            raise GuestMemoryError(f"region at {region.guest_phys_addr:#x} wraps past 2^64")
        for other in self._regions:
            if region.guest_phys_addr < other.end and other.guest_phys_addr < region.end:
                raise GuestMemoryError(
                    f"region {region.guest_phys_addr:#x}+{region.size:#x} overlaps "
                    f"{other.guest_phys_addr:#x}+{other.size:#x}"
                )
        region.map()
        i = bisect.bisect(self._starts, region.guest_phys_addr)
        self._regions.insert(i, region)
        self._starts.insert(i, region.guest_phys_addr)

    def remove_region(self, guest_phys_addr: int, size: int | None = None) -> MemoryRegion:
        """Remove (and return, still mapped) the region starting at ``guest_phys_addr``."""
        for i, r in enumerate(self._regions):
            if r.guest_phys_addr == guest_phys_addr and (size is None or r.size == size):
                del self._regions[i]
                del self._starts[i]
                self._last = None
                return r
        raise GuestMemoryError(f"no region at {guest_phys_addr:#x}")

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        """The regions, ordered by guest-physical address."""
        return tuple(self._regions)

    @property
    def size(self) -> int:
        """Total bytes of guest RAM."""
        return sum(r.size for r in self._regions)

    def close(self) -> None:
        """Unmap every region (closing owned fds)."""
        for r in self._regions:
            r.close()
        self._regions.clear()
        self._starts.clear()
        self._last = None

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- translation --------------------------------------------------------

    def _find(self, addr: int) -> MemoryRegion | None:
        last = self._last
        if last is not None and last.guest_phys_addr <= addr < last.end:
            return last
        i = bisect.bisect(self._starts, addr) - 1
        if i >= 0:
            r = self._regions[i]
            if addr < r.end:
                self._last = r
                return r
        return None

    def _check(self, addr: int, n: int) -> None:
        if n < 0 or addr < 0 or addr + n > _U64_LIMIT:
            raise GuestMemoryError(f"range {addr:#x}+{n:#x} wraps or is negative")

    def contains(self, addr: int, n: int) -> bool:
        """True if every byte of ``[addr, addr+n)`` is guest RAM."""
        try:
            self._check(addr, n)
            for _ in self._spans(addr, n):
                pass
        except GuestMemoryError:
            return False
        return True

    def _spans(self, addr: int, n: int) -> Iterator[tuple[MemoryRegion, int, int]]:
        """Yield ``(region, offset, length)`` pieces covering ``[addr, addr+n)``."""
        while n > 0:
            r = self._find(addr)
            if r is None:
                raise GuestMemoryError(f"guest address {addr:#x} is not in guest RAM")
            off = addr - r.guest_phys_addr
            take = min(n, r.size - off)
            yield r, off, take
            addr += take
            n -= take

    def view(self, addr: int, n: int) -> memoryview:
        """Zero-copy writable view of ``[addr, addr+n)``; must lie in one region."""
        self._check(addr, n)
        r = self._find(addr)
        if r is None:
            if n == 0:
                return memoryview(b"")
            raise GuestMemoryError(f"guest address {addr:#x} is not in guest RAM")
        off = addr - r.guest_phys_addr
        if off + n > r.size:
            raise GuestMemoryError(f"range {addr:#x}+{n:#x} leaves the region ending at {r.end:#x}")
        return r.view[off : off + n]

    def views(self, addr: int, n: int) -> list[memoryview]:
        """Zero-copy views covering ``[addr, addr+n)``, one per region crossed."""
        self._check(addr, n)
        return [r.view[off : off + take] for r, off, take in self._spans(addr, n)]

    def gpa_of_userspace(self, uaddr: int) -> int:
        """Translate a front-end virtual address (vhost-user) to guest-physical."""
        for r in self._regions:
            if r.userspace_addr <= uaddr < r.userspace_addr + r.size:
                return r.guest_phys_addr + (uaddr - r.userspace_addr)
        raise GuestMemoryError(f"front-end address {uaddr:#x} is in no region")

    # -- access -------------------------------------------------------------

    def read(self, addr: int, n: int) -> bytes:
        """Copy ``n`` bytes out of guest RAM."""
        self._check(addr, n)
        r = self._find(addr)
        if r is not None:
            off = addr - r.guest_phys_addr
            if off + n <= r.size:
                return bytes(r.view[off : off + n])
        return b"".join(bytes(r.view[o : o + t]) for r, o, t in self._spans(addr, n))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest RAM at ``addr`` (checked before any byte is written)."""
        n = len(data)
        self._check(addr, n)
        spans = list(self._spans(addr, n))
        src = memoryview(data).cast("B")
        pos = 0
        for r, off, take in spans:
            r.view[off : off + take] = src[pos : pos + take]
            pos += take

    def fill(self, addr: int, n: int, byte: int = 0) -> None:
        """Set ``n`` bytes at ``addr`` to ``byte``."""
        self._check(addr, n)
        spans = list(self._spans(addr, n))
        for r, off, take in spans:
            r.view[off : off + take] = bytes([byte]) * take

    def discard(self, addr: int, n: int) -> int:
        """Give the host memory behind ``[addr, addr+n)`` back; returns the bytes freed.

        Only whole host pages inside the range are released (a partial page at either
        end is left alone), with ``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)``
        on the region's file: the pages leave the page cache and the memfd (every
        process mapping it sees the change), and read back as zeros when next touched.
        This is what a balloon does with inflated pages. Raises
        :class:`~pyvirtio.errors.GuestMemoryError` if the range is not guest RAM or the
        file cannot punch holes (an anonymous mapping, a file system without it).
        """
        self._check(addr, n)
        spans = list(self._spans(addr, n))
        freed = 0
        for r, off, take in spans:
            # whole pages of the file only: a hole punched in part of a page zeroes
            # that part, bytes the caller did not give up
            start = -(-(r.mmap_offset + off) // _PAGE) * _PAGE
            end = (r.mmap_offset + off + take) // _PAGE * _PAGE
            if end <= start:
                continue
            try:
                _fallocate(r.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, start, end - start)
            except OSError as e:
                raise GuestMemoryError(
                    f"cannot discard guest memory at file offset {start:#x}: {e}"
                ) from e
            freed += end - start
        return freed

    def allocated_bytes(self) -> int:
        """Host memory the regions' files hold now (``st_blocks`` of each fd): what
        :meth:`discard` gives back shows here."""
        # one file is often mapped as several regions (QEMU's guest RAM around the
        # VGA hole over vfio-user): count each file once
        files: dict[tuple[int, int], int] = {}
        for r in self._regions:
            if r.fd >= 0:
                st = os.fstat(r.fd)
                files[(st.st_dev, st.st_ino)] = st.st_blocks * 512
        return sum(files.values())

    def _scalar(self, addr: int, s: struct.Struct) -> tuple[memoryview, int]:
        r = self._find(addr)
        if r is not None:
            off = addr - r.guest_phys_addr
            if off + s.size <= r.size:
                return r.view, off
        return memoryview(bytearray(self.read(addr, s.size))), 0

    def read_le16(self, addr: int) -> int:
        """Read a little-endian 16-bit value."""
        buf, off = self._scalar(addr, _LE16)
        return int(_LE16.unpack_from(buf, off)[0])

    def read_le32(self, addr: int) -> int:
        """Read a little-endian 32-bit value."""
        buf, off = self._scalar(addr, _LE32)
        return int(_LE32.unpack_from(buf, off)[0])

    def read_le64(self, addr: int) -> int:
        """Read a little-endian 64-bit value."""
        buf, off = self._scalar(addr, _LE64)
        return int(_LE64.unpack_from(buf, off)[0])

    def write_le16(self, addr: int, value: int) -> None:
        """Write a little-endian 16-bit value."""
        self.write(addr, _LE16.pack(value & 0xFFFF))

    def write_le32(self, addr: int, value: int) -> None:
        """Write a little-endian 32-bit value."""
        self.write(addr, _LE32.pack(value & 0xFFFFFFFF))

    def write_le64(self, addr: int, value: int) -> None:
        """Write a little-endian 64-bit value."""
        self.write(addr, _LE64.pack(value & (_U64_LIMIT - 1)))
