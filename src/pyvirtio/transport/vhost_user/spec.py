"""vhost-user protocol constants and message layouts (QEMU ``docs/interop/vhost-user.rst``).

Every message body is declared exactly once here, as a :class:`~pyvirtio.spec.layout.WireStruct`
(variable-length bodies: a fixed head plus a repeated or byte-array tail, each part declared
once). Sizes are asserted by ``tests/transport/vhost_user/test_codec.py`` against the C
structs of the protocol document and of ``<linux/vhost_types.h>``.

Byte order: the document says "All numbers are in the machine native byte order". vhost-user
only connects processes on one host and pyvirtio targets little-endian hosts (x86-64,
aarch64, riscv64), so every field is declared little-endian; :data:`NATIVE_LITTLE_ENDIAN`
lets the I/O edge refuse to run on a big-endian host.

Names follow the document: request codes drop the ``VHOST_USER_`` (front-end requests) or
``VHOST_USER_BACKEND_`` (back-end requests) prefix, which :attr:`FrontendRequest.spec_name`
puts back; protocol feature bits keep their full ``VHOST_USER_PROTOCOL_F_*`` names as module
constants too. This module holds facts only; validation lives in :mod:`.codec`.
"""

from __future__ import annotations

import sys
from enum import Enum, IntEnum, IntFlag
from typing import Any, NamedTuple
from uuid import UUID

from pyvirtio.spec.layout import WireStruct

#: True on the hosts pyvirtio supports; vhost-user numbers are host-native.
NATIVE_LITTLE_ENDIAN = sys.byteorder == "little"

# ---------------------------------------------------------------------------
# Header
# ---------------------------------------------------------------------------

#: "Lower 2 bits are the version (currently 0x01)".
VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
#: "Bit 2 is the reply flag - needs to be sent on each reply from the back-end".
VHOST_USER_REPLY_MASK = 1 << 2
#: "Bit 3 is the need_reply flag" (REPLY_ACK).
VHOST_USER_NEED_REPLY_MASK = 1 << 3


class HeaderFlags(IntFlag):
    """The ``flags`` word of the message header."""

    NONE = 0
    #: version 1 (the only version; bits 0-1)
    VERSION_1 = VHOST_USER_VERSION
    #: the message is a reply
    REPLY = VHOST_USER_REPLY_MASK
    #: the sender asks for a REPLY_ACK answer
    NEED_REPLY = VHOST_USER_NEED_REPLY_MASK


#: Every flag bit this implementation knows; any other set bit is a protocol error.
HEADER_FLAGS_KNOWN = VHOST_USER_VERSION_MASK | VHOST_USER_REPLY_MASK | VHOST_USER_NEED_REPLY_MASK
#: Flags of every reply: exactly version 1 + REPLY (QEMU refuses any other value).
REPLY_FLAGS = HeaderFlags.VERSION_1 | HeaderFlags.REPLY


class VhostUserHeader(NamedTuple):
    """The message header::

    +---------+-------+------+---------+
    | request | flags | size | payload |
    +---------+-------+------+---------+
    u32 request; u32 flags; u32 size;   /* size of the payload that follows */
    """

    request: int
    flags: int
    size: int


VHOST_USER_HEADER = WireStruct(
    VhostUserHeader, [("request", "le32"), ("flags", "le32"), ("size", "le32")]
)
#: ``VHOST_USER_HDR_SIZE``
VHOST_USER_HDR_SIZE = VHOST_USER_HEADER.size

# ---------------------------------------------------------------------------
# Sizes and masks
# ---------------------------------------------------------------------------

#: Regions a ``VHOST_USER_SET_MEM_TABLE`` message can carry (and fds it can carry).
VHOST_MEMORY_BASELINE_NREGIONS = 8
#: "Maximum size of virtio device config space" in a config message.
VHOST_USER_MAX_CONFIG_SIZE = 256
#: File descriptors one message may carry (8 on both channels: the memory table
#: carries one per region; the back-end channel allows "at most 8 descriptors").
VHOST_USER_MAX_FDS = 8
#: Largest payload pyvirtio accepts in any message. Every declared body is at most
#: 268 bytes (config space); QEMU's own union (its crypto session) is about 1.1 KiB.
#: A header announcing more is refused before the payload is read.
VHOST_USER_MAX_PAYLOAD_SIZE = 4096
#: ``u64`` of KICK/CALL/ERR and of the vring area: bits 0-7 are the vring index.
VHOST_USER_VRING_IDX_MASK = 0xFF
#: ... and bit 8 says "no file descriptor in the ancillary data".
VHOST_USER_VRING_NOFD_MASK = 1 << 8
#: Bit number of ``VHOST_USER_F_PROTOCOL_FEATURES`` in GET/SET_FEATURES.
VHOST_USER_F_PROTOCOL_FEATURES = 30
#: vhost feature bit: "Log all write descriptors" (migration dirty logging).
VHOST_F_LOG_ALL = 26
#: Bit number in ``vhost_vring_addr.flags``: the log address is valid, log used-ring writes.
VHOST_VRING_F_LOG = 0
#: Dirty-log page size.
VHOST_LOG_PAGE = 0x1000
#: Largest queue size (virtio-v1.2 §2.7 "Split Virtqueues" and §2.8 "Packed Virtqueues").
VIRTQUEUE_MAX_SIZE = 32768
#: Ring slots QEMU can hand out with CONFIGURE_MEM_SLOTS (``VHOST_USER_MAX_RAM_SLOTS``).
VHOST_USER_MAX_RAM_SLOTS = 512


# ---------------------------------------------------------------------------
# Request codes
# ---------------------------------------------------------------------------


class FrontendRequest(IntEnum):
    """Front-end message types (front-end -> back-end, main socket): ``VHOST_USER_<name>``."""

    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    #: VIRTIO Shared Memory Regions extension (newest protocol revision)
    GET_SHMEM_CONFIG = 44
    #: previous name of ``SET_BACKEND_REQ_FD``
    SET_SLAVE_REQ_FD = 21

    @property
    def spec_name(self) -> str:
        """The document's name, e.g. ``VHOST_USER_GET_FEATURES``."""
        return f"VHOST_USER_{self.name}"


class BackendRequest(IntEnum):
    """Back-end message types (back-end -> front-end, back-end channel):
    ``VHOST_USER_BACKEND_<name>`` (previously ``VHOST_USER_SLAVE_<name>``)."""

    NONE = 0
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    #: VIRTIO Shared Memory Regions extension (newest protocol revision)
    SHMEM_MAP = 9
    #: VIRTIO Shared Memory Regions extension (newest protocol revision)
    SHMEM_UNMAP = 10

    @property
    def spec_name(self) -> str:
        """The document's name, e.g. ``VHOST_USER_BACKEND_CONFIG_CHANGE_MSG``."""
        return f"VHOST_USER_BACKEND_{self.name}"


# ---------------------------------------------------------------------------
# Protocol features
# ---------------------------------------------------------------------------


class ProtocolFeature(IntEnum):
    """Protocol feature bit numbers: ``VHOST_USER_PROTOCOL_F_<name>``.

    Negotiated with GET/SET_PROTOCOL_FEATURES, only once both sides have
    ``VHOST_USER_F_PROTOCOL_FEATURES`` (bit 30) in GET_FEATURES.
    """

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19
    #: VIRTIO Shared Memory Regions extension (newest protocol revision)
    SHMEM = 20

    @property
    def mask(self) -> int:
        """This feature as a bit mask."""
        return 1 << int(self)

    @property
    def spec_name(self) -> str:
        """The document's name, e.g. ``VHOST_USER_PROTOCOL_F_MQ``."""
        return f"VHOST_USER_PROTOCOL_F_{self.name}"


VHOST_USER_PROTOCOL_F_MQ = ProtocolFeature.MQ
VHOST_USER_PROTOCOL_F_LOG_SHMFD = ProtocolFeature.LOG_SHMFD
VHOST_USER_PROTOCOL_F_RARP = ProtocolFeature.RARP
VHOST_USER_PROTOCOL_F_REPLY_ACK = ProtocolFeature.REPLY_ACK
VHOST_USER_PROTOCOL_F_MTU = ProtocolFeature.MTU
VHOST_USER_PROTOCOL_F_BACKEND_REQ = ProtocolFeature.BACKEND_REQ
VHOST_USER_PROTOCOL_F_CROSS_ENDIAN = ProtocolFeature.CROSS_ENDIAN
VHOST_USER_PROTOCOL_F_CRYPTO_SESSION = ProtocolFeature.CRYPTO_SESSION
VHOST_USER_PROTOCOL_F_PAGEFAULT = ProtocolFeature.PAGEFAULT
VHOST_USER_PROTOCOL_F_CONFIG = ProtocolFeature.CONFIG
VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD = ProtocolFeature.BACKEND_SEND_FD
VHOST_USER_PROTOCOL_F_HOST_NOTIFIER = ProtocolFeature.HOST_NOTIFIER
VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD = ProtocolFeature.INFLIGHT_SHMFD
VHOST_USER_PROTOCOL_F_RESET_DEVICE = ProtocolFeature.RESET_DEVICE
VHOST_USER_PROTOCOL_F_INBAND_NOTIFICATIONS = ProtocolFeature.INBAND_NOTIFICATIONS
VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS = ProtocolFeature.CONFIGURE_MEM_SLOTS
VHOST_USER_PROTOCOL_F_STATUS = ProtocolFeature.STATUS
VHOST_USER_PROTOCOL_F_XEN_MMAP = ProtocolFeature.XEN_MMAP
VHOST_USER_PROTOCOL_F_SHARED_OBJECT = ProtocolFeature.SHARED_OBJECT
VHOST_USER_PROTOCOL_F_DEVICE_STATE = ProtocolFeature.DEVICE_STATE
VHOST_USER_PROTOCOL_F_SHMEM = ProtocolFeature.SHMEM

# ---------------------------------------------------------------------------
# Small enumerations carried in bodies
# ---------------------------------------------------------------------------


class ConfigFlags(IntEnum):
    """``flags`` of the config-space body (SET_CONFIG)."""

    #: "Vhost front-end messages used for writable fields"
    WRITABLE = 0
    #: "Vhost front-end messages used for live migration"
    MIGRATION = 1


class IotlbType(IntEnum):
    """``type`` of ``struct vhost_iotlb_msg``."""

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4
    BATCH_BEGIN = 5
    BATCH_END = 6


class IotlbPerm(IntEnum):
    """``perm`` of ``struct vhost_iotlb_msg``."""

    NONE = 0
    RO = 1
    WO = 2
    RW = 3


class TransferDirection(IntEnum):
    """Device state transfer direction (SET_DEVICE_STATE_FD)."""

    #: back-end -> front-end, on the migration source
    SAVE = 0
    #: front-end -> back-end, on the migration destination
    LOAD = 1


class MigrationPhase(IntEnum):
    """Device state transfer phase (SET_DEVICE_STATE_FD)."""

    #: VM stopped, device suspended (the only phase defined so far)
    STOPPED = 0


#: ``VhostUserMMap.flags``: map read-write (else read-only).
VHOST_USER_FLAG_MAP_RW = 1

# ---------------------------------------------------------------------------
# Bodies
# ---------------------------------------------------------------------------


class VhostUserU64(NamedTuple):
    """ "A single 64-bit integer" payload: ``u64``."""

    u64: int


VHOST_USER_U64 = WireStruct(VhostUserU64, [("u64", "le64")])


class VhostVringState(NamedTuple):
    """ "A vring state description" (``struct vhost_vring_state``)::

        struct vhost_vring_state { unsigned int index; unsigned int num; };

    For SET/GET_VRING_BASE ``num`` holds the descriptor index(es): split rings use
    bits 0-15 (next avail index, free-running); packed rings use bits 0-14 last avail
    index, bit 15 driver wrap counter, bits 16-30 used index, bit 31 device wrap counter.
    """

    index: int  # type: ignore[assignment]  # the spec's name; shadows tuple.index
    num: int


VHOST_VRING_STATE = WireStruct(VhostVringState, [("index", "le32"), ("num", "le32")])


class VhostVringAddr(NamedTuple):
    """ "A vring address description" (``struct vhost_vring_addr``)::

        struct vhost_vring_addr {
                unsigned int index;
                unsigned int flags;        /* bit VHOST_VRING_F_LOG */
                __u64 desc_user_addr;
                __u64 used_user_addr;
                __u64 avail_user_addr;
                __u64 log_guest_addr;
        };

    Ring addresses are front-end user addresses (IOVAs with ``VIRTIO_F_IOMMU_PLATFORM``).
    """

    index: int  # type: ignore[assignment]  # the spec's name; shadows tuple.index
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


VHOST_VRING_ADDR = WireStruct(
    VhostVringAddr,
    [
        ("index", "le32"),
        ("flags", "le32"),
        ("desc_user_addr", "le64"),
        ("used_user_addr", "le64"),
        ("avail_user_addr", "le64"),
        ("log_guest_addr", "le64"),
    ],
)


class VhostUserMemoryRegion(NamedTuple):
    """ "Memory region description" (``VhostUserMemoryRegion``)::

    typedef struct VhostUserMemoryRegion {
            uint64_t guest_phys_addr;
            uint64_t memory_size;
            uint64_t userspace_addr;
            uint64_t mmap_offset;   /* where the region starts in the fd */
    } VhostUserMemoryRegion;
    """

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


_REGION_FIELDS = [
    ("guest_phys_addr", "le64"),
    ("memory_size", "le64"),
    ("userspace_addr", "le64"),
    ("mmap_offset", "le64"),
]
VHOST_USER_MEMORY_REGION = WireStruct(VhostUserMemoryRegion, _REGION_FIELDS)


class VhostUserMemoryHeader(NamedTuple):
    """Head of "Multiple Memory regions description" (``VhostUserMemory``)::

    typedef struct VhostUserMemory {
            uint32_t nregions;
            uint32_t padding;
            VhostUserMemoryRegion regions[nregions];   /* at most 8 */
    } VhostUserMemory;
    """

    nregions: int


VHOST_USER_MEMORY_HEADER = WireStruct(
    VhostUserMemoryHeader, [("nregions", "le32"), ("padding", "pad4")]
)


class VhostUserMemory(NamedTuple):
    """Body of SET_MEM_TABLE: the regions, in the order of the fds that map them.

    On the wire: :data:`VHOST_USER_MEMORY_HEADER` then ``nregions`` times
    :data:`VHOST_USER_MEMORY_REGION`.
    """

    regions: tuple[VhostUserMemoryRegion, ...]


#: "Single memory region description" (``VhostUserMemRegMsg``, ADD/REM_MEM_REG)::
#:
#:     typedef struct VhostUserMemRegMsg {
#:             uint64_t padding;
#:             VhostUserMemoryRegion region;
#:     } VhostUserMemRegMsg;
#:
#: decoded as the :class:`VhostUserMemoryRegion` it carries.
VHOST_USER_MEM_REG_MSG = WireStruct(VhostUserMemoryRegion, [("padding", "pad8"), *_REGION_FIELDS])


class VhostUserLog(NamedTuple):
    """ "Log description" (``VhostUserLog``, SET_LOG_BASE)::

    typedef struct VhostUserLog { uint64_t mmap_size; uint64_t mmap_offset; } VhostUserLog;
    """

    mmap_size: int
    mmap_offset: int


VHOST_USER_LOG = WireStruct(VhostUserLog, [("mmap_size", "le64"), ("mmap_offset", "le64")])


class VhostIotlbMsg(NamedTuple):
    """ "An IOTLB message" (``struct vhost_iotlb_msg``, 32 bytes with C tail padding)::

    struct vhost_iotlb_msg {
            __u64 iova; __u64 size; __u64 uaddr;
            __u8 perm;  /* IotlbPerm */
            __u8 type;  /* IotlbType */
    };
    """

    iova: int
    size: int
    uaddr: int
    perm: int
    type: int


VHOST_IOTLB_MSG = WireStruct(
    VhostIotlbMsg,
    [
        ("iova", "le64"),
        ("size", "le64"),
        ("uaddr", "le64"),
        ("perm", "u8"),
        ("type", "u8"),
        ("padding", "pad6"),
    ],
)


class VhostUserConfigHeader(NamedTuple):
    """Head of "Virtio device config space" (``VhostUserConfig``)::

    typedef struct VhostUserConfig {
            uint32_t offset;
            uint32_t size;
            uint32_t flags;                 /* ConfigFlags */
            uint8_t region[size];           /* at most 256 */
    } VhostUserConfig;
    """

    offset: int
    size: int
    flags: int


VHOST_USER_CONFIG_HEADER = WireStruct(
    VhostUserConfigHeader, [("offset", "le32"), ("size", "le32"), ("flags", "le32")]
)
#: ``VHOST_USER_CONFIG_HDR_SIZE``
VHOST_USER_CONFIG_HDR_SIZE = VHOST_USER_CONFIG_HEADER.size


class VhostUserConfig(NamedTuple):
    """Body of GET_CONFIG / SET_CONFIG: :data:`VHOST_USER_CONFIG_HEADER` then ``size``
    payload bytes. ``len(payload) == size`` always holds for a decoded body."""

    offset: int
    size: int
    flags: int
    payload: bytes


class VhostUserVringArea(NamedTuple):
    """ "Vring area description" (``VhostUserVringArea``, VRING_HOST_NOTIFIER_MSG)::

    typedef struct VhostUserVringArea {
            uint64_t u64;      /* bits 0-7 vring index, bit 8 no-fd flag */
            uint64_t size;
            uint64_t offset;
    } VhostUserVringArea;
    """

    u64: int
    size: int
    offset: int


VHOST_USER_VRING_AREA = WireStruct(
    VhostUserVringArea, [("u64", "le64"), ("size", "le64"), ("offset", "le64")]
)


class VhostUserInflight(NamedTuple):
    """ "Inflight description" (``VhostUserInflight``, 24 bytes with C tail padding)::

    typedef struct VhostUserInflight {
            uint64_t mmap_size;
            uint64_t mmap_offset;
            uint16_t num_queues;
            uint16_t queue_size;
    } VhostUserInflight;
    """

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


VHOST_USER_INFLIGHT = WireStruct(
    VhostUserInflight,
    [
        ("mmap_size", "le64"),
        ("mmap_offset", "le64"),
        ("num_queues", "le16"),
        ("queue_size", "le16"),
        ("padding", "pad4"),
    ],
)


class VhostUserShared(NamedTuple):
    """``VhostUserShared``: a 16-byte UUID in RFC 4122 byte order ("first three components
    ... stored in big endian"), i.e. one big-endian 128-bit number, split in two halves."""

    uuid_hi: int
    uuid_lo: int

    @property
    def uuid(self) -> UUID:
        """The UUID."""
        return UUID(int=self.uuid_hi << 64 | self.uuid_lo)

    @classmethod
    def from_uuid(cls, value: UUID) -> VhostUserShared:
        """The body carrying ``value``."""
        return cls(value.int >> 64, value.int & (1 << 64) - 1)


VHOST_USER_SHARED = WireStruct(VhostUserShared, [("uuid_hi", "be64"), ("uuid_lo", "be64")])


class VhostUserTransferDeviceState(NamedTuple):
    """ "Device state transfer parameters" (SET_DEVICE_STATE_FD)::

    typedef struct VhostUserTransferDeviceState {
            uint32_t direction;   /* TransferDirection */
            uint32_t phase;       /* MigrationPhase */
    } VhostUserTransferDeviceState;
    """

    direction: int
    phase: int


VHOST_USER_TRANSFER_DEVICE_STATE = WireStruct(
    VhostUserTransferDeviceState, [("direction", "le32"), ("phase", "le32")]
)


class VhostUserMMap(NamedTuple):
    """ "MMAP request" (``VhostUserMMap``, BACKEND_SHMEM_MAP/UNMAP; newest revision)::

    typedef struct {
            uint8_t shmid;  uint8_t padding[7];
            uint64_t fd_offset; uint64_t shm_offset; uint64_t len; uint64_t flags;
    } VhostUserMMap;
    """

    shmid: int
    fd_offset: int
    shm_offset: int
    len: int
    flags: int


VHOST_USER_MMAP = WireStruct(
    VhostUserMMap,
    [
        ("shmid", "u8"),
        ("padding", "pad7"),
        ("fd_offset", "le64"),
        ("shm_offset", "le64"),
        ("len", "le64"),
        ("flags", "le64"),
    ],
)

# ---------------------------------------------------------------------------
# Inflight I/O tracking area (shared memory, not a message): one region per queue
# ---------------------------------------------------------------------------


class DescStateSplit(NamedTuple):
    """``DescStateSplit`` (16 bytes): one per descriptor of a split queue::

    uint8_t inflight; uint8_t padding[5]; uint16_t next; uint64_t counter;
    """

    inflight: int
    next: int
    counter: int


DESC_STATE_SPLIT = WireStruct(
    DescStateSplit,
    [("inflight", "u8"), ("padding", "pad5"), ("next", "le16"), ("counter", "le64")],
)


class QueueRegionSplit(NamedTuple):
    """Head of ``QueueRegionSplit`` (16 bytes), followed by ``desc_num`` DescStateSplit::

    uint64_t features; uint16_t version; uint16_t desc_num;
    uint16_t last_batch_head; uint16_t used_idx; DescStateSplit desc[];
    """

    features: int
    version: int
    desc_num: int
    last_batch_head: int
    used_idx: int


QUEUE_REGION_SPLIT = WireStruct(
    QueueRegionSplit,
    [
        ("features", "le64"),
        ("version", "le16"),
        ("desc_num", "le16"),
        ("last_batch_head", "le16"),
        ("used_idx", "le16"),
    ],
)


class DescStatePacked(NamedTuple):
    """``DescStatePacked`` (32 bytes): one per descriptor-ring entry of a packed queue::

    uint8_t inflight; uint8_t padding; uint16_t next; uint16_t last; uint16_t num;
    uint64_t counter; uint16_t id; uint16_t flags; uint32_t len; uint64_t addr;
    """

    inflight: int
    next: int
    last: int
    num: int
    counter: int
    id: int
    flags: int
    len: int
    addr: int


DESC_STATE_PACKED = WireStruct(
    DescStatePacked,
    [
        ("inflight", "u8"),
        ("padding", "pad1"),
        ("next", "le16"),
        ("last", "le16"),
        ("num", "le16"),
        ("counter", "le64"),
        ("id", "le16"),
        ("flags", "le16"),
        ("len", "le32"),
        ("addr", "le64"),
    ],
)


class QueueRegionPacked(NamedTuple):
    """Head of ``QueueRegionPacked`` (32 bytes: 29 declared, ``desc[]`` is 8-aligned)::

    uint64_t features; uint16_t version; uint16_t desc_num;
    uint16_t free_head; uint16_t old_free_head; uint16_t used_idx; uint16_t old_used_idx;
    uint8_t used_wrap_counter; uint8_t old_used_wrap_counter; uint8_t padding[7];
    DescStatePacked desc[];
    """

    features: int
    version: int
    desc_num: int
    free_head: int
    old_free_head: int
    used_idx: int
    old_used_idx: int
    used_wrap_counter: int
    old_used_wrap_counter: int


QUEUE_REGION_PACKED = WireStruct(
    QueueRegionPacked,
    [
        ("features", "le64"),
        ("version", "le16"),
        ("desc_num", "le16"),
        ("free_head", "le16"),
        ("old_free_head", "le16"),
        ("used_idx", "le16"),
        ("old_used_idx", "le16"),
        ("used_wrap_counter", "u8"),
        ("old_used_wrap_counter", "u8"),
        ("padding", "pad10"),
    ],
)
#: ``version`` of an initialised queue region (0 = uninitialised buffer).
INFLIGHT_VERSION = 1

# ---------------------------------------------------------------------------
# Which body each message carries (the document's "request payload" / "reply payload")
# ---------------------------------------------------------------------------


class Payload(Enum):
    """Kinds of message body."""

    #: no payload (``size`` 0)
    NONE = "none"
    U64 = "u64"
    VRING_STATE = "vring state"
    VRING_ADDR = "vring address"
    MEMORY = "multiple memory regions"
    MEM_REG = "single memory region"
    LOG = "log"
    IOTLB = "iotlb"
    CONFIG = "config space"
    VRING_AREA = "vring area"
    INFLIGHT = "inflight"
    SHARED = "shared object"
    TRANSFER_STATE = "device state transfer"
    MMAP = "mmap"
    #: opaque bytes (crypto sessions, shared-memory config): carried, not interpreted
    OPAQUE = "opaque"


#: Fixed-size bodies and their layout.
FIXED_LAYOUTS: dict[Payload, WireStruct[Any]] = {
    Payload.U64: VHOST_USER_U64,
    Payload.VRING_STATE: VHOST_VRING_STATE,
    Payload.VRING_ADDR: VHOST_VRING_ADDR,
    Payload.MEM_REG: VHOST_USER_MEM_REG_MSG,
    Payload.LOG: VHOST_USER_LOG,
    Payload.IOTLB: VHOST_IOTLB_MSG,
    Payload.VRING_AREA: VHOST_USER_VRING_AREA,
    Payload.INFLIGHT: VHOST_USER_INFLIGHT,
    Payload.SHARED: VHOST_USER_SHARED,
    Payload.TRANSFER_STATE: VHOST_USER_TRANSFER_DEVICE_STATE,
    Payload.MMAP: VHOST_USER_MMAP,
}

#: Request payload of each front-end request.
FRONTEND_REQUEST_PAYLOAD: dict[FrontendRequest, Payload] = {
    FrontendRequest.GET_FEATURES: Payload.NONE,
    FrontendRequest.SET_FEATURES: Payload.U64,
    FrontendRequest.SET_OWNER: Payload.NONE,
    FrontendRequest.RESET_OWNER: Payload.NONE,
    FrontendRequest.SET_MEM_TABLE: Payload.MEMORY,
    FrontendRequest.SET_LOG_BASE: Payload.LOG,
    FrontendRequest.SET_LOG_FD: Payload.NONE,
    FrontendRequest.SET_VRING_NUM: Payload.VRING_STATE,
    FrontendRequest.SET_VRING_ADDR: Payload.VRING_ADDR,
    FrontendRequest.SET_VRING_BASE: Payload.VRING_STATE,
    FrontendRequest.GET_VRING_BASE: Payload.VRING_STATE,
    FrontendRequest.SET_VRING_KICK: Payload.U64,
    FrontendRequest.SET_VRING_CALL: Payload.U64,
    FrontendRequest.SET_VRING_ERR: Payload.U64,
    FrontendRequest.GET_PROTOCOL_FEATURES: Payload.NONE,
    FrontendRequest.SET_PROTOCOL_FEATURES: Payload.U64,
    FrontendRequest.GET_QUEUE_NUM: Payload.NONE,
    FrontendRequest.SET_VRING_ENABLE: Payload.VRING_STATE,
    FrontendRequest.SEND_RARP: Payload.U64,
    FrontendRequest.NET_SET_MTU: Payload.U64,
    FrontendRequest.SET_BACKEND_REQ_FD: Payload.NONE,
    FrontendRequest.IOTLB_MSG: Payload.IOTLB,
    FrontendRequest.SET_VRING_ENDIAN: Payload.VRING_STATE,
    FrontendRequest.GET_CONFIG: Payload.CONFIG,
    FrontendRequest.SET_CONFIG: Payload.CONFIG,
    FrontendRequest.CREATE_CRYPTO_SESSION: Payload.OPAQUE,
    FrontendRequest.CLOSE_CRYPTO_SESSION: Payload.U64,
    FrontendRequest.POSTCOPY_ADVISE: Payload.NONE,
    FrontendRequest.POSTCOPY_LISTEN: Payload.NONE,
    FrontendRequest.POSTCOPY_END: Payload.NONE,
    FrontendRequest.GET_INFLIGHT_FD: Payload.INFLIGHT,
    FrontendRequest.SET_INFLIGHT_FD: Payload.INFLIGHT,
    FrontendRequest.GPU_SET_SOCKET: Payload.NONE,
    FrontendRequest.RESET_DEVICE: Payload.NONE,
    FrontendRequest.VRING_KICK: Payload.VRING_STATE,
    FrontendRequest.GET_MAX_MEM_SLOTS: Payload.NONE,
    FrontendRequest.ADD_MEM_REG: Payload.MEM_REG,
    FrontendRequest.REM_MEM_REG: Payload.MEM_REG,
    FrontendRequest.SET_STATUS: Payload.U64,
    FrontendRequest.GET_STATUS: Payload.NONE,
    FrontendRequest.GET_SHARED_OBJECT: Payload.SHARED,
    FrontendRequest.SET_DEVICE_STATE_FD: Payload.TRANSFER_STATE,
    FrontendRequest.CHECK_DEVICE_STATE: Payload.NONE,
    FrontendRequest.GET_SHMEM_CONFIG: Payload.NONE,
}

#: Reply payload of the front-end requests that are always answered ("Here is a list of
#: the ones that do [require replies]" plus every request whose reply payload is not N/A).
#: Any other request is answered only when it carries NEED_REPLY, with a ``u64``
#: (0 = success). SET_MEM_TABLE / ADD_MEM_REG are also answered with their own body in
#: postcopy mode.
FRONTEND_REPLY_PAYLOAD: dict[FrontendRequest, Payload] = {
    FrontendRequest.GET_FEATURES: Payload.U64,
    FrontendRequest.GET_PROTOCOL_FEATURES: Payload.U64,
    FrontendRequest.GET_VRING_BASE: Payload.VRING_STATE,
    FrontendRequest.SET_LOG_BASE: Payload.U64,
    FrontendRequest.GET_QUEUE_NUM: Payload.U64,
    FrontendRequest.IOTLB_MSG: Payload.U64,
    FrontendRequest.GET_CONFIG: Payload.CONFIG,
    FrontendRequest.CREATE_CRYPTO_SESSION: Payload.OPAQUE,
    FrontendRequest.POSTCOPY_ADVISE: Payload.NONE,
    FrontendRequest.POSTCOPY_END: Payload.U64,
    FrontendRequest.GET_INFLIGHT_FD: Payload.INFLIGHT,
    FrontendRequest.GET_MAX_MEM_SLOTS: Payload.U64,
    FrontendRequest.GET_STATUS: Payload.U64,
    FrontendRequest.GET_SHARED_OBJECT: Payload.U64,
    FrontendRequest.SET_DEVICE_STATE_FD: Payload.U64,
    FrontendRequest.CHECK_DEVICE_STATE: Payload.U64,
    FrontendRequest.GET_SHMEM_CONFIG: Payload.OPAQUE,
}

#: Request payload of each back-end request.
BACKEND_REQUEST_PAYLOAD: dict[BackendRequest, Payload] = {
    BackendRequest.IOTLB_MSG: Payload.IOTLB,
    BackendRequest.CONFIG_CHANGE_MSG: Payload.NONE,
    BackendRequest.VRING_HOST_NOTIFIER_MSG: Payload.VRING_AREA,
    BackendRequest.VRING_CALL: Payload.VRING_STATE,
    BackendRequest.VRING_ERR: Payload.VRING_STATE,
    BackendRequest.SHARED_OBJECT_ADD: Payload.SHARED,
    BackendRequest.SHARED_OBJECT_REMOVE: Payload.SHARED,
    BackendRequest.SHARED_OBJECT_LOOKUP: Payload.SHARED,
    BackendRequest.SHMEM_MAP: Payload.MMAP,
    BackendRequest.SHMEM_UNMAP: Payload.MMAP,
}

#: Back-end requests the front-end always answers (others only with NEED_REPLY).
BACKEND_REPLY_PAYLOAD: dict[BackendRequest, Payload] = {
    BackendRequest.SHARED_OBJECT_LOOKUP: Payload.U64,
}
