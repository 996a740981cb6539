"""Constants the virtqueue tests share: guest RAM size, descriptor flags as plain
ints, and the ring feature sets the tests combine."""

from __future__ import annotations

from pyvirtio.spec.ring import (
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
)
from pyvirtio.virtqueue.common import RingFeatures

#: guest RAM of every test that does not build its own
MEM_SIZE = 1 << 20
#: where the allocator of the shared ``alloc`` fixture starts
ALLOC_BASE = 0x1000

NEXT = int(VIRTQ_DESC_F_NEXT)
WRITE = int(VIRTQ_DESC_F_WRITE)
INDIRECT = int(VIRTQ_DESC_F_INDIRECT)
AVAIL = int(VIRTQ_DESC_F_AVAIL)
USED = int(VIRTQ_DESC_F_USED)

IND = RingFeatures(indirect=True)
EVT = RingFeatures(event_idx=True)
INORDER = RingFeatures(in_order=True)
NOFEAT = RingFeatures()
