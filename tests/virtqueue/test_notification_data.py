"""VIRTIO_F_NOTIFICATION_DATA at the ring level (virtio-v1.2 §2.9 "Driver
Notifications"): what the driver queue states, and how the device queue records
and checks it against the ring, split and packed."""

from __future__ import annotations

from typing import Any

import pytest

from pyvirtio.errors import DriverError
from pyvirtio.memory import GuestAllocator, GuestMemory
from pyvirtio.spec.features import Feature
from pyvirtio.virtqueue import make_device_queue, make_driver_queue
from pyvirtio.virtqueue.packed import PackedDeviceQueue, PackedDriverQueue
from pyvirtio.virtqueue.split import SplitDeviceQueue, SplitDriverQueue

SPLIT = Feature.VERSION_1.mask
PACKED = SPLIT | Feature.RING_PACKED.mask


def _pair(mem: GuestMemory, alloc: GuestAllocator, size: int, features: int) -> tuple[Any, Any]:
    drv = make_driver_queue(mem, alloc, size, features)
    dev = make_device_queue(mem, size, drv.addrs, features)
    return drv, dev


def _round(drv: object, dev: object, mem: GuestMemory, buf: int) -> None:
    """One buffer made available, served and reaped."""
    assert isinstance(drv, SplitDriverQueue | PackedDriverQueue)
    assert isinstance(dev, SplitDeviceQueue | PackedDeviceQueue)
    drv.add([(buf, 16)], [], "t")
    drv.kick_prepare()
    chain = dev.pop()
    assert chain is not None
    dev.push(chain, 0)
    dev.flush()
    assert drv.get_used() == ("t", 0)


def test_split_driver_states_the_avail_idx(mem: GuestMemory, alloc: GuestAllocator) -> None:
    drv, dev = _pair(mem, alloc, 8, SPLIT)
    buf = alloc.alloc(16)
    assert drv.notification_data() == 0
    for i in range(1, 20):
        _round(drv, dev, mem, buf)
        assert drv.notification_data() == i  # next_off | next_wrap << 15 = idx
        assert dev.driver_notified(i & 0x7FFF, i >> 15) is None
        assert dev.notified_idx == i


def test_split_idx_bit_15_is_next_wrap(mem: GuestMemory, alloc: GuestAllocator) -> None:
    from pyvirtio.virtqueue.common import QueueState

    drv, _ = _pair(mem, alloc, 8, SPLIT)
    # a device resumed at avail idx 0x8001 with the driver's ring showing 0x8002
    mem.write_le16(drv.addrs.driver + 2, 0x8002)
    dev = SplitDeviceQueue(mem, 8, drv.addrs, state=QueueState(avail_idx=0x8001, used_idx=0x8001))
    assert dev.driver_notified(2, 1) is None
    assert dev.notified_idx == 0x8002
    err = dev.driver_notified(3, 1)  # 0x8003: one entry more than the ring shows
    assert err is not None and "§2.9" in (err.clause or "")


def test_split_notification_ahead_of_the_ring_is_a_violation(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    drv, dev = _pair(mem, alloc, 8, SPLIT)
    buf = alloc.alloc(16)
    drv.add([(buf, 16)], [], "a")
    drv.kick_prepare()
    err = dev.driver_notified(3, 0)  # claims idx 3, the ring shows 1
    assert err is not None
    assert err.clause == 'virtio-v1.2 §2.9 "Driver Notifications"'
    assert "shows idx 1" in err.message
    # not broken: the ring is still served as it shows
    assert not dev.broken
    assert dev.pop() is not None and dev.pop() is None
    # at or behind the ring: consistent (stale, or the driver added more since)
    assert dev.driver_notified(1, 0) is None
    assert dev.driver_notified(0, 0) is None


def test_packed_driver_states_position_and_wrap(mem: GuestMemory, alloc: GuestAllocator) -> None:
    drv, dev = _pair(mem, alloc, 4, PACKED)
    buf = alloc.alloc(16)
    assert drv.notification_data() == 0x8000  # position 0, Driver Ring Wrap Counter 1
    seen = []
    for _ in range(9):
        _round(drv, dev, mem, buf)
        data = drv.notification_data()
        seen.append(data)
        assert dev.driver_notified(data & 0x7FFF, data >> 15) is None
        assert dev.notified_position == (data & 0x7FFF, bool(data >> 15))
    assert seen == [0x8001, 0x8002, 0x8003, 0, 1, 2, 3, 0x8000, 0x8001]


def test_packed_notification_must_match_the_next_descriptor_not_yet_available(
    mem: GuestMemory, alloc: GuestAllocator
) -> None:
    drv, dev = _pair(mem, alloc, 4, PACKED)
    buf = alloc.alloc(16)
    drv.add([(buf, 16)], [], "a")
    drv.add([(buf, 16)], [], "b")
    drv.kick_prepare()
    assert dev.driver_notified(2, 1) is None  # exactly what was made available
    assert dev.driver_notified(1, 1) is None  # behind: the driver added more since
    err = dev.driver_notified(3, 1)  # the descriptor at 2 is not available
    assert err is not None and "§2.8.16" in (err.clause or "")
    err = dev.driver_notified(0, 0)  # a whole lap made available: the ring disagrees
    assert err is not None and "4 descriptor(s) past" in err.message
    err = dev.driver_notified(4, 1)  # outside the ring
    assert err is not None and "outside a ring of 4" in err.message
    assert not dev.broken
    assert dev.pop() is not None and dev.pop() is not None and dev.pop() is None
    # the device caught up: the same statement is now "at the device's position"
    assert dev.driver_notified(2, 1) is None
    # a position behind the device's (already served) is consistent
    assert dev.driver_notified(0, 1) is None


@pytest.mark.parametrize("features", [SPLIT, PACKED], ids=["split", "packed"])
def test_broken_queue_records_without_checking(
    mem: GuestMemory, alloc: GuestAllocator, features: int
) -> None:
    _, dev = _pair(mem, alloc, 4, features)
    dev.broken_reason = DriverError("broken earlier")
    assert dev.driver_notified(3, 0) is None
