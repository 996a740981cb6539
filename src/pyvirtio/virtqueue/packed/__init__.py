"""Packed virtqueues (virtio-v1.2 §2.8 "Packed Virtqueues"), device and driver side."""

from pyvirtio.virtqueue.packed.device import PackedDeviceQueue
from pyvirtio.virtqueue.packed.driver import PackedDriverQueue

__all__ = ["PackedDeviceQueue", "PackedDriverQueue"]
