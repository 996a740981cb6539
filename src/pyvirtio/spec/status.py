"""Device status bits. virtio-v1.2 §2.1 "Device Status Field"."""

from __future__ import annotations

from enum import IntFlag


class DeviceStatus(IntFlag):
    """Bits of the ``device status`` field (virtio-v1.2 §2.1 "Device Status Field")."""

    RESET = 0
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128
