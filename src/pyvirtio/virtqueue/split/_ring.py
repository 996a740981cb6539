"""What the device and driver sides of a split virtqueue share (virtio-v1.2 §2.7).

Plain-int flags and precompiled structs/offsets for the hot paths, taken from the one
definition of each layout in :mod:`pyvirtio.spec.ring` (``virtq_desc``,
``virtq_avail``, ``virtq_used``, ``virtq_used_elem``).
"""

from __future__ import annotations

from pyvirtio.spec.ring import (
    LE16,
    VIRTQ_AVAIL_HEADER,
    VIRTQ_DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_ELEM,
    VIRTQ_USED_HEADER,
)
from pyvirtio.virtqueue.common import RingFeatures

_DESC = VIRTQ_DESC.struct  # "<QIHH": addr, len, flags, next
_DESC_SIZE = VIRTQ_DESC.size
_U16 = LE16.struct
_ELEM = VIRTQ_USED_ELEM.struct
_ELEM_SIZE = VIRTQ_USED_ELEM.size
_AVAIL_FLAGS_OFF = VIRTQ_AVAIL_HEADER.offset_of("flags")
_AVAIL_IDX_OFF = VIRTQ_AVAIL_HEADER.offset_of("idx")
_AVAIL_RING_OFF = VIRTQ_AVAIL_HEADER.size
_USED_FLAGS_OFF = VIRTQ_USED_HEADER.offset_of("flags")
_USED_IDX_OFF = VIRTQ_USED_HEADER.offset_of("idx")
_USED_RING_OFF = VIRTQ_USED_HEADER.size

_NO_FEATURES = RingFeatures()

# Plain ints for the hot paths (IntFlag arithmetic is slow).
_F_NEXT = int(VIRTQ_DESC_F_NEXT)
_F_WRITE = int(VIRTQ_DESC_F_WRITE)
_F_INDIRECT = int(VIRTQ_DESC_F_INDIRECT)
#: "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total"
_MAX_CHAIN_BYTES = 1 << 32
