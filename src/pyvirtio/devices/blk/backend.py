"""Host-side storage behind a block device: the :class:`BlkBackend` plug point.

A backend is addressed in bytes. The device has already checked every range against
:attr:`BlkBackend.size` and hands the backend zero-copy views of guest memory, so a
read lands straight in the driver's buffers (``os.preadv``) and a write goes straight
from them (``os.pwritev``): no intermediate host copy, and nothing the guest controls
sizes a host allocation.

Implementations: :class:`FileBackend` (a raw image file or block device),
:class:`MemoryBackend` (a ``bytearray``, for tests) and :class:`NullBackend` (reads
zeros, drops writes: for benchmarks).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from pyvirtio.errors import ConfigurationError

#: fallocate(2) mode bits (<linux/falloc.h>)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

#: Zeros are written from one shared buffer of this size, never from a buffer sized
#: by a request.
ZERO_CHUNK = 1 << 20

try:
    _IOV_MAX = max(16, int(os.sysconf("SC_IOV_MAX")))
except (ValueError, OSError, AttributeError):  # pragma: no cover - non-Linux
    _IOV_MAX = 1024

_ZEROS = bytes(ZERO_CHUNK)


@runtime_checkable
class BlkBackend(Protocol):
    """What a block device needs from its storage (byte offsets and lengths).

    ``readv``/``writev`` get writable/readable views of guest memory and return how
    many bytes they transferred (less than asked only on end of storage). Errors are
    raised as :class:`OSError`; the device answers them with VIRTIO_BLK_S_IOERR.

    A backend may set a class attribute ``may_block = False`` when none of its
    operations can block (memory, null): the device then runs them inline instead of
    on I/O threads. Without it the device assumes they may block. Backends called
    from I/O threads must allow concurrent calls on distinct requests.
    """

    @property
    def size(self) -> int:
        """Size of the storage in bytes."""
        ...

    @property
    def readonly(self) -> bool:
        """True if the storage cannot be written."""
        ...

    def readv(self, offset: int, bufs: list[memoryview]) -> int:
        """Fill ``bufs`` in order from ``offset``; return bytes read."""
        ...

    def writev(self, offset: int, bufs: list[memoryview]) -> int:
        """Write ``bufs`` in order at ``offset``; return bytes written."""
        ...

    def flush(self) -> None:
        """Make every completed write stable (persistent)."""
        ...

    def discard(self, offset: int, length: int) -> None:
        """Deallocate ``[offset, offset+length)`` if possible (contents undefined)."""
        ...

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make ``[offset, offset+length)`` read as zeros; ``unmap`` allows deallocation."""
        ...

    def close(self) -> None:
        """Release the storage."""
        ...


def _iov_bytes(bufs: Sequence[memoryview]) -> int:
    return sum(b.nbytes for b in bufs)


def _advance(bufs: list[memoryview], done: int) -> list[memoryview]:
    """Drop the first ``done`` bytes of ``bufs`` (after a short transfer)."""
    out: list[memoryview] = []
    for i, b in enumerate(bufs):
        if done >= b.nbytes:
            done -= b.nbytes
            continue
        out.append(b[done:] if done else b)
        out.extend(bufs[i + 1 :])
        break
    return out


def _flat(bufs: list[memoryview]) -> list[memoryview]:
    return [b if b.format == "B" and b.ndim == 1 else b.cast("B") for b in bufs]


class _Libc:
    """``fallocate(2)`` through ctypes (``os`` has only ``posix_fallocate``)."""

    def __init__(self) -> None:
        self.fallocate: Any = None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.fallocate
        except (OSError, AttributeError):  # pragma: no cover - non-glibc platform
            return
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int
        self.fallocate = fn

    def punch_hole(self, fd: int, offset: int, length: int) -> bool:
        """Punch a hole (reads return zeros afterwards); False if unsupported."""
        if self.fallocate is None:
            return False
        rc = self.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        if rc == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
            return False
        raise OSError(err, os.strerror(err))


_LIBC: _Libc | None = None


def _libc() -> _Libc:
    global _LIBC
    if _LIBC is None:
        _LIBC = _Libc()
    return _LIBC


class FileBackend:
    """A raw image file (or a block device node) accessed with ``preadv``/``pwritev``.

    ``flush`` is ``fdatasync``; ``discard`` punches a hole (``fallocate`` with
    ``PUNCH_HOLE|KEEP_SIZE``), falling back to writing zeros where the filesystem
    cannot; ``write_zeroes`` punches when ``unmap`` is allowed and writes zeros in
    bounded chunks otherwise.
    """

    #: write zeroes with ``unmap`` can deallocate (``write_zeroes_may_unmap``)
    can_unmap = True
    may_block = True

    def __init__(self, path: str | os.PathLike[str], readonly: bool = False) -> None:
        self.path = os.fspath(path)
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags)
        except OSError as e:
            raise ConfigurationError(f"cannot open block image {self.path!r}: {e}") from e
        self._readonly = readonly
        st = os.fstat(self.fd)
        self._is_blockdev = stat.S_ISBLK(st.st_mode)
        self._punch_ok = not self._is_blockdev

    @property
    def size(self) -> int:
        """Current size of the image in bytes."""
        if self._is_blockdev:
            return os.lseek(self.fd, 0, os.SEEK_END)
        return os.fstat(self.fd).st_size

    @property
    def readonly(self) -> bool:
        """True if the image was opened read-only."""
        return self._readonly

    def readv(self, offset: int, bufs: list[memoryview]) -> int:
        """``preadv`` straight into ``bufs`` (at most IOV_MAX buffers per call)."""
        total = 0
        pending = _flat(bufs)
        while pending:
            batch = pending[:_IOV_MAX]
            want = _iov_bytes(batch)
            if want == 0:
                pending = pending[_IOV_MAX:]
                continue
            n = os.preadv(self.fd, batch, offset)
            if n <= 0:
                break
            total += n
            offset += n
            pending = _advance(pending, n)
        return total

    def writev(self, offset: int, bufs: list[memoryview]) -> int:
        """``pwritev`` straight from ``bufs`` (at most IOV_MAX buffers per call)."""
        if self._readonly:
            raise OSError(errno.EROFS, "image is read-only")
        total = 0
        pending = _flat(bufs)
        while pending:
            batch = pending[:_IOV_MAX]
            if _iov_bytes(batch) == 0:
                pending = pending[_IOV_MAX:]
                continue
            n = os.pwritev(self.fd, batch, offset)
            if n <= 0:
                break
            total += n
            offset += n
            pending = _advance(pending, n)
        return total

    def flush(self) -> None:
        """``fdatasync`` the image."""
        os.fdatasync(self.fd)

    def _write_zeros(self, offset: int, length: int) -> None:
        zeros = memoryview(_ZEROS)
        while length > 0:
            n = os.pwrite(self.fd, zeros[: min(length, ZERO_CHUNK)], offset)
            if n <= 0:
                raise OSError(errno.EIO, "short write while zeroing")
            offset += n
            length -= n

    def _punch(self, offset: int, length: int) -> bool:
        if not self._punch_ok:
            return False
        if _libc().punch_hole(self.fd, offset, length):
            return True
        self._punch_ok = False
        return False

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole; where holes are unsupported write zeros instead."""
        if self._readonly:
            raise OSError(errno.EROFS, "image is read-only")
        if length <= 0:
            return
        if not self._punch(offset, length):
            self._write_zeros(offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Zero a range: punch a hole if ``unmap`` allows, else write zeros."""
        if self._readonly:
            raise OSError(errno.EROFS, "image is read-only")
        if length <= 0:
            return
        if unmap and self._punch(offset, length):
            return
        self._write_zeros(offset, length)

    def close(self) -> None:
        """Close the image file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class MemoryBackend:
    """A ``bytearray`` image (tests). ``readonly`` refuses writes."""

    can_unmap = False
    may_block = False

    def __init__(self, size: int, readonly: bool = False, data: bytes | None = None) -> None:
        if size < 0:
            raise ConfigurationError("backend size must not be negative")
        self.data = bytearray(size)
        if data is not None:
            self.data[: len(data)] = data[:size]
        self._readonly = readonly
        #: how many times :meth:`flush` was called
        self.flushes = 0

    @property
    def size(self) -> int:
        """Size in bytes."""
        return len(self.data)

    @property
    def readonly(self) -> bool:
        """True if writes are refused."""
        return self._readonly

    def readv(self, offset: int, bufs: list[memoryview]) -> int:
        """Copy image bytes into ``bufs``."""
        src = memoryview(self.data)
        total = 0
        for b in _flat(bufs):
            n = max(0, min(b.nbytes, len(self.data) - offset))
            b[:n] = src[offset : offset + n]
            total += n
            offset += n
            if n < b.nbytes:
                break
        return total

    def writev(self, offset: int, bufs: list[memoryview]) -> int:
        """Copy ``bufs`` into the image."""
        if self._readonly:
            raise OSError(errno.EROFS, "image is read-only")
        dst = memoryview(self.data)
        total = 0
        for b in _flat(bufs):
            n = max(0, min(b.nbytes, len(self.data) - offset))
            dst[offset : offset + n] = b[:n]
            total += n
            offset += n
            if n < b.nbytes:
                break
        return total

    def flush(self) -> None:
        """Count the flush (memory needs none)."""
        self.flushes += 1

    def _zero(self, offset: int, length: int) -> None:
        end = min(offset + length, len(self.data))
        dst = memoryview(self.data)
        zeros = memoryview(_ZEROS)
        while offset < end:
            n = min(end - offset, ZERO_CHUNK)
            dst[offset : offset + n] = zeros[:n]
            offset += n

    def discard(self, offset: int, length: int) -> None:
        """Zero the range (what a hole reads as)."""
        if self._readonly:
            raise OSError(errno.EROFS, "image is read-only")
        self._zero(offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Zero the range."""
        if self._readonly:
            raise OSError(errno.EROFS, "image is read-only")
        self._zero(offset, length)

    def close(self) -> None:
        """Nothing to release."""


class NullBackend:
    """Reads return zeros, writes are dropped (benchmarks: measures virtio alone)."""

    can_unmap = False
    may_block = False

    def __init__(self, size: int, readonly: bool = False) -> None:
        if size < 0:
            raise ConfigurationError("backend size must not be negative")
        self._size = size
        self._readonly = readonly

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self._size

    @property
    def readonly(self) -> bool:
        """True if writes are refused."""
        return self._readonly

    def readv(self, offset: int, bufs: list[memoryview]) -> int:
        """Fill ``bufs`` with zeros (from a fixed buffer, in bounded chunks)."""
        zeros = memoryview(_ZEROS)
        total = 0
        for b in _flat(bufs):
            pos = 0
            while pos < b.nbytes:
                n = min(b.nbytes - pos, ZERO_CHUNK)
                b[pos : pos + n] = zeros[:n]
                pos += n
            total += b.nbytes
        return total

    def writev(self, offset: int, bufs: list[memoryview]) -> int:
        """Drop the data; report it written."""
        if self._readonly:
            raise OSError(errno.EROFS, "image is read-only")
        return _iov_bytes(bufs)

    def flush(self) -> None:
        """Nothing to flush."""

    def discard(self, offset: int, length: int) -> None:
        """Nothing to discard."""

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Reads already return zeros."""

    def close(self) -> None:
        """Nothing to release."""
