"""PCI and virtio-pci register layouts and constants, declared once for both sides.

The device-side function models (:mod:`.function`, :mod:`.device`) and the driver
side (enumeration, modern and legacy transports) all take every offset, width and bit
from here:

- the PCI configuration space header of type 0 (PCI Local Bus 3.0 §6.1), the command
  and status bits, BAR encoding, and the MSI-X capability with its table and PBA
  (PCI 3.0 §6.8.2);
- virtio-v1.2 §4.1.2 "PCI Device Discovery" (vendor and device ids),
- virtio-v1.2 §4.1.4 "Virtio Structure PCI Capabilities" (``struct virtio_pci_cap``,
  ``virtio_pci_notify_cap``, ``virtio_pci_cfg_cap``, ``virtio_pci_cap64``),
- virtio-v1.2 §4.1.4.3 "Common configuration structure layout"
  (``struct virtio_pci_common_cfg``, with a register table giving width, access and
  reset value of every field, used by the register-table tests),
- virtio-v1.2 §4.1.4.10 "Legacy Interfaces: A Note on PCI Device Layout" (the legacy
  I/O BAR header, whose device configuration offset depends on MSI-X being enabled),
- the legacy vring placement from a page frame number (virtio-v1.2 §2.7.2 "Legacy
  Interfaces: A Note on Virtqueue Layout", alignment 4096).

All multi-byte fields are little-endian (virtio-v1.2 §4.1.3 "PCI Device Layout": "All
64-bit, 32-bit and 16-bit fields are little-endian").
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import NamedTuple

from pyvirtio.spec.ids import DeviceId
from pyvirtio.spec.layout import WireStruct
from pyvirtio.virtqueue.common import QueueAddresses

# ---------------------------------------------------------------------------
# Device discovery (virtio-v1.2 §4.1.2)
# ---------------------------------------------------------------------------

#: "Devices MUST have the PCI Vendor ID 0x1AF4" (virtio-v1.2 §4.1.2.1).
VIRTIO_PCI_VENDOR_ID = 0x1AF4
#: Subsystem vendor id pyvirtio's function model presents (same as the vendor).
VIRTIO_PCI_SUBSYSTEM_VENDOR_ID = 0x1AF4
#: "The PCI Device ID is calculated by adding 0x1040 to the Virtio Device ID".
VIRTIO_PCI_MODERN_DEVICE_ID_BASE = 0x1040
#: Any device id in 0x1000..0x107F (inclusive) of vendor 0x1AF4 is a virtio device.
VIRTIO_PCI_DEVICE_ID_MIN = 0x1000
VIRTIO_PCI_DEVICE_ID_MAX = 0x107F
#: Transitional PCI device ids are 0x1000..0x103F.
VIRTIO_PCI_TRANSITIONAL_DEVICE_ID_MAX = 0x103F

#: The Transitional PCI Device ID of each device type that has one (virtio-v1.2
#: §4.1.2.1 table); "Transitional devices MUST have the PCI Subsystem Device ID
#: matching the Virtio Device ID" and "a PCI Revision ID of 0" (§4.1.2.3).
TRANSITIONAL_DEVICE_IDS: dict[int, int] = {
    DeviceId.NET: 0x1000,
    DeviceId.BLOCK: 0x1001,
    DeviceId.BALLOON_TRADITIONAL: 0x1002,
    DeviceId.CONSOLE: 0x1003,
    DeviceId.SCSI: 0x1004,
    DeviceId.ENTROPY: 0x1005,
    DeviceId.TRANSPORT_9P: 0x1009,
}

#: PCI Revision ID of a transitional device ("MUST have a PCI Revision ID of 0").
VIRTIO_PCI_REVISION_TRANSITIONAL = 0
#: PCI Revision ID of a non-transitional device ("SHOULD have a PCI Revision ID of 1
#: or higher").
VIRTIO_PCI_REVISION_MODERN = 1
#: "Non-transitional devices SHOULD have a PCI Subsystem Device ID of 0x40 or higher."
VIRTIO_PCI_MODERN_SUBSYSTEM_ID_MIN = 0x40


def modern_pci_device_id(device_type: int) -> int:
    """The non-transitional PCI Device ID of virtio device type ``device_type``."""
    return VIRTIO_PCI_MODERN_DEVICE_ID_BASE + device_type


def transitional_pci_device_id(device_type: int) -> int | None:
    """The Transitional PCI Device ID of ``device_type``; None if it has none."""
    return TRANSITIONAL_DEVICE_IDS.get(device_type)


def is_virtio_pci_id(vendor_id: int, device_id: int) -> bool:
    """True if a function with these ids is a virtio device (virtio-v1.2 §4.1.2)."""
    return (
        vendor_id == VIRTIO_PCI_VENDOR_ID
        and VIRTIO_PCI_DEVICE_ID_MIN <= device_id <= VIRTIO_PCI_DEVICE_ID_MAX
    )


def virtio_device_type(device_id: int, subsystem_id: int) -> int:
    """The virtio device type of a virtio PCI function (0 if it cannot tell).

    A modern id gives it directly (``device_id - 0x1040``); a transitional function
    carries it in its Subsystem Device ID (virtio-v1.2 §4.1.2.3).
    """
    if device_id >= VIRTIO_PCI_MODERN_DEVICE_ID_BASE:
        return device_id - VIRTIO_PCI_MODERN_DEVICE_ID_BASE
    if device_id <= VIRTIO_PCI_TRANSITIONAL_DEVICE_ID_MAX:
        return subsystem_id
    return 0


#: PCI class code (base class << 16 | subclass << 8 | prog-if) presented per device
#: type; the spec leaves it open, these are the values QEMU uses, so a driver
#: matching on class sees the same thing on both.
PCI_CLASS_FOR_TYPE: dict[int, int] = {
    DeviceId.NET: 0x020000,  # network controller, ethernet
    DeviceId.BLOCK: 0x018000,  # mass storage, other
    DeviceId.CONSOLE: 0x078000,  # communication controller, other
    DeviceId.SCSI: 0x010000,  # mass storage, SCSI
    DeviceId.ENTROPY: 0x00FF00,  # unclassified
    DeviceId.BALLOON_TRADITIONAL: 0x00FF00,
}
#: Class code for any other device type ("other" of "unclassified").
PCI_CLASS_OTHER = 0x00FF00
#: Host bridge class code (base 06, subclass 00).
PCI_CLASS_BRIDGE_HOST = 0x060000

# ---------------------------------------------------------------------------
# PCI configuration space header, type 0 (PCI Local Bus 3.0 §6.1)
# ---------------------------------------------------------------------------

#: Size of conventional PCI configuration space.
PCI_CONFIG_SPACE_SIZE = 256
#: First byte after the standard header (capabilities may start here).
PCI_HEADER_SIZE = 0x40
#: Number of BARs in a type 0 header.
PCI_NUM_BARS = 6


class PciCfg(IntEnum):
    """Offsets in the type 0 configuration header."""

    VENDOR_ID = 0x00  # le16, RO
    DEVICE_ID = 0x02  # le16, RO
    COMMAND = 0x04  # le16, RW
    STATUS = 0x06  # le16, RO / RW1C
    REVISION_ID = 0x08  # u8, RO
    PROG_IF = 0x09  # u8, RO
    SUBCLASS = 0x0A  # u8, RO
    CLASS = 0x0B  # u8, RO (base class)
    CACHE_LINE_SIZE = 0x0C  # u8
    LATENCY_TIMER = 0x0D  # u8
    HEADER_TYPE = 0x0E  # u8, RO
    BIST = 0x0F  # u8
    BAR0 = 0x10  # le32 each, BAR n at 0x10 + 4n
    BAR1 = 0x14
    BAR2 = 0x18
    BAR3 = 0x1C
    BAR4 = 0x20
    BAR5 = 0x24
    CARDBUS_CIS = 0x28
    SUBSYSTEM_VENDOR_ID = 0x2C  # le16, RO
    SUBSYSTEM_ID = 0x2E  # le16, RO
    ROM_ADDRESS = 0x30  # le32
    CAPABILITY_LIST = 0x34  # u8, RO
    INTERRUPT_LINE = 0x3C  # u8, RW (scratch for firmware)
    INTERRUPT_PIN = 0x3D  # u8, RO (1 = INTA#)
    MIN_GNT = 0x3E
    MAX_LAT = 0x3F


def bar_offset(index: int) -> int:
    """Configuration space offset of BAR ``index`` (0..5)."""
    return PciCfg.BAR0 + 4 * index


class PciCommand(IntFlag):
    """Bits of the Command register."""

    NONE = 0
    #: I/O Space decode enable
    IO = 0x0001
    #: Memory Space decode enable
    MEMORY = 0x0002
    #: Bus Master enable (needed for DMA, hence MSI/MSI-X messages)
    MASTER = 0x0004
    #: Interrupt Disable (INTx# assertion off)
    INTX_DISABLE = 0x0400


class PciStatus(IntFlag):
    """Bits of the Status register."""

    NONE = 0
    #: Interrupt Status: INTx# is (logically) asserted
    INTERRUPT = 0x0008
    #: Capabilities List present
    CAP_LIST = 0x0010


#: Header Type 0 (general device), single function.
PCI_HEADER_TYPE_NORMAL = 0x00
#: Interrupt Pin value of INTA#.
PCI_INTERRUPT_PIN_INTA = 1

#: BAR bit 0: 1 = I/O space BAR.
PCI_BAR_SPACE_IO = 0x1
#: Memory BAR type field (bits 2:1): 0 = 32-bit, 2 = 64-bit.
PCI_BAR_MEM_TYPE_MASK = 0x6
PCI_BAR_MEM_TYPE_32 = 0x0
PCI_BAR_MEM_TYPE_64 = 0x4
#: Memory BAR bit 3: prefetchable.
PCI_BAR_MEM_PREFETCH = 0x8
#: Address bits of a memory BAR / an I/O BAR.
PCI_BAR_MEM_ADDR_MASK = 0xFFFFFFF0
PCI_BAR_IO_ADDR_MASK = 0xFFFFFFFC


class PciCapId(IntEnum):
    """Capability IDs (PCI 3.0 appendix H) used here."""

    #: Vendor-specific ("PCI_CAP_ID_VNDR"): every virtio structure capability
    VNDR = 0x09
    #: MSI-X
    MSIX = 0x11


# -- MSI-X (PCI 3.0 §6.8.2) -------------------------------------------------


class MsixCap(NamedTuple):
    """The MSI-X capability structure::

    u8   cap_id;        /* 0x11 */
    u8   cap_next;
    le16 message_control; /* bits 10:0 Table Size - 1, 14 Function Mask, 15 Enable */
    le32 table;         /* bits 2:0 BIR, 31:3 offset */
    le32 pba;           /* bits 2:0 BIR, 31:3 offset */
    """

    cap_id: int
    cap_next: int
    message_control: int
    table: int
    pba: int


MSIX_CAP = WireStruct(
    MsixCap,
    [
        ("cap_id", "u8"),
        ("cap_next", "u8"),
        ("message_control", "le16"),
        ("table", "le32"),
        ("pba", "le32"),
    ],
)

#: Message Control: Table Size field (N - 1), read-only.
MSIX_CONTROL_TABLE_SIZE_MASK = 0x07FF
#: Message Control: Function Mask (all vectors masked while set).
MSIX_CONTROL_FUNCTION_MASK = 0x4000
#: Message Control: MSI-X Enable.
MSIX_CONTROL_ENABLE = 0x8000
#: The BIR (BAR indicator) bits of the table / PBA offset registers.
MSIX_BIR_MASK = 0x7
#: "A device that has an MSI-X capability SHOULD support at least 2 and at most
#: 0x800 MSI-X vectors" (virtio-v1.2 §4.1.5.1.2.1).
MSIX_MAX_VECTORS = 0x800


class MsixEntry(NamedTuple):
    """One MSI-X table entry (16 bytes)::

    le32 msg_addr_lo; le32 msg_addr_hi; le32 msg_data; le32 vector_control;
    """

    msg_addr_lo: int
    msg_addr_hi: int
    msg_data: int
    vector_control: int


MSIX_ENTRY = WireStruct(
    MsixEntry,
    [
        ("msg_addr_lo", "le32"),
        ("msg_addr_hi", "le32"),
        ("msg_data", "le32"),
        ("vector_control", "le32"),
    ],
)
#: Vector Control bit 0: the vector is masked (its reset value is 1).
MSIX_ENTRY_CTRL_MASKBIT = 0x1

#: x86 MSI address window: a DMA write here is an interrupt message, not memory.
MSI_ADDRESS_BASE = 0xFEE00000
MSI_ADDRESS_LIMIT = 0xFEEFFFFF

# ---------------------------------------------------------------------------
# Virtio structure capabilities (virtio-v1.2 §4.1.4)
# ---------------------------------------------------------------------------


class VirtioPciCapType(IntEnum):
    """``cfg_type`` values of ``struct virtio_pci_cap`` (virtio-v1.2 §4.1.4)."""

    COMMON_CFG = 1
    NOTIFY_CFG = 2
    ISR_CFG = 3
    DEVICE_CFG = 4
    PCI_CFG = 5
    SHARED_MEMORY_CFG = 8
    VENDOR_CFG = 9


VIRTIO_PCI_CAP_COMMON_CFG = VirtioPciCapType.COMMON_CFG
VIRTIO_PCI_CAP_NOTIFY_CFG = VirtioPciCapType.NOTIFY_CFG
VIRTIO_PCI_CAP_ISR_CFG = VirtioPciCapType.ISR_CFG
VIRTIO_PCI_CAP_DEVICE_CFG = VirtioPciCapType.DEVICE_CFG
VIRTIO_PCI_CAP_PCI_CFG = VirtioPciCapType.PCI_CFG
VIRTIO_PCI_CAP_SHARED_MEMORY_CFG = VirtioPciCapType.SHARED_MEMORY_CFG
VIRTIO_PCI_CAP_VENDOR_CFG = VirtioPciCapType.VENDOR_CFG

#: ``bar`` values 0..5 name a BAR; "Any other value is reserved".
VIRTIO_PCI_CAP_BAR_MAX = 5


class VirtioPciCap(NamedTuple):
    """``struct virtio_pci_cap`` (virtio-v1.2 §4.1.4)::

    struct virtio_pci_cap {
            u8 cap_vndr;    /* Generic PCI field: PCI_CAP_ID_VNDR */
            u8 cap_next;    /* Generic PCI field: next ptr. */
            u8 cap_len;     /* Generic PCI field: capability length */
            u8 cfg_type;    /* Identifies the structure. */
            u8 bar;         /* Where to find it. */
            u8 id;          /* Multiple capabilities of the same type */
            u8 padding[2];  /* Pad to full dword. */
            le32 offset;    /* Offset within bar. */
            le32 length;    /* Length of the structure, in bytes. */
    };
    """

    cap_vndr: int
    cap_next: int
    cap_len: int
    cfg_type: int
    bar: int
    id: int
    offset: int
    length: int


_CAP_FIELDS = [
    ("cap_vndr", "u8"),
    ("cap_next", "u8"),
    ("cap_len", "u8"),
    ("cfg_type", "u8"),
    ("bar", "u8"),
    ("id", "u8"),
    ("padding", "pad2"),
    ("offset", "le32"),
    ("length", "le32"),
]

VIRTIO_PCI_CAP = WireStruct(VirtioPciCap, _CAP_FIELDS)


class VirtioPciNotifyCap(NamedTuple):
    """``struct virtio_pci_notify_cap`` (virtio-v1.2 §4.1.4.4)::

    struct virtio_pci_notify_cap {
            struct virtio_pci_cap cap;
            le32 notify_off_multiplier; /* Multiplier for queue_notify_off. */
    };

    A queue's Queue Notify address is ``cap.offset + queue_notify_off *
    notify_off_multiplier`` within ``cap.bar``.
    """

    cap_vndr: int
    cap_next: int
    cap_len: int
    cfg_type: int
    bar: int
    id: int
    offset: int
    length: int
    notify_off_multiplier: int


VIRTIO_PCI_NOTIFY_CAP = WireStruct(
    VirtioPciNotifyCap, [*_CAP_FIELDS, ("notify_off_multiplier", "le32")]
)


class VirtioPciCfgCap(NamedTuple):
    """``struct virtio_pci_cfg_cap`` (virtio-v1.2 §4.1.4.8)::

    struct virtio_pci_cfg_cap {
            struct virtio_pci_cap cap;
            u8 pci_cfg_data[4]; /* Data for BAR access. */
    };

    ``cap.bar``, ``cap.offset``, ``cap.length`` and ``pci_cfg_data`` are read-write:
    ``pci_cfg_data`` is a window of ``cap.length`` (1, 2 or 4) bytes into BAR
    ``cap.bar`` at ``cap.offset``. (``pci_cfg_data`` is decoded here as one le32.)
    """

    cap_vndr: int
    cap_next: int
    cap_len: int
    cfg_type: int
    bar: int
    id: int
    offset: int
    length: int
    pci_cfg_data: int


VIRTIO_PCI_CFG_CAP = WireStruct(VirtioPciCfgCap, [*_CAP_FIELDS, ("pci_cfg_data", "le32")])


class VirtioPciCap64(NamedTuple):
    """``struct virtio_pci_cap64`` (virtio-v1.2 §4.1.4)::

    struct virtio_pci_cap64 {
            struct virtio_pci_cap cap;
            le32 offset_hi;
            le32 length_hi;
    };
    """

    cap_vndr: int
    cap_next: int
    cap_len: int
    cfg_type: int
    bar: int
    id: int
    offset: int
    length: int
    offset_hi: int
    length_hi: int


VIRTIO_PCI_CAP64 = WireStruct(
    VirtioPciCap64, [*_CAP_FIELDS, ("offset_hi", "le32"), ("length_hi", "le32")]
)

#: Offsets of the fields inside any virtio capability (relative to the capability).
VIRTIO_PCI_CAP_VNDR = VIRTIO_PCI_CAP.offset_of("cap_vndr")
VIRTIO_PCI_CAP_NEXT = VIRTIO_PCI_CAP.offset_of("cap_next")
VIRTIO_PCI_CAP_LEN = VIRTIO_PCI_CAP.offset_of("cap_len")
VIRTIO_PCI_CAP_CFG_TYPE = VIRTIO_PCI_CAP.offset_of("cfg_type")
VIRTIO_PCI_CAP_BAR = VIRTIO_PCI_CAP.offset_of("bar")
VIRTIO_PCI_CAP_ID = VIRTIO_PCI_CAP.offset_of("id")
VIRTIO_PCI_CAP_OFFSET = VIRTIO_PCI_CAP.offset_of("offset")
VIRTIO_PCI_CAP_LENGTH = VIRTIO_PCI_CAP.offset_of("length")
VIRTIO_PCI_NOTIFY_CAP_MULT = VIRTIO_PCI_NOTIFY_CAP.offset_of("notify_off_multiplier")
VIRTIO_PCI_CFG_CAP_DATA = VIRTIO_PCI_CFG_CAP.offset_of("pci_cfg_data")

# ---------------------------------------------------------------------------
# Common configuration structure (virtio-v1.2 §4.1.4.3)
# ---------------------------------------------------------------------------


class VirtioPciCommonCfg(NamedTuple):
    """``struct virtio_pci_common_cfg`` (virtio-v1.2 §4.1.4.3)::

    struct virtio_pci_common_cfg {
            /* About the whole device. */
            le32 device_feature_select;     /* read-write */
            le32 device_feature;            /* read-only for driver */
            le32 driver_feature_select;     /* read-write */
            le32 driver_feature;            /* read-write */
            le16 config_msix_vector;        /* read-write */
            le16 num_queues;                /* read-only for driver */
            u8 device_status;               /* read-write */
            u8 config_generation;           /* read-only for driver */

            /* About a specific virtqueue. */
            le16 queue_select;              /* read-write */
            le16 queue_size;                /* read-write */
            le16 queue_msix_vector;         /* read-write */
            le16 queue_enable;              /* read-write */
            le16 queue_notify_off;          /* read-only for driver */
            le64 queue_desc;                /* read-write */
            le64 queue_driver;              /* read-write */
            le64 queue_device;              /* read-write */
            le16 queue_notify_data;         /* read-only for driver */
            le16 queue_reset;               /* read-write */

            /* About the administration virtqueue. */
            le16 admin_queue_index;         /* read-only for driver */
            le16 admin_queue_num;           /* read-only for driver */
    };

    (``queue_notify_data`` is called ``queue_notif_config_data`` in newer drafts.)
    """

    device_feature_select: int
    device_feature: int
    driver_feature_select: int
    driver_feature: int
    config_msix_vector: int
    num_queues: int
    device_status: int
    config_generation: int
    queue_select: int
    queue_size: int
    queue_msix_vector: int
    queue_enable: int
    queue_notify_off: int
    queue_desc: int
    queue_driver: int
    queue_device: int
    queue_notify_data: int
    queue_reset: int
    admin_queue_index: int
    admin_queue_num: int


VIRTIO_PCI_COMMON_CFG = WireStruct(
    VirtioPciCommonCfg,
    [
        ("device_feature_select", "le32"),
        ("device_feature", "le32"),
        ("driver_feature_select", "le32"),
        ("driver_feature", "le32"),
        ("config_msix_vector", "le16"),
        ("num_queues", "le16"),
        ("device_status", "u8"),
        ("config_generation", "u8"),
        ("queue_select", "le16"),
        ("queue_size", "le16"),
        ("queue_msix_vector", "le16"),
        ("queue_enable", "le16"),
        ("queue_notify_off", "le16"),
        ("queue_desc", "le64"),
        ("queue_driver", "le64"),
        ("queue_device", "le64"),
        ("queue_notify_data", "le16"),
        ("queue_reset", "le16"),
        ("admin_queue_index", "le16"),
        ("admin_queue_num", "le16"),
    ],
)


class CommonCfg(IntEnum):
    """Byte offset of each ``virtio_pci_common_cfg`` field (64-bit fields: low half;
    the high half is at ``+ 4``)."""

    DEVICE_FEATURE_SELECT = 0
    DEVICE_FEATURE = 4
    DRIVER_FEATURE_SELECT = 8
    DRIVER_FEATURE = 12
    CONFIG_MSIX_VECTOR = 16
    NUM_QUEUES = 18
    DEVICE_STATUS = 20
    CONFIG_GENERATION = 21
    QUEUE_SELECT = 22
    QUEUE_SIZE = 24
    QUEUE_MSIX_VECTOR = 26
    QUEUE_ENABLE = 28
    QUEUE_NOTIFY_OFF = 30
    QUEUE_DESC = 32
    QUEUE_DRIVER = 40
    QUEUE_DEVICE = 48
    QUEUE_NOTIFY_DATA = 56
    QUEUE_RESET = 58
    ADMIN_QUEUE_INDEX = 60
    ADMIN_QUEUE_NUM = 62


class Register(NamedTuple):
    """One register of a register table: what the register-table tests check.

    ``access`` is ``"R"`` (read-only for the driver), ``"W"`` (write-only) or
    ``"RW"``; ``reset`` is the value read after a device reset, or None when it
    depends on the device (feature bits, queue count, maximum queue size ...).
    """

    name: str
    offset: int
    width: int
    access: str
    reset: int | None


#: "Vector value used to disable MSI for queue" (virtio-v1.2 §4.1.5.1.2).
VIRTIO_MSI_NO_VECTOR = 0xFFFF

#: Every field of ``virtio_pci_common_cfg`` with its access and reset value (as read
#: with queue_select = 0). Reset values: "The device MUST present a 0 in queue_enable
#: on reset", "MUST have all queue and configuration change events ... unmapped upon
#: reset" (NO_VECTOR), "present a 0 in device_status" after reset, "present a 0 in
#: queue_reset on reset".
COMMON_CFG_REGISTERS: tuple[Register, ...] = (
    Register("device_feature_select", CommonCfg.DEVICE_FEATURE_SELECT, 4, "RW", 0),
    Register("device_feature", CommonCfg.DEVICE_FEATURE, 4, "R", None),
    Register("driver_feature_select", CommonCfg.DRIVER_FEATURE_SELECT, 4, "RW", 0),
    Register("driver_feature", CommonCfg.DRIVER_FEATURE, 4, "RW", 0),
    Register("config_msix_vector", CommonCfg.CONFIG_MSIX_VECTOR, 2, "RW", VIRTIO_MSI_NO_VECTOR),
    Register("num_queues", CommonCfg.NUM_QUEUES, 2, "R", None),
    Register("device_status", CommonCfg.DEVICE_STATUS, 1, "RW", 0),
    Register("config_generation", CommonCfg.CONFIG_GENERATION, 1, "R", None),
    Register("queue_select", CommonCfg.QUEUE_SELECT, 2, "RW", 0),
    Register("queue_size", CommonCfg.QUEUE_SIZE, 2, "RW", None),
    Register("queue_msix_vector", CommonCfg.QUEUE_MSIX_VECTOR, 2, "RW", VIRTIO_MSI_NO_VECTOR),
    Register("queue_enable", CommonCfg.QUEUE_ENABLE, 2, "RW", 0),
    Register("queue_notify_off", CommonCfg.QUEUE_NOTIFY_OFF, 2, "R", None),
    Register("queue_desc_lo", CommonCfg.QUEUE_DESC, 4, "RW", 0),
    Register("queue_desc_hi", CommonCfg.QUEUE_DESC + 4, 4, "RW", 0),
    Register("queue_driver_lo", CommonCfg.QUEUE_DRIVER, 4, "RW", 0),
    Register("queue_driver_hi", CommonCfg.QUEUE_DRIVER + 4, 4, "RW", 0),
    Register("queue_device_lo", CommonCfg.QUEUE_DEVICE, 4, "RW", 0),
    Register("queue_device_hi", CommonCfg.QUEUE_DEVICE + 4, 4, "RW", 0),
    Register("queue_notify_data", CommonCfg.QUEUE_NOTIFY_DATA, 2, "R", None),
    Register("queue_reset", CommonCfg.QUEUE_RESET, 2, "RW", 0),
    Register("admin_queue_index", CommonCfg.ADMIN_QUEUE_INDEX, 2, "R", 0),
    Register("admin_queue_num", CommonCfg.ADMIN_QUEUE_NUM, 2, "R", 0),
)

# -- ISR status (virtio-v1.2 §4.1.4.5) ---------------------------------------


class IsrBits(IntFlag):
    """Bits of the ISR status byte (read-to-clear)."""

    NONE = 0
    #: Queue Interrupt
    QUEUE = 0x1
    #: Device Configuration Interrupt
    CONFIG = 0x2


VIRTIO_PCI_ISR_QUEUE = IsrBits.QUEUE
VIRTIO_PCI_ISR_CONFIG = IsrBits.CONFIG

# -- Notifications (virtio-v1.2 §4.1.4.4, §4.1.5.2) ---------------------------

#: Without VIRTIO_F_NOTIFICATION_DATA the notification is the 16-bit queue index.
NOTIFY_VALUE_WIDTH = 2

# ---------------------------------------------------------------------------
# Legacy interface (virtio-v1.2 §4.1.4.10): the I/O BAR0 header
# ---------------------------------------------------------------------------


class LegacyReg(IntEnum):
    """Offsets in the legacy configuration structure in I/O BAR0."""

    #: Device Features bits 0:31, R, 32 bits
    HOST_FEATURES = 0
    #: Driver Features bits 0:31, R+W, 32 bits
    GUEST_FEATURES = 4
    #: Queue Address (page frame number, address >> 12), R+W, 32 bits
    QUEUE_PFN = 8
    #: queue_size, R, 16 bits
    QUEUE_NUM = 12
    #: queue_select, R+W, 16 bits
    QUEUE_SEL = 14
    #: Queue Notify, R+W, 16 bits
    QUEUE_NOTIFY = 16
    #: Device Status, R+W, 8 bits
    STATUS = 18
    #: ISR Status, R, 8 bits (read-to-clear)
    ISR = 19
    #: config_msix_vector, R+W, 16 bits (only while MSI-X is enabled)
    MSI_CONFIG_VECTOR = 20
    #: queue_msix_vector, R+W, 16 bits (only while MSI-X is enabled)
    MSI_QUEUE_VECTOR = 22


VIRTIO_PCI_HOST_FEATURES = LegacyReg.HOST_FEATURES
VIRTIO_PCI_GUEST_FEATURES = LegacyReg.GUEST_FEATURES
VIRTIO_PCI_QUEUE_PFN = LegacyReg.QUEUE_PFN
VIRTIO_PCI_QUEUE_NUM = LegacyReg.QUEUE_NUM
VIRTIO_PCI_QUEUE_SEL = LegacyReg.QUEUE_SEL
VIRTIO_PCI_QUEUE_NOTIFY = LegacyReg.QUEUE_NOTIFY
VIRTIO_PCI_STATUS = LegacyReg.STATUS
VIRTIO_PCI_ISR = LegacyReg.ISR
VIRTIO_MSI_CONFIG_VECTOR = LegacyReg.MSI_CONFIG_VECTOR
VIRTIO_MSI_QUEUE_VECTOR = LegacyReg.MSI_QUEUE_VECTOR

#: Size of the legacy header without / with the two MSI-X vector registers.
LEGACY_HEADER_SIZE = 20
LEGACY_HEADER_SIZE_MSIX = 24


def legacy_config_offset(msix_enabled: bool) -> int:
    """Where the device-specific configuration starts in the legacy I/O BAR: "When
    MSI-X capability is enabled, device-specific configuration starts at byte offset
    24 ... When MSI-X capability is not enabled, ... at byte offset 20"."""
    return LEGACY_HEADER_SIZE_MSIX if msix_enabled else LEGACY_HEADER_SIZE


#: The legacy header registers (the MSI-X pair only exists while MSI-X is enabled).
LEGACY_REGISTERS: tuple[Register, ...] = (
    Register("host_features", LegacyReg.HOST_FEATURES, 4, "R", None),
    Register("guest_features", LegacyReg.GUEST_FEATURES, 4, "RW", 0),
    Register("queue_pfn", LegacyReg.QUEUE_PFN, 4, "RW", 0),
    Register("queue_num", LegacyReg.QUEUE_NUM, 2, "R", None),
    Register("queue_sel", LegacyReg.QUEUE_SEL, 2, "RW", 0),
    Register("queue_notify", LegacyReg.QUEUE_NOTIFY, 2, "RW", 0),
    Register("status", LegacyReg.STATUS, 1, "RW", 0),
    Register("isr", LegacyReg.ISR, 1, "R", 0),
)
LEGACY_MSIX_REGISTERS: tuple[Register, ...] = (
    Register("config_msix_vector", LegacyReg.MSI_CONFIG_VECTOR, 2, "RW", VIRTIO_MSI_NO_VECTOR),
    Register("queue_msix_vector", LegacyReg.MSI_QUEUE_VECTOR, 2, "RW", VIRTIO_MSI_NO_VECTOR),
)

#: The legacy Queue Address register holds the ring address shifted right by 12.
VIRTIO_PCI_QUEUE_ADDR_SHIFT = 12
#: Legacy PCI vring alignment ("with an alignment of 4096", §4.1.5.1.3.1).
VIRTIO_PCI_VRING_ALIGN = 4096
#: The legacy ABI version of the PCI interface (Revision ID 0).
VIRTIO_PCI_ABI_VERSION = 0


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def legacy_vring_addresses(base: int, size: int, align: int) -> QueueAddresses:
    """The three areas of a legacy vring of ``size`` entries starting at ``base``.

    virtio-v1.2 §2.7.2 "Legacy Interfaces: A Note on Virtqueue Layout": the
    Descriptor Table (16 * size bytes), then the Available Ring (6 + 2 * size bytes),
    then padding to the next multiple of ``align`` and the Used Ring. Legacy PCI uses
    ``align`` = 4096 and ``base = pfn << 12``; legacy MMIO uses QueueAlign and
    ``base = pfn * GuestPageSize``.
    """
    desc = base
    avail = desc + 16 * size
    used = _align_up(avail + 6 + 2 * size, align)
    return QueueAddresses(desc, avail, used)


# ---------------------------------------------------------------------------
# pyvirtio's own function layout (informative: drivers parse the capabilities)
# ---------------------------------------------------------------------------

#: BAR of the legacy I/O header (transitional and legacy functions; fixed by §4.1.4.10).
LEGACY_IO_BAR = 0
#: BAR holding the MSI-X table (at 0) and PBA (at :data:`MSIX_PBA_OFFSET`).
MSIX_BAR = 1
#: 64-bit memory BAR holding the modern virtio structures.
MODERN_BAR = 4
#: Offsets of the modern structures in :data:`MODERN_BAR` (one 4 KiB page each).
MODERN_COMMON_OFFSET = 0x0000
MODERN_ISR_OFFSET = 0x1000
MODERN_DEVICE_OFFSET = 0x2000
MODERN_NOTIFY_OFFSET = 0x3000
#: Size of :data:`MODERN_BAR`.
MODERN_BAR_SIZE = 0x4000
#: ``notify_off_multiplier`` presented (an even power of 2, 4-byte stride per queue).
MODERN_NOTIFY_OFF_MULTIPLIER = 4
#: Offset of the PBA in :data:`MSIX_BAR` (the table starts at 0).
MSIX_PBA_OFFSET = 0x800
#: Minimum size of :data:`MSIX_BAR`.
MSIX_BAR_MIN_SIZE = 0x1000
