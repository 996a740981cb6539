"""Split and packed virtqueues, device side and driver side, behind one API.

:func:`make_device_queue` and :func:`make_driver_queue` pick the ring format from the
negotiated features (VIRTIO_F_RING_PACKED), so transports and drivers never name it.
"""

from __future__ import annotations

from typing import Any

from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.features import Feature, has
from pyvirtio.virtqueue.common import (
    DescriptorChain,
    DeviceVirtqueue,
    DriverVirtqueue,
    QueueAddresses,
    QueueState,
    RingFeatures,
    Segment,
)

__all__ = [
    "DescriptorChain",
    "DeviceVirtqueue",
    "DriverVirtqueue",
    "QueueAddresses",
    "QueueState",
    "RingFeatures",
    "Segment",
    "make_device_queue",
    "make_driver_queue",
]


def make_device_queue(
    mem: GuestMemory,
    size: int,
    addrs: QueueAddresses,
    features: int,
    *,
    index: int = 0,
    state: QueueState | None = None,
) -> DeviceVirtqueue:
    """The device side of a queue in the format the negotiated ``features`` select."""
    rf = RingFeatures.from_features(features)
    if has(features, Feature.RING_PACKED):
        from pyvirtio.virtqueue.packed.device import PackedDeviceQueue

        return PackedDeviceQueue(mem, size, addrs, rf, index=index, state=state)
    from pyvirtio.virtqueue.split.device import SplitDeviceQueue

    return SplitDeviceQueue(mem, size, addrs, rf, index=index, state=state)


def make_driver_queue(
    mem: GuestMemory,
    allocator: GuestAllocator,
    size: int,
    features: int,
    *,
    legacy_align: int = 0,
) -> DriverVirtqueue[Any]:
    """The driver side of a queue in the format the negotiated ``features`` select.

    ``legacy_align`` (split only) lays the ring out as the legacy interface requires.
    """
    rf = RingFeatures.from_features(features)
    if has(features, Feature.RING_PACKED):
        from pyvirtio.virtqueue.packed.driver import PackedDriverQueue

        return PackedDriverQueue(mem, allocator, size, rf)
    from pyvirtio.virtqueue.split.driver import SplitDriverQueue

    return SplitDriverQueue(mem, allocator, size, rf, legacy_align=legacy_align)
