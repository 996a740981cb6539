"""vfio-user wire layouts and constants (QEMU ``docs/interop/vfio-user.rst``, protocol
version 0.1, and the ``<linux/vfio.h>`` structures it reuses).

Every message body is declared once here as a :class:`~pyvirtio.spec.layout.WireStruct`;
the server and the tests' client use the same definitions. "In this revision, all data
is in the endianness of the host system": pyvirtio runs on little-endian x86, so the
layouts are little-endian.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import NamedTuple

from pyvirtio.spec.layout import WireStruct

__all__ = [
    "DMA_MAP",
    "DMA_UNMAP",
    "HEADER",
    "IRQ_INFO",
    "IRQ_SET",
    "REGION_ACCESS",
    "REGION_INFO",
    "VERSION",
    "DEVICE_INFO",
    "VFIO_USER_MAJOR",
    "VFIO_USER_MINOR",
    "Command",
    "DeviceFlags",
    "DmaFlags",
    "Header",
    "HeaderFlags",
    "IrqInfoFlags",
    "IrqSetFlags",
    "PciIrqIndex",
    "PciRegion",
    "RegionFlags",
]

#: Protocol version pyvirtio speaks ("version major 0, minor 1").
VFIO_USER_MAJOR = 0
VFIO_USER_MINOR = 1
#: Default ``max_data_xfer_size`` when the peer names none (vfio-user.rst "Version").
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
#: Default ``max_msg_fds`` when the peer names none.
DEFAULT_MAX_MSG_FDS = 1
#: Descriptors pyvirtio accepts in one message (QEMU refuses a max_msg_fds above its
#: VFIO_USER_MAX_MAX_FDS, 16, as "malformed").
MAX_MSG_FDS = 16
#: Largest ``count`` of a region access pyvirtio accepts and advertises.
MAX_DATA_XFER_SIZE = 1 << 20
#: Largest message pyvirtio reads: a region write of MAX_DATA_XFER_SIZE plus headers,
#: or a VERSION with a JSON document (bounded too).
MAX_MESSAGE_SIZE = MAX_DATA_XFER_SIZE + 4096
#: Page sizes we accept in DMA maps (``pgsizes``): 4 KiB.
PGSIZES = 4096


class Command(IntEnum):
    """vfio-user.rst "Commands"."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class HeaderFlags(IntFlag):
    """vfio-user.rst "Header": bits 0-3 the type, bit 4 No_reply, bit 5 Error."""

    COMMAND = 0x0
    REPLY = 0x1
    NO_REPLY = 0x10
    ERROR = 0x20


#: The type bits of the header flags.
TYPE_MASK = 0xF


class Header(NamedTuple):
    """vfio-user.rst "Header" (16 bytes)::

    Message ID  0  2
    Command     2  2
    Message size 4 4   (of the entire message, header included)
    Flags       8  4
    Error       12 4
    """

    msg_id: int
    command: int
    size: int
    flags: int
    error_no: int


HEADER = WireStruct(
    Header,
    [("msg_id", "le16"), ("command", "le16"), ("size", "le32"), ("flags", "le32"),
     ("error_no", "le32")],
)  # fmt: skip


class Version(NamedTuple):
    """``VFIO_USER_VERSION``: version major (2), minor (2), then optional JSON
    capabilities including the terminating NUL."""

    major: int
    minor: int


VERSION = WireStruct(Version, [("major", "le16"), ("minor", "le16")])


class DmaFlags(IntFlag):
    """``VFIO_USER_DMA_MAP`` flags."""

    READ = 1 << 0
    WRITE = 1 << 1


class DmaMap(NamedTuple):
    """``VFIO_USER_DMA_MAP`` request (32 bytes): argsz, flags, offset (in the fd),
    address (the DMA address, guest-physical without a vIOMMU), size."""

    argsz: int
    flags: int
    offset: int
    address: int
    size: int


DMA_MAP = WireStruct(
    DmaMap,
    [("argsz", "le32"), ("flags", "le32"), ("offset", "le64"), ("address", "le64"),
     ("size", "le64")],
)  # fmt: skip


class DmaUnmap(NamedTuple):
    """``VFIO_USER_DMA_UNMAP`` request and reply (24 bytes): argsz, flags, address,
    size; "The address and size of the DMA region being unmapped must match exactly
    a previous mapping"."""

    argsz: int
    flags: int
    address: int
    size: int


DMA_UNMAP = WireStruct(
    DmaUnmap, [("argsz", "le32"), ("flags", "le32"), ("address", "le64"), ("size", "le64")]
)


class DeviceFlags(IntFlag):
    """``VFIO_DEVICE_FLAGS_*`` of ``struct vfio_device_info``."""

    RESET = 1 << 0
    PCI = 1 << 1


class DeviceInfo(NamedTuple):
    """``VFIO_USER_DEVICE_GET_INFO`` (``struct vfio_device_info``, 16 bytes)."""

    argsz: int
    flags: int
    num_regions: int
    num_irqs: int


DEVICE_INFO = WireStruct(
    DeviceInfo, [("argsz", "le32"), ("flags", "le32"), ("num_regions", "le32"),
                 ("num_irqs", "le32")]
)  # fmt: skip


class PciRegion(IntEnum):
    """``VFIO_PCI_*_REGION_INDEX`` of ``<linux/vfio.h>``."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8
    NUM = 9


class RegionFlags(IntFlag):
    """``VFIO_REGION_INFO_FLAG_*``."""

    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class RegionInfo(NamedTuple):
    """``VFIO_USER_DEVICE_GET_REGION_INFO`` (``struct vfio_region_info``, 32 bytes;
    the spec's ``index`` is ``region`` here: a NamedTuple has ``index()``)."""

    argsz: int
    flags: int
    region: int
    cap_offset: int
    size: int
    offset: int


REGION_INFO = WireStruct(
    RegionInfo,
    [("argsz", "le32"), ("flags", "le32"), ("region", "le32"), ("cap_offset", "le32"),
     ("size", "le64"), ("offset", "le64")],
)  # fmt: skip


class PciIrqIndex(IntEnum):
    """``VFIO_PCI_*_IRQ_INDEX``."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4
    NUM = 5


class IrqInfoFlags(IntFlag):
    """``VFIO_IRQ_INFO_*``."""

    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqInfo(NamedTuple):
    """``VFIO_USER_DEVICE_GET_IRQ_INFO`` (``struct vfio_irq_info``, 16 bytes; the
    spec's ``index``/``count`` are ``irq_index``/``irq_count``)."""

    argsz: int
    flags: int
    irq_index: int
    irq_count: int


IRQ_INFO = WireStruct(
    IrqInfo,
    [("argsz", "le32"), ("flags", "le32"), ("irq_index", "le32"), ("irq_count", "le32")],
)


class IrqSetFlags(IntFlag):
    """``VFIO_IRQ_SET_*``: one DATA and one ACTION bit."""

    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


DATA_TYPE_MASK = 0x7
ACTION_TYPE_MASK = 0x38


class IrqSet(NamedTuple):
    """``VFIO_USER_DEVICE_SET_IRQS`` (``struct vfio_irq_set``, 20 bytes, then data:
    ``count`` bool bytes for DATA_BOOL; eventfds travel as SCM_RIGHTS; ``index``
    and ``count`` are ``irq_index`` and ``irq_count`` here)."""

    argsz: int
    flags: int
    irq_index: int
    start: int
    irq_count: int


IRQ_SET = WireStruct(
    IrqSet,
    [("argsz", "le32"), ("flags", "le32"), ("irq_index", "le32"), ("start", "le32"),
     ("irq_count", "le32")],
)  # fmt: skip


class RegionAccess(NamedTuple):
    """``VFIO_USER_REGION_READ``/``WRITE`` request and reply head (16 bytes): offset,
    region, count (``data_count`` here); data follows in a write request and a read
    reply."""

    offset: int
    region: int
    data_count: int


REGION_ACCESS = WireStruct(
    RegionAccess, [("offset", "le64"), ("region", "le32"), ("data_count", "le32")]
)
