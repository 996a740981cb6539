"""A driver-side allocator of guest-physical memory (the driver's "DMA" memory).

A driver owns guest RAM and must place rings, indirect tables, request headers and
data buffers in it. :class:`GuestAllocator` hands out aligned ranges of one
guest-physical window with first-fit allocation and coalescing frees.
"""

from __future__ import annotations

import bisect
import threading

from pyvirtio.errors import ConfigurationError, GuestMemoryError


class GuestAllocator:
    """First-fit allocator over ``[base, base + size)``; thread-safe."""

    def __init__(self, base: int, size: int) -> None:
        if size <= 0:
            raise ConfigurationError("allocator window must not be empty")
        self.base = base
        self.size = size
        # free list of (start, length), sorted by start, never adjacent
        self._free: list[tuple[int, int]] = [(base, size)]
        self._used: dict[int, int] = {}
        self._lock = threading.Lock()

    def alloc(self, size: int, align: int = 16) -> int:
        """Return the guest-physical address of ``size`` fresh bytes aligned to ``align``."""
        if size <= 0:
            raise ValueError("allocation size must be positive")
        if align <= 0 or align & (align - 1):
            raise ValueError("alignment must be a power of two")
        with self._lock:
            for i, (start, length) in enumerate(self._free):
                addr = (start + align - 1) & ~(align - 1)
                pad = addr - start
                if pad + size > length:
                    continue
                pieces = []
                if pad:
                    pieces.append((start, pad))
                rest = length - pad - size
                if rest:
                    pieces.append((addr + size, rest))
                self._free[i : i + 1] = pieces
                self._used[addr] = size
                return addr
        raise GuestMemoryError(f"guest memory exhausted: cannot allocate {size} bytes")

    def free(self, addr: int) -> None:
        """Release an allocation made by :meth:`alloc`."""
        with self._lock:
            size = self._used.pop(addr)
            starts = [s for s, _ in self._free]
            i = bisect.bisect(starts, addr)
            start, length = addr, size
            # merge with the following free range
            if i < len(self._free) and self._free[i][0] == addr + size:
                length += self._free[i][1]
                del self._free[i]
            # merge with the preceding free range
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == addr:
                start = self._free[i - 1][0]
                length += self._free[i - 1][1]
                del self._free[i - 1]
                i -= 1
            self._free.insert(i, (start, length))

    @property
    def free_bytes(self) -> int:
        """Bytes not currently allocated (fragmented or not)."""
        with self._lock:
            return sum(length for _, length in self._free)
