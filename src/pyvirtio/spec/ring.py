"""Virtqueue wire layouts and flags, split (virtio-v1.2 §2.7) and packed (§2.8).

Every ring struct is declared once here. Sizes are asserted by
``tests/spec/test_layouts.py``.
"""

from __future__ import annotations

from enum import IntFlag
from typing import NamedTuple

from pyvirtio.spec.layout import WireStruct

# ---------------------------------------------------------------------------
# Split virtqueue (virtio-v1.2 §2.7)
# ---------------------------------------------------------------------------


class VirtqDescFlags(IntFlag):
    """``virtq_desc.flags`` (virtio-v1.2 §2.7.5 "The Virtqueue Descriptor Table").

    For packed rings the same NEXT/WRITE/INDIRECT values apply, plus AVAIL/USED
    (virtio-v1.2 §2.8.1 "Driver and Device Ring Wrap Counters").
    """

    NONE = 0
    #: VIRTQ_DESC_F_NEXT: this marks a buffer as continuing via the next field.
    NEXT = 1
    #: VIRTQ_DESC_F_WRITE: this marks a buffer as device write-only (otherwise read-only).
    WRITE = 2
    #: VIRTQ_DESC_F_INDIRECT: this means the buffer contains a list of buffer descriptors.
    INDIRECT = 4
    #: VIRTQ_DESC_F_AVAIL (packed ring only)
    AVAIL = 1 << 7
    #: VIRTQ_DESC_F_USED (packed ring only)
    USED = 1 << 15


VIRTQ_DESC_F_NEXT = VirtqDescFlags.NEXT
VIRTQ_DESC_F_WRITE = VirtqDescFlags.WRITE
VIRTQ_DESC_F_INDIRECT = VirtqDescFlags.INDIRECT
VIRTQ_DESC_F_AVAIL = VirtqDescFlags.AVAIL
VIRTQ_DESC_F_USED = VirtqDescFlags.USED

#: virtq_avail.flags: VIRTQ_AVAIL_F_NO_INTERRUPT (§2.7.7 "Used Buffer Notification Suppression")
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
#: virtq_used.flags: VIRTQ_USED_F_NO_NOTIFY (§2.7.10 "Available Buffer Notification Suppression")
VIRTQ_USED_F_NO_NOTIFY = 1

#: Maximum queue size of a split ring: "Queue Size ... is a power of 2 ... maximum
#: Queue Size value is 32768" (virtio-v1.2 §2.7 "Split Virtqueues").
SPLIT_MAX_QUEUE_SIZE = 32768
#: Packed ring size: "Queue Size ... can be any value up to 32768" (§2.8).
PACKED_MAX_QUEUE_SIZE = 32768


class VirtqDesc(NamedTuple):
    """``struct virtq_desc`` (virtio-v1.2 §2.7.5)::

    struct virtq_desc {
            le64 addr;   /* Address (guest-physical). */
            le32 len;    /* Length. */
            le16 flags;  /* The flags as indicated above. */
            le16 next;   /* Next field if flags & NEXT */
    };
    """

    addr: int
    len: int
    flags: int
    next: int


VIRTQ_DESC = WireStruct(
    VirtqDesc, [("addr", "le64"), ("len", "le32"), ("flags", "le16"), ("next", "le16")]
)


class VirtqAvailHeader(NamedTuple):
    """Head of ``struct virtq_avail`` (virtio-v1.2 §2.7.6 "The Virtqueue Available Ring")::

    struct virtq_avail {
            le16 flags;
            le16 idx;
            le16 ring[ /* Queue Size */ ];
            le16 used_event; /* Only if VIRTIO_F_EVENT_IDX */
    };
    """

    flags: int
    idx: int


VIRTQ_AVAIL_HEADER = WireStruct(VirtqAvailHeader, [("flags", "le16"), ("idx", "le16")])


class VirtqUsedElem(NamedTuple):
    """``struct virtq_used_elem`` (virtio-v1.2 §2.7.8 "The Virtqueue Used Ring")::

    struct virtq_used_elem {
            le32 id;  /* Index of start of used descriptor chain. */
            le32 len; /* Bytes written into the device writable portion */
    };
    """

    id: int
    len: int


VIRTQ_USED_ELEM = WireStruct(VirtqUsedElem, [("id", "le32"), ("len", "le32")])


class VirtqUsedHeader(NamedTuple):
    """Head of ``struct virtq_used`` (virtio-v1.2 §2.7.8)::

    struct virtq_used {
            le16 flags;
            le16 idx;
            struct virtq_used_elem ring[ /* Queue Size */];
            le16 avail_event; /* Only if VIRTIO_F_EVENT_IDX */
    };
    """

    flags: int
    idx: int


VIRTQ_USED_HEADER = WireStruct(VirtqUsedHeader, [("flags", "le16"), ("idx", "le16")])

LE16 = WireStruct(lambda v: v, [("v", "le16")])


def split_desc_table_size(qsz: int) -> int:
    """Descriptor Area size: 16 * Queue Size (virtio-v1.2 §2.7 table of alignments)."""
    return VIRTQ_DESC.size * qsz


def split_avail_size(qsz: int) -> int:
    """Driver Area size: 6 + 2 * Queue Size (flags, idx, ring[], used_event)."""
    return VIRTQ_AVAIL_HEADER.size + 2 * qsz + 2


def split_used_size(qsz: int) -> int:
    """Device Area size: 6 + 8 * Queue Size (flags, idx, ring[], avail_event)."""
    return VIRTQ_USED_HEADER.size + VIRTQ_USED_ELEM.size * qsz + 2


#: Alignment of Descriptor Table, Available Ring and Used Ring (virtio-v1.2 §2.7).
SPLIT_DESC_ALIGN = 16
SPLIT_AVAIL_ALIGN = 2
SPLIT_USED_ALIGN = 4
#: Legacy vring layout aligns the used ring to 4096 (virtio-v1.2 §2.7.2).
LEGACY_VRING_ALIGN = 4096


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The spec's ``vring_need_event`` helper (virtio-v1.2 §2.7.10)::

    (u16)(new_idx - event_idx - 1) < (u16)(new_idx - old)
    """
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


# ---------------------------------------------------------------------------
# Packed virtqueue (virtio-v1.2 §2.8)
# ---------------------------------------------------------------------------


class PvirtqDesc(NamedTuple):
    """``struct pvirtq_desc`` (virtio-v1.2 §2.8.13 "The Virtqueue Descriptor Format")::

    struct pvirtq_desc {
            le64 addr;  /* Buffer Address. */
            le32 len;   /* Buffer Length. */
            le16 id;    /* Buffer ID. */
            le16 flags; /* The flags depending on descriptor type. */
    };
    """

    addr: int
    len: int
    id: int
    flags: int


PVIRTQ_DESC = WireStruct(
    PvirtqDesc, [("addr", "le64"), ("len", "le32"), ("id", "le16"), ("flags", "le16")]
)


class PvirtqEventSuppress(NamedTuple):
    """``struct pvirtq_event_suppress`` (virtio-v1.2 §2.8.14 "Event Suppression Structure
    Format")::

        struct pvirtq_event_suppress {
                le16 desc;   /* Descriptor Ring Change Event Offset/Wrap Counter. */
                le16 flags;  /* Descriptor Ring Change Event Flags. */
        };

    ``desc`` packs ``desc_event_off`` (bits 0..14) and ``desc_event_wrap`` (bit 15).
    """

    desc: int
    flags: int


PVIRTQ_EVENT_SUPPRESS = WireStruct(PvirtqEventSuppress, [("desc", "le16"), ("flags", "le16")])

#: pvirtq_event_suppress.flags values (virtio-v1.2 §2.8.14)
RING_EVENT_FLAGS_ENABLE = 0x0
RING_EVENT_FLAGS_DISABLE = 0x1
RING_EVENT_FLAGS_DESC = 0x2

#: Alignment of the packed Descriptor Ring and the event suppression structures (§2.8.10.1)
PACKED_DESC_ALIGN = 16
PACKED_EVENT_ALIGN = 4


def packed_desc_ring_size(qsz: int) -> int:
    """Descriptor Area size of a packed ring: 16 * Queue Size."""
    return PVIRTQ_DESC.size * qsz
