"""virtio-mmio register layouts and constants, declared once for both sides.

virtio-v1.2 §4.2.2 "MMIO Device Register Layout" (version 2) and §4.2.4 "Legacy
interface" (version 1). Every register is 32 bits wide and little-endian ("All
register values are organized as Little Endian"); the device-specific configuration
space starts at 0x100. The register tables below give offset, direction and reset
value of every register; the register-table tests check the device model against
them and the driver side takes its offsets from :class:`MmioReg`.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import NamedTuple

#: "The device MUST return 0x74726976 in MagicValue" (the string "virt" little-endian).
VIRTIO_MMIO_MAGIC_VALUE = 0x74726976
#: Version of the current interface ("The device MUST return value 0x2 in Version").
VIRTIO_MMIO_VERSION = 2
#: Version of the legacy interface ("Legacy device returns value 0x1").
VIRTIO_MMIO_VERSION_LEGACY = 1
#: VendorID pyvirtio's device model presents (the spec leaves it free).
VIRTIO_MMIO_VENDOR_ID = 0x1AF4

#: Offset of the device-specific configuration space.
VIRTIO_MMIO_CONFIG = 0x100
#: Size of one device's register window as laid out by QEMU's microvm / virt boards.
VIRTIO_MMIO_WINDOW_SIZE = 0x200
#: Width of every control register (the driver "MUST only use 32 bit wide and
#: aligned reads and writes to access the control registers").
VIRTIO_MMIO_REG_WIDTH = 4

#: QEMU microvm places its virtio-mmio transports at 0xFEB00000 + n * 0x200.
MICROVM_MMIO_BASE = 0xFEB00000
#: microvm has 8 such transports.
MICROVM_MMIO_COUNT = 8
#: GSI of transport n on microvm without the second IOAPIC: 5 + n.
MICROVM_MMIO_IRQ_BASE = 5

#: Value read from SHMLenLow/High and (both halves of) SHMBase for a region that does
#: not exist: "Reading from a non-existent region ... results in a length of -1"
#: and "a base address of 0xffffffffffffffff".
VIRTIO_MMIO_SHM_ABSENT = 0xFFFFFFFFFFFFFFFF

#: Default GuestPageSize of a legacy device until the driver writes one (Linux
#: writes PAGE_SIZE = 4096 before configuring queues).
VIRTIO_MMIO_DEFAULT_PAGE_SIZE = 4096
#: Default QueueAlign of a legacy device until the driver writes one.
VIRTIO_MMIO_DEFAULT_QUEUE_ALIGN = 4096


class MmioReg(IntEnum):
    """Offsets of the control registers (version 2 names; legacy aliases below)."""

    MAGIC_VALUE = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    #: legacy (version 1) only
    GUEST_PAGE_SIZE = 0x028
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    #: legacy (version 1) only
    QUEUE_ALIGN = 0x03C
    #: legacy (version 1) only
    QUEUE_PFN = 0x040
    #: version 2 only
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_DRIVER_LOW = 0x090
    QUEUE_DRIVER_HIGH = 0x094
    QUEUE_DEVICE_LOW = 0x0A0
    QUEUE_DEVICE_HIGH = 0x0A4
    SHM_SEL = 0x0AC
    SHM_LEN_LOW = 0x0B0
    SHM_LEN_HIGH = 0x0B4
    SHM_BASE_LOW = 0x0B8
    SHM_BASE_HIGH = 0x0BC
    QUEUE_RESET = 0x0C0
    CONFIG_GENERATION = 0x0FC


# Spec names of the same registers (virtio-v1.2 §4.2.2 / §4.2.4 tables).
QUEUE_SIZE_MAX = MmioReg.QUEUE_NUM_MAX
QUEUE_SIZE = MmioReg.QUEUE_NUM
HOST_FEATURES = MmioReg.DEVICE_FEATURES
HOST_FEATURES_SEL = MmioReg.DEVICE_FEATURES_SEL
GUEST_FEATURES = MmioReg.DRIVER_FEATURES
GUEST_FEATURES_SEL = MmioReg.DRIVER_FEATURES_SEL


class MmioInterrupt(IntFlag):
    """Bits of InterruptStatus / InterruptACK."""

    NONE = 0
    #: "Used Buffer Notification - bit 0"
    VRING = 0x1
    #: "Configuration Change Notification - bit 1"
    CONFIG = 0x2


VIRTIO_MMIO_INT_VRING = MmioInterrupt.VRING
VIRTIO_MMIO_INT_CONFIG = MmioInterrupt.CONFIG
#: Every defined interrupt bit ("Bits which do not represent events ... MUST be zero").
VIRTIO_MMIO_INT_MASK = 0x3


class MmioRegister(NamedTuple):
    """One row of an MMIO register table.

    ``access``: ``"R"`` read-only, ``"W"`` write-only, ``"RW"`` read-write (the
    spec's Direction column). ``reset`` is the value read after a device reset (for
    readable registers), or None when it depends on the device.
    """

    name: str
    offset: int
    access: str
    reset: int | None


#: virtio-v1.2 §4.2.2 table "MMIO Device Register Layout" (version 2).
MMIO_V2_REGISTERS: tuple[MmioRegister, ...] = (
    MmioRegister("MagicValue", MmioReg.MAGIC_VALUE, "R", VIRTIO_MMIO_MAGIC_VALUE),
    MmioRegister("Version", MmioReg.VERSION, "R", VIRTIO_MMIO_VERSION),
    MmioRegister("DeviceID", MmioReg.DEVICE_ID, "R", None),
    MmioRegister("VendorID", MmioReg.VENDOR_ID, "R", VIRTIO_MMIO_VENDOR_ID),
    MmioRegister("DeviceFeatures", MmioReg.DEVICE_FEATURES, "R", None),
    MmioRegister("DeviceFeaturesSel", MmioReg.DEVICE_FEATURES_SEL, "W", None),
    MmioRegister("DriverFeatures", MmioReg.DRIVER_FEATURES, "W", None),
    MmioRegister("DriverFeaturesSel", MmioReg.DRIVER_FEATURES_SEL, "W", None),
    MmioRegister("QueueSel", MmioReg.QUEUE_SEL, "W", None),
    MmioRegister("QueueSizeMax", MmioReg.QUEUE_NUM_MAX, "R", None),
    MmioRegister("QueueSize", MmioReg.QUEUE_NUM, "W", None),
    MmioRegister("QueueReady", MmioReg.QUEUE_READY, "RW", 0),
    MmioRegister("QueueNotify", MmioReg.QUEUE_NOTIFY, "W", None),
    MmioRegister("InterruptStatus", MmioReg.INTERRUPT_STATUS, "R", 0),
    MmioRegister("InterruptACK", MmioReg.INTERRUPT_ACK, "W", None),
    MmioRegister("Status", MmioReg.STATUS, "RW", 0),
    MmioRegister("QueueDescLow", MmioReg.QUEUE_DESC_LOW, "W", None),
    MmioRegister("QueueDescHigh", MmioReg.QUEUE_DESC_HIGH, "W", None),
    MmioRegister("QueueDriverLow", MmioReg.QUEUE_DRIVER_LOW, "W", None),
    MmioRegister("QueueDriverHigh", MmioReg.QUEUE_DRIVER_HIGH, "W", None),
    MmioRegister("QueueDeviceLow", MmioReg.QUEUE_DEVICE_LOW, "W", None),
    MmioRegister("QueueDeviceHigh", MmioReg.QUEUE_DEVICE_HIGH, "W", None),
    MmioRegister("SHMSel", MmioReg.SHM_SEL, "W", None),
    MmioRegister("SHMLenLow", MmioReg.SHM_LEN_LOW, "R", 0xFFFFFFFF),
    MmioRegister("SHMLenHigh", MmioReg.SHM_LEN_HIGH, "R", 0xFFFFFFFF),
    MmioRegister("SHMBaseLow", MmioReg.SHM_BASE_LOW, "R", 0xFFFFFFFF),
    MmioRegister("SHMBaseHigh", MmioReg.SHM_BASE_HIGH, "R", 0xFFFFFFFF),
    MmioRegister("QueueReset", MmioReg.QUEUE_RESET, "RW", 0),
    MmioRegister("ConfigGeneration", MmioReg.CONFIG_GENERATION, "R", None),
)

#: virtio-v1.2 §4.2.4 table "MMIO Device Legacy Register Layout" (version 1).
MMIO_V1_REGISTERS: tuple[MmioRegister, ...] = (
    MmioRegister("MagicValue", MmioReg.MAGIC_VALUE, "R", VIRTIO_MMIO_MAGIC_VALUE),
    MmioRegister("Version", MmioReg.VERSION, "R", VIRTIO_MMIO_VERSION_LEGACY),
    MmioRegister("DeviceID", MmioReg.DEVICE_ID, "R", None),
    MmioRegister("VendorID", MmioReg.VENDOR_ID, "R", VIRTIO_MMIO_VENDOR_ID),
    MmioRegister("HostFeatures", MmioReg.DEVICE_FEATURES, "R", None),
    MmioRegister("HostFeaturesSel", MmioReg.DEVICE_FEATURES_SEL, "W", None),
    MmioRegister("GuestFeatures", MmioReg.DRIVER_FEATURES, "W", None),
    MmioRegister("GuestFeaturesSel", MmioReg.DRIVER_FEATURES_SEL, "W", None),
    MmioRegister("GuestPageSize", MmioReg.GUEST_PAGE_SIZE, "W", None),
    MmioRegister("QueueSel", MmioReg.QUEUE_SEL, "W", None),
    MmioRegister("QueueSizeMax", MmioReg.QUEUE_NUM_MAX, "R", None),
    MmioRegister("QueueSize", MmioReg.QUEUE_NUM, "W", None),
    MmioRegister("QueueAlign", MmioReg.QUEUE_ALIGN, "W", None),
    MmioRegister("QueuePFN", MmioReg.QUEUE_PFN, "RW", 0),
    MmioRegister("QueueNotify", MmioReg.QUEUE_NOTIFY, "W", None),
    MmioRegister("InterruptStatus", MmioReg.INTERRUPT_STATUS, "R", 0),
    MmioRegister("InterruptACK", MmioReg.INTERRUPT_ACK, "W", None),
    MmioRegister("Status", MmioReg.STATUS, "RW", 0),
)
