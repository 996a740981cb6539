"""Reserved (device-independent) feature bits. virtio-v1.2 §6 "Reserved Feature Bits".

Feature bits are numbers (bit positions); :func:`bit` turns one into a mask.
Device-specific bits live beside their device in ``pyvirtio.spec.<device>``.
"""

from __future__ import annotations

from enum import IntEnum


class Feature(IntEnum):
    """Device-independent feature bit numbers (virtio-v1.2 §6)."""

    #: legacy only (virtio-v1.2 §6.1 "Legacy Interface: Reserved Feature Bits")
    NOTIFY_ON_EMPTY = 24
    #: legacy only
    ANY_LAYOUT = 27
    INDIRECT_DESC = 28
    EVENT_IDX = 29
    #: legacy only: a device offering it is buggy; a driver must not accept it
    UNUSED = 30
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    SR_IOV = 37
    NOTIFICATION_DATA = 38
    NOTIF_CONFIG_DATA = 39
    RING_RESET = 40
    ADMIN_VQ = 41

    @property
    def mask(self) -> int:
        """This feature as a bit mask."""
        return 1 << int(self)


#: Bits 24..41 are the device-independent range in virtio 1.2 ("Feature bits 24
#: to 41 are reserved for extensions to the queue and feature negotiation
#: mechanisms"); bits 0..23 and 50..127 are device-specific.
TRANSPORT_FEATURES_FIRST = 24
TRANSPORT_FEATURES_LAST = 41


def bit(n: int) -> int:
    """Return the mask for feature bit number ``n``."""
    return 1 << n


def has(features: int, n: int) -> bool:
    """True if feature bit number ``n`` is set in ``features``."""
    return bool(features >> n & 1)


def feature_names(features: int, extra: dict[int, str] | None = None) -> list[str]:
    """Spec names of the bits set in ``features`` (``VIRTIO_F_*``, then ``extra``)."""
    out: list[str] = []
    n = 0
    while features >> n:
        if features >> n & 1:
            if extra and n in extra:
                out.append(extra[n])
            else:
                try:
                    out.append(f"VIRTIO_F_{Feature(n).name}")
                except ValueError:
                    out.append(f"bit{n}")
        n += 1
    return out
