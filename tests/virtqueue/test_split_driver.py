"""Driver side of the split virtqueue (virtio-v1.2 §2.7): ring layout, descriptors it
writes, notification suppression, and a hand-made malicious device for the checks."""

from __future__ import annotations

import itertools

import pytest

from pyvirtio.errors import ConfigurationError, DeviceError, QueueBrokenError, QueueFullError
from pyvirtio.memory import GuestAllocator, GuestMemory
from pyvirtio.spec.ring import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC,
    VIRTQ_USED_ELEM,
    VIRTQ_USED_F_NO_NOTIFY,
    VirtqDesc,
)
from pyvirtio.virtqueue.common import RingFeatures
from pyvirtio.virtqueue.split import SplitDeviceQueue, SplitDriverQueue
from tests.virtqueue.helpers import ALLOC_BASE, INDIRECT, NEXT, WRITE

BASE = ALLOC_BASE


def make(
    mem: GuestMemory, alloc: GuestAllocator, size: int = 8, **kw: bool
) -> SplitDriverQueue[str]:
    return SplitDriverQueue(mem, alloc, size, RingFeatures(**kw))


class EvilDevice:
    """Writes the used ring by hand."""

    def __init__(self, q: SplitDriverQueue[str]) -> None:
        self.q = q
        self.mem = q.mem
        self.idx = 0

    def desc(self, i: int) -> VirtqDesc:
        return VIRTQ_DESC.unpack(self.mem.read(self.q.addrs.desc + 16 * i, 16))

    def avail_ring(self, i: int) -> int:
        return self.mem.read_le16(self.q.addrs.driver + 4 + 2 * (i % self.q.size))

    @property
    def avail_idx(self) -> int:
        return self.mem.read_le16(self.q.addrs.driver + 2)

    @property
    def avail_flags(self) -> int:
        return self.mem.read_le16(self.q.addrs.driver)

    @property
    def used_event(self) -> int:
        return self.mem.read_le16(self.q.addrs.driver + 4 + 2 * self.q.size)

    def set_used_flags(self, v: int) -> None:
        self.mem.write_le16(self.q.addrs.device, v)

    def set_avail_event(self, v: int) -> None:
        self.mem.write_le16(self.q.addrs.device + 4 + 8 * self.q.size, v)

    def used(self, id_: int, ln: int, advance: int = 1) -> None:
        off = self.q.addrs.device + 4 + 8 * (self.idx % self.q.size)
        self.mem.write(off, VIRTQ_USED_ELEM.pack_values(id_, ln))
        self.idx = (self.idx + advance) & 0xFFFF
        self.mem.write_le16(self.q.addrs.device + 2, self.idx)


def expect_broken(q: SplitDriverQueue[str], match: str) -> DeviceError:
    with pytest.raises(DeviceError, match=match) as ei:
        q.get_used()
    assert q.broken and q.broken_reason is ei.value
    with pytest.raises(QueueBrokenError):
        q.get_used()
    with pytest.raises(QueueBrokenError):
        q.add([(0x8000, 1)], [], "x")
    with pytest.raises(QueueBrokenError):
        q.kick_prepare()
    return ei.value


# -- layout ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 3, 100, 65536])
def test_driver_rejects_bad_queue_size(mem: GuestMemory, alloc: GuestAllocator, size: int) -> None:
    with pytest.raises(ConfigurationError):
        make(mem, alloc, size)


@pytest.mark.parametrize("size", [1, 2, 8, 256, 32768])
def test_areas_are_aligned_zeroed_and_disjoint(size: int) -> None:
    with GuestMemory.create(4 << 20) as m:
        a = GuestAllocator(BASE, (4 << 20) - BASE)
        m.fill(0, 4 << 20, 0xAA)
        q: SplitDriverQueue[int] = SplitDriverQueue(m, a, size)
        d, av, u = q.addrs.desc, q.addrs.driver, q.addrs.device
        assert d % 16 == 0 and av % 2 == 0 and u % 4 == 0
        spans = sorted([(d, 16 * size), (av, 6 + 2 * size), (u, 6 + 8 * size)])
        for (s1, n1), (s2, _) in itertools.pairwise(spans):
            assert s1 + n1 <= s2
        for s, n in spans:
            assert m.read(s, n) == bytes(n)  # "initialize flags in the used ring to 0"
        assert q.num_free == size
        before = a.free_bytes
        q.close()
        q.close()  # idempotent
        assert a.free_bytes > before and a.free_bytes == (4 << 20) - BASE


def test_legacy_ring_size_follows_spec_formula() -> None:
    # ALIGN(16*256 + 2*(3+256)) + ALIGN(2*3 + 8*256) with 4096 alignment
    assert SplitDriverQueue.legacy_ring_size(256, 4096) == 8192 + 4096
    assert SplitDriverQueue.legacy_ring_size(128, 4096) == 4096 + 4096
    assert SplitDriverQueue.legacy_ring_size(1024, 4096) == 20480 + 12288
    assert SplitDriverQueue.legacy_ring_size(4, 64) == 128 + 64


@pytest.mark.parametrize("size", [4, 128, 256])
def test_legacy_layout_is_one_contiguous_block(
    mem: GuestMemory, alloc: GuestAllocator, size: int
) -> None:
    """Legacy interface: desc table, avail ring, padding, used ring at Queue Align."""
    alloc.alloc(100, 16)  # push the next allocation off a page boundary
    lq: SplitDriverQueue[str] = SplitDriverQueue(mem, alloc, size, legacy_align=4096)
    a = lq.addrs
    assert a.desc % 4096 == 0
    assert a.driver == a.desc + 16 * size
    assert a.device % 4096 == 0
    assert a.device == (a.driver + 6 + 2 * size + 4095) // 4096 * 4096
    # the whole block is reserved: later allocations land outside it
    total = SplitDriverQueue.legacy_ring_size(size, 4096)
    for _ in range(8):
        nxt = alloc.alloc(512, 16)
        assert nxt + 512 <= a.desc or nxt >= a.desc + total
    # a device locating the parts with the legacy formula works
    dev = SplitDeviceQueue(mem, size, a)
    lq.add([(0x80000, 4)], [], "t")
    c = dev.pop()
    assert c is not None and c.readable == [(0x80000, 4)]


# -- add ---------------------------------------------------------------------------------


def test_add_writes_direct_chain(mem: GuestMemory, alloc: GuestAllocator) -> None:
    q = make(mem, alloc)
    ev = EvilDevice(q)
    q.add([(0x8000, 10), (0x9000, 20)], [(0xA000, 30)], "a")
    assert q.num_free == 5
    assert ev.avail_idx == 1  # published by add
    head = ev.avail_ring(0)
    d0 = ev.desc(head)
    assert (d0.addr, d0.len, d0.flags) == (0x8000, 10, NEXT)
    d1 = ev.desc(d0.next)
    assert (d1.addr, d1.len, d1.flags) == (0x9000, 20, NEXT)
    d2 = ev.desc(d1.next)
    assert (d2.addr, d2.len, d2.flags) == (0xA000, 30, WRITE)


def test_add_uses_indirect_table(mem: GuestMemory, alloc: GuestAllocator) -> None:
    before = alloc.free_bytes
    q = make(mem, alloc, indirect=True)
    ev = EvilDevice(q)
    q.add([(0x8000, 10)], [(0xA000, 30), (0xB000, 4)], "a")
    assert q.num_free == 7
    d = ev.desc(ev.avail_ring(0))
    assert d.flags == INDIRECT and d.len == 48
    entries = [VIRTQ_DESC.unpack(mem.read(d.addr + 16 * j, 16)) for j in range(3)]
    assert [(e.addr, e.len, e.flags, e.next) for e in entries] == [
        (0x8000, 10, NEXT, 1),
        (0xA000, 30, WRITE | NEXT, 2),
        (0xB000, 4, WRITE, 0),
    ]
    q.add([(0x8000, 10)], [], "single")  # one segment: direct
    assert ev.desc(ev.avail_ring(1)).flags == 0
    ev.used(ev.avail_ring(0), 34)
    assert q.get_used() == ("a", 34)
    ev.used(ev.avail_ring(1), 0)
    assert q.get_used() == ("single", 0)
    # the reaped table is reused by the next buffer of the same shape
    q.add([(0x8000, 1)], [(0xA000, 2), (0xB000, 3)], "again")
    assert ev.desc(ev.avail_ring(2)).addr == d.addr
    q.close()
    assert alloc.free_bytes == before  # rings and tables all went back


def test_add_rejects_empty_buffer(mem: GuestMemory, alloc: GuestAllocator) -> None:
    q = make(mem, alloc)
    with pytest.raises(ValueError):
        q.add([], [], "x")


def test_driver_does_not_create_chain_longer_than_queue_size(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    """A driver MUST NOT create a descriptor chain longer than the Queue Size."""
    q = make(mem, alloc, 4, indirect=True)
    with pytest.raises(ValueError, match="Queue Size"):
        q.add([(0x8000, 1)] * 5, [], "x")


def test_driver_does_not_add_chain_longer_than_2_32_bytes(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    q = make(mem, alloc)
    with pytest.raises(ValueError, match="2\\^32"):
        q.add([(0x8000, 0xFFFF_FFFF)], [(0x8000, 2)], "x")
    with pytest.raises(ValueError):
        q.add([(0x8000, 1 << 32)], [], "x")
    q.add([(0x8000, 0xFFFF_FFFF)], [(0x8000, 1)], "ok")  # exactly 2^32


def test_queue_full(mem: GuestMemory, alloc: GuestAllocator) -> None:
    q = make(mem, alloc, 4)
    q.add([(0x8000, 1)] * 3, [], "a")
    with pytest.raises(QueueFullError):
        q.add([(0x8000, 1)], [(0x9000, 1)], "b")
    q.add([(0x8000, 1)], [], "c")
    assert q.num_free == 0
    with pytest.raises(QueueFullError):
        q.add([(0x8000, 1)], [], "d")
    assert not q.broken


def test_free_list_reuse_over_many_rounds(mem: GuestMemory, alloc: GuestAllocator) -> None:
    q = make(mem, alloc, 8)
    dev = SplitDeviceQueue(mem, 8, q.addrs)
    for rnd in range(40):
        n = 1 + rnd % 3
        tokens = [f"{rnd}-{k}" for k in range(8 // n)]
        for t in tokens:
            q.add([(0x8000, 1)] * (n - 1), [(0x9000, 4)], t)
        assert q.num_free == 8 - n * len(tokens)
        popped = []
        while (c := dev.pop()) is not None:
            popped.append(c)
        for c in reversed(popped):  # completes out of order
            dev.push(c, 4)
        dev.flush()
        got = []
        while (u := q.get_used()) is not None:
            got.append(u)
        assert sorted(got) == sorted((t, 4) for t in tokens)
        assert q.num_free == 8


def test_in_order_uses_descriptors_in_ring_order(mem: GuestMemory, alloc: GuestAllocator) -> None:
    """With VIRTIO_F_IN_ORDER the driver uses descriptors starting from 0 and wrapping,
    and sets next to x + 1 (0 for the last descriptor of the table)."""
    q = make(mem, alloc, 4, in_order=True)
    ev = EvilDevice(q)
    q.add([(0x8000, 1)], [(0x9000, 1)], "a")  # descs 0,1
    q.add([(0x8000, 1)], [], "b")  # desc 2
    assert [ev.avail_ring(i) for i in range(2)] == [0, 2]
    assert ev.desc(0).next == 1
    ev.used(0, 1)
    assert q.get_used() == ("a", 1)
    q.add([(0x8000, 1)], [(0x9000, 1), (0x9000, 2)], "c")  # descs 3,0,1
    assert ev.avail_ring(2) == 3
    assert ev.desc(3).next == 0 and ev.desc(0).next == 1 and ev.desc(1).flags == WRITE


# -- kick_prepare ------------------------------------------------------------------------


def test_kick_prepare_honours_no_notify(mem: GuestMemory, alloc: GuestAllocator) -> None:
    q = make(mem, alloc)
    ev = EvilDevice(q)
    assert q.kick_prepare() is False  # nothing added
    q.add([(0x8000, 1)], [], "a")
    assert q.kick_prepare() is True
    ev.set_used_flags(VIRTQ_USED_F_NO_NOTIFY)
    q.add([(0x8000, 1)], [], "b")
    assert q.kick_prepare() is False


def test_kick_prepare_with_event_idx(mem: GuestMemory, alloc: GuestAllocator) -> None:
    """Driver MUST notify if the idx that determined where a descriptor index was placed
    equals avail_event; the lower bit of flags MUST be ignored."""
    q = make(mem, alloc, event_idx=True)
    ev = EvilDevice(q)
    ev.set_used_flags(VIRTQ_USED_F_NO_NOTIFY)
    ev.set_avail_event(0)
    q.add([(0x8000, 1)], [], "a")  # placed at index 0 == avail_event
    assert q.kick_prepare() is True
    q.add([(0x8000, 1)], [], "b")  # index 1; avail_event still 0
    assert q.kick_prepare() is False
    ev.set_avail_event(3)
    q.add([(0x8000, 1)], [], "c")  # 2
    q.add([(0x8000, 1)], [], "d")  # 3 == avail_event
    q.add([(0x8000, 1)], [], "e")  # 4
    assert q.kick_prepare() is True


# -- interrupts --------------------------------------------------------------------------


def test_interrupt_suppression_flags(mem: GuestMemory, alloc: GuestAllocator) -> None:
    q = make(mem, alloc)
    ev = EvilDevice(q)
    q.disable_interrupts()
    assert ev.avail_flags == VIRTQ_AVAIL_F_NO_INTERRUPT
    assert q.enable_interrupts() is False
    assert ev.avail_flags == 0
    q.add([], [(0x9000, 4)], "a")
    ev.used(ev.avail_ring(0), 4)
    q.disable_interrupts()
    assert q.enable_interrupts() is True  # pending


def test_interrupt_suppression_event_idx(mem: GuestMemory, alloc: GuestAllocator) -> None:
    q = make(mem, alloc, event_idx=True)
    ev = EvilDevice(q)
    q.disable_interrupts()
    assert ev.avail_flags == 0  # driver MUST set flags to 0 with event idx
    assert ev.used_event == 0xFFFF
    assert q.enable_interrupts() is False
    assert ev.used_event == 0
    q.add([], [(0x9000, 4)], "a")
    q.add([], [(0x9000, 4)], "b")
    ev.used(ev.avail_ring(0), 4)
    assert q.get_used() == ("a", 4)
    assert ev.used_event == 1  # kept at the next used index while enabled
    q.disable_interrupts()
    ev.used(ev.avail_ring(1), 4)
    assert q.get_used() == ("b", 4)
    assert ev.used_event == 0  # left behind while disabled


# -- malicious device --------------------------------------------------------------------


def test_driver_rejects_used_id_out_of_range(mem: GuestMemory, alloc: GuestAllocator) -> None:
    q = make(mem, alloc)
    q.add([(0x8000, 1)], [], "a")
    EvilDevice(q).used(8, 0)
    err = expect_broken(q, "not the head")
    assert err.clause is not None and "§2.7.8" in err.clause


def test_driver_rejects_used_id_not_in_flight(mem: GuestMemory, alloc: GuestAllocator) -> None:
    q = make(mem, alloc)
    q.add([(0x8000, 1)], [(0x9000, 1)], "a")
    ev = EvilDevice(q)
    head = ev.avail_ring(0)
    ev.used(ev.desc(head).next, 0)  # the second descriptor, not a head
    expect_broken(q, "not the head")


def test_driver_rejects_used_id_returned_twice(mem: GuestMemory, alloc: GuestAllocator) -> None:
    q = make(mem, alloc)
    q.add([(0x8000, 1)], [], "a")
    q.add([(0x8000, 1)], [], "b")
    ev = EvilDevice(q)
    head = ev.avail_ring(0)
    ev.used(head, 0)
    assert q.get_used() == ("a", 0)
    ev.used(head, 0)
    expect_broken(q, "not the head")


def test_driver_rejects_used_len_beyond_writable(mem: GuestMemory, alloc: GuestAllocator) -> None:
    """Used len is the bytes written into the device-writable part: it cannot exceed it."""
    q = make(mem, alloc)
    q.add([(0x8000, 100)], [(0x9000, 8)], "a")
    ev = EvilDevice(q)
    ev.used(ev.avail_ring(0), 9)
    err = expect_broken(q, "device-writable")
    assert err.clause is not None and "§2.7.8.2" in err.clause


def test_driver_rejects_used_idx_jump(mem: GuestMemory, alloc: GuestAllocator) -> None:
    q = make(mem, alloc)
    q.add([(0x8000, 1)], [], "a")
    ev = EvilDevice(q)
    ev.used(ev.avail_ring(0), 0, advance=2)
    expect_broken(q, "in flight")


def test_driver_rejects_in_order_batch_larger_than_used_idx_advance(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    q = make(mem, alloc, in_order=True)
    for t in "abc":
        q.add([], [(0x9000, 4)], t)
    ev = EvilDevice(q)
    ev.used(2, 4, advance=2)  # names the third buffer but advances by two
    err = expect_broken(q, "batch")
    assert err.clause is not None and "§2.7.9" in err.clause


def test_in_order_batch_completes_earlier_buffers_in_full(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    """Skipped buffers "are assumed to have been used ... by the device completely"."""
    q = make(mem, alloc, in_order=True)
    q.add([(0x8000, 1)], [(0x9000, 4)], "a")  # descs 0,1
    q.add([], [(0x9000, 6)], "b")  # desc 2
    q.add([], [(0x9000, 8)], "c")  # desc 3
    q.add([], [(0x9000, 9)], "d")  # desc 4
    ev = EvilDevice(q)
    ev.used(3, 5, advance=3)  # batch a, b, c closed by c with len 5
    assert q.enable_interrupts() is True
    assert q.get_used() == ("a", 4)
    assert q.get_used() == ("b", 6)
    assert q.get_used() == ("c", 5)
    assert q.get_used() is None
    assert q.num_free == 7
    ev.used(4, 1)
    assert q.get_used() == ("d", 1)
    assert q.num_free == 8


# -- reset -------------------------------------------------------------------------------


@pytest.mark.parametrize("in_order", [False, True])
def test_detach_unused_returns_in_flight_and_resets(
    mem: GuestMemory, alloc: GuestAllocator, in_order: bool
) -> None:
    q = make(mem, alloc, indirect=True, in_order=in_order)
    before = alloc.free_bytes
    q.add([(0x8000, 1)], [(0x9000, 4)], "a")
    q.add([(0x8000, 1)], [], "b")
    q.add([(0x8000, 1), (0x8001, 1)], [], "c")
    ev = EvilDevice(q)
    ev.used(ev.avail_ring(0), 4)
    assert q.get_used() == ("a", 4)
    assert q.detach_unused() == ["b", "c"]
    assert alloc.free_bytes == before
    assert q.num_free == 8
    assert ev.avail_idx == 0
    assert mem.read(q.addrs.device, 6 + 8 * 8) == bytes(6 + 8 * 8)
    # usable again with a fresh device
    dev = SplitDeviceQueue(mem, 8, q.addrs, RingFeatures(indirect=True, in_order=in_order))
    q.add([(0x8000, 2)], [], "d")
    c = dev.pop()
    assert c is not None and c.readable == [(0x8000, 2)]
    dev.push(c, 0)
    dev.flush()
    assert q.get_used() == ("d", 0)


def test_close_frees_indirect_tables(mem: GuestMemory, alloc: GuestAllocator) -> None:
    before = alloc.free_bytes
    q = make(mem, alloc, indirect=True)
    q.add([(0x8000, 1), (0x8001, 1)], [], "a")
    q.close()
    assert alloc.free_bytes == before


def test_detach_unused_works_on_a_broken_queue(mem: GuestMemory, alloc: GuestAllocator) -> None:
    q = make(mem, alloc, event_idx=True)
    q.disable_interrupts()
    q.add([(0x8000, 1)], [], "a")
    EvilDevice(q).used(7, 0)
    expect_broken(q, "not the head")
    assert q.detach_unused() == ["a"]
    assert q.broken  # a broken queue stays broken; the caller re-creates it


def test_closed_queue_refuses_use(mem: GuestMemory, alloc: GuestAllocator) -> None:
    q = make(mem, alloc)
    q.close()
    for call in (q.kick_prepare, q.get_used, q.enable_interrupts, q.disable_interrupts):
        with pytest.raises(ValueError, match="closed"):
            call()
    with pytest.raises(ValueError, match="closed"):
        q.add([(0x8000, 1)], [], "x")
