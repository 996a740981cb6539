"""Dirty-page logging for live migration (vhost-user.rst "Migration").

The front-end hands the back-end a shared bitmap with ``VHOST_USER_SET_LOG_BASE``
(``VHOST_USER_PROTOCOL_F_LOG_SHMFD``: a file descriptor, a size and an offset). While
``VHOST_F_LOG_ALL`` is negotiated, every guest page the back-end writes must be marked
in it: "All the modifications to memory pointed by vring 'descriptor' should be
marked. Modifications to 'used' vring should be marked if ``VHOST_VRING_F_LOG`` is
part of ring's flags." A page is ``VHOST_LOG_PAGE`` (4 KiB) of guest-physical memory::

    page = addr / VHOST_LOG_PAGE
    log[page / 8] |= 1 << page % 8

:class:`DirtyLog` is that bitmap. Which writes get logged is the caller's business:
the back-end's served queues log the device-writable part of every chain they return
and the used-side ring areas they write (see :mod:`.backend`).

Atomicity: the document asks for atomic operations, "as the log may be concurrently
manipulated". Python cannot issue an atomic OR on shared memory; each update here is a
single one-byte store of ``old | bits`` (or of ``0xff`` for whole bytes). The front-end
only ever *clears* bits, by atomically exchanging words with zero while it syncs. A
store racing such an exchange can therefore only set bits again that the front-end
already collected (the page is sent once more), never lose a bit this side set: the
log stays a superset of the dirty pages, which is what migration needs.
"""

from __future__ import annotations

import mmap
import os

from pyvirtio.errors import ProtocolError
from pyvirtio.transport.vhost_user._shm import map_shared, release_shared
from pyvirtio.transport.vhost_user.spec import VHOST_LOG_PAGE

__all__ = ["MAX_LOG_SIZE", "DirtyLog"]

_CLAUSE = 'vhost-user.rst "Migration"'
_PAGE_SHIFT = VHOST_LOG_PAGE.bit_length() - 1
#: Largest log accepted (bytes). 1 GiB of bitmap covers 32 TiB of guest RAM.
MAX_LOG_SIZE = 1 << 30


class DirtyLog:
    """The shared dirty-page bitmap given by ``VHOST_USER_SET_LOG_BASE``.

    Takes ownership of ``fd`` (closed by :meth:`close`, also when construction fails).
    The mapping is checked against the file's size first, so a log shorter than it
    claims cannot fault the process later. ``pages_marked`` counts :meth:`mark` page
    bits set, ``out_of_range`` the writes that fell beyond the log (front-end error:
    the log must cover every guest address; those bits are dropped).
    """

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int, *, trusted: bool = False) -> None:
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        try:
            if not 0 < mmap_size <= MAX_LOG_SIZE:
                raise ProtocolError(
                    f"dirty log of {mmap_size} bytes (1..{MAX_LOG_SIZE} accepted)", _CLAUSE
                )
            self._map, self._view = map_shared(
                fd, mmap_size, mmap_offset, "dirty log", ProtocolError, _CLAUSE, trusted=trusted
            )
        except BaseException:
            os.close(fd)
            self.close()
            raise
        self.fd = fd
        self.size = mmap_size
        self.offset = mmap_offset
        #: guest pages the log can describe
        self.pages = mmap_size * 8
        self.pages_marked = 0
        self.out_of_range = 0

    def mark(self, gpa: int, length: int) -> None:
        """Mark every page touched by the guest-physical range ``[gpa, gpa+length)``."""
        view = self._view
        if length <= 0 or view is None:
            return
        first = gpa >> _PAGE_SHIFT
        last = (gpa + length - 1) >> _PAGE_SHIFT
        if last >= self.pages:
            self.out_of_range += 1
            if first >= self.pages:
                return
            last = self.pages - 1
        self.pages_marked += last - first + 1
        b0 = first >> 3
        b1 = last >> 3
        if b0 == b1:
            view[b0] |= ((1 << (last - first + 1)) - 1) << (first & 7)
            return
        view[b0] |= (0xFF << (first & 7)) & 0xFF
        if b1 > b0 + 1:
            view[b0 + 1 : b1] = b"\xff" * (b1 - b0 - 1)
        view[b1] |= (1 << ((last & 7) + 1)) - 1

    def is_dirty(self, gpa: int) -> bool:
        """True if the page holding ``gpa`` is marked (for tests and diagnostics)."""
        page = gpa >> _PAGE_SHIFT
        if self._view is None or page >= self.pages:
            return False
        return bool(self._view[page >> 3] >> (page & 7) & 1)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._view is None

    def close(self) -> None:
        """Unmap the log and close its descriptor. Idempotent."""
        release_shared(self._view, self._map, getattr(self, "fd", -1))
        self._view = None
        self._map = None
        self.fd = -1
