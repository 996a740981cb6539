"""Driver side of the packed virtqueue (virtio-v1.2 §2.8): ring layout, flags and wrap
counters, event suppression, in-order batches, and a hand-made malicious device."""

from __future__ import annotations

import pytest

from pyvirtio.errors import DeviceError, QueueBrokenError, QueueFullError
from pyvirtio.memory import GuestAllocator, GuestMemory
from pyvirtio.spec.ring import (
    PVIRTQ_DESC,
    PVIRTQ_EVENT_SUPPRESS,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
)
from pyvirtio.virtqueue.common import RingFeatures
from pyvirtio.virtqueue.packed import PackedDeviceQueue, PackedDriverQueue
from tests.virtqueue.helpers import (
    AVAIL,
    EVT,
    IND,
    INDIRECT,
    INORDER,
    NEXT,
    NOFEAT,
    USED,
    WRITE,
)


class FakeDevice:
    """A hand-driven (possibly malicious) device writing raw used descriptors."""

    def __init__(self, mem: GuestMemory, drv: PackedDriverQueue[int]) -> None:
        self.mem = mem
        self.drv = drv
        self.size = drv.size
        self.pos = 0
        self.wrap = True

    def desc(self, pos: int) -> tuple[int, int, int, int]:
        d = PVIRTQ_DESC.unpack(self.mem.read(self.drv.addrs.desc + 16 * pos, 16))
        return (d.addr, d.len, d.id, d.flags)

    def use(self, bid: int, length: int, skip: int = 1, write: bool = True) -> None:
        flags = (AVAIL | USED if self.wrap else 0) | (WRITE if write else 0)
        self.mem.write(
            self.drv.addrs.desc + 16 * self.pos, PVIRTQ_DESC.pack_values(0, length, bid, flags)
        )
        self.pos += skip
        if self.pos >= self.size:
            self.pos -= self.size
            self.wrap = not self.wrap

    def set_event(self, flags: int, off: int = 0, wrap: bool = True) -> None:
        self.mem.write(
            self.drv.addrs.device, PVIRTQ_EVENT_SUPPRESS.pack_values(off | wrap << 15, flags)
        )

    def driver_event(self) -> tuple[int, int]:
        e = PVIRTQ_EVENT_SUPPRESS.unpack(self.mem.read(self.drv.addrs.driver, 4))
        return (e.desc, e.flags)


def make(
    mem: GuestMemory, alloc: GuestAllocator, size: int = 4, features: RingFeatures = NOFEAT
) -> tuple[PackedDriverQueue[int], FakeDevice]:
    drv: PackedDriverQueue[int] = PackedDriverQueue(mem, alloc, size, features)
    return drv, FakeDevice(mem, drv)


# ---------------------------------------------------------------------------
# layout and publishing
# ---------------------------------------------------------------------------


def test_ring_areas_are_aligned_zeroed_and_freed_on_close(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    mem.fill(0x1000, 0x10000, 0xFF)  # dirty memory: the constructor must zero it
    before = alloc.free_bytes
    drv: PackedDriverQueue[int] = PackedDriverQueue(mem, alloc, 5)
    a = drv.addrs
    assert a.desc % 16 == 0 and a.driver % 4 == 0 and a.device % 4 == 0
    assert mem.read(a.desc, 80) == bytes(80)
    assert mem.read(a.driver, 4) == bytes(4) and mem.read(a.device, 4) == bytes(4)
    assert drv.num_free == 5
    drv.close()
    drv.close()
    assert alloc.free_bytes == before


def test_add_writes_chain_with_avail_flags_and_buffer_id(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    drv, dev = make(mem, alloc)
    drv.add([(0x8000, 10)], [(0x9000, 20), (0xA000, 30)], 1)
    d0, d1, d2 = dev.desc(0), dev.desc(1), dev.desc(2)
    assert d0 == (0x8000, 10, d2[2], AVAIL | NEXT)
    assert d1 == (0x9000, 20, d2[2], AVAIL | NEXT | WRITE)
    assert d2[:2] == (0xA000, 30) and d2[3] == AVAIL | WRITE
    assert 0 <= d2[2] < 4
    assert drv.num_free == 1


def test_driver_wrap_counter_flips_flags(mem: GuestMemory, alloc: GuestAllocator) -> None:
    drv, dev = make(mem, alloc, size=3)
    drv.add([(0x8000, 1)], [], 0)
    dev.use(dev.desc(0)[2], 0, write=False)
    assert drv.get_used() == (0, 0)
    # two slots left in lap 1, the third one wraps to lap 2 (wrap counter 0)
    drv.add([(0x8000, 1), (0x8001, 1), (0x8002, 1)], [], 1)
    assert dev.desc(1)[3] == AVAIL | NEXT
    assert dev.desc(2)[3] == AVAIL | NEXT
    assert dev.desc(0)[3] == USED  # AVAIL=0 (wrap 0), USED=inverse
    dev.use(dev.desc(0)[2], 0, skip=3, write=False)
    assert drv.get_used() == (1, 0)
    assert drv.num_free == 3


def test_indirect_table_is_built_and_freed_on_reap(mem: GuestMemory, alloc: GuestAllocator) -> None:
    drv, dev = make(mem, alloc, features=IND)
    before = alloc.free_bytes
    drv.add([(0x8000, 8)], [(0x9000, 16)], 5)
    addr, length, bid, flags = dev.desc(0)
    assert flags == AVAIL | INDIRECT and length == 32
    t0 = PVIRTQ_DESC.unpack(mem.read(addr, 16))
    t1 = PVIRTQ_DESC.unpack(mem.read(addr + 16, 16))
    assert (t0.addr, t0.len, t0.flags) == (0x8000, 8, 0)
    assert (t1.addr, t1.len, t1.flags) == (0x9000, 16, WRITE)
    assert drv.num_free == 3
    dev.use(bid, 16)
    assert drv.get_used() == (5, 16)
    assert alloc.free_bytes == before


def test_single_segment_never_uses_indirect(mem: GuestMemory, alloc: GuestAllocator) -> None:
    drv, dev = make(mem, alloc, features=IND)
    drv.add([], [(0x9000, 16)], 5)
    assert dev.desc(0)[3] == AVAIL | WRITE


def test_add_rejects_empty_and_oversized_buffers(mem: GuestMemory, alloc: GuestAllocator) -> None:
    drv, _ = make(mem, alloc)
    with pytest.raises(ValueError):
        drv.add([], [], 0)
    with pytest.raises(ValueError):
        drv.add([(0x8000, 1)] * 5, [], 0)
    with pytest.raises(ValueError):
        drv.add([(0x8000, 1 << 32)], [], 0)


def test_add_raises_queue_full(mem: GuestMemory, alloc: GuestAllocator) -> None:
    drv, _ = make(mem, alloc)
    drv.add([(0x8000, 1)] * 3, [], 0)
    with pytest.raises(QueueFullError):
        drv.add([(0x8000, 1)] * 2, [], 1)
    drv.add([(0x8000, 1)], [], 2)
    with pytest.raises(QueueFullError):
        drv.add([(0x8000, 1)], [], 3)


def test_used_without_write_flag_has_zero_length(mem: GuestMemory, alloc: GuestAllocator) -> None:
    # a buffer with no device-writable part: Element Length is reserved, ignored
    drv, dev = make(mem, alloc)
    drv.add([(0x8000, 16)], [], 3)
    dev.use(dev.desc(0)[2], 12, write=False)
    assert drv.get_used() == (3, 0)


def test_used_without_write_flag_still_takes_the_length_of_a_writable_buffer(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    # QEMU 7.2 leaves VIRTQ_DESC_F_WRITE clear in used descriptors; Linux takes the
    # length anyway, and so do we (still bounded by the writable part)
    drv, dev = make(mem, alloc)
    drv.add([], [(0x9000, 16)], 3)
    dev.use(dev.desc(0)[2], 12, write=False)
    assert drv.get_used() == (3, 12)
    drv.add([], [(0x9000, 16)], 4)
    dev.use(dev.desc(1)[2], 17, write=False)
    with pytest.raises(DeviceError):
        drv.get_used()


def test_out_of_order_used_buffers(mem: GuestMemory, alloc: GuestAllocator) -> None:
    drv, dev = make(mem, alloc, size=8)
    drv.add([(0x8000, 1)], [(0x9000, 8)], 10)  # slots 0, 1
    drv.add([(0x8000, 1)], [(0x9000, 4), (0xA000, 4)], 11)  # slots 2..4
    id10, id11 = dev.desc(0)[2], dev.desc(2)[2]
    assert id10 != id11
    dev.use(id11, 8, skip=3)
    dev.use(id10, 1, skip=2)
    assert drv.get_used() == (11, 8)
    assert drv.get_used() == (10, 1)
    assert drv.get_used() is None
    assert drv.num_free == 8


def test_in_order_batch_completes_earlier_buffers_in_full(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    drv, dev = make(mem, alloc, size=8, features=INORDER)
    drv.add([], [(0x9000, 8)], 0)
    drv.add([(0x8000, 1)], [(0x9000, 4), (0xA000, 4)], 1)
    drv.add([], [(0x9000, 16)], 2)
    last_id = dev.desc(4)[2]  # slots: 0 | 1..3 | 4
    dev.use(last_id, 5, skip=5)
    assert drv.enable_interrupts() is True
    assert [drv.get_used() for _ in range(3)] == [(0, 8), (1, 8), (2, 5)]
    assert drv.get_used() is None
    assert drv.num_free == 8


def test_used_descriptor_ignored_when_nothing_in_flight(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    drv, dev = make(mem, alloc)
    dev.use(0, 0)
    assert drv.get_used() is None
    assert not drv.broken


# ---------------------------------------------------------------------------
# notifications
# ---------------------------------------------------------------------------


def test_kick_prepare_follows_device_event_suppression(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    drv, dev = make(mem, alloc, size=8)
    assert drv.kick_prepare() is False  # nothing added
    drv.add([(0x8000, 1)], [], 0)
    assert drv.kick_prepare() is True  # ENABLE (zeroed structure)
    assert drv.kick_prepare() is False  # nothing new
    dev.set_event(RING_EVENT_FLAGS_DISABLE)
    drv.add([(0x8000, 1)], [], 1)
    assert drv.kick_prepare() is False
    dev.set_event(RING_EVENT_FLAGS_DESC, off=7)  # DESC without EVENT_IDX: treated as ENABLE
    drv.add([(0x8000, 1)], [], 2)
    assert drv.kick_prepare() is True


def test_kick_prepare_descriptor_specific_event(mem: GuestMemory, alloc: GuestAllocator) -> None:
    drv, dev = make(mem, alloc, size=4, features=EVT)
    dev.set_event(RING_EVENT_FLAGS_DESC, off=2, wrap=True)
    drv.add([(0x8000, 1)], [], 0)  # slot 0
    assert drv.kick_prepare() is False
    drv.add([(0x8000, 1)] * 2, [], 1)  # slots 1, 2
    assert drv.kick_prepare() is True
    drv.add([(0x8000, 1)], [], 2)  # slot 3
    assert drv.kick_prepare() is False
    # the device uses everything and waits for slot 0 of lap 2 (wrap 0)
    for bid, skip in ((dev.desc(0)[2], 1), (dev.desc(2)[2], 2), (dev.desc(3)[2], 1)):
        dev.use(bid, 0, skip=skip, write=False)
    while drv.get_used() is not None:
        pass
    dev.set_event(RING_EVENT_FLAGS_DESC, off=0, wrap=False)
    drv.add([(0x8000, 1)], [], 3)
    assert drv.kick_prepare() is True


def test_kick_prepare_after_a_full_lap_always_notifies(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    drv, dev = make(mem, alloc, size=2, features=EVT)
    dev.set_event(RING_EVENT_FLAGS_DESC, off=1, wrap=False)  # far away
    for t in range(2):
        drv.add([(0x8000, 1)], [], t)
        dev.use(dev.desc(dev.pos)[2], 0, write=False)
        assert drv.get_used() == (t, 0)
    assert drv.kick_prepare() is True


def test_interrupt_suppression_flags(mem: GuestMemory, alloc: GuestAllocator) -> None:
    drv, dev = make(mem, alloc)
    drv.disable_interrupts()
    assert dev.driver_event()[1] == RING_EVENT_FLAGS_DISABLE
    assert drv.enable_interrupts() is False
    assert dev.driver_event()[1] == RING_EVENT_FLAGS_ENABLE
    drv.add([(0x8000, 1)], [], 0)
    dev.use(dev.desc(0)[2], 0)
    assert drv.enable_interrupts() is True


def test_event_idx_interrupts_track_next_used(mem: GuestMemory, alloc: GuestAllocator) -> None:
    drv, dev = make(mem, alloc, size=2, features=EVT)
    assert drv.enable_interrupts() is False
    assert dev.driver_event() == (0 | 1 << 15, RING_EVENT_FLAGS_DESC)
    drv.add([(0x8000, 1)], [], 0)
    drv.add([(0x8000, 1)], [], 1)
    dev.use(dev.desc(0)[2], 0)
    dev.use(dev.desc(1)[2], 0)
    assert drv.get_used() == (0, 0)
    assert dev.driver_event()[0] == 1 | 1 << 15
    assert drv.get_used() == (1, 0)
    assert dev.driver_event()[0] == 0  # position 0, wrap counter 0


def test_works_with_device_queue_end_to_end(mem: GuestMemory, alloc: GuestAllocator) -> None:
    drv: PackedDriverQueue[str] = PackedDriverQueue(mem, alloc, 4, IND)
    dev = PackedDeviceQueue(mem, 4, drv.addrs, IND)
    buf = alloc.alloc(64)
    mem.write(buf, b"ping")
    drv.add([(buf, 4)], [(buf + 16, 4), (buf + 32, 4)], "req")
    chain = dev.pop()
    assert chain is not None
    chain.write_all(mem, chain.read_all(mem).upper() * 2)
    dev.push(chain, 8)
    dev.flush()
    assert drv.get_used() == ("req", 8)
    assert mem.read(buf + 16, 4) + mem.read(buf + 32, 4) == b"PINGPING"


def test_detach_unused_returns_tokens_and_resets(mem: GuestMemory, alloc: GuestAllocator) -> None:
    drv, _ = make(mem, alloc, size=4, features=IND)
    before = alloc.free_bytes
    drv.add([(0x8000, 1), (0x8001, 1)], [], 0)
    drv.add([(0x8000, 1)], [], 1)
    assert alloc.free_bytes < before
    assert drv.detach_unused() == [0, 1]
    assert alloc.free_bytes == before  # the indirect table went back
    assert drv.num_free == 4
    assert mem.read(drv.addrs.desc, 64) == bytes(64)
    # a fresh device starts at position 0 with wrap counter 1
    real = PackedDeviceQueue(mem, 4, drv.addrs, IND)
    drv.add([(0x8000, 1)], [], 7)
    chain = real.pop()
    assert chain is not None
    real.push(chain, 0)
    real.flush()
    assert drv.get_used() == (7, 0)


# ---------------------------------------------------------------------------
# device violations: each raises DeviceError and breaks the queue
# ---------------------------------------------------------------------------


def expect_broken(drv: PackedDriverQueue[int], clause_part: str) -> None:
    with pytest.raises(DeviceError) as exc:
        drv.get_used()
    assert exc.value.clause is not None and clause_part in exc.value.clause
    assert drv.broken and drv.broken_reason is exc.value
    with pytest.raises(QueueBrokenError):
        drv.get_used()
    with pytest.raises(QueueBrokenError):
        drv.add([(0x8000, 1)], [], 9)


def test_driver_rejects_used_buffer_id_out_of_range(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    drv, dev = make(mem, alloc)
    drv.add([(0x8000, 1)], [], 0)
    dev.use(4, 0)
    expect_broken(drv, "Receiving Used Buffers")


def test_driver_rejects_used_buffer_id_not_in_flight(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    drv, dev = make(mem, alloc)
    drv.add([(0x8000, 1)], [], 0)
    bid = dev.desc(0)[2]
    dev.use((bid + 1) % 4, 0)
    expect_broken(drv, "Receiving Used Buffers")


def test_driver_rejects_used_buffer_id_returned_twice(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    drv, dev = make(mem, alloc)
    drv.add([(0x8000, 1)], [], 0)
    drv.add([(0x8000, 1)], [], 1)
    bid = dev.desc(0)[2]
    dev.use(bid, 0)
    dev.use(bid, 0)
    assert drv.get_used() == (0, 0)
    expect_broken(drv, "Receiving Used Buffers")


def test_driver_rejects_used_length_beyond_writable(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    drv, dev = make(mem, alloc)
    drv.add([(0x8000, 4)], [(0x9000, 8)], 0)
    dev.use(dev.desc(0)[2], 9, skip=2)
    expect_broken(drv, "Element Address and Length")


def test_driver_rejects_in_order_batch_naming_unknown_id(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    drv, dev = make(mem, alloc, features=INORDER)
    drv.add([], [(0x9000, 8)], 0)
    dev.use((dev.desc(0)[2] + 2) % 4, 8, skip=2)
    expect_broken(drv, "Receiving Used Buffers")
