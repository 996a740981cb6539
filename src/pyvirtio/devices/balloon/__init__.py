"""The traditional memory balloon, device side (virtio-v1.2 §5.5 "Traditional Memory
Balloon Device")."""

from pyvirtio.devices.balloon.control import BalloonControl, balloon_command
from pyvirtio.devices.balloon.device import (
    ALL_FEATURES,
    MAX_PFNS_PER_REQUEST,
    BalloonCounters,
    BalloonDevice,
)
from pyvirtio.devices.balloon.entry import DEVICE_TYPE

__all__ = [
    "ALL_FEATURES",
    "DEVICE_TYPE",
    "MAX_PFNS_PER_REQUEST",
    "BalloonControl",
    "BalloonCounters",
    "BalloonDevice",
    "balloon_command",
]
