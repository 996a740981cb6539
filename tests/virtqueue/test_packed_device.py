"""Device side of the packed virtqueue (virtio-v1.2 §2.8), driven by our own driver
queue for the normal paths and by raw descriptor writes for a misbehaving driver."""

from __future__ import annotations

import pytest

from pyvirtio.errors import DriverError, QueueBrokenError
from pyvirtio.memory import GuestAllocator, GuestMemory
from pyvirtio.spec.ring import (
    PVIRTQ_DESC,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
)
from pyvirtio.testing import RawPackedRing
from pyvirtio.virtqueue.common import (
    MAX_INDIRECT_ENTRIES,
    DescriptorChain,
    QueueAddresses,
    RingFeatures,
)
from pyvirtio.virtqueue.packed import PackedDeviceQueue, PackedDriverQueue
from tests.virtqueue.helpers import (
    AVAIL,
    EVT,
    IND,
    INDIRECT,
    INORDER,
    MEM_SIZE,
    NEXT,
    NOFEAT,
    USED,
    WRITE,
)

#: the kit's hand-driven packed ring: descriptors written exactly as told
RawDriver = RawPackedRing


def raw_device(
    mem: GuestMemory, alloc: GuestAllocator, features: RingFeatures = NOFEAT
) -> tuple[RawDriver, PackedDeviceQueue]:
    """A hand-driven driver and the device queue on its 4-entry ring."""
    raw = RawDriver(mem, alloc, 4)
    return raw, PackedDeviceQueue(mem, 4, raw.addrs, features)


def make_pair(
    mem: GuestMemory, alloc: GuestAllocator, size: int = 8, features: RingFeatures = NOFEAT
) -> tuple[PackedDriverQueue[int], PackedDeviceQueue]:
    drv: PackedDriverQueue[int] = PackedDriverQueue(mem, alloc, size, features)
    dev = PackedDeviceQueue(mem, size, drv.addrs, features)
    return drv, dev


# ---------------------------------------------------------------------------
# normal operation
# ---------------------------------------------------------------------------


def test_round_trip_single_buffer(mem: GuestMemory, alloc: GuestAllocator) -> None:
    drv, dev = make_pair(mem, alloc)
    out = alloc.alloc(16)
    inb = alloc.alloc(32)
    mem.write(out, b"hello packed....")
    assert not dev.has_available()
    drv.add([(out, 16)], [(inb, 32)], 7)
    assert dev.has_available()
    chain = dev.pop()
    assert chain is not None
    assert chain.readable == [(out, 16)] and chain.writable == [(inb, 32)]
    assert chain.ndescs == 2 and dev.in_flight == 1
    assert chain.read_all(mem) == b"hello packed...."
    chain.write_all(mem, b"HELLO")
    assert dev.pop() is None
    dev.push(chain, 5)
    assert dev.in_flight == 0
    assert drv.get_used() is None  # not published before flush
    assert dev.flush() is True
    assert drv.get_used() == (7, 5)
    assert mem.read(inb, 5) == b"HELLO"
    assert drv.num_free == 8


def test_used_descriptor_marks_wrap_and_write_flag(mem: GuestMemory, alloc: GuestAllocator) -> None:
    raw, dev = raw_device(mem, alloc)
    buf = alloc.alloc(64)
    raw.put(buf, 8, 3, 0)
    raw.put(buf + 8, 8, 1, WRITE)
    c1 = dev.pop()
    c2 = dev.pop()
    assert c1 is not None and c2 is not None
    dev.push(c2, 4)
    dev.push(c1, 0)
    dev.flush()
    # completion order: id 1 at position 0, id 3 at position 1; wrap counter 1
    assert raw.read(0) == (0, 4, 1, AVAIL | USED | WRITE)
    assert raw.read(1) == (0, 0, 3, AVAIL | USED)
    assert dev.get_state().used_idx == 2


def test_ring_wraps_many_times_with_odd_size(mem: GuestMemory, alloc: GuestAllocator) -> None:
    drv, dev = make_pair(mem, alloc, size=3)
    bufs = [alloc.alloc(8) for _ in range(3)]
    for rnd in range(20):
        drv.add([(bufs[0], 4)], [(bufs[1], 8), (bufs[2], 8)], rnd)
        chain = dev.pop()
        assert chain is not None and chain.ndescs == 3
        dev.push(chain, 16)
        dev.flush()
        assert drv.get_used() == (rnd, 16)
        assert drv.num_free == 3
    state = dev.get_state()
    assert (state.avail_idx, state.used_idx) == (0, 0)
    assert state.avail_wrap == state.used_wrap == (20 % 2 == 0)


def test_indirect_chain_is_read_from_table(mem: GuestMemory, alloc: GuestAllocator) -> None:
    drv, dev = make_pair(mem, alloc, size=4, features=IND)
    a, b, c = alloc.alloc(16), alloc.alloc(16), alloc.alloc(16)
    drv.add([(a, 16), (b, 8)], [(c, 16)], 1)
    chain = dev.pop()
    assert chain is not None
    assert chain.ndescs == 1
    assert chain.readable == [(a, 16), (b, 8)] and chain.writable == [(c, 16)]


def test_zero_length_descriptors_are_accepted_and_skipped(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    raw = RawDriver(mem, alloc, 8)
    dev = PackedDeviceQueue(mem, 8, raw.addrs)
    buf = alloc.alloc(64)
    raw.put(buf, 8, 0, NEXT)
    raw.put(buf + 8, 0, 0, WRITE | NEXT)  # empty writable, then a readable one
    raw.put(buf + 16, 8, 0, NEXT)
    raw.put(buf + 24, 8, 5, WRITE)
    chain = dev.pop()
    assert chain is not None
    assert chain.id == 5 and chain.ndescs == 4
    assert chain.readable == [(buf, 8), (buf + 16, 8)]
    assert chain.writable == [(buf + 24, 8)]


def test_indirect_table_ignores_next_flag_and_ids(mem: GuestMemory, alloc: GuestAllocator) -> None:
    raw, dev = raw_device(mem, alloc, IND)
    buf = alloc.alloc(64)
    table = alloc.alloc(32)
    mem.write(table, PVIRTQ_DESC.pack_values(buf, 8, 99, NEXT))
    mem.write(table + 16, PVIRTQ_DESC.pack_values(buf + 8, 8, 77, WRITE))
    raw.put(table, 32, 2, INDIRECT | WRITE)  # WRITE on the indirect descriptor is ignored
    chain = dev.pop()
    assert chain is not None
    assert chain.id == 2 and chain.readable == [(buf, 8)] and chain.writable == [(buf + 8, 8)]


def test_in_order_batch_writes_one_used_descriptor(mem: GuestMemory, alloc: GuestAllocator) -> None:
    drv, dev = make_pair(mem, alloc, size=8, features=INORDER)
    buf = alloc.alloc(64)
    for t in range(3):
        drv.add([(buf, 4)], [(buf + 16 * t, 16)], t)
    chains = [dev.pop() for _ in range(3)]
    assert all(c is not None for c in chains)
    # pushed out of order: held back until the predecessors are pushed
    dev.push(chains[2], 3)  # type: ignore[arg-type]
    dev.push(chains[1], 16)  # type: ignore[arg-type]
    assert dev.flush() is False  # nothing publishable yet
    dev.push(chains[0], 16)  # type: ignore[arg-type]
    assert dev.flush() is True
    head = PVIRTQ_DESC.unpack(mem.read(drv.addrs.desc, 16))
    assert (head.id, head.len) == (chains[2].id, 3)  # type: ignore[union-attr]
    # the skipped positions still hold the driver's available descriptors
    second = PVIRTQ_DESC.unpack(mem.read(drv.addrs.desc + 32, 16))
    assert second.flags & (AVAIL | USED) == AVAIL
    assert dev.get_state().used_idx == 6
    assert [drv.get_used() for _ in range(3)] == [(0, 16), (1, 16), (2, 3)]
    assert drv.get_used() is None


def test_in_order_partial_buffer_gets_own_used_descriptor(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    raw = RawDriver(mem, alloc, 8)
    dev = PackedDeviceQueue(mem, 8, raw.addrs, INORDER)
    buf = alloc.alloc(64)
    for i in range(3):
        raw.put(buf + 16 * i, 16, i, WRITE)
    chains = [dev.pop() for _ in range(3)]
    dev.push(chains[0], 5)  # type: ignore[arg-type]
    dev.push(chains[1], 16)  # type: ignore[arg-type]
    dev.push(chains[2], 2)  # type: ignore[arg-type]
    dev.flush()
    assert raw.read(0)[1:3] == (5, 0)
    assert raw.read(1)[1:3] == (2, 2)  # batch of ids 1 and 2 named by id 2
    assert raw.read(2)[3] & (AVAIL | USED) == AVAIL


def test_push_rejects_written_beyond_writable(mem: GuestMemory, alloc: GuestAllocator) -> None:
    drv, dev = make_pair(mem, alloc)
    buf = alloc.alloc(16)
    drv.add([], [(buf, 16)], 0)
    chain = dev.pop()
    assert chain is not None
    with pytest.raises(ValueError):
        dev.push(chain, 17)
    dev.push(chain, 16)
    with pytest.raises(ValueError):
        dev.push(chain, 0)  # not in flight any more


def test_flush_follows_driver_event_suppression(mem: GuestMemory, alloc: GuestAllocator) -> None:
    raw, dev = raw_device(mem, alloc)
    buf = alloc.alloc(16)
    assert dev.flush() is False  # nothing to publish
    for flags, want in (
        (RING_EVENT_FLAGS_DISABLE, False),
        (RING_EVENT_FLAGS_ENABLE, True),
        (RING_EVENT_FLAGS_DESC, True),  # DESC without VIRTIO_F_EVENT_IDX: notify
    ):
        raw.set_driver_event(flags, off=3)
        raw.put(buf, 16, 0, WRITE)
        c = dev.pop()
        assert c is not None
        dev.push(c, 1)
        assert dev.flush() is want


def test_flush_descriptor_specific_event(mem: GuestMemory, alloc: GuestAllocator) -> None:
    raw, dev = raw_device(mem, alloc, EVT)
    buf = alloc.alloc(16)

    def one() -> bool:
        raw.put(buf, 16, 0, WRITE)
        c = dev.pop()
        assert c is not None
        dev.push(c, 1)
        return dev.flush()

    raw.set_driver_event(RING_EVENT_FLAGS_DESC, off=2, wrap=True)
    assert one() is False  # used position 0
    assert one() is False  # 1
    assert one() is True  # 2: the event position
    assert one() is False  # 3
    assert one() is False  # 0 of the next lap (wrap 0) is not (2, wrap 1)
    raw.set_driver_event(RING_EVENT_FLAGS_DESC, off=1, wrap=False)
    assert one() is True  # position 1, wrap 0


def test_set_notification_writes_device_event_suppression(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    raw, dev = raw_device(mem, alloc)
    dev.set_notification(False)
    assert raw.device_event()[1] == RING_EVENT_FLAGS_DISABLE
    dev.set_notification(True)
    assert raw.device_event()[1] == RING_EVENT_FLAGS_ENABLE
    raw.put(alloc.alloc(8), 8, 0, 0)
    assert dev.enable_notification() is True


def test_event_idx_notification_tracks_next_available(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    raw = RawDriver(mem, alloc, 2)
    dev = PackedDeviceQueue(mem, 2, raw.addrs, EVT)
    dev.set_notification(True)
    assert raw.device_event() == (0 | 1 << 15, RING_EVENT_FLAGS_DESC)
    buf = alloc.alloc(8)
    raw.put(buf, 8, 0, 0)
    raw.put(buf, 8, 1, 0)
    assert dev.pop() is not None
    assert raw.device_event()[0] == 1 | 1 << 15
    assert dev.pop() is not None
    assert raw.device_event()[0] == 0  # position 0 of the lap with wrap counter 0


def test_state_resume(mem: GuestMemory, alloc: GuestAllocator) -> None:
    drv, dev = make_pair(mem, alloc, size=5)
    buf = alloc.alloc(16)
    for t in range(7):
        drv.add([(buf, 4)], [], t)
        c = dev.pop()
        assert c is not None
        dev.push(c, 0)
        dev.flush()
        assert drv.get_used() == (t, 0)
    state = dev.get_state()
    assert (state.avail_idx, state.avail_wrap) == (2, False)
    dev2 = PackedDeviceQueue(mem, 5, drv.addrs, state=state)
    drv.add([(buf, 4)], [], 99)
    c = dev2.pop()
    assert c is not None
    dev2.push(c, 0)
    dev2.flush()
    assert drv.get_used() == (99, 0)


# ---------------------------------------------------------------------------
# driver violations: each raises DriverError and breaks the queue
# ---------------------------------------------------------------------------


def expect_broken(dev: PackedDeviceQueue, clause_part: str) -> None:
    with pytest.raises(DriverError) as exc:
        dev.pop()
    assert exc.value.clause is not None and clause_part in exc.value.clause
    assert dev.broken and dev.broken_reason is exc.value
    with pytest.raises(QueueBrokenError):
        dev.pop()
    with pytest.raises(QueueBrokenError):
        dev.flush()


@pytest.mark.parametrize("size", [0, 32769])
def test_device_rejects_queue_size_out_of_range(
    mem: GuestMemory, alloc: GuestAllocator, size: int
) -> None:
    with pytest.raises(DriverError):
        PackedDeviceQueue(mem, size, QueueAddresses(0x1000, 0x2000, 0x3000))


def test_device_accepts_queue_size_not_power_of_two(mem: GuestMemory) -> None:
    PackedDeviceQueue(mem, 7, QueueAddresses(0x1000, 0x2000, 0x3000))


@pytest.mark.parametrize(
    "addrs",
    [
        QueueAddresses(0x1008, 0x2000, 0x3000),
        QueueAddresses(0x1000, 0x2002, 0x3000),
        QueueAddresses(0x1000, 0x2000, 0x3001),
    ],
)
def test_device_rejects_misaligned_ring_parts(mem: GuestMemory, addrs: QueueAddresses) -> None:
    with pytest.raises(DriverError, match="aligned"):
        PackedDeviceQueue(mem, 4, addrs)


@pytest.mark.parametrize(
    "addrs",
    [
        QueueAddresses(MEM_SIZE - 32, 0x2000, 0x3000),
        QueueAddresses(0x1000, MEM_SIZE, 0x3000),
        QueueAddresses(0x1000, 0x2000, 1 << 40),
    ],
)
def test_device_rejects_ring_outside_guest_ram(mem: GuestMemory, addrs: QueueAddresses) -> None:
    with pytest.raises(DriverError, match="guest RAM"):
        PackedDeviceQueue(mem, 4, addrs)


def test_device_rejects_saved_position_outside_ring(mem: GuestMemory) -> None:
    from pyvirtio.virtqueue.common import QueueState

    with pytest.raises(DriverError):
        PackedDeviceQueue(
            mem, 4, QueueAddresses(0x1000, 0x2000, 0x3000), state=QueueState(avail_idx=4)
        )


def test_device_rejects_descriptor_list_longer_than_queue_size(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    raw, dev = raw_device(mem, alloc)
    buf = alloc.alloc(16)
    for _ in range(4):
        raw.put(buf, 4, 0, NEXT)  # NEXT on the last slot too: a list that never ends
    expect_broken(dev, "Scatter-Gather")


def test_device_rejects_list_descriptor_not_marked_available(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    raw, dev = raw_device(mem, alloc)
    buf = alloc.alloc(16)
    raw.put(buf, 4, 0, NEXT)  # the next slot is still zero: not available
    expect_broken(dev, "Next Flag")


def test_device_rejects_buffer_id_out_of_range(mem: GuestMemory, alloc: GuestAllocator) -> None:
    raw, dev = raw_device(mem, alloc)
    raw.put(alloc.alloc(16), 16, 4, 0)
    expect_broken(dev, "Supplying Buffers")


def test_device_rejects_buffer_id_offered_twice_while_in_flight(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    raw, dev = raw_device(mem, alloc)
    buf = alloc.alloc(16)
    raw.put(buf, 16, 1, 0)
    raw.put(buf, 16, 1, 0)
    assert dev.pop() is not None
    expect_broken(dev, "Supplying Buffers")


def test_device_rejects_buffer_id_reused_before_used_is_published(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    raw, dev = raw_device(mem, alloc)
    buf = alloc.alloc(16)
    raw.put(buf, 16, 1, 0)
    raw.put(buf, 16, 1, 0)
    c = dev.pop()
    assert c is not None
    dev.push(c, 0)  # staged, the driver has not seen it
    expect_broken(dev, "Supplying Buffers")


def test_device_rejects_indirect_without_feature(mem: GuestMemory, alloc: GuestAllocator) -> None:
    raw, dev = raw_device(mem, alloc)
    table = alloc.alloc(16)
    mem.write(table, PVIRTQ_DESC.pack_values(table, 16, 0, 0))
    raw.put(table, 16, 0, INDIRECT)
    expect_broken(dev, "Indirect Descriptors")


def test_device_rejects_indirect_inside_indirect(mem: GuestMemory, alloc: GuestAllocator) -> None:
    raw, dev = raw_device(mem, alloc, IND)
    table = alloc.alloc(16)
    mem.write(table, PVIRTQ_DESC.pack_values(table, 16, 0, INDIRECT))
    raw.put(table, 16, 0, INDIRECT)
    expect_broken(dev, "Indirect Descriptors")


@pytest.mark.parametrize("first_indirect", [True, False])
def test_device_rejects_indirect_in_next_linked_list(
    mem: GuestMemory, alloc: GuestAllocator, first_indirect: bool
) -> None:
    raw, dev = raw_device(mem, alloc, IND)
    table = alloc.alloc(16)
    buf = alloc.alloc(16)
    mem.write(table, PVIRTQ_DESC.pack_values(buf, 16, 0, 0))
    if first_indirect:
        raw.put(table, 16, 0, INDIRECT | NEXT)
        raw.put(buf, 16, 0, 0)
    else:
        raw.put(buf, 16, 0, NEXT)
        raw.put(table, 16, 0, INDIRECT)
    expect_broken(dev, "Indirect Descriptors")


@pytest.mark.parametrize("length", [0, 24, 16 * (MAX_INDIRECT_ENTRIES + 1)])
def test_device_rejects_bad_indirect_table_length(
    mem: GuestMemory, alloc: GuestAllocator, length: int
) -> None:
    raw, dev = raw_device(mem, alloc, IND)
    raw.put(0x1000, length, 0, INDIRECT)
    expect_broken(dev, "Indirect Flag")


def test_device_rejects_indirect_table_outside_guest_ram(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    raw, dev = raw_device(mem, alloc, IND)
    raw.put(MEM_SIZE - 16, 32, 0, INDIRECT)
    expect_broken(dev, "Element Address")


@pytest.mark.parametrize("addr", [MEM_SIZE - 8, (1 << 64) - 8, 1 << 50])
def test_device_rejects_buffer_outside_guest_ram(
    mem: GuestMemory, alloc: GuestAllocator, addr: int
) -> None:
    raw, dev = raw_device(mem, alloc)
    raw.put(addr, 16, 0, 0)
    expect_broken(dev, "Element Address")


def test_device_rejects_indirect_entry_outside_guest_ram(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    raw, dev = raw_device(mem, alloc, IND)
    table = alloc.alloc(16)
    mem.write(table, PVIRTQ_DESC.pack_values((1 << 64) - 4, 16, 0, WRITE))
    raw.put(table, 16, 0, INDIRECT)
    expect_broken(dev, "Element Address")


def test_device_rejects_chain_longer_than_2_32_bytes() -> None:
    # sparse memfd: 4 GiB of guest RAM costs no real memory
    big = GuestMemory.create_layout([(0, 1 << 20), (1 << 33, 1 << 32)])
    try:
        raw = RawDriver(big, GuestAllocator(0x1000, 0x10000), 4)
        dev = PackedDeviceQueue(big, 4, raw.addrs)
        raw.put(1 << 33, 0xFFFFFFFF, 0, NEXT)
        raw.put(1 << 33, 2, 0, 0)
        expect_broken(dev, "Descriptor Table")
    finally:
        big.close()


def test_device_rejects_readable_after_writable(mem: GuestMemory, alloc: GuestAllocator) -> None:
    raw, dev = raw_device(mem, alloc)
    buf = alloc.alloc(32)
    raw.put(buf, 16, 0, WRITE | NEXT)
    raw.put(buf + 16, 16, 0, 0)
    expect_broken(dev, "Scatter-Gather")


def test_device_rejects_readable_after_writable_in_indirect_table(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    raw, dev = raw_device(mem, alloc, IND)
    buf = alloc.alloc(32)
    table = alloc.alloc(32)
    mem.write(table, PVIRTQ_DESC.pack_values(buf, 16, 0, WRITE))
    mem.write(table + 16, PVIRTQ_DESC.pack_values(buf + 16, 16, 0, 0))
    raw.put(table, 32, 0, INDIRECT)
    expect_broken(dev, "Scatter-Gather")


def test_broken_queue_refuses_every_call(mem: GuestMemory, alloc: GuestAllocator) -> None:
    raw, dev = raw_device(mem, alloc)
    raw.put(alloc.alloc(16), 16, 9, 0)
    with pytest.raises(DriverError):
        dev.pop()
    for call in (dev.has_available, dev.flush, lambda: dev.set_notification(True)):
        with pytest.raises(QueueBrokenError):
            call()


def test_adopt_resubmits_a_chain_before_later_pops(mem: GuestMemory, alloc: GuestAllocator) -> None:
    raw, dev = raw_device(mem, alloc, INORDER)
    buf = alloc.alloc(16)
    c = DescriptorChain(2, [], [(buf, 16)], 1)  # recovered from elsewhere
    dev.adopt(c)
    assert dev.in_flight == 1
    with pytest.raises(DriverError, match="adopted"):
        dev.adopt(c)
    with pytest.raises(DriverError, match="adopted"):
        dev.adopt(DescriptorChain(4, [], [(buf, 16)], 1))  # Buffer ID >= queue size
    assert not dev.broken
    raw.put(buf, 16, 0, WRITE)
    first = dev.pop()
    assert first is not None and first.id == 0
    dev.push(first, 1)
    dev.push(c, 2)
    dev.flush()
    assert raw.read(0)[1:3] == (2, 2)  # in order: the adopted chain first
    assert raw.read(1)[1:3] == (1, 0)


def test_indirect_table_spanning_two_regions(alloc: GuestAllocator) -> None:
    two = GuestMemory.create_layout([(0, 1 << 16), (1 << 16, 1 << 16)])
    try:
        raw = RawDriver(two, GuestAllocator(0x1000, 0x4000), 4)
        dev = PackedDeviceQueue(two, 4, raw.addrs, IND)
        table = (1 << 16) - 16  # entry 0 in the first region, entry 1 in the second
        two.write(table, PVIRTQ_DESC.pack_values(0x8000, 8, 0, 0))
        two.write(table + 16, PVIRTQ_DESC.pack_values(0x9000, 8, 0, WRITE))
        raw.put(table, 32, 1, INDIRECT)
        chain = dev.pop()
        assert chain is not None
        assert chain.readable == [(0x8000, 8)] and chain.writable == [(0x9000, 8)]
    finally:
        two.close()


def test_factory_picks_packed_ring(mem: GuestMemory, alloc: GuestAllocator) -> None:
    from pyvirtio.spec.features import Feature
    from pyvirtio.virtqueue import make_device_queue, make_driver_queue

    features = Feature.RING_PACKED.mask | Feature.INDIRECT_DESC.mask
    drv = make_driver_queue(mem, alloc, 6, features)
    dev = make_device_queue(mem, 6, drv.addrs, features)
    assert isinstance(drv, PackedDriverQueue) and isinstance(dev, PackedDeviceQueue)
    assert dev.features.indirect and not dev.features.event_idx
