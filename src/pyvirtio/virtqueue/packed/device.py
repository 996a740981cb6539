"""The device's side of a packed virtqueue (virtio-v1.2 §2.8 "Packed Virtqueues").

The device polls one place, the descriptor at its next-available position, and
recognises a driver descriptor by its AVAIL/USED flags matching its own wrap counter
(virtio-v1.2 §2.8.1 "Driver and Device Ring Wrap Counters"). Used descriptors are
written in completion order at the device's next-used position, which trails the
next-available position; after each one the device skips by the number of ring slots
the buffer(s) took (virtio-v1.2 §2.8.2 "Polling of available and used descriptors").

Everything the driver wrote is validated before a chain is handed out; a violation
raises :class:`~pyvirtio.errors.DriverError` with the clause and marks the queue
broken (the device then sets ``DEVICE_NEEDS_RESET``).

Choices where the spec leaves room:

- Zero-length descriptors are not forbidden by the packed ring text, so they are
  accepted and skipped: they appear in neither segment list and take no part in the
  readable-before-writable check (they still count as ring slots).
- In an indirect table, VIRTQ_DESC_F_WRITE is the only valid flag; NEXT and the
  Buffer ID are ignored as the spec says, but INDIRECT (a table inside a table) is
  refused. A descriptor with INDIRECT that is part of a NEXT-linked list is refused.
- With VIRTIO_F_IN_ORDER the queue publishes used buffers in the order they were
  made available even if the device model pushes them out of order (a pushed buffer
  waits for its predecessors). A run of buffers each written in full, closed by the
  last buffer published by a flush, becomes one used descriptor carrying the Buffer
  ID and length of that last buffer (virtio-v1.2 §2.8.8 "In-order use of
  descriptors"); every other buffer gets its own used descriptor.
"""

from __future__ import annotations

from collections import deque

from pyvirtio.errors import DriverError, GuestMemoryError
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
    USED_LEN_MAX,
    DescriptorChain,
    DeviceVirtqueue,
    QueueAddresses,
    QueueState,
    RingFeatures,
    Segment,
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
    _F_USED,
    _F_WRITE,
    _FLAGS_OFF,
    _NO_FEATURES,
    _U32_LIMIT,
    _event_wanted,
    event_in_range,
)

__all__ = ["PackedDeviceQueue", "event_in_range"]

CLAUSE_PACKED = 'virtio-v1.2 §2.8 "Packed Virtqueues"'
CLAUSE_ALIGN = 'virtio-v1.2 §2.8.11 "Driver Requirements: Virtqueues"'
CLAUSE_WRAP = 'virtio-v1.2 §2.8.1 "Driver and Device Ring Wrap Counters"'
CLAUSE_ADDR = 'virtio-v1.2 §2.8.4 "Element Address and Length"'
CLAUSE_NEXT = 'virtio-v1.2 §2.8.6 "Next Flag: Descriptor Chaining"'
CLAUSE_INDIRECT = 'virtio-v1.2 §2.8.7 "Indirect Flag: Scatter-Gather Support"'
CLAUSE_SG = 'virtio-v1.2 §2.8.17 "Driver Requirements: Scatter-Gather Support"'
CLAUSE_INDIRECT_REQ = 'virtio-v1.2 §2.8.19 "Driver Requirements: Indirect Descriptors"'
CLAUSE_SUPPLY = 'virtio-v1.2 §2.8.21 "Supplying Buffers to The Device"'
CLAUSE_TOTAL = 'virtio-v1.2 §2.7.5.2 "Driver Requirements: The Virtqueue Descriptor Table"'
CLAUSE_NOTIFY_DATA = 'virtio-v1.2 §2.8.16 "Driver Requirements: The Virtqueue Descriptor Table"'


class PackedDeviceQueue(DeviceVirtqueue):
    """Device side of a packed virtqueue (virtio-v1.2 §2.8).

    ``addrs.desc`` is the Descriptor Ring, ``addrs.driver`` the Driver Event
    Suppression structure (read by the device), ``addrs.device`` the Device Event
    Suppression structure (written by the device). ``state`` resumes at a saved ring
    position and wrap counters (vhost-user ``SET_VRING_BASE``).
    """

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        addrs: QueueAddresses,
        features: RingFeatures = _NO_FEATURES,
        *,
        index: int = 0,
        state: QueueState | None = None,
    ) -> None:
        super().__init__(mem, size, addrs, features, index=index, state=state)
        if not 1 <= size <= PACKED_MAX_QUEUE_SIZE:
            # "Packed virtqueues support up to 2^15 entries each."
            raise DriverError(f"packed queue size {size} is not in 1..32768", CLAUSE_PACKED)
        # "The driver MUST ensure that the physical address of the first byte of each
        # virtqueue part is a multiple of the specified alignment value"
        for name, addr, align in (
            ("Descriptor Ring", addrs.desc, PACKED_DESC_ALIGN),
            ("Driver Event Suppression", addrs.driver, PACKED_EVENT_ALIGN),
            ("Device Event Suppression", addrs.device, PACKED_EVENT_ALIGN),
        ):
            if addr % align:
                raise DriverError(
                    f"{name} at {addr:#x} is not aligned to {align} bytes", CLAUSE_ALIGN
                )
        self._desc = self._ring_view("Descriptor Ring", addrs.desc, packed_desc_ring_size(size))
        self._drv_evt = self._ring_view(
            "Driver Event Suppression", addrs.driver, PVIRTQ_EVENT_SUPPRESS.size
        )
        self._dev_evt = self._ring_view(
            "Device Event Suppression", addrs.device, PVIRTQ_EVENT_SUPPRESS.size
        )
        # flags and event fields: one atomic 16-bit access each (see u16_words)
        self._desc16 = u16_words(self._desc)
        self._drv_evt16 = u16_words(self._drv_evt)
        self._dev_evt16 = u16_words(self._dev_evt)
        st = state if state is not None else QueueState()
        for what, pos in (("available", st.avail_idx), ("used", st.used_idx)):
            if not 0 <= pos < size:
                raise DriverError(
                    f"saved {what} ring position {pos} is outside a ring of {size}", CLAUSE_WRAP
                )
        #: next ring position to look at for an available descriptor
        self._next_avail = st.avail_idx
        #: AVAIL/USED bits an available descriptor carries at the current avail lap
        self._avail_mask = _F_AVAIL if st.avail_wrap else _F_USED
        #: next ring position to write a used descriptor at, and its wrap counter
        self._next_used = st.used_idx
        self._used_wrap = bool(st.used_wrap)
        #: Buffer ID -> ring slots, for buffers popped and not yet pushed
        self._inflight: dict[int, int] = {}
        #: Buffer IDs pushed but not yet published by flush (not reusable by the driver)
        self._pending: set[int] = set()
        #: staged used elements: (id, written, ndescs, written in full)
        self._staged: list[tuple[int, int, int, bool]] = []
        #: in-order: Buffer IDs in the order popped, and pushes waiting for predecessors
        self._order: deque[int] = deque()
        self._held: dict[int, tuple[int, int, bool]] = {}
        self._notify_enabled = True
        #: ``(next_off, next_wrap)`` of the driver's last VIRTIO_F_NOTIFICATION_DATA
        #: notification (None before the first one)
        self.notified_position: tuple[int, bool] | None = None

    def _ring_view(self, name: str, addr: int, n: int) -> memoryview:
        try:
            return self.mem.view(addr, n)
        except GuestMemoryError as e:
            raise DriverError(
                f"{name} {addr:#x}+{n:#x} is not inside guest RAM ({e.message})", CLAUSE_ADDR
            ) from None

    # -- helpers -------------------------------------------------------------

    @property
    def avail_wrap(self) -> bool:
        """The wrap counter of the next-available position (driver's lap)."""
        return self._avail_mask == _F_AVAIL

    @property
    def used_wrap(self) -> bool:
        """The Device Ring Wrap Counter (virtio-v1.2 §2.8.1)."""
        return self._used_wrap

    @property
    def in_flight(self) -> int:
        """Chains popped and not yet pushed."""
        return len(self._inflight)

    def get_state(self) -> QueueState:
        """Ring positions and wrap counters (vhost-user encodes each as idx | wrap<<15)."""
        return QueueState(
            avail_idx=self._next_avail,
            used_idx=self._next_used,
            avail_wrap=self.avail_wrap,
            used_wrap=self._used_wrap,
        )

    # -- available side ------------------------------------------------------

    def driver_notified(self, next_off: int, next_wrap: int) -> DriverError | None:
        """Record and check the position a VIRTIO_F_NOTIFICATION_DATA notification
        states, kept in :attr:`notified_position`.

        "When notifying the device, driver MUST set next_off and next_wrap to match
        the next descriptor not yet made available to the device" (virtio-v1.2
        §2.8.16): so ``next_off`` lies inside the ring, and when the stated position
        is ahead of the device's next-available position (by at most one lap, ring
        positions compared modulo two laps as the wrap counter makes them), the
        descriptor just before it must read as available for its lap (virtio-v1.2
        §2.8.1). A stated position at the device's, or behind it (the device already
        served those buffers), is consistent. A violation is returned, not raised:
        the queue keeps serving what the ring shows.
        """
        size = self.size
        wrap = bool(next_wrap)
        self.notified_position = (next_off, wrap)
        if self.broken_reason is not None:
            return None
        if not 0 <= next_off < size:
            return DriverError(
                f"queue {self.index}: notification states next_off {next_off}, outside a "
                f"ring of {size} descriptors",
                CLAUSE_NOTIFY_DATA,
            )
        laps = 2 * size
        stated = next_off if wrap else next_off + size
        device = self._next_avail if self.avail_wrap else self._next_avail + size
        ahead = (stated - device) % laps
        if not 0 < ahead <= size:
            return None
        last = (stated - 1) % laps
        pos, last_wrap = (last, True) if last < size else (last - size, False)
        flags = self._desc16[(pos * _DESC_SIZE + _FLAGS_OFF) >> 1]
        if flags & _F_AVAIL_USED != (_F_AVAIL if last_wrap else _F_USED):
            return DriverError(
                f"queue {self.index}: notification states next_off {next_off} wrap "
                f"{int(wrap)}, {ahead} descriptor(s) past the device's position, but the "
                f"descriptor at {pos} is not available: next_off/next_wrap must match the "
                "next descriptor not yet made available",
                CLAUSE_NOTIFY_DATA,
            )
        return None

    def has_available(self) -> bool:
        """True if the descriptor at the next-available position is available.

        A descriptor is available when its AVAIL bit matches the driver's wrap counter
        and its USED bit does not (virtio-v1.2 §2.8.1).
        """
        self._check_not_broken()
        flags = self._desc16[(self._next_avail * _DESC_SIZE + _FLAGS_OFF) >> 1]
        return bool(flags & _F_AVAIL_USED == self._avail_mask)

    def pop(self) -> DescriptorChain | None:
        """Take and validate the next available buffer (virtio-v1.2 §2.8.21).

        "A device MUST NOT use a descriptor unless it observes the VIRTQ_DESC_F_AVAIL
        bit in its flags being changed": only a descriptor whose AVAIL/USED bits match
        the current lap is read.
        """
        self._check_not_broken()
        desc = self._desc
        head = self._next_avail
        mask = self._avail_mask
        if self._desc16[(head * _DESC_SIZE + _FLAGS_OFF) >> 1] & _F_AVAIL_USED != mask:
            return None
        size = self.size
        mem = self.mem
        readable: list[Segment] = []
        writable: list[Segment] = []
        total = 0
        pos = head
        n = 0
        while True:
            addr, length, bid, flags = _DESC.unpack_from(desc, pos * _DESC_SIZE)
            if flags & _F_AVAIL_USED != mask:
                # "all flags, including VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED ... must
                # be set/cleared correctly in all descriptors in the list"
                raise self._fail(
                    f"descriptor {pos} (#{n} of the list at {head}) is not marked available",
                    CLAUSE_NEXT,
                )
            n += 1
            pos += 1
            if pos == size:
                pos = 0
                mask ^= _F_AVAIL_USED
            if flags & _F_INDIRECT:
                if not self.features.indirect:
                    # "The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT flag unless the
                    # VIRTIO_F_INDIRECT_DESC feature was negotiated."
                    raise self._fail(
                        "indirect descriptor without VIRTIO_F_INDIRECT_DESC", CLAUSE_INDIRECT_REQ
                    )
                if n > 1 or flags & _F_NEXT:
                    # "A driver MUST NOT write direct descriptors with
                    # VIRTQ_DESC_F_INDIRECT set in a scatter-gather list linked by
                    # VIRTQ_DESC_F_NEXT."
                    raise self._fail(
                        f"indirect descriptor at {(pos - 1) % size} in a NEXT-linked list",
                        CLAUSE_INDIRECT_REQ,
                    )
                total = self._walk_indirect(addr, length, readable, writable)
                break
            if length:
                if not mem.contains(addr, length):
                    raise self._fail(
                        f"buffer {addr:#x}+{length:#x} is not inside guest RAM", CLAUSE_ADDR
                    )
                if flags & _F_WRITE:
                    writable.append((addr, length))
                elif writable:
                    # "The driver MUST place any device-writable descriptor elements
                    # after any device-readable descriptor elements."
                    raise self._fail(
                        "device-readable descriptor after a device-writable one", CLAUSE_SG
                    )
                else:
                    readable.append((addr, length))
                total += length
            if not flags & _F_NEXT:
                break
            if n >= size:
                # "A driver MUST NOT create a descriptor list longer than the Queue Size."
                raise self._fail(
                    f"descriptor list at {head} is longer than the queue size {size}", CLAUSE_SG
                )
        if total > _U32_LIMIT:
            # "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total"
            raise self._fail(f"buffer of {total} bytes exceeds 2^32 bytes", CLAUSE_TOTAL)
        # "Buffer ID is included in the last descriptor in the list."
        if bid >= size:
            raise self._fail(f"Buffer ID {bid} is not below the queue size {size}", CLAUSE_SUPPLY)
        if bid in self._inflight or bid in self._pending:
            raise self._fail(
                f"Buffer ID {bid} made available again while still in use", CLAUSE_SUPPLY
            )
        self._inflight[bid] = n
        if self.features.in_order:
            self._order.append(bid)
        self._next_avail = pos
        self._avail_mask = mask
        if self._notify_enabled and self.features.event_idx:
            self._write_avail_event()
        return DescriptorChain(bid, readable, writable, n)

    def adopt(self, chain: DescriptorChain) -> None:
        """Treat ``chain`` as popped and not yet pushed (resubmission after a restart).

        With VIRTIO_F_IN_ORDER adopted chains come before anything popped later.
        Raises :class:`~pyvirtio.errors.DriverError` if its Buffer ID is out of range or
        still in use (the queue is not marked broken: the caller decides).
        """
        self._check_not_broken()
        bid = chain.id
        if not 0 <= bid < self.size or bid in self._inflight or bid in self._pending:
            raise DriverError(
                f"queue {self.index}: Buffer ID {bid} cannot be adopted (out of range or "
                "still in use)",
                CLAUSE_SUPPLY,
            )
        self._inflight[bid] = chain.ndescs
        if self.features.in_order:
            self._order.append(bid)

    def _walk_indirect(
        self, addr: int, length: int, readable: list[Segment], writable: list[Segment]
    ) -> int:
        """Read an indirect table of ``pvirtq_desc`` (virtio-v1.2 §2.8.7); return total bytes."""
        if length == 0 or length % _DESC_SIZE:
            # struct pvirtq_indirect_descriptor_table { struct pvirtq_desc desc[len / 16]; }
            raise self._fail(
                f"indirect table length {length} is not a non-zero multiple of {_DESC_SIZE}",
                CLAUSE_INDIRECT,
            )
        count = length // _DESC_SIZE
        if count > MAX_INDIRECT_ENTRIES:
            raise self._fail(
                f"indirect table of {count} entries exceeds {MAX_INDIRECT_ENTRIES}",
                CLAUSE_INDIRECT,
            )
        mem = self.mem
        if not mem.contains(addr, length):
            raise self._fail(
                f"indirect table {addr:#x}+{length:#x} is not inside guest RAM", CLAUSE_ADDR
            )
        try:
            table: memoryview | bytes = mem.view(addr, length)
        except GuestMemoryError:  # spans two regions: copy (bounded by the cap above)
            table = mem.read(addr, length)
        total = 0
        for i, (a, n, _id, flags) in enumerate(_DESC.iter_unpack(table)):
            if flags & _F_INDIRECT:
                # "The driver MUST NOT set any flags except DESC_F_WRITE within an
                # indirect descriptor."
                raise self._fail(
                    f"indirect table entry {i} has VIRTQ_DESC_F_INDIRECT", CLAUSE_INDIRECT_REQ
                )
            if not n:
                continue
            if not mem.contains(a, n):
                raise self._fail(f"buffer {a:#x}+{n:#x} is not inside guest RAM", CLAUSE_ADDR)
            if flags & _F_WRITE:
                writable.append((a, n))
            elif writable:
                raise self._fail(
                    f"device-readable indirect entry {i} after a device-writable one", CLAUSE_SG
                )
            else:
                readable.append((a, n))
            total += n
        return total

    # -- notifications -------------------------------------------------------

    def _write_avail_event(self) -> None:
        off_wrap = self._next_avail | (0x8000 if self._avail_mask == _F_AVAIL else 0)
        self._dev_evt16[_EVT_DESC_OFF >> 1] = off_wrap

    def set_notification(self, enable: bool) -> None:
        """Write the Device Event Suppression structure (virtio-v1.2 §2.8.10).

        Enabled with VIRTIO_F_EVENT_IDX: RING_EVENT_FLAGS_DESC at the next-available
        position (kept up to date by :meth:`pop`); enabled without it:
        RING_EVENT_FLAGS_ENABLE; disabled: RING_EVENT_FLAGS_DISABLE.
        """
        self._check_not_broken()
        self._notify_enabled = enable
        if not enable:
            flags = RING_EVENT_FLAGS_DISABLE
        elif self.features.event_idx:
            self._write_avail_event()
            flags = RING_EVENT_FLAGS_DESC
        else:
            flags = RING_EVENT_FLAGS_ENABLE
        self._dev_evt16[_EVT_FLAGS_OFF >> 1] = flags

    # -- used side -----------------------------------------------------------

    def push(self, chain: DescriptorChain, written: int) -> None:
        """Stage the used descriptor of ``chain`` (published by :meth:`flush`)."""
        self._check_not_broken()
        wlen = chain.writable_len
        if not 0 <= written <= min(wlen, USED_LEN_MAX):
            raise ValueError(
                f"written={written} is not within 0..{min(wlen, USED_LEN_MAX)} (device bug)"
            )
        ndescs = self._inflight.pop(chain.id, None)
        if ndescs is None:
            raise ValueError(f"Buffer ID {chain.id} is not in flight (device bug)")
        self._pending.add(chain.id)
        if not self.features.in_order:
            self._staged.append((chain.id, written, ndescs, written == wlen))
            return
        self._held[chain.id] = (written, ndescs, written == wlen)
        order = self._order
        held = self._held
        while order and order[0] in held:
            bid = order.popleft()
            w, nd, full = held.pop(bid)
            self._staged.append((bid, w, nd, full))

    def flush(self) -> bool:
        """Write the staged used descriptors; True if the driver wants a notification.

        The first used descriptor's flags are written last so the driver sees the
        batch at once. "To mark a descriptor as used, the device sets the
        VIRTQ_DESC_F_USED bit in Flags to match the internal Device Ring Wrap Counter.
        It also sets the VIRTQ_DESC_F_AVAIL bit to match the same value."
        """
        self._check_not_broken()
        staged = self._staged
        if not staged:
            return False
        self._staged = []
        pending = self._pending
        for e in staged:
            pending.discard(e[0])
        desc = self._desc
        size = self.size
        old_pos = pos = self._next_used
        old_wrap = wrap = self._used_wrap
        elems: list[tuple[int, int, int, int]] = []  # (pos, id, len, flags)
        count = len(staged)
        # in-order: the trailing run of full buffers closed by the last buffer collapses
        start = count - 1
        if self.features.in_order:
            while start > 0 and staged[start - 1][3]:
                start -= 1
        advanced = 0
        i = 0
        while i < count:
            bid, written, nd, _full = staged[i]
            if i == start:
                for j in range(i + 1, count):
                    nd += staged[j][2]
                bid, written = staged[-1][0], staged[-1][1]
                i = count
            else:
                i += 1
            flags = (_F_AVAIL_USED if wrap else 0) | (_F_WRITE if written else 0)
            elems.append((pos, bid, written, flags))
            advanced += nd
            pos += nd
            if pos >= size:
                pos -= size
                wrap = not wrap
        # Id and length first, flags last, each flags word in one 16-bit store (the
        # driver may be polling: see _DESC_BODY); the first descriptor's flags last
        # of all, so the driver sees the batch at once.
        body = _DESC_BODY.pack_into
        desc16 = self._desc16
        first_pos, first_id, first_len, first_flags = elems[0]
        body(desc, first_pos * _DESC_SIZE, 0, first_len, first_id)
        for p, bid, ln, fl in elems[1:]:
            body(desc, p * _DESC_SIZE, 0, ln, bid)
            desc16[(p * _DESC_SIZE + _FLAGS_OFF) >> 1] = fl
        desc16[(first_pos * _DESC_SIZE + _FLAGS_OFF) >> 1] = first_flags
        self._next_used = pos
        self._used_wrap = wrap
        # consult the Driver Event Suppression structure (virtio-v1.2 §2.8.10)
        return _event_wanted(
            self._drv_evt16, self.features.event_idx, old_pos, old_wrap, advanced, self.size
        )
