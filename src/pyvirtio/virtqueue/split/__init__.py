"""Split virtqueues (virtio-v1.2 §2.7 "Split Virtqueues"), device side and driver side."""

from pyvirtio.virtqueue.split.device import SplitDeviceQueue
from pyvirtio.virtqueue.split.driver import SplitDriverQueue

__all__ = ["SplitDeviceQueue", "SplitDriverQueue"]
