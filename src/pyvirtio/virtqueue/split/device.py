"""The device side of a split virtqueue (virtio-v1.2 §2.7 "Split Virtqueues").

:class:`SplitDeviceQueue` reads the Available Ring and the Descriptor Table the driver
wrote, and writes the Used Ring. The driver is untrusted: every chain is validated
before it is handed to the device model, and a violation raises
:class:`~pyvirtio.errors.DriverError` (carrying the clause) and marks the queue broken;
the device answers that with ``DEVICE_NEEDS_RESET``.

Choices where the spec leaves room:

- Zero-length descriptors are not forbidden by the spec: they are accepted and skipped
  (no segment is produced for them), but they still count for the loop guard and the
  readable-before-writable rule.
- Indirect tables are walked up to their own length, capped at
  :data:`~pyvirtio.virtqueue.common.MAX_INDIRECT_ENTRIES` entries (Linux builds
  indirect tables longer than the queue size, so the cap is not the queue size).
- With VIRTIO_F_IN_ORDER the device model may :meth:`~SplitDeviceQueue.push` chains in
  any order; the queue publishes them in the order they were made available (a
  reorder buffer), as the feature requires.
- Ring areas are viewed once at construction; an area that straddles two memory
  regions is refused.
"""

from __future__ import annotations

from collections import deque

from pyvirtio.errors import DriverError, GuestMemoryError
from pyvirtio.memory.guest_memory import GuestMemory, u16_words
from pyvirtio.spec.ring import (
    SPLIT_AVAIL_ALIGN,
    SPLIT_DESC_ALIGN,
    SPLIT_MAX_QUEUE_SIZE,
    SPLIT_USED_ALIGN,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_USED_F_NO_NOTIFY,
    split_avail_size,
    split_desc_table_size,
    split_used_size,
    vring_need_event,
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
from pyvirtio.virtqueue.split._ring import (
    _AVAIL_FLAGS_OFF,
    _AVAIL_IDX_OFF,
    _AVAIL_RING_OFF,
    _DESC,
    _DESC_SIZE,
    _ELEM,
    _ELEM_SIZE,
    _F_INDIRECT,
    _F_NEXT,
    _F_WRITE,
    _MAX_CHAIN_BYTES,
    _NO_FEATURES,
    _USED_FLAGS_OFF,
    _USED_IDX_OFF,
    _USED_RING_OFF,
)

__all__ = ["SplitDeviceQueue"]

# Spec clauses quoted by the checks below.
_C_SPLIT = 'virtio-v1.2 §2.7 "Split Virtqueues"'
_C_ALIGN = 'virtio-v1.2 §2.7.1 "Driver Requirements: Virtqueues"'
_C_FRAMING = 'virtio-v1.2 §2.7.4.2 "Driver Requirements: Message Framing"'
_C_DESC = 'virtio-v1.2 §2.7.5.2 "Driver Requirements: The Virtqueue Descriptor Table"'
_C_INDIRECT = 'virtio-v1.2 §2.7.5.3.1 "Driver Requirements: Indirect Descriptors"'
_C_INDIRECT_TABLE = 'virtio-v1.2 §2.7.5.3 "Indirect Descriptors"'
_C_AVAIL = 'virtio-v1.2 §2.7.13 "Supplying Buffers to The Device"'
_C_PLACE = 'virtio-v1.2 §2.7.13.1 "Placing Buffers Into The Descriptor Table"'
_C_MEMORY = 'virtio-v1.2 §2.7.5 "The Virtqueue Descriptor Table"'
_C_NOTIFY_DATA = 'virtio-v1.2 §2.9 "Driver Notifications"'


def _ring_view(mem: GuestMemory, addr: int, n: int, align: int, what: str) -> memoryview:
    """Validate one ring area (alignment, inside guest RAM) and view it once."""
    if addr % align:
        raise DriverError(
            f"{what} at {addr:#x} is not aligned to {align} bytes: the driver MUST "
            "ensure the first byte of each virtqueue part is a multiple of its alignment",
            _C_ALIGN,
        )
    if not mem.contains(addr, n):
        raise DriverError(f"{what} {addr:#x}+{n:#x} is not inside guest RAM", _C_SPLIT)
    try:
        return mem.view(addr, n)
    except GuestMemoryError as e:
        raise DriverError(
            f"{what} {addr:#x}+{n:#x} straddles two memory regions ({e.message})", _C_SPLIT
        ) from None


class SplitDeviceQueue(DeviceVirtqueue):
    """Device side of a split virtqueue (virtio-v1.2 §2.7).

    ``pop`` validates the chain named by the next Available Ring entry: head and
    ``next`` in range, no loop (at most Queue Size descriptors, at most the table's
    entries inside an indirect table), indirect rules (virtio-v1.2 §2.7.5.3),
    readable-before-writable (§2.7.4), every buffer inside guest RAM, total at most
    2^32 bytes (§2.7.5), the available ``idx`` never more than Queue Size ahead and a
    head never offered twice while in flight (§2.7.13). ``push`` stages a used element;
    ``flush`` publishes the used ``idx`` once for the batch and answers whether the
    driver wants a used buffer notification (§2.7.7).
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
        if not 1 <= size <= SPLIT_MAX_QUEUE_SIZE or size & (size - 1):
            raise DriverError(
                f"queue size {size} is not a power of 2 in 1..{SPLIT_MAX_QUEUE_SIZE}", _C_SPLIT
            )
        self._desc = _ring_view(
            mem, addrs.desc, split_desc_table_size(size), SPLIT_DESC_ALIGN, "Descriptor Table"
        )
        self._avail = _ring_view(
            mem, addrs.driver, split_avail_size(size), SPLIT_AVAIL_ALIGN, "Available Ring"
        )
        self._used = _ring_view(
            mem, addrs.device, split_used_size(size), SPLIT_USED_ALIGN, "Used Ring"
        )
        # indexes, flags and events: one atomic 16-bit access each (see u16_words)
        self._avail16 = u16_words(self._avail)
        self._used16 = u16_words(self._used)
        self._mask = size - 1
        self._used_event_off = _AVAIL_RING_OFF + 2 * size
        self._avail_event_off = _USED_RING_OFF + _ELEM_SIZE * size
        st = state or QueueState()
        #: next Available Ring index to read
        self._last_avail = st.avail_idx & 0xFFFF
        #: last value of the driver's avail idx we read (avoids re-reading it per pop)
        self._avail_shadow = self._last_avail
        #: used idx as published to the driver
        self._used_idx = st.used_idx & 0xFFFF
        #: used elements written to the ring but not yet published (not in-order)
        self._staged = 0
        #: per head: 1 while popped and not pushed, 2 while pushed and not yet
        #: published (a head offered again meanwhile is a driver violation)
        self._inflight = bytearray(size)
        #: heads pushed since the last flush (not in-order)
        self._staged_heads: list[int] = []
        self._inflight_count = 0
        # in-order: heads in pop order, and per head the pushed length (-1: not pushed)
        self._order: deque[DescriptorChain] = deque()
        self._written: list[int] = [-1] * size if features.in_order else []
        self._notify = True
        # first flush after construction/resume always notifies (no known old value)
        self._signalled_valid = False
        self._indirect = features.indirect
        self._event_idx = features.event_idx
        self._in_order = features.in_order
        # Fast path of the buffer check: bounds of the largest RAM region, taken once
        # (like the ring views). A buffer inside it is in guest RAM; anything else is
        # decided by mem.contains. Every later access still goes through mem.
        big = max(mem.regions, key=lambda r: r.size)
        self._ram_lo = big.guest_phys_addr
        self._ram_hi = big.end
        #: the avail ``idx`` the driver's last VIRTIO_F_NOTIFICATION_DATA
        #: notification stated (None before the first one)
        self.notified_idx: int | None = None

    # -- available side -----------------------------------------------------------

    def _read_avail_idx(self) -> int:
        idx: int = self._avail16[_AVAIL_IDX_OFF >> 1]
        if (idx - self._last_avail) & 0xFFFF > self.size:
            raise self._fail(
                f"available idx {idx} is more than Queue Size ({self.size}) ahead of "
                f"{self._last_avail}: the available ring cannot hold that many",
                _C_AVAIL,
            )
        self._avail_shadow = idx
        return idx

    def has_available(self) -> bool:
        """True if the driver has made a buffer available that :meth:`pop` would return."""
        self._check_not_broken()
        if self._avail_shadow != self._last_avail:
            return True
        return self._read_avail_idx() != self._last_avail

    def driver_notified(self, next_off: int, next_wrap: int) -> DriverError | None:
        """Record and check the avail ``idx`` a VIRTIO_F_NOTIFICATION_DATA
        notification states (virtio-v1.2 §2.9 "Driver Notifications": for a split
        ring ``next_off`` is "the 15 least significant bits of the available index"
        and ``next_wrap`` its bit 15), kept in :attr:`notified_idx`.

        The driver publishes ``idx`` before it notifies, so the ring must show at
        least what the notification states: a stated ``idx`` ahead of the ``idx``
        read from the Available Ring now (in 16-bit serial arithmetic: less than half
        the index space ahead) claims buffers that were never made available and is
        returned as a violation. A stated ``idx`` at or behind the ring's is
        consistent (the driver may have added more since, or the device may already
        have served them). The queue is not marked broken either way and serves
        what the ring shows.
        """
        stated = (next_off & 0x7FFF) | (0x8000 if next_wrap else 0)
        self.notified_idx = stated
        if self.broken_reason is not None:
            return None
        ring: int = self._avail16[_AVAIL_IDX_OFF >> 1]
        ahead = (stated - ring) & 0xFFFF
        if 0 < ahead < 0x8000:
            return DriverError(
                f"queue {self.index}: notification states avail idx {stated}, but the "
                f"Available Ring shows idx {ring}: next_off/next_wrap must be where the "
                "next available ring entry will be written",
                _C_NOTIFY_DATA,
            )
        return None

    def pop(self) -> DescriptorChain | None:
        """Take and validate the chain named by the next Available Ring entry."""
        self._check_not_broken()
        last = self._last_avail
        if self._avail_shadow == last and self._read_avail_idx() == last:
            return None
        head: int = self._avail16[(_AVAIL_RING_OFF >> 1) + (last & self._mask)]
        if head >= self.size:
            raise self._fail(
                f"available ring entry {last} names head {head} >= Queue Size {self.size}",
                _C_PLACE,
            )
        if self._inflight[head]:
            raise self._fail(
                f"head {head} made available again while still in use by the device; "
                "the driver places a buffer into free descriptors only",
                _C_PLACE,
            )
        chain = self._walk(head)
        last = (last + 1) & 0xFFFF
        self._last_avail = last
        if self._event_idx and self._notify:
            self._used16[self._avail_event_off >> 1] = last
        self._inflight[head] = 1
        self._inflight_count += 1
        if self._in_order:
            self._order.append(chain)
        return chain

    def read_chain(self, head: int) -> DescriptorChain:
        """Walk and validate the chain at ``head`` without taking an Available Ring entry.

        For a back-end that recovers chains in flight from elsewhere (vhost-user
        inflight I/O tracking); pair with :meth:`adopt`. A malformed chain raises
        :class:`~pyvirtio.errors.DriverError` and marks the queue broken, as in
        :meth:`pop`.
        """
        self._check_not_broken()
        if not 0 <= head < self.size:
            raise self._fail(f"head {head} >= Queue Size {self.size}", _C_PLACE)
        return self._walk(head)

    def adopt(self, chain: DescriptorChain) -> None:
        """Treat ``chain`` as popped and not yet pushed (resubmission after a restart).

        With VIRTIO_F_IN_ORDER adopted chains come before anything popped later.
        Raises :class:`~pyvirtio.errors.DriverError` if its head is out of range or
        already in flight (the queue is not marked broken: the caller decides).
        """
        self._check_not_broken()
        head = chain.id
        if not 0 <= head < self.size or self._inflight[head]:
            raise DriverError(
                f"queue {self.index}: head {head} cannot be adopted (out of range or "
                "already in flight)",
                _C_PLACE,
            )
        self._inflight[head] = 1
        self._inflight_count += 1
        if self._in_order:
            self._order.append(chain)

    def _walk(self, head: int) -> DescriptorChain:
        """Follow the chain from ``head``, validating it (virtio-v1.2 §2.7.5)."""
        desc = self._desc
        size = self.size
        unpack = _DESC.unpack_from
        contains = self.mem.contains
        lo = self._ram_lo
        hi = self._ram_hi
        readable: list[Segment] = []
        writable: list[Segment] = []
        total = 0
        seen_writable = False
        in_order = self._in_order
        i = head
        count = 0
        while True:
            count += 1
            if count > size:
                raise self._fail(
                    f"chain from head {head} is longer than Queue Size {size} (a loop?): "
                    "drivers MUST NOT add a descriptor chain longer than 2^32 bytes; "
                    "loops in the descriptor chain are forbidden",
                    _C_DESC,
                )
            addr, ln, flags, nxt = unpack(desc, i * _DESC_SIZE)
            if flags & _F_INDIRECT:
                if not self._indirect:
                    raise self._fail(
                        f"descriptor {i} has VIRTQ_DESC_F_INDIRECT: the driver MUST NOT set "
                        "it unless VIRTIO_F_INDIRECT_DESC was negotiated",
                        _C_INDIRECT,
                    )
                if flags & _F_NEXT:
                    raise self._fail(
                        f"descriptor {i} has VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT: "
                        "the driver MUST NOT set both",
                        _C_INDIRECT,
                    )
                # the device MUST ignore VIRTQ_DESC_F_WRITE on the table descriptor
                total = self._walk_indirect(
                    head, addr, ln, readable, writable, total, seen_writable
                )
                break
            if flags & _F_WRITE:
                seen_writable = True
                segs = writable
            elif seen_writable:
                raise self._fail(
                    f"device-readable descriptor {i} follows a device-writable one: the "
                    "driver MUST place any device-writable descriptor elements after "
                    "any device-readable descriptor elements",
                    _C_FRAMING,
                )
            else:
                segs = readable
            if ln:
                if not (lo <= addr and addr + ln <= hi) and not contains(addr, ln):
                    raise self._fail(
                        f"descriptor {i} buffer {addr:#x}+{ln:#x} is not in guest RAM",
                        _C_MEMORY,
                    )
                segs.append((addr, ln))
            total += ln
            if not flags & _F_NEXT:
                break
            if nxt >= size:
                raise self._fail(f"descriptor {i} has next {nxt} >= Queue Size {size}", _C_DESC)
            if in_order and nxt != (i + 1) & self._mask:
                raise self._fail(
                    f"descriptor {i} has next {nxt}: with VIRTIO_F_IN_ORDER the driver MUST "
                    f"set next to {(i + 1) & self._mask}",
                    _C_DESC,
                )
            i = nxt
        if total > _MAX_CHAIN_BYTES:
            raise self._fail(
                f"chain from head {head} is {total} bytes: drivers MUST NOT add a "
                "descriptor chain longer than 2^32 bytes in total",
                _C_DESC,
            )
        return DescriptorChain(head, readable, writable, count)

    def _walk_indirect(
        self,
        head: int,
        table: int,
        length: int,
        readable: list[Segment],
        writable: list[Segment],
        total: int,
        seen_writable: bool,
    ) -> int:
        """Walk one indirect table (virtio-v1.2 §2.7.5.3); returns the new byte total."""
        if length == 0 or length % _DESC_SIZE:
            raise self._fail(
                f"indirect table of chain {head} has length {length}, not a non-zero "
                "multiple of 16 (struct virtq_desc desc[len / 16])",
                _C_INDIRECT_TABLE,
            )
        n = length // _DESC_SIZE
        if n > MAX_INDIRECT_ENTRIES:
            raise self._fail(
                f"indirect table of chain {head} has {n} entries (limit {MAX_INDIRECT_ENTRIES})",
                _C_INDIRECT_TABLE,
            )
        if not (self._ram_lo <= table and table + length <= self._ram_hi) and not self.mem.contains(
            table, length
        ):
            raise self._fail(
                f"indirect table {table:#x}+{length:#x} of chain {head} is not in guest RAM",
                _C_MEMORY,
            )
        buf: memoryview | bytes
        try:
            buf = self.mem.view(table, length)
        except GuestMemoryError:
            buf = self.mem.read(table, length)  # spans regions: copy (bounded above)
        unpack = _DESC.unpack_from
        contains = self.mem.contains
        lo = self._ram_lo
        hi = self._ram_hi
        in_order = self._in_order
        j = 0
        count = 0
        while True:
            count += 1
            if count > n:
                raise self._fail(
                    f"indirect table of chain {head} loops (more than its {n} entries "
                    "walked): loops in the descriptor chain are forbidden",
                    _C_DESC,
                )
            addr, ln, flags, nxt = unpack(buf, j * _DESC_SIZE)
            if flags & _F_INDIRECT:
                raise self._fail(
                    f"indirect table entry {j} of chain {head} has VIRTQ_DESC_F_INDIRECT: "
                    "the driver MUST NOT set it within an indirect descriptor",
                    _C_INDIRECT,
                )
            if flags & _F_WRITE:
                seen_writable = True
                segs = writable
            elif seen_writable:
                raise self._fail(
                    f"device-readable indirect entry {j} of chain {head} follows a "
                    "device-writable one: the driver MUST place any device-writable "
                    "descriptor elements after any device-readable descriptor elements",
                    _C_FRAMING,
                )
            else:
                segs = readable
            if ln:
                if not (lo <= addr and addr + ln <= hi) and not contains(addr, ln):
                    raise self._fail(
                        f"indirect entry {j} of chain {head}: buffer {addr:#x}+{ln:#x} "
                        "is not in guest RAM",
                        _C_MEMORY,
                    )
                segs.append((addr, ln))
            total += ln
            if not flags & _F_NEXT:
                return total
            if nxt >= n:
                raise self._fail(
                    f"indirect entry {j} of chain {head} has next {nxt} outside its "
                    f"{n}-entry table",
                    _C_INDIRECT_TABLE,
                )
            if in_order and nxt != j + 1:
                raise self._fail(
                    f"indirect entry {j} of chain {head} has next {nxt}: with "
                    "VIRTIO_F_IN_ORDER indirect descriptors MUST appear sequentially",
                    _C_INDIRECT,
                )
            j = nxt

    # -- used side ----------------------------------------------------------------

    def push(self, chain: DescriptorChain, written: int) -> None:
        """Stage the used element of ``chain`` with ``written`` bytes; see :meth:`flush`.

        ``written`` larger than the chain's writable part, or a chain that is not in
        flight, is the device model's bug: :class:`ValueError`.
        """
        self._check_not_broken()
        head = chain.id
        if not (0 <= head < self.size and self._inflight[head] == 1) or (
            self._in_order and self._written[head] >= 0
        ):
            raise ValueError(f"chain {head} is not in flight on queue {self.index}")
        if written < 0 or written > chain.writable_len or written > USED_LEN_MAX:
            raise ValueError(
                f"written={written} outside 0..{min(chain.writable_len, USED_LEN_MAX)} "
                "(the chain's writable part, and what a le32 used length can say)"
            )
        self._inflight_count -= 1
        # the head stays marked in use until its used element is published: the driver
        # cannot have reused it before, so offering it again is a violation
        self._inflight[head] = 2
        if self._in_order:
            self._written[head] = written
            return
        self._staged_heads.append(head)
        _ELEM.pack_into(
            self._used,
            _USED_RING_OFF + _ELEM_SIZE * ((self._used_idx + self._staged) & self._mask),
            head,
            written,
        )
        self._staged += 1

    def _collect_in_order(self) -> int:
        """Write used elements for the pushed prefix of the pop order; returns its size.

        VIRTIO_F_IN_ORDER (virtio-v1.2 §2.7.9): one used element may stand for a batch,
        its ``id`` the head of the last buffer; skipped buffers count as used in full.
        We batch only a run of buffers each written in full, closed by the last buffer
        of this flush (which carries its own length); the others get one element each.
        """
        order = self._order
        written = self._written
        done: list[tuple[int, int, bool]] = []
        inflight = self._inflight
        while order and written[order[0].id] >= 0:
            chain = order.popleft()
            w = written[chain.id]
            written[chain.id] = -1
            inflight[chain.id] = 0
            done.append((chain.id, w, w == chain.writable_len))
        n = len(done)
        if not n:
            return 0
        k = n - 1
        while k > 0 and done[k - 1][2]:
            k -= 1
        base = self._used_idx
        mask = self._mask
        used = self._used
        for i in range(k):
            head, w, _ = done[i]
            _ELEM.pack_into(used, _USED_RING_OFF + _ELEM_SIZE * ((base + i) & mask), head, w)
        head, w, _ = done[-1]
        _ELEM.pack_into(used, _USED_RING_OFF + _ELEM_SIZE * ((base + k) & mask), head, w)
        return n

    def flush(self) -> bool:
        """Publish staged used elements (one used ``idx`` update for the batch).

        Returns True if the driver wants a used buffer notification (virtio-v1.2 §2.7.7
        "Used Buffer Notification Suppression"): without VIRTIO_F_EVENT_IDX when
        ``flags`` lacks VIRTQ_AVAIL_F_NO_INTERRUPT; with it when ``used_event`` lies in
        the range of used indexes this flush published (``vring_need_event``).
        """
        self._check_not_broken()
        if self._in_order:
            n = self._collect_in_order()
        else:
            n = self._staged
            self._staged = 0
            inflight = self._inflight
            for head in self._staged_heads:
                inflight[head] = 0
            self._staged_heads.clear()
        if not n:
            return False
        old = self._used_idx
        new = (old + n) & 0xFFFF
        self._used_idx = new
        self._used16[_USED_IDX_OFF >> 1] = new
        if self._event_idx:
            valid = self._signalled_valid
            self._signalled_valid = True
            event: int = self._avail16[self._used_event_off >> 1]
            return not valid or vring_need_event(event, new, old)
        flags: int = self._avail16[_AVAIL_FLAGS_OFF >> 1]
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    # -- notification suppression -------------------------------------------------

    def set_notification(self, enable: bool) -> None:
        """Available buffer notification suppression (virtio-v1.2 §2.7.10).

        Without VIRTIO_F_EVENT_IDX: ``flags`` VIRTQ_USED_F_NO_NOTIFY (0 or 1). With it
        (the device MUST then keep ``flags`` 0): enabled, ``avail_event`` follows the
        next index to pop, so any new buffer is notified; disabled, it is left one
        behind that, where the driver will not reach it.
        """
        self._check_not_broken()
        self._notify = enable
        if self._event_idx:
            event = self._last_avail if enable else (self._last_avail - 1) & 0xFFFF
            self._used16[self._avail_event_off >> 1] = event
        else:
            self._used16[_USED_FLAGS_OFF >> 1] = 0 if enable else VIRTQ_USED_F_NO_NOTIFY

    # -- state ----------------------------------------------------------------------

    def get_state(self) -> QueueState:
        """Next available index to read and the published used index."""
        return QueueState(avail_idx=self._last_avail, used_idx=self._used_idx)

    @property
    def in_flight(self) -> int:
        """Chains popped and not yet pushed."""
        return self._inflight_count
