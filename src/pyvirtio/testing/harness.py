"""Drive a device model by hand: a fake host, queues in test memory, raw chains.

:class:`DeviceHarness` puts a device on rings in a private guest RAM with no
transport in between: it negotiates the ring features asked for, activates the
device with :class:`FakeHost` as its host and hands out the driver side of each
queue, either a real driver queue (:meth:`DeviceHarness.add`, for well-formed
requests laid out any way the test likes) or a raw ring the test writes descriptor by
descriptor (:class:`RawSplitRing`, :class:`RawPackedRing`: for malformed chains a
real driver would never build). Every device entry goes through the device's own
entry points (:meth:`~pyvirtio.core.device.VirtioDevice.queue_notified`,
:meth:`~pyvirtio.core.device.VirtioDevice.host_event`), so the failure path and the
used-element batching are the ones transports get.

This is the device author's counterpart of vm-virtio's ``MockSplitQueue``::

    h = DeviceHarness(MyDevice(), packed=True)
    h.add(0, [b"request"], [64], token="r1")
    h.kick(0)
    assert h.used(0) == [("r1", 7)]
"""

from __future__ import annotations

import select
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pyvirtio.core.device import VirtioDevice
from pyvirtio.errors import VirtioError
from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.features import Feature
from pyvirtio.spec.ring import (
    PVIRTQ_DESC,
    PVIRTQ_EVENT_SUPPRESS,
    VIRTQ_DESC,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_USED,
    VIRTQ_USED_ELEM,
    split_avail_size,
    split_desc_table_size,
    split_used_size,
)
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.virtqueue import make_device_queue, make_driver_queue
from pyvirtio.virtqueue.common import (
    DeviceVirtqueue,
    DriverVirtqueue,
    QueueAddresses,
    Segment,
)

__all__ = ["DeviceHarness", "FakeHost", "RawPackedRing", "RawSplitRing", "place_buffers"]


def place_buffers(
    mem: GuestMemory,
    alloc: GuestAllocator,
    queue: DriverVirtqueue[Any],
    readable: Sequence[bytes | Segment],
    writable: Sequence[int | Segment],
    token: Any = None,
    fill: int = 0xEE,
    guard: int = 0,
) -> tuple[list[Segment], list[int]]:
    """Make one buffer available on driver ``queue`` (not notified): each readable
    part is bytes (copied into a fresh buffer) or a segment, each writable part a size
    (a fresh buffer filled with ``fill``, followed by ``guard`` more bytes of it that
    belong to no buffer: a device writing there wrote past the buffer) or a segment.
    Returns the writable segments and the addresses allocated (for the caller to
    free)."""
    allocated: list[int] = []
    out: list[Segment] = []
    for r in readable:
        if isinstance(r, bytes):
            a = alloc.alloc(max(1, len(r)), 16)
            mem.write(a, r)
            allocated.append(a)
            out.append((a, len(r)))
        else:
            out.append(r)
    in_: list[Segment] = []
    for w in writable:
        if isinstance(w, int):
            a = alloc.alloc(max(1, w) + guard, 16)
            mem.fill(a, max(1, w) + guard, fill)
            allocated.append(a)
            in_.append((a, w))
        else:
            in_.append(w)
    queue.add(out, in_, token)
    return in_, allocated


@dataclass
class FakeHost:
    """A :class:`~pyvirtio.core.device.DeviceHost` that records what the device did.

    ``used`` lists the queue of every used buffer notification, ``config`` counts
    configuration change notifications, ``resets`` holds each DEVICE_NEEDS_RESET
    reason; :attr:`status` reads like the device status a transport would show.
    """

    used: list[int] = field(default_factory=list)
    config: int = 0
    resets: list[VirtioError] = field(default_factory=list)

    def notify_used(self, queue_index: int) -> None:
        """Record a used buffer notification."""
        self.used.append(queue_index)

    def notify_config(self) -> None:
        """Record a configuration change notification."""
        self.config += 1

    def needs_reset(self, reason: VirtioError) -> None:
        """Record DEVICE_NEEDS_RESET and the configuration change it comes with."""
        self.resets.append(reason)
        self.config += 1

    @property
    def status(self) -> int:
        """DEVICE_NEEDS_RESET once the device asked for a reset, else 0."""
        return int(DeviceStatus.DEVICE_NEEDS_RESET) if self.resets else 0


class RawSplitRing:
    """The driver side of a split ring written by hand (virtio-v1.2 §2.7).

    :meth:`desc` writes any descriptor (any flags, any ``next``), :meth:`table` an
    indirect table, :meth:`offer` puts heads into the Available Ring and publishes
    ``idx``; the ``set_*`` methods write the Available Ring's other fields as a
    hostile driver may; :meth:`used` reads the used elements published since the last
    call. The areas come from ``alloc``, or are the given ``addrs``.
    """

    def __init__(
        self,
        mem: GuestMemory,
        alloc: GuestAllocator | None,
        size: int,
        *,
        addrs: QueueAddresses | None = None,
    ) -> None:
        self.mem = mem
        self.size = size
        if addrs is None:
            if alloc is None:
                raise ValueError("give an allocator or the ring's addresses")
            addrs = QueueAddresses(
                alloc.alloc(split_desc_table_size(size), 16),
                alloc.alloc(split_avail_size(size), 2),
                alloc.alloc(split_used_size(size), 4),
            )
        for addr, n in (
            (addrs.desc, split_desc_table_size(size)),
            (addrs.driver, split_avail_size(size)),
            (addrs.device, split_used_size(size)),
        ):
            mem.fill(addr, n)
        self.addrs = addrs
        self.idx = 0
        self._seen = 0

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        """Write descriptor ``i`` of the table (``struct virtq_desc``)."""
        self.mem.write(self.addrs.desc + 16 * i, VIRTQ_DESC.pack_values(addr, length, flags, nxt))

    def table(self, at: int, entries: Sequence[tuple[int, int, int, int]]) -> int:
        """Write an indirect table of ``(addr, len, flags, next)`` at ``at``; returns
        its length in bytes."""
        for j, e in enumerate(entries):
            self.mem.write(at + 16 * j, VIRTQ_DESC.pack_values(*e))
        return 16 * len(entries)

    def offer(self, *heads: int) -> None:
        """Append ``heads`` to the Available Ring and publish the new ``idx``."""
        for h in heads:
            self.mem.write_le16(self.addrs.driver + 4 + 2 * (self.idx % self.size), h)
            self.idx = (self.idx + 1) & 0xFFFF
        self.mem.write_le16(self.addrs.driver + 2, self.idx)

    def set_avail_idx(self, idx: int) -> None:
        """Write the Available Ring's ``idx`` (any value)."""
        self.mem.write_le16(self.addrs.driver + 2, idx)

    def set_avail_flags(self, flags: int) -> None:
        """Write the Available Ring's ``flags``."""
        self.mem.write_le16(self.addrs.driver, flags)

    def set_used_event(self, value: int) -> None:
        """Write ``used_event`` (VIRTIO_F_EVENT_IDX)."""
        self.mem.write_le16(self.addrs.driver + 4 + 2 * self.size, value)

    @property
    def used_idx(self) -> int:
        """The Used Ring's ``idx`` as the device left it."""
        return self.mem.read_le16(self.addrs.device + 2)

    @property
    def used_flags(self) -> int:
        """The Used Ring's ``flags``."""
        return self.mem.read_le16(self.addrs.device)

    @property
    def avail_event(self) -> int:
        """``avail_event`` (VIRTIO_F_EVENT_IDX) as the device left it."""
        return self.mem.read_le16(self.addrs.device + 4 + 8 * self.size)

    def used_elem(self, i: int) -> tuple[int, int]:
        """``(id, len)`` of used element ``i`` (modulo the ring size)."""
        raw = self.mem.read(self.addrs.device + 4 + 8 * (i % self.size), 8)
        e = VIRTQ_USED_ELEM.unpack(raw)
        return e.id, e.len

    def used(self) -> list[tuple[int, int]]:
        """``(id, len)`` of each used element published since the last call."""
        end = self.used_idx
        out = []
        while self._seen != end:
            out.append(self.used_elem(self._seen))
            self._seen = (self._seen + 1) & 0xFFFF
        return out


class RawPackedRing:
    """The driver side of a packed ring written by hand (virtio-v1.2 §2.8).

    :meth:`put` writes the next descriptor with any flags and Buffer ID (AVAIL/USED
    set for the driver's wrap counter); :meth:`used` reads the used descriptors the
    device wrote since the last call.
    """

    def __init__(self, mem: GuestMemory, alloc: GuestAllocator, size: int) -> None:
        self.mem = mem
        self.size = size
        desc = alloc.alloc(16 * size, 16)
        driver = alloc.alloc(4, 4)
        device = alloc.alloc(4, 4)
        mem.fill(desc, 16 * size)
        mem.fill(driver, 4)
        mem.fill(device, 4)
        self.addrs = QueueAddresses(desc, driver, device)
        #: guest addresses of the three areas
        self.desc, self.driver, self.device = desc, driver, device
        self.pos = 0
        self.wrap = True
        self._used_pos = 0
        self._used_wrap = True

    def avail_bits(self) -> int:
        """AVAIL/USED flag bits that make a descriptor available on this lap."""
        return int(VIRTQ_DESC_F_AVAIL) if self.wrap else int(VIRTQ_DESC_F_USED)

    def put(self, addr: int, length: int, bid: int, flags: int = 0) -> int:
        """Write one available descriptor at the next position; returns the position."""
        pos = self.pos
        bits = self.avail_bits()
        self.mem.write(
            self.desc_addr(pos), PVIRTQ_DESC.pack_values(addr, length, bid, flags | bits)
        )
        self.pos += 1
        if self.pos == self.size:
            self.pos = 0
            self.wrap = not self.wrap
        return pos

    def desc_addr(self, pos: int) -> int:
        """Guest address of descriptor ``pos``."""
        return self.addrs.desc + 16 * pos

    def read(self, pos: int) -> tuple[int, int, int, int]:
        """``(addr, len, id, flags)`` of descriptor ``pos`` as it is now."""
        d = PVIRTQ_DESC.unpack(self.mem.read(self.desc_addr(pos), 16))
        return (d.addr, d.len, d.id, d.flags)

    def set_driver_event(self, flags: int, off: int = 0, wrap: bool = True) -> None:
        """Write the Driver Event Suppression structure (virtio-v1.2 §2.8.10)."""
        self.mem.write(self.driver, PVIRTQ_EVENT_SUPPRESS.pack_values(off | (wrap << 15), flags))

    def device_event(self) -> tuple[int, int]:
        """``(desc, flags)`` of the Device Event Suppression structure."""
        e = PVIRTQ_EVENT_SUPPRESS.unpack(self.mem.read(self.device, 4))
        return (e.desc, e.flags)

    def used(self, ndescs: Sequence[int] | None = None) -> list[tuple[int, int]]:
        """``(id, len)`` of each used descriptor written since the last call.

        The device skips as many ring slots as the chain had descriptors: pass each
        used chain's descriptor count in ``ndescs`` (default: one each).
        """
        out: list[tuple[int, int]] = []
        k = 0
        both = int(VIRTQ_DESC_F_AVAIL) | int(VIRTQ_DESC_F_USED)
        while True:
            d = PVIRTQ_DESC.unpack(self.mem.read(self.desc_addr(self._used_pos), 16))
            want = both if self._used_wrap else 0
            if d.flags & both != want:
                return out
            out.append((d.id, d.len))
            step = 1 if ndescs is None or k >= len(ndescs) else ndescs[k]
            k += 1
            self._used_pos += step
            if self._used_pos >= self.size:
                self._used_pos -= self.size
                self._used_wrap = not self._used_wrap


class DeviceHarness:
    """``device`` on rings in a private guest RAM, driven by hand (see the module docs).

    ``packed``, ``indirect``, ``event_idx`` and ``in_order`` choose the ring features
    negotiated (VIRTIO_F_VERSION_1 always); ``features`` adds device-specific bits
    (each must be offered). ``raw=True`` gives raw rings (:attr:`raw`) instead of
    driver queues (:attr:`queues`). The harness owns the memory: :meth:`close`.
    """

    def __init__(
        self,
        device: VirtioDevice,
        *,
        packed: bool = False,
        indirect: bool = True,
        event_idx: bool = True,
        in_order: bool = False,
        features: int = 0,
        queue_size: int = 16,
        mem_size: int = 4 << 20,
        raw: bool = False,
    ) -> None:
        self.device = device
        self.mem = GuestMemory.create(mem_size, name="pyvirtio-harness")
        self.alloc = GuestAllocator(0x1000, mem_size - 0x1000)
        f = Feature.VERSION_1.mask | features
        for on, bit in (
            (packed, Feature.RING_PACKED),
            (indirect, Feature.INDIRECT_DESC),
            (event_idx, Feature.EVENT_IDX),
            (in_order, Feature.IN_ORDER),
        ):
            if on:
                f |= bit.mask
        missing = f & ~device.device_features()
        if missing:
            self.mem.close()
            raise ValueError(f"the device does not offer feature bits {missing:#x}")
        self.features = f
        self.queues: list[DriverVirtqueue[Any]] = []
        self.raw: list[RawSplitRing | RawPackedRing] = []
        dev_queues: list[DeviceVirtqueue | None] = []
        for i in range(device.num_queues):
            size = min(queue_size, device.queue_max_size)
            if raw:
                ring: RawSplitRing | RawPackedRing = (
                    RawPackedRing(self.mem, self.alloc, size)
                    if packed
                    else RawSplitRing(self.mem, self.alloc, size)
                )
                self.raw.append(ring)
                addrs = ring.addrs
            else:
                drvq = make_driver_queue(self.mem, self.alloc, size, f)
                self.queues.append(drvq)
                addrs = drvq.addrs
            dev_queues.append(make_device_queue(self.mem, size, addrs, f, index=i))
        self.host = FakeHost()
        device.host = self.host
        if not device.validate_features(f):
            raise ValueError("the device refused the features")
        device.features = f
        device.guarded("activate", device.activate, f, dev_queues)

    # -- buffers -----------------------------------------------------------------------

    def buf(self, n: int, fill: int = 0xEE) -> int:
        """A buffer of ``n`` bytes (filled with ``fill``, 64 more bytes of guard after)."""
        addr = self.alloc.alloc(max(1, n) + 64, 16)
        self.mem.fill(addr, max(1, n) + 64, fill)
        return addr

    def put(self, data: bytes) -> int:
        """A buffer holding ``data``."""
        addr = self.buf(len(data))
        self.mem.write(addr, data)
        return addr

    def add(
        self,
        queue: int,
        readable: Sequence[bytes | Segment],
        writable: Sequence[int | Segment],
        token: Any = None,
    ) -> list[Segment]:
        """Make one buffer available on driver queue ``queue`` (not notified yet):
        each readable part is bytes (copied in) or a segment, each writable part a
        size (followed by 64 guard bytes of 0xEE) or a segment. Returns the writable
        segments."""
        in_, _ = place_buffers(
            self.mem, self.alloc, self.queues[queue], readable, writable, token, guard=64
        )
        return in_

    def kick(self, queue: int) -> None:
        """Publish what was added and send the available buffer notification (even
        if the device suppressed it: a harness may always poke the device)."""
        if self.queues:
            self.queues[queue].kick_prepare()
        self.device.queue_notified(queue)

    def used(self, queue: int) -> list[tuple[Any, int]]:
        """Every used buffer of driver queue ``queue`` now: ``(token, written)``."""
        out = []
        q = self.queues[queue]
        while (u := q.get_used()) is not None:
            out.append(u)
        return out

    def poll(self, timeout: float = 0.0) -> int:
        """Serve the device's host event sources once, as a transport's loop would:
        wait up to ``timeout`` seconds for one of its descriptors, call back the
        ready ones, run due timers. Returns how many callbacks ran."""
        readers = self.device.events.readers()
        wait = self.device.events.timeout(default=timeout)
        ready, _, _ = select.select(list(readers), [], [], wait) if readers else ([], [], [])
        if not readers and wait:
            time.sleep(wait)
        for fd in ready:
            self.device.host_event(fd)
        return len(ready) + self.device.run_timers()

    def read(self, seg: Segment) -> bytes:
        """The bytes of ``seg``."""
        return self.mem.read(seg[0], seg[1])

    @property
    def needs_reset(self) -> bool:
        """True once the device asked for DEVICE_NEEDS_RESET."""
        return bool(self.host.resets)

    def close(self) -> None:
        """Reset the device and release the memory."""
        self.device.guarded("reset", self.device.reset)
        if self.device.host is self.host:
            self.device.host = None
        for q in self.queues:
            q.close()
        self.mem.close()

    def __enter__(self) -> DeviceHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
