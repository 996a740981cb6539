"""The driver side of a split virtqueue (virtio-v1.2 §2.7 "Split Virtqueues").

:class:`SplitDriverQueue` owns the ring memory (allocated from a
:class:`~pyvirtio.memory.allocator.GuestAllocator`), writes the Descriptor Table and the
Available Ring, and reads the Used Ring. The device is untrusted: a used element that
names a buffer not in flight, or claims more bytes than the buffer's device-writable
part, raises :class:`~pyvirtio.errors.DeviceError` and marks the queue broken (Linux's
``BAD_RING``).

Bookkeeping that matters for safety (the free-descriptor list, each buffer's length)
lives in host memory, never read back from the rings the device can scribble on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import NamedTuple, cast

from pyvirtio.errors import ConfigurationError, QueueFullError
from pyvirtio.memory.allocator import GuestAllocator
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
    DriverVirtqueue,
    QueueAddresses,
    RingFeatures,
    Segment,
    T,
    check_segments,
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
    _U16,
    _USED_FLAGS_OFF,
    _USED_IDX_OFF,
    _USED_RING_OFF,
)

__all__ = ["SplitDriverQueue"]

_C_USED = 'virtio-v1.2 §2.7.8 "The Virtqueue Used Ring"'
_C_USED_DEV = 'virtio-v1.2 §2.7.8.2 "Device Requirements: The Virtqueue Used Ring"'
_C_IN_ORDER = 'virtio-v1.2 §2.7.9 "In-order use of descriptors"'

_LEGACY_BLOCK_ALIGN = 4096


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


class _InFlight(NamedTuple):
    """Host-side record of one buffer in flight, kept by its head index."""

    token: object
    ndescs: int  # descriptors it takes in the Descriptor Table
    last: int  # its last descriptor (free-list splice point)
    writable: int  # bytes of its device-writable part
    indirect: int  # guest address of its indirect table, 0 if none
    table_bytes: int  # size of that table
    seq: int  # position in add order (in-order batches)


class SplitDriverQueue(DriverVirtqueue[T]):
    """Driver side of a split virtqueue (virtio-v1.2 §2.7).

    ``add`` fills free descriptors (or an indirect table when VIRTIO_F_INDIRECT_DESC
    was negotiated and the buffer has several segments), puts the head in the
    Available Ring and publishes the new ``idx`` at once (§2.7.13). ``kick_prepare``
    answers whether the device asked to be notified of the adds since the previous
    call (§2.7.10). ``get_used`` validates each used element (§2.7.8).

    With VIRTIO_F_IN_ORDER descriptors are used in ring order (§2.7.5: "starting from
    offset 0 in the table, and wrapping around") and a used element may stand for a
    batch (§2.7.9).

    ``legacy_align`` (keyword-only; 4096 for legacy PCI) lays the three areas out as one
    contiguous block as the legacy interface requires (§2.7.2 "Legacy Interfaces: A
    Note on Virtqueue Layout"): Descriptor Table, Available Ring, padding, Used Ring
    at the next multiple of ``legacy_align``.
    """

    def __init__(
        self,
        mem: GuestMemory,
        allocator: GuestAllocator,
        size: int,
        features: RingFeatures = _NO_FEATURES,
        *,
        legacy_align: int = 0,
    ) -> None:
        super().__init__(mem, allocator, size, features)
        if not 1 <= size <= SPLIT_MAX_QUEUE_SIZE or size & (size - 1):
            raise ConfigurationError(
                f"split queue size {size} is not a power of 2 in 1..{SPLIT_MAX_QUEUE_SIZE}"
            )
        if legacy_align < 0 or legacy_align & (legacy_align - 1):
            raise ConfigurationError(f"legacy_align {legacy_align} is not a power of 2")
        desc_n = split_desc_table_size(size)
        avail_n = split_avail_size(size)
        used_n = split_used_size(size)
        self._blocks: list[int] = []
        if legacy_align:
            total = self.legacy_ring_size(size, legacy_align)
            base = allocator.alloc(total, max(_LEGACY_BLOCK_ALIGN, legacy_align))
            self._blocks.append(base)
            mem.fill(base, total)
            desc = base
            avail = base + desc_n
            used = _align_up(avail + avail_n, legacy_align)
        else:
            desc = allocator.alloc(desc_n, SPLIT_DESC_ALIGN)
            self._blocks.append(desc)
            try:
                avail = allocator.alloc(avail_n, SPLIT_AVAIL_ALIGN)
                self._blocks.append(avail)
                used = allocator.alloc(used_n, SPLIT_USED_ALIGN)
                self._blocks.append(used)
            except BaseException:
                for b in self._blocks:
                    allocator.free(b)
                raise
            mem.fill(desc, desc_n)
            mem.fill(avail, avail_n)
            # "The driver MUST initialize flags in the used ring to 0" (§2.7.10.1)
            mem.fill(used, used_n)
        self._addrs = QueueAddresses(desc, avail, used)
        self._desc = mem.view(desc, desc_n)
        self._avail = mem.view(avail, avail_n)
        self._used = mem.view(used, used_n)
        # indexes, flags and events: one atomic 16-bit access each (see u16_words)
        self._avail16 = u16_words(self._avail)
        self._used16 = u16_words(self._used)
        self._mask = size - 1
        self._used_event_off = _AVAIL_RING_OFF + 2 * size
        self._avail_event_off = _USED_RING_OFF + _ELEM_SIZE * size
        self._indirect = features.indirect
        self._event_idx = features.event_idx
        self._in_order = features.in_order
        self._closed = False
        # reaped indirect tables kept for reuse, by size in bytes
        self._table_cache: dict[int, list[int]] = {}
        self._cached_tables = 0
        self._reset_state()

    @staticmethod
    def legacy_ring_size(size: int, align: int) -> int:
        """Bytes of a legacy vring of ``size`` entries with Queue Align ``align``.

        The formula of virtio-v1.2 §2.7.2 ("the transitional driver MUST allocate the
        total number of bytes for the virtqueue according to the following formula"):
        ``ALIGN(16*qsz + 2*(3 + qsz)) + ALIGN(2*3 + 8*qsz)``.
        """
        if align <= 0 or align & (align - 1):
            raise ValueError(f"align {align} is not a power of 2")
        first = split_desc_table_size(size) + split_avail_size(size)
        return _align_up(first, align) + _align_up(split_used_size(size), align)

    def _reset_state(self) -> None:
        size = self.size
        # free list kept host-side: _next[i] links free descriptors (not in-order)
        self._next = [(i + 1) & self._mask for i in range(size)]
        self._free_head = 0
        self._num_free = size
        # in-order: the next descriptor to use, in ring order
        self._next_desc = 0
        self._records: list[_InFlight | None] = [None] * size
        self._order: deque[int] = deque()  # in-flight heads in add order (in-order)
        self._seq = 0
        self._avail_idx = 0  # shadow of avail idx (published by add)
        self._kicked_idx = 0  # avail idx at the previous kick_prepare
        self._added = 0  # adds since the previous kick_prepare
        self._last_used = 0
        self._num_inflight = 0
        self._interrupts = True
        self._batch_left = 0  # in-order: buffers of the current batch not yet returned
        self._batch_len = 0  # in-order: used len of the last buffer of that batch

    # -- API ----------------------------------------------------------------------

    @property
    def addrs(self) -> QueueAddresses:
        """Descriptor Table, Available Ring and Used Ring addresses."""
        return self._addrs

    @property
    def num_free(self) -> int:
        """Free descriptors in the Descriptor Table."""
        return self._num_free

    def _check_open(self) -> None:
        self._check_not_broken()
        if self._closed:
            raise ValueError("queue is closed")

    def add(self, out: Sequence[Segment], in_: Sequence[Segment], token: T) -> None:
        """Make a buffer available: ``out`` device-readable, ``in_`` device-writable.

        Raises :class:`ValueError` for an empty buffer, a segment that does not fit a
        descriptor, a chain longer than Queue Size or 2^32 bytes (virtio-v1.2 §2.7.5.2);
        :class:`~pyvirtio.errors.QueueFullError` when too few descriptors are free.
        """
        self._check_open()
        n_out = len(out)
        total_n = n_out + len(in_)
        if not total_n:
            raise ValueError("a buffer needs at least one segment")
        if total_n > self.size:
            # "A driver MUST NOT create a descriptor chain longer than the Queue Size"
            raise ValueError(f"{total_n} segments exceed Queue Size {self.size}")
        total_bytes = check_segments(out)
        wlen = check_segments(in_)
        total_bytes += wlen
        if total_bytes > _MAX_CHAIN_BYTES:
            # "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total"
            raise ValueError(f"buffer of {total_bytes} bytes exceeds 2^32")
        use_indirect = self._indirect and total_n > 1 and total_n <= MAX_INDIRECT_ENTRIES
        need = 1 if use_indirect else total_n
        if need > self._num_free:
            raise QueueFullError(f"{need} descriptors needed, {self._num_free} free")

        desc = self._desc
        pack = _DESC.pack_into
        table = 0
        nbytes = 0
        if use_indirect:
            nbytes = total_n * _DESC_SIZE
            cached = self._table_cache.get(nbytes)
            if cached:
                table = cached.pop()
                self._cached_tables -= 1
            else:
                table = self.allocator.alloc(nbytes, SPLIT_DESC_ALIGN)
            buf = bytearray(nbytes)
            off = 0
            i = 0
            for segs, wflag in ((out, 0), (in_, _F_WRITE)):
                for addr, n in segs:
                    i += 1
                    pack(buf, off, addr, n, wflag | _F_NEXT if i < total_n else wflag, i)
                    off += _DESC_SIZE
            # the last entry's next is unused; zero it for tidiness
            _U16.pack_into(buf, nbytes - 2, 0)
            self.mem.write(table, buf)
            head = last = self._take(1)
            pack(desc, head * _DESC_SIZE, table, nbytes, _F_INDIRECT, 0)
        else:
            head = self._take(total_n)
            nxt_of = self._next
            mask = self._mask
            in_order = self._in_order
            i = head
            k = 0
            last = head
            for segs, wflag in ((out, 0), (in_, _F_WRITE)):
                for addr, n in segs:
                    k += 1
                    nxt = ((i + 1) & mask) if in_order else nxt_of[i]
                    if k < total_n:
                        pack(desc, i * _DESC_SIZE, addr, n, wflag | _F_NEXT, nxt)
                    else:
                        pack(desc, i * _DESC_SIZE, addr, n, wflag, 0)
                        last = i
                    i = nxt
            if not in_order:
                self._free_head = i
        self._records[head] = _InFlight(token, need, last, wlen, table, nbytes, self._seq)
        self._seq += 1
        self._num_free -= need
        self._num_inflight += 1
        if self._in_order:
            self._order.append(head)
        idx = self._avail_idx
        self._avail16[(_AVAIL_RING_OFF >> 1) + (idx & self._mask)] = head
        idx = (idx + 1) & 0xFFFF
        self._avail_idx = idx
        # the ring entry is written before idx exposes it (§2.7.13.3 "Updating idx")
        self._avail16[_AVAIL_IDX_OFF >> 1] = idx
        self._added += 1

    def _take(self, n: int) -> int:
        """First of ``n`` free descriptors (the caller checked there are enough)."""
        if self._in_order:
            head = self._next_desc
            self._next_desc = (head + n) & self._mask
            return head
        head = self._free_head
        if n == 1:
            self._free_head = self._next[head]
        return head

    def kick_prepare(self) -> bool:
        """True if the device wants an available buffer notification (§2.7.10).

        Without VIRTIO_F_EVENT_IDX: unless ``flags`` has VIRTQ_USED_F_NO_NOTIFY. With
        it: if ``avail_event`` lies in the range of indexes added since the last call
        ("If the idx field in the available ring ... was equal to avail_event, the
        driver MUST send a notification").
        """
        self._check_open()
        added = self._added
        if not added:
            return False
        old = self._kicked_idx
        new = self._avail_idx
        self._kicked_idx = new
        self._added = 0
        if self._event_idx:
            if added >= 0xFFFF:  # the 16-bit window cannot tell; notify to be safe
                return True
            event: int = self._used16[self._avail_event_off >> 1]
            return vring_need_event(event, new, old)
        flags: int = self._used16[_USED_FLAGS_OFF >> 1]
        return not flags & VIRTQ_USED_F_NO_NOTIFY

    def notification_data(self) -> int:
        """The available ``idx`` as published: for a split ring ``next_off`` is its 15
        low bits and ``next_wrap`` its bit 15 (virtio-v1.2 §2.9 "Driver
        Notifications")."""
        return self._avail_idx

    def _used_pending(self) -> int:
        used_idx: int = self._used16[_USED_IDX_OFF >> 1]
        return (used_idx - self._last_used) & 0xFFFF

    def get_used(self) -> tuple[T, int] | None:
        """Next used buffer as ``(token, written_len)``; None if there is none."""
        self._check_open()
        if self._batch_left:
            return self._finish_in_order(self._order[0])
        pending = self._used_pending()
        if not pending:
            return None
        if pending > self._num_inflight:
            raise self._fail(
                f"used idx moved {pending} past {self._last_used} but only "
                f"{self._num_inflight} buffers are in flight",
                _C_USED,
            )
        head: int
        ln: int
        head, ln = _ELEM.unpack_from(
            self._used, _USED_RING_OFF + _ELEM_SIZE * (self._last_used & self._mask)
        )
        rec = self._records[head] if head < self.size else None
        if rec is None:
            raise self._fail(
                f"used element {self._last_used} names id {head}, which is not the head "
                "of a buffer in flight",
                _C_USED,
            )
        if ln > rec.writable:
            raise self._fail(
                f"used element for id {head} has len {ln} but the buffer has only "
                f"{rec.writable} device-writable bytes",
                _C_USED_DEV,
            )
        if self._in_order:
            batch = rec.seq - self._records_front_seq() + 1
            if batch > pending:
                raise self._fail(
                    f"used element for id {head} stands for a batch of {batch} buffers "
                    f"but used idx advanced by only {pending}",
                    _C_IN_ORDER,
                )
            self._batch_left = batch
            self._batch_len = ln
            return self._finish_in_order(self._order[0])
        self._release(head, rec)
        self._last_used = (self._last_used + 1) & 0xFFFF
        self._after_reap()
        return cast(T, rec.token), ln

    def _records_front_seq(self) -> int:
        rec = self._records[self._order[0]]
        return rec.seq if rec is not None else 0

    def _finish_in_order(self, head: int) -> tuple[T, int]:
        """Return the oldest in-flight buffer as part of the current in-order batch."""
        rec = self._records[head]
        if rec is None:  # pragma: no cover - _order and _records move together
            raise self._fail("in-order bookkeeping lost a buffer", _C_IN_ORDER)
        self._order.popleft()
        self._batch_left -= 1
        # skipped buffers "are assumed to have been used ... by the device completely"
        ln = self._batch_len if not self._batch_left else rec.writable
        self._release(head, rec)
        self._last_used = (self._last_used + 1) & 0xFFFF
        self._after_reap()
        return cast(T, rec.token), ln

    def _release(self, head: int, rec: _InFlight) -> None:
        self._records[head] = None
        self._num_inflight -= 1
        self._num_free += rec.ndescs
        if not self._in_order:
            self._next[rec.last] = self._free_head
            self._free_head = head
        if rec.indirect:
            self._put_table(rec.indirect, rec.table_bytes)

    def _put_table(self, table: int, nbytes: int) -> None:
        """Keep a reaped indirect table for reuse (at most Queue Size of them)."""
        if self._cached_tables < self.size:
            self._table_cache.setdefault(nbytes, []).append(table)
            self._cached_tables += 1
        else:
            self.allocator.free(table)

    def _drop_table_cache(self) -> None:
        for tables in self._table_cache.values():
            for t in tables:
                self.allocator.free(t)
        self._table_cache = {}
        self._cached_tables = 0

    def _after_reap(self) -> None:
        if self._event_idx and self._interrupts:
            self._avail16[self._used_event_off >> 1] = self._last_used

    def disable_interrupts(self) -> None:
        """Ask the device not to send used buffer notifications (§2.7.7).

        Without VIRTIO_F_EVENT_IDX: set VIRTQ_AVAIL_F_NO_INTERRUPT. With it (``flags``
        MUST then stay 0): move ``used_event`` one behind the next used index, where
        the device will not reach it.
        """
        self._check_open()
        self._write_interrupts(False)

    def _write_interrupts(self, enable: bool) -> None:
        self._interrupts = enable
        if self._event_idx:
            event = self._last_used if enable else (self._last_used - 1) & 0xFFFF
            self._avail16[self._used_event_off >> 1] = event
        else:
            flags = 0 if enable else VIRTQ_AVAIL_F_NO_INTERRUPT
            self._avail16[_AVAIL_FLAGS_OFF >> 1] = flags

    def enable_interrupts(self) -> bool:
        """Ask for used buffer notifications again; True if used buffers are pending.

        With VIRTIO_F_EVENT_IDX ``used_event`` is set to the next used index to read,
        and kept there as buffers are reaped.
        """
        self._check_open()
        self._write_interrupts(True)
        return bool(self._batch_left) or self._used_pending() != 0

    def detach_unused(self) -> list[T]:
        """After a device reset: every in-flight token, and an empty, zeroed ring."""
        tokens: list[T] = []
        recs = self._records
        if self._in_order:
            heads: list[int] = list(self._order)
        else:
            heads = [h for h, r in enumerate(recs) if r is not None]
            heads.sort(key=lambda h: recs[h].seq)  # type: ignore[union-attr]
        for h in heads:
            rec = recs[h]
            if rec is None:  # pragma: no cover - defensive
                continue
            tokens.append(cast(T, rec.token))
            if rec.indirect:
                self.allocator.free(rec.indirect)
        self._drop_table_cache()
        if not self._closed:
            for view in (self._desc, self._avail, self._used):
                view[:] = bytes(len(view))
        interrupts = self._interrupts
        self._reset_state()
        if not interrupts and not self._closed:
            self._write_interrupts(False)
        return tokens

    def close(self) -> None:
        """Free the ring memory and any indirect tables (idempotent)."""
        if self._closed:
            return
        for rec in self._records:
            if rec is not None and rec.indirect:
                self.allocator.free(rec.indirect)
        self._drop_table_cache()
        self._records = [None] * self.size
        self._order.clear()
        self._num_inflight = 0
        self._closed = True
        # the typed views first: a live export keeps the mapping (and its fd) open
        self._avail16.release()
        self._used16.release()
        self._desc.release()
        self._avail.release()
        self._used.release()
        for b in self._blocks:
            self.allocator.free(b)
        self._blocks = []
