"""Network device constants and wire layouts. virtio-v1.2 §5.1 "Network Device".

Device ID 1. Virtqueues (§5.1.2): receiveq1, transmitq1, ..., receiveqN, transmitqN
(N = 1 without VIRTIO_NET_F_MQ, else up to ``max_virtqueue_pairs``), then controlq
when VIRTIO_NET_F_CTRL_VQ is negotiated.

The header that precedes every packet (``struct virtio_net_hdr``, §5.1.6) has a
length that follows from the negotiated features alone, never from anything the
other side sends: :func:`net_hdr_size`.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import NamedTuple

from pyvirtio.spec.features import Feature, has
from pyvirtio.spec.layout import WireStruct

__all__ = [
    "FEATURE_REQUIREMENTS",
    "ETH_ALEN",
    "VIRTIO_NET_CONFIG",
    "VIRTIO_NET_CTRL_HDR",
    "VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX",
    "VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN",
    "VIRTIO_NET_ERR",
    "VIRTIO_NET_HDR",
    "VIRTIO_NET_HDR_HASH",
    "VIRTIO_NET_HDR_LEGACY",
    "VirtioNetHdrHash",
    "VIRTIO_NET_OK",
    "NetCtrlAnnounce",
    "NetCtrlClass",
    "NetCtrlMac",
    "NetCtrlMq",
    "NetCtrlRx",
    "NetCtrlVlan",
    "NetFeature",
    "NetGsoType",
    "NetHdrFlags",
    "NetStatus",
    "VirtioNetConfig",
    "VirtioNetCtrlHdr",
    "VirtioNetHdr",
    "net_hdr_size",
    "virtqueue_count",
]

#: Bytes of a MAC address.
ETH_ALEN = 6


class NetFeature(IntEnum):
    """Network device feature bits (virtio-v1.2 §5.1.3 "Feature bits")."""

    CSUM = 0
    GUEST_CSUM = 1
    CTRL_GUEST_OFFLOADS = 2
    MTU = 3
    MAC = 5
    #: legacy: "the driver can receive packets with any GSO type" (§5.1.3.2)
    GSO = 6
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_ECN = 9
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_ECN = 13
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17
    CTRL_RX = 18
    CTRL_VLAN = 19
    CTRL_RX_EXTRA = 20
    GUEST_ANNOUNCE = 21
    MQ = 22
    CTRL_MAC_ADDR = 23
    NOTF_COAL = 53
    HASH_REPORT = 57
    RSS = 60
    RSC_EXT = 61
    STANDBY = 62
    SPEED_DUPLEX = 63

    @property
    def mask(self) -> int:
        """This feature as a bit mask."""
        return 1 << int(self)


class NetStatus(IntFlag):
    """``virtio_net_config.status`` bits (virtio-v1.2 §5.1.4)."""

    LINK_UP = 1
    ANNOUNCE = 2


class VirtioNetConfig(NamedTuple):
    """``struct virtio_net_config`` (virtio-v1.2 §5.1.4 "Device configuration layout")::

    struct virtio_net_config {
            u8 mac[6];
            le16 status;
            le16 max_virtqueue_pairs;
            le16 mtu;
            le32 speed;
            u8 duplex;
            u8 rss_max_key_size;
            le16 rss_max_indirection_table_length;
            le32 supported_hash_types;
    };
    """

    mac: bytes
    status: int
    max_virtqueue_pairs: int
    mtu: int
    speed: int
    duplex: int
    rss_max_key_size: int
    rss_max_indirection_table_length: int
    supported_hash_types: int


VIRTIO_NET_CONFIG = WireStruct(
    VirtioNetConfig,
    [
        ("mac", "bytes6"),
        ("status", "le16"),
        ("max_virtqueue_pairs", "le16"),
        ("mtu", "le16"),
        ("speed", "le32"),
        ("duplex", "u8"),
        ("rss_max_key_size", "u8"),
        ("rss_max_indirection_table_length", "le16"),
        ("supported_hash_types", "le32"),
    ],
)


class NetHdrFlags(IntFlag):
    """``virtio_net_hdr.flags`` (virtio-v1.2 §5.1.6)."""

    NEEDS_CSUM = 1
    DATA_VALID = 2
    RSC_INFO = 4


class NetGsoType(IntEnum):
    """``virtio_net_hdr.gso_type`` values (virtio-v1.2 §5.1.6); :attr:`ECN` is a flag
    OR-ed onto the others."""

    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    ECN = 0x80


class VirtioNetHdr(NamedTuple):
    """``struct virtio_net_hdr`` (virtio-v1.2 §5.1.6 "Device Operation")::

    struct virtio_net_hdr {
            u8 flags;
            u8 gso_type;
            le16 hdr_len;
            le16 gso_size;
            le16 csum_start;
            le16 csum_offset;
            le16 num_buffers;
    };

    :data:`VIRTIO_NET_HDR_LEGACY` is the same without ``num_buffers`` (10 bytes: the
    legacy layout without VIRTIO_NET_F_MRG_RXBUF); its values have ``num_buffers`` 0.
    """

    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int
    csum_offset: int
    num_buffers: int = 0


_HDR_FIELDS = [
    ("flags", "u8"),
    ("gso_type", "u8"),
    ("hdr_len", "le16"),
    ("gso_size", "le16"),
    ("csum_start", "le16"),
    ("csum_offset", "le16"),
]
VIRTIO_NET_HDR = WireStruct(VirtioNetHdr, [*_HDR_FIELDS, ("num_buffers", "le16")])
VIRTIO_NET_HDR_LEGACY = WireStruct(VirtioNetHdr, _HDR_FIELDS)


class VirtioNetHdrHash(NamedTuple):
    """The header with VIRTIO_NET_F_HASH_REPORT (virtio-v1.2 §5.1.6): ``struct
    virtio_net_hdr`` followed by ``le32 hash_value; le16 hash_report; le16
    padding_reserved;`` (20 bytes)."""

    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int
    csum_offset: int
    num_buffers: int
    hash_value: int
    hash_report: int


VIRTIO_NET_HDR_HASH = WireStruct(
    VirtioNetHdrHash,
    [
        *_HDR_FIELDS,
        ("num_buffers", "le16"),
        ("hash_value", "le32"),
        ("hash_report", "le16"),
        ("padding_reserved", "pad2"),
    ],
)


#: virtio-v1.2 §5.1.3.1 "Feature bit requirements": feature -> (features of which at
#: least one must also be negotiated).
FEATURE_REQUIREMENTS: dict[int, tuple[int, ...]] = {
    NetFeature.GUEST_TSO4: (NetFeature.GUEST_CSUM,),
    NetFeature.GUEST_TSO6: (NetFeature.GUEST_CSUM,),
    NetFeature.GUEST_ECN: (NetFeature.GUEST_TSO4, NetFeature.GUEST_TSO6),
    NetFeature.GUEST_UFO: (NetFeature.GUEST_CSUM,),
    NetFeature.HOST_TSO4: (NetFeature.CSUM,),
    NetFeature.HOST_TSO6: (NetFeature.CSUM,),
    NetFeature.HOST_ECN: (NetFeature.HOST_TSO4, NetFeature.HOST_TSO6),
    NetFeature.HOST_UFO: (NetFeature.CSUM,),
    NetFeature.CTRL_RX: (NetFeature.CTRL_VQ,),
    NetFeature.CTRL_RX_EXTRA: (NetFeature.CTRL_RX,),
    NetFeature.CTRL_VLAN: (NetFeature.CTRL_VQ,),
    NetFeature.GUEST_ANNOUNCE: (NetFeature.CTRL_VQ,),
    NetFeature.MQ: (NetFeature.CTRL_VQ,),
    NetFeature.CTRL_MAC_ADDR: (NetFeature.CTRL_VQ,),
    NetFeature.CTRL_GUEST_OFFLOADS: (NetFeature.CTRL_VQ,),
    NetFeature.RSS: (NetFeature.CTRL_VQ,),
    NetFeature.RSC_EXT: (NetFeature.HOST_TSO4, NetFeature.HOST_TSO6),
}


def net_hdr_size(features: int) -> int:
    """Length of the header before each packet for the negotiated ``features``.

    virtio-v1.2 §5.1.6: ``num_buffers`` is present when VIRTIO_F_VERSION_1 or
    VIRTIO_NET_F_MRG_RXBUF is negotiated (12 bytes; 10 without, the legacy layout of
    §5.1.6.1), and the hash report fields with VIRTIO_NET_F_HASH_REPORT (20 bytes).
    Derived from the features only: a device must never size the header by what the
    driver claims (the CVE-2023-6693 class of bug).
    """
    if has(features, NetFeature.HASH_REPORT):
        return VIRTIO_NET_HDR_HASH.size
    if has(features, Feature.VERSION_1) or has(features, NetFeature.MRG_RXBUF):
        return VIRTIO_NET_HDR.size
    return VIRTIO_NET_HDR_LEGACY.size


def virtqueue_count(features: int, max_virtqueue_pairs: int) -> int:
    """Virtqueues the driver uses (virtio-v1.2 §5.1.2): 2 per queue pair (one pair
    without VIRTIO_NET_F_MQ), plus the control queue with VIRTIO_NET_F_CTRL_VQ."""
    pairs = max_virtqueue_pairs if has(features, NetFeature.MQ) else 1
    return 2 * pairs + (1 if has(features, NetFeature.CTRL_VQ) else 0)


# -- the control virtqueue (virtio-v1.2 §5.1.6.5) ---------------------------------------


class VirtioNetCtrlHdr(NamedTuple):
    """``struct virtio_net_ctrl { u8 class; u8 command; ... u8 ack; }``: the header
    of a control command (its ``command-specific-data`` follows, then the
    device-writable ``ack``)."""

    class_: int
    command: int


VIRTIO_NET_CTRL_HDR = WireStruct(VirtioNetCtrlHdr, [("class_", "u8"), ("command", "u8")])

#: ``ack`` values: the device-writable byte that ends a control command.
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1


class NetCtrlClass(IntEnum):
    """Control command classes (virtio-v1.2 §5.1.6.5)."""

    RX = 0
    MAC = 1
    VLAN = 2
    ANNOUNCE = 3
    MQ = 4
    GUEST_OFFLOADS = 5
    NOTF_COAL = 6


class NetCtrlRx(IntEnum):
    """VIRTIO_NET_CTRL_RX commands (§5.1.6.5.1): each carries one u8, on or off."""

    PROMISC = 0
    ALLMULTI = 1
    ALLUNI = 2
    NOMULTI = 3
    NOUNI = 4
    NOBCAST = 5


class NetCtrlMac(IntEnum):
    """VIRTIO_NET_CTRL_MAC commands (§5.1.6.5.2)."""

    TABLE_SET = 0
    ADDR_SET = 1


class NetCtrlVlan(IntEnum):
    """VIRTIO_NET_CTRL_VLAN commands (§5.1.6.5.3): each carries one le16 VLAN id."""

    ADD = 0
    DEL = 1


class NetCtrlAnnounce(IntEnum):
    """VIRTIO_NET_CTRL_ANNOUNCE commands (§5.1.6.5.4)."""

    ACK = 0


class NetCtrlMq(IntEnum):
    """VIRTIO_NET_CTRL_MQ commands (§5.1.6.5.5)."""

    VQ_PAIRS_SET = 0
    RSS_CONFIG = 1
    HASH_CONFIG = 2


#: ``virtqueue_pairs`` of VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET must lie in this range.
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN = 1
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX = 0x8000
