"""The driver's side of a packed virtqueue (virtio-v1.2 §2.8 "Packed Virtqueues").

The driver writes buffers into the Descriptor Ring at its next-available position,
marking them with its Driver Ring Wrap Counter, and reads used descriptors at its
next-used position, recognised by AVAIL and USED both matching its used wrap counter
(virtio-v1.2 §2.8.1 "Driver and Device Ring Wrap Counters"). Buffer IDs come from a
free list of ``0..size-1``; each remembers how many ring slots its buffer took so the
driver can skip to the next used descriptor (virtio-v1.2 §2.8.6 "Next Flag:
Descriptor Chaining").

The device is untrusted: a used Buffer ID that is out of range or not in flight, or a
used length beyond the buffer's device-writable part, raises
:class:`~pyvirtio.errors.DeviceError` and marks the queue broken.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Generic, TypeVar

from pyvirtio.errors import GuestMemoryError, QueueFullError
from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.memory.guest_memory import GuestMemory, u16_words
from pyvirtio.spec.ring import (
    PACKED_DESC_ALIGN,
    PACKED_EVENT_ALIGN,
    PACKED_MAX_QUEUE_SIZE,
    PVIRTQ_EVENT_SUPPRESS,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    packed_desc_ring_size,
)
from pyvirtio.virtqueue.common import (
    MAX_INDIRECT_ENTRIES,
    DriverVirtqueue,
    QueueAddresses,
    RingFeatures,
    Segment,
    check_segments,
)
from pyvirtio.virtqueue.packed._ring import (
    _DESC,
    _DESC_BODY,
    _DESC_SIZE,
    _EVT_DESC_OFF,
    _EVT_FLAGS_OFF,
    _F_AVAIL,
    _F_AVAIL_USED,
    _F_INDIRECT,
    _F_NEXT,
    _F_WRITE,
    _FLAGS_OFF,
    _NO_FEATURES,
    _event_wanted,
)

__all__ = ["PackedDriverQueue"]

T = TypeVar("T")

_NO_TABLE = -1

CLAUSE_USED = 'virtio-v1.2 §2.8.22 "Receiving Used Buffers From The Device"'
CLAUSE_LEN = 'virtio-v1.2 §2.8.4 "Element Address and Length"'


class PackedDriverQueue(DriverVirtqueue[T], Generic[T]):
    """Driver side of a packed virtqueue (virtio-v1.2 §2.8), generic over the token type.

    The ring areas are allocated (zeroed) from ``allocator``: the Descriptor Ring
    (16-byte aligned, 16 * size bytes) and the two 4-byte event suppression structures
    (4-byte aligned), virtio-v1.2 §2.8.10.1 "Structure Size and Alignment".
    """

    def __init__(
        self,
        mem: GuestMemory,
        allocator: GuestAllocator,
        size: int,
        features: RingFeatures = _NO_FEATURES,
    ) -> None:
        super().__init__(mem, allocator, size, features)
        if not 1 <= size <= PACKED_MAX_QUEUE_SIZE:
            raise ValueError(f"packed queue size {size} is not in 1..{PACKED_MAX_QUEUE_SIZE}")
        ring_bytes = packed_desc_ring_size(size)
        evt_bytes = PVIRTQ_EVENT_SUPPRESS.size
        allocated: list[int] = []
        try:
            desc_addr = allocator.alloc(ring_bytes, PACKED_DESC_ALIGN)
            allocated.append(desc_addr)
            drv_addr = allocator.alloc(evt_bytes, PACKED_EVENT_ALIGN)
            allocated.append(drv_addr)
            dev_addr = allocator.alloc(evt_bytes, PACKED_EVENT_ALIGN)
            allocated.append(dev_addr)
            self._desc = mem.view(desc_addr, ring_bytes)
            self._drv_evt = mem.view(drv_addr, evt_bytes)
            self._dev_evt = mem.view(dev_addr, evt_bytes)
            # flags and event fields: one atomic 16-bit access each (see u16_words)
            self._desc16 = u16_words(self._desc)
            self._drv_evt16 = u16_words(self._drv_evt)
            self._dev_evt16 = u16_words(self._dev_evt)
        except BaseException:
            for a in allocated:
                allocator.free(a)
            raise
        # "The descriptor ring is zero-initialized."
        self._desc[:] = bytes(ring_bytes)
        self._drv_evt[:] = bytes(evt_bytes)
        self._dev_evt[:] = bytes(evt_bytes)
        self._addrs = QueueAddresses(desc_addr, drv_addr, dev_addr)
        self._closed = False
        # per Buffer ID bookkeeping
        self._ndescs = [0] * size
        self._wlen = [0] * size
        self._table = [_NO_TABLE] * size
        #: Buffer ID -> token for buffers in flight, in the order made available
        self._inflight: dict[int, T] = {}
        #: completions of an in-order batch not yet handed out by get_used
        self._ready: deque[tuple[T, int]] = deque()
        self._event_flags = RING_EVENT_FLAGS_ENABLE
        self._reset_ring_state()

    def _reset_ring_state(self) -> None:
        size = self.size
        self._free_ids = list(range(size - 1, -1, -1))
        self._num_free = size
        self._next_avail = 0
        #: AVAIL/USED bits that mark a descriptor available at the current lap
        self._avail_flags = _F_AVAIL  # Driver Ring Wrap Counter = 1
        self._next_used = 0
        self._used_wrap = True
        # kick bookkeeping: position at the last kick_prepare and slots added since
        self._kick_pos = 0
        self._kick_wrap = True
        self._added = 0

    # -- properties ----------------------------------------------------------

    @property
    def addrs(self) -> QueueAddresses:
        """Descriptor Ring, Driver Event Suppression, Device Event Suppression."""
        return self._addrs

    @property
    def num_free(self) -> int:
        """Free ring slots."""
        return self._num_free

    @property
    def in_flight(self) -> int:
        """Buffers made available and not yet returned by :meth:`get_used`."""
        return len(self._inflight) + len(self._ready)

    def _check_usable(self) -> None:
        if self._closed:
            raise ValueError("virtqueue is closed")
        self._check_not_broken()

    # -- supplying buffers ---------------------------------------------------

    def add(self, out: Sequence[Segment], in_: Sequence[Segment], token: T) -> None:
        """Make a buffer available (virtio-v1.2 §2.8.21 "Supplying Buffers to The Device").

        With VIRTIO_F_INDIRECT_DESC and more than one segment the buffer goes into an
        indirect table (one ring slot). The first descriptor's flags are written
        last: "The driver always makes the first descriptor in the list available
        after the rest of the list has been written out into the ring."
        """
        self._check_usable()
        nseg = len(out) + len(in_)
        if nseg == 0:
            raise ValueError("a buffer needs at least one segment")
        check_segments(out)
        wlen = check_segments(in_)
        use_indirect = self.features.indirect and 1 < nseg <= MAX_INDIRECT_ENTRIES
        if not use_indirect and nseg > self.size:
            raise ValueError(f"{nseg} segments do not fit a ring of {self.size}")
        if self._num_free == 0:
            raise QueueFullError(f"no free descriptor for a buffer of {nseg} segments")
        table = _NO_TABLE
        if use_indirect:
            try:
                table = self.allocator.alloc(nseg * _DESC_SIZE, PACKED_DESC_ALIGN)
            except GuestMemoryError:
                if nseg > self.size:
                    raise
                # fall back to a direct list
        if table == _NO_TABLE and nseg > self._num_free:
            raise QueueFullError(f"{nseg} descriptors needed, {self._num_free} free")
        bid = self._free_ids.pop()
        desc = self._desc
        size = self.size
        head = pos = self._next_avail
        avail = self._avail_flags
        if table != _NO_TABLE:
            tview = self.mem.view(table, nseg * _DESC_SIZE)
            off = 0
            for addr, n in out:
                _DESC.pack_into(tview, off, addr, n, 0, 0)
                off += _DESC_SIZE
            for addr, n in in_:
                _DESC.pack_into(tview, off, addr, n, 0, _F_WRITE)
                off += _DESC_SIZE
            head_desc = (table, nseg * _DESC_SIZE, bid, _F_INDIRECT | avail)
            ndescs = 1
            pos += 1
            if pos == size:
                pos = 0
                avail ^= _F_AVAIL_USED
        else:
            ndescs = nseg
            head_desc = (0, 0, 0, 0)
            i = 0
            for segs, wflag in ((out, 0), (in_, _F_WRITE)):
                for addr, n in segs:
                    i += 1
                    flags = wflag | avail | (_F_NEXT if i < nseg else 0)
                    if i == 1:
                        head_desc = (addr, n, bid, flags)
                    else:
                        _DESC.pack_into(desc, pos * _DESC_SIZE, addr, n, bid, flags)
                    pos += 1
                    if pos == size:
                        pos = 0
                        avail ^= _F_AVAIL_USED
        # publish: the head's body first, its flags word last in one 16-bit store (the
        # device may be polling; see _DESC_BODY)
        hoff = head * _DESC_SIZE
        _DESC_BODY.pack_into(desc, hoff, head_desc[0], head_desc[1], head_desc[2])
        self._desc16[(hoff + _FLAGS_OFF) >> 1] = head_desc[3]
        self._next_avail = pos
        self._avail_flags = avail
        self._num_free -= ndescs
        self._added += ndescs
        self._ndescs[bid] = ndescs
        self._wlen[bid] = wlen
        self._table[bid] = table
        self._inflight[bid] = token

    def kick_prepare(self) -> bool:
        """True if the device wants an available buffer notification.

        Buffers are already published by :meth:`add`; this consults the Device Event
        Suppression structure (virtio-v1.2 §2.8.10) over every slot made available
        since the previous call: DISABLE never, ENABLE always, DESC (with
        VIRTIO_F_EVENT_IDX) when the descriptor at ``desc_event_off`` with wrap
        ``desc_event_wrap`` was among them.
        """
        self._check_usable()
        added = self._added
        old_pos, old_wrap = self._kick_pos, self._kick_wrap
        self._added = 0
        self._kick_pos = self._next_avail
        self._kick_wrap = self._avail_flags == _F_AVAIL
        if not added:
            return False
        return _event_wanted(
            self._dev_evt16, self.features.event_idx, old_pos, old_wrap, added, self.size
        )

    def notification_data(self) -> int:
        """``next_off | next_wrap << 15``: the ring position of the next descriptor
        not yet made available and its Driver Ring Wrap Counter ("When notifying the
        device, driver MUST set next_off and next_wrap to match the next descriptor
        not yet made available to the device", virtio-v1.2 §2.8.16 "Driver
        Requirements: The Virtqueue Descriptor Table")."""
        return self._next_avail | (0x8000 if self._avail_flags == _F_AVAIL else 0)

    # -- receiving used buffers ----------------------------------------------

    def _used_pending(self) -> bool:
        flags = self._desc16[(self._next_used * _DESC_SIZE + _FLAGS_OFF) >> 1]
        want = _F_AVAIL_USED if self._used_wrap else 0
        return bool(flags & _F_AVAIL_USED == want)

    def _release(self, bid: int) -> None:
        table = self._table[bid]
        if table != _NO_TABLE:
            self._table[bid] = _NO_TABLE
            self.allocator.free(table)
        self._free_ids.append(bid)

    def get_used(self) -> tuple[T, int] | None:
        """Next used buffer as ``(token, written_len)`` (virtio-v1.2 §2.8.22).

        A used descriptor has AVAIL and USED both equal to the driver's used wrap
        counter. "Element Length is reserved for used descriptors without the
        VIRTQ_DESC_F_WRITE flag, and is ignored by drivers": a buffer with no
        device-writable part completes with length 0 whatever the device wrote there.
        A buffer that has a device-writable part takes the length even when the
        device left VIRTQ_DESC_F_WRITE clear, as Linux's driver does: QEMU 7.2's
        packed ring never sets the flag in used descriptors (found against
        virtio-rng-pci over qtest); the length is still checked against the buffer.
        With VIRTIO_F_IN_ORDER a used descriptor may
        stand for a batch: "The skipped buffers (for which no used descriptor was
        written) are assumed to have been used ... completely."
        """
        self._check_usable()
        if self._ready:
            return self._ready.popleft()
        inflight = self._inflight
        if not inflight or not self._used_pending():
            return None
        size = self.size
        _addr, length, bid, flags = _DESC.unpack_from(self._desc, self._next_used * _DESC_SIZE)
        if bid >= size or bid not in inflight:
            raise self._fail(
                f"used Buffer ID {bid} at ring position {self._next_used} is not in flight",
                CLAUSE_USED,
            )
        written = length if flags & _F_WRITE or self._wlen[bid] else 0
        if written > self._wlen[bid]:
            raise self._fail(
                f"used length {written} of Buffer ID {bid} exceeds its device-writable "
                f"length {self._wlen[bid]}",
                CLAUSE_LEN,
            )
        if self.features.in_order:
            result: tuple[T, int] | None = None
            skip = 0
            while result is None:
                cur = next(iter(inflight))
                token = inflight.pop(cur)
                skip += self._ndescs[cur]
                self._release(cur)
                if cur == bid:
                    result = (token, written)
                else:
                    self._ready.append((token, self._wlen[cur]))
            if self._ready:
                self._ready.append(result)
                result = self._ready.popleft()
        else:
            token = inflight.pop(bid)
            skip = self._ndescs[bid]
            self._release(bid)
            result = (token, written)
        self._num_free += skip
        pos = self._next_used + skip
        if pos >= size:
            pos -= size
            self._used_wrap = not self._used_wrap
        self._next_used = pos
        if self._event_flags == RING_EVENT_FLAGS_DESC:
            # keep the descriptor-specific event at the next used position
            self._write_used_event()
        return result

    def _write_used_event(self) -> None:
        off_wrap = self._next_used | (0x8000 if self._used_wrap else 0)
        self._drv_evt16[_EVT_DESC_OFF >> 1] = off_wrap

    def disable_interrupts(self) -> None:
        """Write RING_EVENT_FLAGS_DISABLE into the Driver Event Suppression structure."""
        self._check_usable()
        if self._event_flags != RING_EVENT_FLAGS_DISABLE:
            self._event_flags = RING_EVENT_FLAGS_DISABLE
            self._drv_evt16[_EVT_FLAGS_OFF >> 1] = RING_EVENT_FLAGS_DISABLE

    def enable_interrupts(self) -> bool:
        """Ask for used buffer notifications; True if used buffers are already pending.

        With VIRTIO_F_EVENT_IDX this asks for a notification when the descriptor at
        the next used position is used (RING_EVENT_FLAGS_DESC), else ENABLE.
        """
        self._check_usable()
        if self.features.event_idx:
            self._write_used_event()
            flags = RING_EVENT_FLAGS_DESC
        else:
            flags = RING_EVENT_FLAGS_ENABLE
        self._event_flags = flags
        self._drv_evt16[_EVT_FLAGS_OFF >> 1] = flags
        return bool(self._ready) or (bool(self._inflight) and self._used_pending())

    # -- teardown ------------------------------------------------------------

    def detach_unused(self) -> list[T]:
        """Take back every buffer not returned yet and reset the ring to empty.

        For use after a device reset: tokens of completed-but-unreturned in-order
        batch members come first, then in-flight ones in the order made available.
        """
        if self._closed:
            raise ValueError("virtqueue is closed")
        tokens = [t for t, _ in self._ready]
        self._ready.clear()
        for bid, token in self._inflight.items():
            tokens.append(token)
            table = self._table[bid]
            if table != _NO_TABLE:
                self._table[bid] = _NO_TABLE
                self.allocator.free(table)
        self._inflight.clear()
        self._desc[:] = bytes(len(self._desc))
        self._drv_evt[:] = bytes(len(self._drv_evt))
        self._dev_evt[:] = bytes(len(self._dev_evt))
        self._event_flags = RING_EVENT_FLAGS_ENABLE
        self._reset_ring_state()
        return tokens

    def close(self) -> None:
        """Free the ring memory and any indirect tables (idempotent)."""
        if self._closed:
            return
        for bid in self._inflight:
            table = self._table[bid]
            if table != _NO_TABLE:
                self._table[bid] = _NO_TABLE
                self.allocator.free(table)
        self._inflight.clear()
        self._ready.clear()
        self._closed = True
        # the typed views first: a live export keeps the mapping (and its fd) open
        for view in (self._desc16, self._drv_evt16, self._dev_evt16):
            view.release()
        for view in (self._desc, self._drv_evt, self._dev_evt):
            view.release()
        for addr in (self._addrs.desc, self._addrs.driver, self._addrs.device):
            self.allocator.free(addr)
