"""What the device and driver sides of a packed virtqueue share (virtio-v1.2 §2.8).

Plain-int flags and precompiled structs/offsets for the hot paths, taken from the one
definition of each layout in :mod:`pyvirtio.spec.ring` (``pvirtq_desc``,
``pvirtq_event_suppress``), and the event suppression decision both sides make
(virtio-v1.2 §2.8.10 "Driver and Device Event Suppression").
"""

from __future__ import annotations

import struct

from pyvirtio.spec.ring import (
    PVIRTQ_DESC,
    PVIRTQ_EVENT_SUPPRESS,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
)
from pyvirtio.virtqueue.common import RingFeatures

# Plain ints for the hot paths (IntFlag arithmetic is slow).
_F_NEXT = int(VIRTQ_DESC_F_NEXT)
_F_WRITE = int(VIRTQ_DESC_F_WRITE)
_F_INDIRECT = int(VIRTQ_DESC_F_INDIRECT)
_F_AVAIL = int(VIRTQ_DESC_F_AVAIL)
_F_USED = int(VIRTQ_DESC_F_USED)
_F_AVAIL_USED = _F_AVAIL | _F_USED

_DESC = PVIRTQ_DESC.struct
_DESC_SIZE = PVIRTQ_DESC.size
_FLAGS = PVIRTQ_DESC.field_struct("flags")
#: ``addr``, ``len`` and ``id`` of a ``pvirtq_desc``: the 14 bytes before ``flags``.
#: A descriptor the peer may be polling is written with this and then its flags with
#: one 16-bit store: ``struct.pack_into`` of the whole descriptor zero-fills all 16
#: bytes before writing the fields, and flags that read 0 for a moment look "used"
#: (AVAIL = USED = 0) on a lap whose used wrap counter is 0.
_DESC_BODY = struct.Struct("<QIH")
_FLAGS_OFF = PVIRTQ_DESC.offset_of("flags")
_EVT = PVIRTQ_EVENT_SUPPRESS.struct
_EVT_DESC = PVIRTQ_EVENT_SUPPRESS.field_struct("desc")
_EVT_DESC_OFF = PVIRTQ_EVENT_SUPPRESS.offset_of("desc")
_EVT_FLAGS = PVIRTQ_EVENT_SUPPRESS.field_struct("flags")
_EVT_FLAGS_OFF = PVIRTQ_EVENT_SUPPRESS.offset_of("flags")

_U32_LIMIT = 1 << 32
_NO_FEATURES = RingFeatures()


def event_in_range(off_wrap: int, old_pos: int, old_wrap: bool, count: int, size: int) -> bool:
    """Whether the event position ``off_wrap`` is among ``count`` slots from ``old_pos``.

    ``off_wrap`` is a ``pvirtq_event_suppress.desc`` value: ``desc_event_off`` in bits
    0..14, ``desc_event_wrap`` in bit 15 (virtio-v1.2 §2.8.14 "Event Suppression
    Structure Format"). Ring positions are compared modulo two laps (the wrap counter
    is 1 on even laps), so a descriptor-specific event "will only trigger when Ring
    Wrap Counter matches this value and a descriptor is made available/used"
    (virtio-v1.2 §2.8.10 "Driver and Device Event Suppression"). ``count`` >= ``size``
    always triggers (the whole ring went by).
    """
    if count >= size:
        return True
    off = off_wrap & 0x7FFF
    ev = off if off_wrap >> 15 else off + size
    start = old_pos if old_wrap else old_pos + size
    return (ev - start) % (2 * size) < count


def _event_wanted(
    evt: memoryview, event_idx: bool, old_pos: int, old_wrap: bool, count: int, size: int
) -> bool:
    """Whether the peer's event suppression structure ``evt`` asks for a notification
    after ``count`` slots went by from ``old_pos``/``old_wrap`` (virtio-v1.2 §2.8.10).

    DISABLE never; ENABLE always; DESC (with VIRTIO_F_EVENT_IDX) when the descriptor
    at ``desc_event_off`` with wrap ``desc_event_wrap`` was among those slots.
    """
    # ``evt`` is the structure as 16-bit words (u16_words): one atomic load each
    off_wrap, flags = evt[0], evt[1]
    flags &= 0x3
    if flags == RING_EVENT_FLAGS_DISABLE:
        return False
    if flags != RING_EVENT_FLAGS_DESC or not event_idx:
        # ENABLE; DESC is "Only valid if VIRTIO_F_EVENT_IDX has been negotiated" and
        # 0x3 is reserved: notifying is the safe answer to both.
        return True
    return event_in_range(off_wrap, old_pos, old_wrap, count, size)
