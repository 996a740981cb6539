"""The virtio entropy device, device side (virtio-v1.2 §5.4 "Entropy Device")."""

from __future__ import annotations

from pyvirtio.devices.rng.backend import (
    CallableSource,
    EntropySource,
    FileSource,
    OsRandomSource,
)
from pyvirtio.devices.rng.device import CHUNK_SIZE, REQUESTQ, RngDevice
from pyvirtio.devices.rng.entry import DEVICE_TYPE

__all__ = [
    "DEVICE_TYPE",
    "CHUNK_SIZE",
    "REQUESTQ",
    "CallableSource",
    "EntropySource",
    "FileSource",
    "OsRandomSource",
    "RngDevice",
]
