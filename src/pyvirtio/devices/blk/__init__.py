"""The virtio block device (virtio-v1.2 §5.2 "Block Device") and its storage backends."""

from pyvirtio.devices.blk.backend import BlkBackend, FileBackend, MemoryBackend, NullBackend
from pyvirtio.devices.blk.device import BlkDevice, BlkMetrics
from pyvirtio.devices.blk.entry import DEVICE_TYPE

__all__ = [
    "DEVICE_TYPE",
    "BlkBackend",
    "BlkDevice",
    "BlkMetrics",
    "FileBackend",
    "MemoryBackend",
    "NullBackend",
]
