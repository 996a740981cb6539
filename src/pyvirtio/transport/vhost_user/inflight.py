"""Inflight I/O tracking (vhost-user.rst "Inflight I/O tracking").

A back-end that completes requests out of order cannot learn after a crash or a
reconnect which available buffers it had taken but not yet returned: the front-end
only knows the used index. The back-end therefore records, in a shared buffer the
front-end keeps for it (``VHOST_USER_GET_INFLIGHT_FD`` / ``VHOST_USER_SET_INFLIGHT_FD``),
every buffer it fetches and every buffer it returns. After a reconnect the buffers
still marked in flight are resubmitted, in the order they were fetched, exactly once.

Layout: one region per virtqueue, one after the other; each region is a
``QueueRegionSplit`` or ``QueueRegionPacked`` header followed by one ``DescStateSplit``
/ ``DescStatePacked`` per ring entry (layouts in :mod:`.spec`). Like libvhost-user and
DPDK, each region is rounded up to :data:`INFLIGHT_ALIGNMENT` bytes. The front-end
asks for the buffer before it tells the ring format (GET_INFLIGHT_FD comes before
SET_FEATURES), so :func:`inflight_area_size` sizes it for the larger, packed format;
the region stride follows the format in force when a ring starts.

The update orders below are the document's, and each is crash-consistent: whatever
store the back-end died after, :meth:`SplitInflight.recover` /
:meth:`PackedInflight.recover` rebuild a state in which a buffer is in flight exactly
when the driver has not seen it used.

The region is shared memory the front-end can write too: every index read from it is
bounds-checked, list walks are capped, and an inconsistent region raises
:class:`InflightError` (the back-end then starts the ring from its base, without
resubmission). Resubmitted chains are re-validated as the rings validate them
(split: :meth:`~pyvirtio.virtqueue.split.device.SplitDeviceQueue.read_chain`; packed:
:func:`packed_chain`).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Sequence

from pyvirtio.errors import DriverError, GuestMemoryError, ProtocolError
from pyvirtio.memory.guest_memory import GuestMemory, create_memfd
from pyvirtio.spec.ring import (
    PVIRTQ_DESC,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
)
from pyvirtio.transport.vhost_user._shm import map_shared, release_shared
from pyvirtio.transport.vhost_user.spec import (
    DESC_STATE_PACKED,
    DESC_STATE_SPLIT,
    INFLIGHT_VERSION,
    QUEUE_REGION_PACKED,
    QUEUE_REGION_SPLIT,
    VIRTQUEUE_MAX_SIZE,
)
from pyvirtio.virtqueue.common import MAX_INDIRECT_ENTRIES, DescriptorChain, Segment

__all__ = [
    "INFLIGHT_ALIGNMENT",
    "InflightArea",
    "InflightError",
    "PackedInflight",
    "RawDesc",
    "SplitInflight",
    "inflight_area_size",
    "packed_chain",
    "packed_region_size",
    "split_region_size",
]

_CLAUSE = 'vhost-user.rst "Inflight I/O tracking"'
_C_DESC = 'virtio-v1.2 §2.7.5 "The Virtqueue Descriptor Table"'
_C_FRAMING = 'virtio-v1.2 §2.7.4.2 "Driver Requirements: Message Framing"'
_C_PACKED_INDIRECT = 'virtio-v1.2 §2.8.7 "Indirect Flag: Scatter-Gather Support"'

#: Each queue region starts at a multiple of this (libvhost-user and DPDK do the same).
INFLIGHT_ALIGNMENT = 64

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
_F_WRITE = int(VIRTQ_DESC_F_WRITE)
_F_INDIRECT = int(VIRTQ_DESC_F_INDIRECT)
_F_AVAIL = int(VIRTQ_DESC_F_AVAIL)
_F_USED = int(VIRTQ_DESC_F_USED)
_MAX_CHAIN_BYTES = 1 << 32

#: A descriptor as fetched from a packed ring: (addr, len, id, flags).
RawDesc = tuple[int, int, int, int]


class InflightError(ProtocolError):
    """The inflight region is inconsistent or cannot record more (front-end error)."""


def _align(n: int) -> int:
    return (n + INFLIGHT_ALIGNMENT - 1) // INFLIGHT_ALIGNMENT * INFLIGHT_ALIGNMENT


def split_region_size(queue_size: int) -> int:
    """Bytes of one split queue region: header + ``queue_size`` DescStateSplit, aligned."""
    return _align(QUEUE_REGION_SPLIT.size + DESC_STATE_SPLIT.size * queue_size)


def packed_region_size(queue_size: int) -> int:
    """Bytes of one packed queue region: header + ``queue_size`` DescStatePacked, aligned."""
    return _align(QUEUE_REGION_PACKED.size + DESC_STATE_PACKED.size * queue_size)


def inflight_area_size(num_queues: int, queue_size: int) -> int:
    """Size of the buffer GET_INFLIGHT_FD hands out: room for either ring format."""
    return num_queues * max(split_region_size(queue_size), packed_region_size(queue_size))


# ---------------------------------------------------------------------------
# The shared buffer
# ---------------------------------------------------------------------------


class InflightArea:
    """The inflight buffer of a device: ``num_queues`` regions of ``queue_size`` entries.

    Owns ``fd`` from construction on (closed by :meth:`close`, also if construction
    fails). The mapping is checked against the file size first so that a short file
    cannot fault the process later.
    """

    def __init__(
        self,
        fd: int,
        mmap_size: int,
        mmap_offset: int,
        num_queues: int,
        queue_size: int,
        *,
        trusted: bool = False,
    ) -> None:
        self.fd = fd
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        try:
            if not 1 <= queue_size <= VIRTQUEUE_MAX_SIZE or not 1 <= num_queues <= 256:
                raise InflightError(
                    f"inflight area for {num_queues} queues of {queue_size} entries", _CLAUSE
                )
            need = num_queues * split_region_size(queue_size)
            if mmap_size < need:
                raise InflightError(
                    f"inflight area of {mmap_size} bytes cannot hold {num_queues} queues of "
                    f"{queue_size} entries ({need} bytes at least)",
                    _CLAUSE,
                )
            if mmap_size > inflight_area_size(num_queues, queue_size) + mmap.PAGESIZE:
                # never map more than the regions can use (the size is the peer's word)
                mmap_size = inflight_area_size(num_queues, queue_size)
            self._map, self._view = map_shared(
                fd,
                mmap_size,
                mmap_offset,
                "inflight area",
                InflightError,
                _CLAUSE,
                trusted=trusted,
            )
        except BaseException:
            self.close()
            raise
        self.mmap_size = mmap_size
        self.mmap_offset = mmap_offset
        self.num_queues = num_queues
        self.queue_size = queue_size

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> InflightArea:
        """A fresh, zeroed area in a new memfd (the GET_INFLIGHT_FD answer)."""
        size = inflight_area_size(num_queues, queue_size)
        fd = create_memfd(size, "pyvirtio-inflight")
        return cls(fd, size, 0, num_queues, queue_size)

    def _region(self, index: int, stride: int) -> memoryview | None:
        if self._view is None or not 0 <= index < self.num_queues:
            return None
        start = index * stride
        if start + stride > len(self._view):
            return None
        return self._view[start : start + stride]

    def split_queue(self, index: int) -> SplitInflight | None:
        """The split-format region of queue ``index`` (None if it does not fit)."""
        region = self._region(index, split_region_size(self.queue_size))
        return None if region is None else SplitInflight(region, self.queue_size)

    def packed_queue(self, index: int) -> PackedInflight | None:
        """The packed-format region of queue ``index`` (None if it does not fit)."""
        region = self._region(index, packed_region_size(self.queue_size))
        return None if region is None else PackedInflight(region, self.queue_size)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._view is None and self.fd < 0

    def close(self) -> None:
        """Unmap the area and close its descriptor. Idempotent."""
        release_shared(self._view, self._map, self.fd)
        self._view = None
        self._map = None
        self.fd = -1


# ---------------------------------------------------------------------------
# Split queue region
# ---------------------------------------------------------------------------

_S_VERSION = QUEUE_REGION_SPLIT.offset_of("version")
_S_DESC_NUM = QUEUE_REGION_SPLIT.offset_of("desc_num")
_S_LAST_BATCH = QUEUE_REGION_SPLIT.offset_of("last_batch_head")
_S_USED_IDX = QUEUE_REGION_SPLIT.offset_of("used_idx")
_S_HDR = QUEUE_REGION_SPLIT.size
_SD = DESC_STATE_SPLIT.size
_SD_INFLIGHT = DESC_STATE_SPLIT.offset_of("inflight")
_SD_NEXT = DESC_STATE_SPLIT.offset_of("next")
_SD_COUNTER = DESC_STATE_SPLIT.offset_of("counter")


class SplitInflight:
    """One ``QueueRegionSplit``: the fetch/complete record of a split virtqueue.

    - fetch (:meth:`fetch`): ``desc[head].counter`` = global counter (then +1),
      ``desc[head].inflight`` = 1;
    - complete, for one batch: :meth:`complete_begin` links each head into the
      last-batch list (``desc[i].next = last_batch_head; last_batch_head = i``), the
      caller publishes the used index, then :meth:`complete_end` clears ``inflight``
      of each head and stores the used index;
    - reconnect (:meth:`recover`): if the stored ``used_idx`` differs from the ring's,
      the last batch was published but not cleared: clear it; the heads still in
      flight are returned in counter order.
    """

    def __init__(self, region: memoryview, desc_num: int) -> None:
        self._r = region
        self.desc_num = desc_num
        self._counter = 1
        self._last_batch = 0

    @property
    def initialized(self) -> bool:
        """False for a fresh (all-zero) region: "Zero value indicates an uninitialized buffer"."""
        return bool(_U16.unpack_from(self._r, _S_VERSION)[0])

    def reset(self, used_idx: int) -> None:
        """Initialise the region for a ring whose used index is ``used_idx``."""
        r = self._r
        r[:] = bytes(len(r))
        _U16.pack_into(r, _S_DESC_NUM, self.desc_num)
        _U16.pack_into(r, _S_USED_IDX, used_idx & 0xFFFF)
        _U16.pack_into(r, _S_VERSION, INFLIGHT_VERSION)
        self._counter = 1
        self._last_batch = 0

    def recover(self, ring_used_idx: int) -> list[int]:
        """Reconnect: repair the last batch, return the in-flight heads in fetch order."""
        r = self._r
        n = self.desc_num
        version, stored_n = (
            _U16.unpack_from(r, _S_VERSION)[0],
            _U16.unpack_from(r, _S_DESC_NUM)[0],
        )
        if version != INFLIGHT_VERSION or stored_n != n:
            raise InflightError(
                f"split region has version {version} and {stored_n} entries "
                f"(expected {INFLIGHT_VERSION} and {n})",
                _CLAUSE,
            )
        stored_used = _U16.unpack_from(r, _S_USED_IDX)[0]
        ring_used_idx &= 0xFFFF
        if stored_used != ring_used_idx:
            # "Subtract the value of used_idx from the idx value of used ring to get
            # last batch size", clear the batch list from last_batch_head.
            batch = (ring_used_idx - stored_used) & 0xFFFF
            if batch > n:
                raise InflightError(
                    f"used index moved by {batch} since the region was written (ring of {n})",
                    _CLAUSE,
                )
            i = _U16.unpack_from(r, _S_LAST_BATCH)[0]
            for _ in range(batch):
                if i >= n:
                    raise InflightError(f"last-batch list reaches entry {i} of {n}", _CLAUSE)
                off = _S_HDR + i * _SD
                _U8.pack_into(r, off + _SD_INFLIGHT, 0)
                i = _U16.unpack_from(r, off + _SD_NEXT)[0]
            _U16.pack_into(r, _S_USED_IDX, ring_used_idx)
        heads: list[tuple[int, int]] = []
        top = 0
        for i in range(n):
            off = _S_HDR + i * _SD
            if r[off + _SD_INFLIGHT] == 1:
                counter = _U64.unpack_from(r, off + _SD_COUNTER)[0]
                heads.append((counter, i))
                top = max(top, counter)
        heads.sort()
        self._counter = top + 1
        self._last_batch = _U16.unpack_from(r, _S_LAST_BATCH)[0]
        return [i for _, i in heads]

    def fetch(self, head: int) -> None:
        """Record that the chain at ``head`` was taken from the available ring."""
        if not 0 <= head < self.desc_num:
            raise InflightError(f"head {head} outside the {self.desc_num}-entry region", _CLAUSE)
        off = _S_HDR + head * _SD
        _U64.pack_into(self._r, off + _SD_COUNTER, self._counter)
        self._counter += 1
        _U8.pack_into(self._r, off + _SD_INFLIGHT, 1)

    def complete_begin(self, heads: Sequence[int]) -> None:
        """Before the used index of a batch is published: link the batch."""
        r = self._r
        last = self._last_batch
        for head in heads:
            if not 0 <= head < self.desc_num:
                continue
            _U16.pack_into(r, _S_HDR + head * _SD + _SD_NEXT, last)
            last = head
        self._last_batch = last
        _U16.pack_into(r, _S_LAST_BATCH, last)

    def complete_end(self, heads: Sequence[int], used_idx: int) -> None:
        """After the used index was published: clear the batch, store the used index."""
        r = self._r
        for head in heads:
            if 0 <= head < self.desc_num:
                _U8.pack_into(r, _S_HDR + head * _SD + _SD_INFLIGHT, 0)
        _U16.pack_into(r, _S_USED_IDX, used_idx & 0xFFFF)

    def is_inflight(self, head: int) -> bool:
        """True if ``head`` is recorded in flight (diagnostics and tests)."""
        return 0 <= head < self.desc_num and self._r[_S_HDR + head * _SD + _SD_INFLIGHT] == 1

    def release(self) -> None:
        """Drop the reference to the shared region."""
        self._r = memoryview(bytearray(len(self._r)))


# ---------------------------------------------------------------------------
# Packed queue region
# ---------------------------------------------------------------------------

_P_VERSION = QUEUE_REGION_PACKED.offset_of("version")
_P_DESC_NUM = QUEUE_REGION_PACKED.offset_of("desc_num")
_P_FREE_HEAD = QUEUE_REGION_PACKED.offset_of("free_head")
_P_OLD_FREE_HEAD = QUEUE_REGION_PACKED.offset_of("old_free_head")
_P_USED_IDX = QUEUE_REGION_PACKED.offset_of("used_idx")
_P_OLD_USED_IDX = QUEUE_REGION_PACKED.offset_of("old_used_idx")
_P_USED_WRAP = QUEUE_REGION_PACKED.offset_of("used_wrap_counter")
_P_OLD_USED_WRAP = QUEUE_REGION_PACKED.offset_of("old_used_wrap_counter")
_P_HDR = QUEUE_REGION_PACKED.size
_PD = DESC_STATE_PACKED.size
_PD_INFLIGHT = DESC_STATE_PACKED.offset_of("inflight")
_PD_NEXT = DESC_STATE_PACKED.offset_of("next")
_PD_LAST = DESC_STATE_PACKED.offset_of("last")
_PD_NUM = DESC_STATE_PACKED.offset_of("num")
_PD_COUNTER = DESC_STATE_PACKED.offset_of("counter")
_PD_ID = DESC_STATE_PACKED.offset_of("id")
# id, flags, len, addr are consecutive: one struct for the stored descriptor
_PD_DESC = struct.Struct("<HHIQ")
_PD_FLAGS = DESC_STATE_PACKED.offset_of("flags")
_PVIRTQ_FLAGS_OFF = PVIRTQ_DESC.offset_of("flags")


class PackedInflight:
    """One ``QueueRegionPacked``: the fetch/complete record of a packed virtqueue.

    Entries form a free list (``next`` links, head ``free_head``). Fetching a chain of
    ``n`` descriptors stores them in ``n`` free entries, the first of which (the
    "head" entry, ``old_free_head``) carries ``inflight``, ``counter``, ``num`` and
    ``last``; ``old_free_head`` then moves past the chain (commit). Completing a batch
    returns each chain's entries to the free list and moves ``used_idx`` /
    ``used_wrap_counter`` before the used descriptors are written
    (:meth:`complete_begin`), then clears ``inflight`` and commits the ``old_*``
    copies (:meth:`complete_end`). :meth:`recover` rolls an interrupted update
    forward (the used descriptors reached the ring) or back.
    """

    def __init__(self, region: memoryview, desc_num: int) -> None:
        self._r = region
        self.desc_num = desc_num
        self._counter = 1
        self._free_head = 0
        self._used_idx = 0
        self._used_wrap = True
        #: Buffer ID -> head entry, for chains in flight
        self._by_id: dict[int, int] = {}

    @property
    def initialized(self) -> bool:
        """False for a fresh (all-zero) region."""
        return bool(_U16.unpack_from(self._r, _P_VERSION)[0])

    @property
    def used(self) -> tuple[int, bool]:
        """The device's used position and wrap counter as recorded."""
        return self._used_idx, self._used_wrap

    def _entry(self, i: int) -> int:
        return _P_HDR + i * _PD

    def reset(self, used_idx: int, used_wrap: bool) -> None:
        """Initialise the region: every entry free, the used position given."""
        r = self._r
        n = self.desc_num
        r[:] = bytes(len(r))
        for j in range(n):
            _U16.pack_into(r, _P_HDR + j * _PD + _PD_NEXT, j + 1)
        _U16.pack_into(r, _P_DESC_NUM, n)
        for off in (_P_USED_IDX, _P_OLD_USED_IDX):
            _U16.pack_into(r, off, used_idx)
        for off in (_P_USED_WRAP, _P_OLD_USED_WRAP):
            _U8.pack_into(r, off, int(used_wrap))
        _U16.pack_into(r, _P_VERSION, INFLIGHT_VERSION)
        self._counter = 1
        self._free_head = 0
        self._used_idx = used_idx
        self._used_wrap = used_wrap
        self._by_id = {}

    def recover(self, desc_ring: memoryview, ring_size: int) -> list[tuple[int, list[RawDesc]]]:
        """Reconnect: finish or roll back an interrupted update; return the chains in
        flight as ``(head entry, descriptors)`` in fetch (counter) order.

        ``desc_ring`` is the packed Descriptor Ring (``ring_size`` entries), consulted
        to see whether an interrupted batch reached the driver.
        """
        r = self._r
        n = self.desc_num
        version = _U16.unpack_from(r, _P_VERSION)[0]
        stored_n = _U16.unpack_from(r, _P_DESC_NUM)[0]
        if version != INFLIGHT_VERSION or stored_n != n:
            raise InflightError(
                f"packed region has version {version} and {stored_n} entries "
                f"(expected {INFLIGHT_VERSION} and {n})",
                _CLAUSE,
            )
        used_idx = _U16.unpack_from(r, _P_USED_IDX)[0]
        old_used_idx = _U16.unpack_from(r, _P_OLD_USED_IDX)[0]
        used_wrap = r[_P_USED_WRAP]
        old_used_wrap = r[_P_OLD_USED_WRAP]
        if old_used_idx >= ring_size or used_idx >= ring_size:
            raise InflightError(f"used position {used_idx}/{old_used_idx} of {ring_size}", _CLAUSE)
        if (used_idx, used_wrap) != (old_used_idx, old_used_wrap):
            # "Use old_used_wrap_counter to calculate the available flags"; if the slot
            # no longer looks available, the batch reached the driver: commit it.
            flags = _U16.unpack_from(desc_ring, old_used_idx * 16 + _PVIRTQ_FLAGS_OFF)[0]
            avail_pattern = _F_AVAIL if old_used_wrap else _F_USED
            if flags & (_F_AVAIL | _F_USED) != avail_pattern:
                for src, dst in (
                    (_P_FREE_HEAD, _P_OLD_FREE_HEAD),
                    (_P_USED_IDX, _P_OLD_USED_IDX),
                ):
                    _U16.pack_into(r, dst, _U16.unpack_from(r, src)[0])
                _U8.pack_into(r, _P_OLD_USED_WRAP, used_wrap)
        # roll back whatever is still in progress
        for src, dst in ((_P_OLD_FREE_HEAD, _P_FREE_HEAD), (_P_OLD_USED_IDX, _P_USED_IDX)):
            _U16.pack_into(r, dst, _U16.unpack_from(r, src)[0])
        _U8.pack_into(r, _P_USED_WRAP, r[_P_OLD_USED_WRAP])
        self._free_head = _U16.unpack_from(r, _P_FREE_HEAD)[0]
        self._used_idx = _U16.unpack_from(r, _P_USED_IDX)[0]
        self._used_wrap = bool(r[_P_USED_WRAP])
        # entries on the free list are not in flight
        i = self._free_head
        for _ in range(n):
            if i >= n:
                break
            _U8.pack_into(r, self._entry(i) + _PD_INFLIGHT, 0)
            i = _U16.unpack_from(r, self._entry(i) + _PD_NEXT)[0]
        chains: list[tuple[int, int, list[RawDesc]]] = []
        top = 0
        self._by_id = {}
        total = 0
        for e in range(n):
            off = self._entry(e)
            if r[off + _PD_INFLIGHT] != 1:
                continue
            counter = _U64.unpack_from(r, off + _PD_COUNTER)[0]
            num = _U16.unpack_from(r, off + _PD_NUM)[0]
            total += num
            if not 1 <= num <= n or total > ring_size:
                raise InflightError(f"in-flight entry {e} holds {num} descriptors", _CLAUSE)
            descs: list[RawDesc] = []
            j = e
            for k in range(num):
                if j >= n:
                    raise InflightError(f"chain of entry {e} reaches entry {j} of {n}", _CLAUSE)
                bid, flags, length, addr = _PD_DESC.unpack_from(r, self._entry(j) + _PD_ID)
                descs.append((addr, length, bid, flags))
                if k + 1 < num:
                    j = _U16.unpack_from(r, self._entry(j) + _PD_NEXT)[0]
            if _U16.unpack_from(r, off + _PD_LAST)[0] != j:
                raise InflightError(f"entry {e}: last is not the chain's last entry", _CLAUSE)
            bid = descs[-1][2]
            if bid in self._by_id:
                raise InflightError(f"Buffer ID {bid} recorded in flight twice", _CLAUSE)
            self._by_id[bid] = e
            chains.append((counter, e, descs))
            top = max(top, counter)
        chains.sort(key=lambda c: c[0])
        self._counter = top + 1
        return [(e, descs) for _, e, descs in chains]

    def fetch(self, descs: Sequence[RawDesc]) -> None:
        """Record a chain just taken from the ring: its descriptors, in ring order."""
        r = self._r
        n = self.desc_num
        head = _U16.unpack_from(r, _P_OLD_FREE_HEAD)[0]
        if head != self._free_head or head >= n:
            raise InflightError(f"free list head {head} is not usable", _CLAUSE)
        hoff = self._entry(head)
        _U16.pack_into(r, hoff + _PD_NUM, 0)
        _U64.pack_into(r, hoff + _PD_COUNTER, self._counter)
        self._counter += 1
        _U8.pack_into(r, hoff + _PD_INFLIGHT, 1)
        f = head
        last = head
        for addr, length, bid, flags in descs:
            if f >= n:
                raise InflightError("the inflight free list ran out of entries", _CLAUSE)
            off = self._entry(f)
            _PD_DESC.pack_into(r, off + _PD_ID, bid, flags, length, addr)
            last = f
            f = _U16.unpack_from(r, off + _PD_NEXT)[0]
        _U16.pack_into(r, hoff + _PD_LAST, last)
        _U16.pack_into(r, hoff + _PD_NUM, len(descs))
        _U16.pack_into(r, _P_FREE_HEAD, f)
        _U16.pack_into(r, _P_OLD_FREE_HEAD, f)
        self._free_head = f
        self._by_id[descs[-1][2]] = head

    def complete_begin(self, ids: Sequence[int], used_idx: int, used_wrap: bool) -> list[int]:
        """Before the batch's used descriptors are written: free the chains' entries and
        record the used position after the batch. Returns the head entries."""
        r = self._r
        heads: list[int] = []
        free = self._free_head
        for bid in ids:
            e = self._by_id.pop(bid, None)
            if e is None:
                continue
            last = _U16.unpack_from(r, self._entry(e) + _PD_LAST)[0]
            if last < self.desc_num:
                _U16.pack_into(r, self._entry(last) + _PD_NEXT, free)
                free = e
            heads.append(e)
        self._free_head = free
        _U16.pack_into(r, _P_FREE_HEAD, free)
        _U16.pack_into(r, _P_USED_IDX, used_idx)
        _U8.pack_into(r, _P_USED_WRAP, int(used_wrap))
        self._used_idx = used_idx
        self._used_wrap = used_wrap
        return heads

    def complete_end(self, heads: Sequence[int]) -> None:
        """After the used descriptors were written: clear ``inflight``, commit."""
        r = self._r
        for e in heads:
            _U8.pack_into(r, self._entry(e) + _PD_INFLIGHT, 0)
        _U16.pack_into(r, _P_OLD_FREE_HEAD, self._free_head)
        _U16.pack_into(r, _P_OLD_USED_IDX, self._used_idx)
        _U8.pack_into(r, _P_OLD_USED_WRAP, int(self._used_wrap))

    def is_inflight(self, bid: int) -> bool:
        """True if Buffer ID ``bid`` is recorded in flight (diagnostics and tests)."""
        e = self._by_id.get(bid)
        return e is not None and self._r[self._entry(e) + _PD_INFLIGHT] == 1

    def release(self) -> None:
        """Drop the reference to the shared region."""
        self._r = memoryview(bytearray(len(self._r)))


# ---------------------------------------------------------------------------
# Rebuilding resubmitted chains (validated like the rings validate them)
# ---------------------------------------------------------------------------


def _segment(
    mem: GuestMemory, addr: int, length: int, flags: int, out: tuple[list[Segment], list[Segment]]
) -> None:
    readable, writable = out
    if flags & _F_WRITE:
        if length:
            if not mem.contains(addr, length):
                raise DriverError(f"buffer {addr:#x}+{length:#x} is not in guest RAM", _C_DESC)
            writable.append((addr, length))
        return
    if writable and length:
        raise DriverError(
            "a device-readable descriptor follows a device-writable one: the driver MUST "
            "place any device-writable descriptor elements after any device-readable ones",
            _C_FRAMING,
        )
    if length:
        if not mem.contains(addr, length):
            raise DriverError(f"buffer {addr:#x}+{length:#x} is not in guest RAM", _C_DESC)
        readable.append((addr, length))


def _table(mem: GuestMemory, addr: int, length: int, clause: str) -> bytes:
    if length == 0 or length % 16 or length // 16 > MAX_INDIRECT_ENTRIES:
        raise DriverError(f"indirect table of {length} bytes", clause)
    try:
        return mem.read(addr, length)
    except GuestMemoryError:
        raise DriverError(
            f"indirect table {addr:#x}+{length:#x} is not in guest RAM", clause
        ) from None


def packed_chain(mem: GuestMemory, descs: Sequence[RawDesc], *, indirect: bool) -> DescriptorChain:
    """Rebuild a packed-ring chain from the descriptors recorded at fetch time.

    Raises :class:`~pyvirtio.errors.DriverError` for a chain the ring would refuse.
    """
    if not descs:
        raise DriverError("empty descriptor list", _C_PACKED_INDIRECT)
    out: tuple[list[Segment], list[Segment]] = ([], [])
    total = 0
    for k, (addr, length, _bid, flags) in enumerate(descs):
        if flags & _F_INDIRECT:
            if not indirect or len(descs) != 1 or k:
                raise DriverError("indirect descriptor not allowed here", _C_PACKED_INDIRECT)
            t = _table(mem, addr, length, _C_PACKED_INDIRECT)
            for a, ln, _i, fl in PVIRTQ_DESC.struct.iter_unpack(t):
                if fl & _F_INDIRECT:
                    raise DriverError(
                        "indirect descriptor inside an indirect table", _C_PACKED_INDIRECT
                    )
                _segment(mem, a, ln, fl, out)
                total += ln
            continue
        _segment(mem, addr, length, flags, out)
        total += length
    if total > _MAX_CHAIN_BYTES:
        raise DriverError("chain longer than 2^32 bytes", _C_DESC)
    return DescriptorChain(descs[-1][2], out[0], out[1], len(descs))
