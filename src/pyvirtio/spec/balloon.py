"""Memory balloon constants and wire layouts. virtio-v1.2 §5.5 "Traditional Memory
Balloon Device".

Device ID 5 (13 is reserved for a future balloon with different semantics). The
configuration space is ``struct virtio_balloon_config`` (§5.5.4); inflate and deflate
requests are arrays of le32 page frame numbers of 4096-byte pages whatever the guest
page size (§5.5.6: "These addresses are divided by 4096"); memory statistics are
10-byte ``struct virtio_balloon_stat`` entries (§5.5.6.3).

Virtqueues (virtio-v1.2 §5.5.2 "Virtqueues")::

    0 inflateq  1 deflateq  2 statsq  3 free_page_vq  4 reporting_vq

"statsq only exists if VIRTIO_BALLOON_F_STATS_VQ is set. free_page_vq only exists if
VIRTIO_BALLOON_F_FREE_PAGE_HINT is set. reporting_vq only exists if
VIRTIO_BALLOON_F_PAGE_REPORTING is set." A queue that does not exist takes no index:
the later ones move down (as Linux's virtballoon and QEMU's virtio-balloon number
them), so with only PAGE_REPORTING the reporting_vq is queue 2. :func:`queue_indexes`
gives the numbering for a feature set.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

from pyvirtio.spec.layout import WireStruct

__all__ = [
    "BALLOON_CONFIG",
    "BALLOON_STAT",
    "MAX_QUEUES",
    "PFN_SHIFT",
    "PFN_SIZE",
    "BalloonFeature",
    "BalloonQueue",
    "CmdId",
    "StatTag",
    "VirtioBalloonConfig",
    "VirtioBalloonStat",
    "queue_indexes",
    "virtqueue_count",
]

#: ``VIRTIO_BALLOON_PFN_SHIFT``: PFNs count 4096-byte pages (§5.5.6: "This is
#: historical, and independent of the guest page size").
PFN_SHIFT = 12
#: Bytes of the page one balloon PFN names.
PFN_SIZE = 1 << PFN_SHIFT
#: Largest number of queues a balloon can have (every optional queue present).
MAX_QUEUES = 5


class BalloonFeature(IntEnum):
    """Balloon feature bits (virtio-v1.2 §5.5.3 "Feature bits")."""

    #: "Host has to be told before pages from the balloon are used."
    MUST_TELL_HOST = 0
    #: "A virtqueue for reporting guest memory statistics is present."
    STATS_VQ = 1
    #: "Deflate balloon on guest out of memory condition."
    DEFLATE_ON_OOM = 2
    #: free page hinting: free_page_vq and ``free_page_hint_cmd_id`` are valid
    FREE_PAGE_HINT = 3
    #: the driver writes ``poison_val`` to pages after deflating them
    PAGE_POISON = 4
    #: free page reporting: reporting_vq is present (Linux: VIRTIO_BALLOON_F_REPORTING)
    PAGE_REPORTING = 5

    @property
    def mask(self) -> int:
        """``1 << bit``."""
        return 1 << int(self)


class BalloonQueue(IntEnum):
    """The balloon's queues by role, numbered as when every one exists (§5.5.2)."""

    INFLATEQ = 0
    DEFLATEQ = 1
    STATSQ = 2
    FREE_PAGE_VQ = 3
    REPORTING_VQ = 4


#: the feature that makes each optional queue exist (§5.5.2)
_QUEUE_FEATURE = {
    BalloonQueue.STATSQ: BalloonFeature.STATS_VQ,
    BalloonQueue.FREE_PAGE_VQ: BalloonFeature.FREE_PAGE_HINT,
    BalloonQueue.REPORTING_VQ: BalloonFeature.PAGE_REPORTING,
}


def queue_indexes(features: int) -> dict[BalloonQueue, int]:
    """Queue index of each queue that exists with ``features`` (virtio-v1.2 §5.5.2
    "Virtqueues"): inflateq 0, deflateq 1, then statsq, free_page_vq and reporting_vq
    in that order, each only if its feature is set, taking the next free index."""
    out: dict[BalloonQueue, int] = {}
    for role in BalloonQueue:
        feature = _QUEUE_FEATURE.get(role)
        if feature is None or features >> int(feature) & 1:
            out[role] = len(out)
    return out


def virtqueue_count(features: int) -> int:
    """How many queues a balloon has with ``features``."""
    return len(queue_indexes(features))


class CmdId(IntEnum):
    """Reserved ``free_page_hint_cmd_id`` values (§5.5.6.4 "Free Page Hinting");
    2 and above are command ids of hinting rounds."""

    #: "Any command ID previously supplied by the device is invalid. The driver should
    #: stop hinting free pages until a new command ID is supplied"
    STOP = 0
    #: "... and should release all hinted pages for use by the guest"
    DONE = 1


class StatTag(IntEnum):
    """``virtio_balloon_stat.tag`` values (virtio-v1.2 §5.5.6.3.1 "Memory Statistics
    Tags"); amounts of memory are in bytes."""

    SWAP_IN = 0
    SWAP_OUT = 1
    MAJFLT = 2
    MINFLT = 3
    MEMFREE = 4
    MEMTOT = 5
    AVAIL = 6
    CACHES = 7
    HTLB_PGALLOC = 8
    HTLB_PGFAIL = 9


class VirtioBalloonConfig(NamedTuple):
    """virtio-v1.2 §5.5.4 "Device configuration layout"::

    struct virtio_balloon_config {
            le32 num_pages;
            le32 actual;
            le32 free_page_hint_cmd_id;
            le32 poison_val;
    };

    ``num_pages`` and ``actual`` are always available; ``free_page_hint_cmd_id``
    (read-only by the driver) with VIRTIO_BALLOON_F_FREE_PAGE_HINT, ``poison_val``
    with VIRTIO_BALLOON_F_PAGE_POISON.
    """

    num_pages: int
    actual: int
    free_page_hint_cmd_id: int
    poison_val: int


BALLOON_CONFIG = WireStruct(
    VirtioBalloonConfig,
    [
        ("num_pages", "le32"),
        ("actual", "le32"),
        ("free_page_hint_cmd_id", "le32"),
        ("poison_val", "le32"),
    ],
)


class VirtioBalloonStat(NamedTuple):
    """virtio-v1.2 §5.5.6.3 "Memory Statistics"::

    struct virtio_balloon_stat {
            le16 tag;
            le64 val;
    } __attribute__((packed));
    """

    tag: int
    val: int


BALLOON_STAT = WireStruct(VirtioBalloonStat, [("tag", "le16"), ("val", "le64")])
