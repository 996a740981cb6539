"""virtio-mmio, the driver's side: version 2 (virtio-v1.2 §4.2.2) and the legacy
version 1 (§4.2.4 "Legacy interface").

:class:`VirtioMmioTransport` implements :class:`~pyvirtio.core.driver.DriverTransport`
for the register window at ``base`` on a :class:`~pyvirtio.transport.bus.Bus`:

- version 2: 64-bit features through the ``*FeaturesSel`` windows, FEATURES_OK,
  QueueSizeMax / QueueSize / QueueDesc / QueueDriver / QueueDevice / QueueReady,
  ConfigGeneration, shared memory regions (SHMSel: all ones = absent), QueueReset;
- version 1 (``legacy`` True): GuestPageSize written once after reset, QueueAlign
  and QueuePFN for rings laid out contiguously (VirtioDriver uses alignment 4096
  when ``legacy`` is True), no FEATURES_OK, no configuration generation.

Control registers are accessed 32 bits wide and aligned only ("The driver MUST only
use 32 bit wide and aligned reads and writes to access the control registers",
§4.2.2.2). Interrupts: the board's interrupt line ``irq`` (QEMU microvm: see
:func:`microvm_irq`); on each raise InterruptStatus is read and the same bits are
written to InterruptACK: bit 0 reports every set-up queue, bit 1 a configuration
change.
"""

from __future__ import annotations

import contextlib
import time

from pyvirtio.errors import ConfigurationError, DeviceError, DriverError
from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.features import Feature, has
from pyvirtio.transport.bus import Bus
from pyvirtio.transport.interrupts import InterruptBookkeeping, InterruptRouter
from pyvirtio.transport.mmio.spec import (
    MICROVM_MMIO_BASE,
    MICROVM_MMIO_COUNT,
    MICROVM_MMIO_IRQ_BASE,
    VIRTIO_MMIO_CONFIG,
    VIRTIO_MMIO_DEFAULT_PAGE_SIZE,
    VIRTIO_MMIO_DEFAULT_QUEUE_ALIGN,
    VIRTIO_MMIO_INT_MASK,
    VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_SHM_ABSENT,
    VIRTIO_MMIO_VERSION,
    VIRTIO_MMIO_VERSION_LEGACY,
    VIRTIO_MMIO_WINDOW_SIZE,
    MmioInterrupt,
    MmioReg,
)
from pyvirtio.transport.pci.spec import legacy_vring_addresses
from pyvirtio.virtqueue.common import QueueAddresses

__all__ = [
    "MICROVM_ACPI_IRQ_BASE",
    "VirtioMmioTransport",
    "find_mmio_devices",
    "microvm_irq",
]

#: How long :meth:`VirtioMmioTransport.reset` waits for Status to read 0 (seconds).
RESET_TIMEOUT = 5.0
#: Most queues probed on a device (MMIO has no queue count register).
MAX_QUEUES = 1024
#: QEMU microvm with ACPI (its default) wires virtio-mmio slot n to GSI 16 + n when
#: the second I/O APIC is off (``ioapic2=off``); without ACPI to GSI 5 + n
#: (:data:`~pyvirtio.transport.mmio.spec.MICROVM_MMIO_IRQ_BASE`). With ``ioapic2``
#: on (QEMU's default) the 24 slots sit on the second I/O APIC, which qtest can
#: only intercept by an unstable QOM path: :class:`~pyvirtio.transport.qtest.QtestBus`
#: therefore starts microvm with ``ioapic2=off`` unless told otherwise.
MICROVM_ACPI_IRQ_BASE = 16

CLAUSE_DRIVER = 'virtio-v1.2 §4.2.2.2 "Driver Requirements: MMIO Device Register Layout"'
CLAUSE_LEGACY = 'virtio-v1.2 §4.2.4 "Legacy interface"'
CLAUSE_VQ = 'virtio-v1.2 §4.2.3.2 "Virtqueue Configuration"'
CLAUSE_NOTIFY = 'virtio-v1.2 §4.2.3.3 "Available Buffer Notifications"'


def microvm_irq(slot: int, *, acpi: bool = True) -> int:
    """The I/O APIC input QEMU microvm (``ioapic2=off``) wires virtio-mmio slot
    ``slot`` (0..7) to: GSI 16 + slot with ACPI (the default), 5 + slot without."""
    if not 0 <= slot < MICROVM_MMIO_COUNT:
        raise ConfigurationError(
            f"microvm has virtio-mmio slots 0..{MICROVM_MMIO_COUNT - 1}, not {slot}"
        )
    return (MICROVM_ACPI_IRQ_BASE if acpi else MICROVM_MMIO_IRQ_BASE) + slot


def find_mmio_devices(
    bus: Bus,
    base: int = MICROVM_MMIO_BASE,
    count: int = MICROVM_MMIO_COUNT,
    stride: int = VIRTIO_MMIO_WINDOW_SIZE,
) -> list[tuple[int, int, int]]:
    """Probe ``count`` register windows from ``base``; return ``(slot, address,
    device id)`` for each that holds a device (magic "virt", DeviceID not 0)."""
    found = []
    for slot in range(count):
        addr = base + slot * stride
        if bus.mmio_read(addr + MmioReg.MAGIC_VALUE, 4) != VIRTIO_MMIO_MAGIC_VALUE:
            continue
        did = bus.mmio_read(addr + MmioReg.DEVICE_ID, 4)
        if did:
            found.append((slot, addr, did))
    return found


class VirtioMmioTransport(InterruptBookkeeping):
    """:class:`~pyvirtio.core.driver.DriverTransport` for the virtio-mmio device at
    ``base`` (version 2, or version 1 which sets :attr:`legacy`).

    ``irq`` is the interrupt line the bus reports for the device (None: no
    interrupts, the driver polls); ``allocator`` defaults to the bus's.
    Raises :class:`~pyvirtio.errors.ConfigurationError` if there is no virtio-mmio
    device at ``base`` (bad magic, DeviceID 0) or its version is unknown.
    """

    #: guest RAM (the bus's)
    mem: GuestMemory
    #: the driver's allocator for rings and buffers
    allocator: GuestAllocator

    def __init__(
        self,
        bus: Bus,
        base: int,
        *,
        irq: int | None = None,
        allocator: GuestAllocator | None = None,
        page_size: int = VIRTIO_MMIO_DEFAULT_PAGE_SIZE,
    ) -> None:
        self.bus = bus
        self.base = base
        self.mem = bus.mem
        alloc = allocator if allocator is not None else getattr(bus, "allocator", None)
        if not isinstance(alloc, GuestAllocator):
            raise ConfigurationError("the bus has no allocator: pass allocator=")
        self.allocator = alloc
        magic = self._rd(MmioReg.MAGIC_VALUE)
        if magic != VIRTIO_MMIO_MAGIC_VALUE:
            raise ConfigurationError(f"no virtio-mmio device at {base:#x} (magic {magic:#x})")
        #: the interface version (2, or 1 for legacy)
        self.version = self._rd(MmioReg.VERSION)
        if self.version not in (VIRTIO_MMIO_VERSION, VIRTIO_MMIO_VERSION_LEGACY):
            raise ConfigurationError(
                f"virtio-mmio device at {base:#x} has unknown version {self.version}"
            )
        #: True for the version 1 (legacy) register layout
        self.legacy = self.version == VIRTIO_MMIO_VERSION_LEGACY
        #: True if VIRTIO_F_NOTIFICATION_DATA may be accepted (version 2 only)
        self.notification_data = not self.legacy
        self._device_id = self._rd(MmioReg.DEVICE_ID)
        if self._device_id == 0:
            raise ConfigurationError(f"the virtio-mmio window at {base:#x} has no device")
        #: VendorID register
        self.vendor_id = self._rd(MmioReg.VENDOR_ID)
        if page_size <= 0 or page_size & (page_size - 1):
            raise ConfigurationError("page_size must be a power of two")
        self.page_size = page_size
        self.irq = irq
        self._router = InterruptRouter.for_bus(bus) if irq is not None else None
        if self._router is not None and irq is not None:
            self._router.add_intx(irq, self._on_irq)
            # the line is level-triggered and a bus reports edges: acknowledge what an
            # earlier user left pending, or the line would stay high for good
            pending = self._rd(MmioReg.INTERRUPT_STATUS) & VIRTIO_MMIO_INT_MASK
            if pending:
                self._wr(MmioReg.INTERRUPT_ACK, pending)
        # set-up queues, pending events, interrupt_counts / interrupts / wakeups /
        # timeouts (interrupts: raises that found InterruptStatus bits set)
        super().__init__()
        self._queue_max: dict[int, int] = {}
        self._queue_count: int | None = None
        self._closed = False
        self._driver_features = 0
        #: times InterruptStatus had bits set when a wait timed out (no raise seen)
        self.polled = 0

    # -- register access ---------------------------------------------------------------

    def _rd(self, reg: int) -> int:
        return self.bus.mmio_read(self.base + reg, 4)

    def _wr(self, reg: int, value: int) -> None:
        self.bus.mmio_write(self.base + reg, 4, value & 0xFFFFFFFF)

    # -- identity, status, features ------------------------------------------------------

    def device_id(self) -> int:
        """DeviceID (the virtio device type)."""
        return self._device_id

    def reset(self) -> None:
        """Write 0 to Status and wait until it reads 0; version 1: write GuestPageSize
        ("during initialization, before any queues are used", §4.2.4)."""
        self._wr(MmioReg.STATUS, 0)
        deadline = time.monotonic() + RESET_TIMEOUT
        while self._rd(MmioReg.STATUS) != 0:
            if time.monotonic() > deadline:
                raise DeviceError("Status never read 0 after reset", CLAUSE_DRIVER)
            time.sleep(0.001)
        self._enabled.clear()
        self._queue_max.clear()
        self._fired.clear()
        if self.legacy:
            self._wr(MmioReg.GUEST_PAGE_SIZE, self.page_size)

    def get_status(self) -> int:
        """Read Status."""
        return self._rd(MmioReg.STATUS) & 0xFF

    def set_status(self, status: int) -> None:
        """Write Status."""
        self._wr(MmioReg.STATUS, status & 0xFF)

    def get_device_features(self) -> int:
        """DeviceFeatures words 0 and 1 (version 1 devices present 0 in word 1)."""
        value = 0
        for sel in range(2):
            self._wr(MmioReg.DEVICE_FEATURES_SEL, sel)
            value |= self._rd(MmioReg.DEVICE_FEATURES) << (32 * sel)
        return value

    def set_driver_features(self, features: int) -> None:
        """DriverFeatures words 0 and 1."""
        if features >> 64:
            raise DriverError("feature bits above 63 are not written by this transport")
        self._driver_features = features
        for sel in range(2):
            self._wr(MmioReg.DRIVER_FEATURES_SEL, sel)
            self._wr(MmioReg.DRIVER_FEATURES, features >> (32 * sel))

    def config_generation(self) -> int:
        """ConfigGeneration (version 2); 0 for version 1, which has none."""
        return 0 if self.legacy else self._rd(MmioReg.CONFIG_GENERATION)

    # -- configuration space -----------------------------------------------------------------

    def read_config(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes of configuration space with the widest naturally
        aligned accesses (1, 2 or 4 bytes) (virtio-v1.2 §4.2.2.2)."""
        if offset < 0 or size < 0 or offset + size > VIRTIO_MMIO_WINDOW_SIZE - VIRTIO_MMIO_CONFIG:
            raise ValueError(f"configuration range {offset}+{size} is outside the window")
        out = bytearray()
        pos, end = offset, offset + size
        while pos < end:
            width = 4
            while width > 1 and (pos % width or pos + width > end):
                width //= 2
            value = self.bus.mmio_read(self.base + VIRTIO_MMIO_CONFIG + pos, width)
            out += value.to_bytes(width, "little")
            pos += width
        return bytes(out)

    def write_config(self, offset: int, data: bytes) -> None:
        """Write configuration space (naturally aligned accesses of 1, 2 or 4 bytes)."""
        size = len(data)
        if offset < 0 or offset + size > VIRTIO_MMIO_WINDOW_SIZE - VIRTIO_MMIO_CONFIG:
            raise ValueError(f"configuration range {offset}+{size} is outside the window")
        pos = 0
        while pos < size:
            width = 4
            while width > 1 and ((offset + pos) % width or pos + width > size):
                width //= 2
            value = int.from_bytes(data[pos : pos + width], "little")
            self.bus.mmio_write(self.base + VIRTIO_MMIO_CONFIG + offset + pos, width, value)
            pos += width

    def shm_region(self, shmid: int) -> tuple[int, int] | None:
        """``(base, length)`` of shared memory region ``shmid``; None if absent
        (SHMLen reads all ones, virtio-v1.2 §4.2.2) or on a version 1 device."""
        if self.legacy:
            return None
        self._wr(MmioReg.SHM_SEL, shmid)
        length = self._rd(MmioReg.SHM_LEN_LOW) | self._rd(MmioReg.SHM_LEN_HIGH) << 32
        if length == VIRTIO_MMIO_SHM_ABSENT:
            return None
        base = self._rd(MmioReg.SHM_BASE_LOW) | self._rd(MmioReg.SHM_BASE_HIGH) << 32
        return base, length

    # -- queues ---------------------------------------------------------------------------

    def _select(self, index: int) -> None:
        self._wr(MmioReg.QUEUE_SEL, index)

    def num_queues(self) -> int:
        """Queues with a non-zero QueueSizeMax, probed from 0 up (virtio-mmio has no
        queue count register)."""
        if self._queue_count is None:
            n = 0
            while n < MAX_QUEUES and self.queue_max_size(n):
                n += 1
            self._queue_count = n
        return self._queue_count

    def queue_max_size(self, index: int) -> int:
        """QueueSizeMax of queue ``index`` (0: not available)."""
        if not 0 <= index < MAX_QUEUES:
            return 0
        if index not in self._queue_max:
            self._select(index)
            self._queue_max[index] = self._rd(MmioReg.QUEUE_NUM_MAX) & 0xFFFF
        return self._queue_max[index]

    def setup_queue(self, index: int, size: int, addrs: QueueAddresses) -> None:
        """Configure and activate queue ``index`` (virtio-v1.2 §4.2.3.2 "Virtqueue
        Configuration"; version 1: §4.2.4).

        Version 2: check QueueReady reads 0, QueueSize, the three addresses, then
        QueueReady = 1. Version 1: check QueuePFN reads 0, QueueSize, QueueAlign and
        the page frame number of the (contiguous) ring. Raises
        :class:`~pyvirtio.errors.DriverError` for a size the queue does not accept,
        a queue already in use, or (version 1) a ring not laid out as one block.
        """
        qmax = self.queue_max_size(index)
        if qmax == 0:
            raise DriverError(f"queue {index} is not available", CLAUSE_VQ)
        if not 0 < size <= qmax:
            raise DriverError(f"queue {index}: size {size} is not in 1..{qmax}", CLAUSE_VQ)
        self._select(index)
        if self.legacy:
            self._setup_legacy(index, size, addrs)
        else:
            if self._rd(MmioReg.QUEUE_READY):
                raise DriverError(f"queue {index} is already in use", CLAUSE_VQ)
            self._wr(MmioReg.QUEUE_NUM, size)
            for low, addr in (
                (MmioReg.QUEUE_DESC_LOW, addrs.desc),
                (MmioReg.QUEUE_DRIVER_LOW, addrs.driver),
                (MmioReg.QUEUE_DEVICE_LOW, addrs.device),
            ):
                self._wr(low, addr)
                self._wr(low + 4, addr >> 32)
            self._wr(MmioReg.QUEUE_READY, 1)
        self._enabled.add(index)

    def _setup_legacy(self, index: int, size: int, addrs: QueueAddresses) -> None:
        align = VIRTIO_MMIO_DEFAULT_QUEUE_ALIGN
        expected = legacy_vring_addresses(addrs.desc, size, align)
        if addrs.desc % self.page_size or expected != addrs:
            raise DriverError(
                f"queue {index}: legacy rings are one block starting on a "
                f"{self.page_size}-byte page, used ring aligned to {align} (got {addrs})",
                'virtio-v1.2 §2.7.2 "Legacy Interfaces: A Note on Virtqueue Layout"',
            )
        pfn = addrs.desc // self.page_size
        if pfn >> 32 or pfn == 0:
            raise DriverError(f"queue {index}: ring at {addrs.desc:#x} has no usable PFN")
        if self._rd(MmioReg.QUEUE_PFN):
            raise DriverError(f"queue {index} is already in use", CLAUSE_LEGACY)
        self._wr(MmioReg.QUEUE_NUM, size)
        self._wr(MmioReg.QUEUE_ALIGN, align)
        self._wr(MmioReg.QUEUE_PFN, pfn)

    def reset_queue(self, index: int) -> None:
        """Reset queue ``index`` alone with QueueReset (VIRTIO_F_RING_RESET, version
        2): "the driver MUST NOT consider queue reset to be complete until it reads
        back 0 in QueueReset"."""
        if self.legacy:
            raise DriverError("version 1 devices have no QueueReset", CLAUSE_LEGACY)
        if not has(self._driver_features, Feature.RING_RESET):
            raise DriverError("QueueReset needs VIRTIO_F_RING_RESET negotiated", CLAUSE_DRIVER)
        self._select(index)
        self._wr(MmioReg.QUEUE_RESET, 1)
        deadline = time.monotonic() + RESET_TIMEOUT
        while self._rd(MmioReg.QUEUE_RESET) != 0:
            if time.monotonic() > deadline:
                raise DeviceError(f"queue {index} reset never completed", CLAUSE_DRIVER)
            time.sleep(0.0005)
        self._enabled.discard(index)

    def notify(self, index: int) -> None:
        """Write the queue index to QueueNotify (virtio-v1.2 §4.2.3.3 "Available
        Buffer Notifications"). With VIRTIO_F_NOTIFICATION_DATA negotiated the value
        must carry the data: use :meth:`notify_data`
        (:class:`~pyvirtio.errors.DriverError` here)."""
        if index not in self._enabled:
            raise DriverError(f"notification for queue {index}, which is not set up")
        if self._notification_data():
            raise DriverError(
                f"queue {index}: VIRTIO_F_NOTIFICATION_DATA is negotiated, a notification "
                "carries data (notify_data)",
                CLAUSE_NOTIFY,
            )
        self._wr(MmioReg.QUEUE_NOTIFY, index)

    def notify_data(self, index: int, data: int) -> None:
        """With VIRTIO_F_NOTIFICATION_DATA negotiated, write ``index | data << 16``
        (``data`` = ``next_off | next_wrap << 15``) to QueueNotify (virtio-v1.2 §4.2.2
        "MMIO Device Register Layout", QueueNotify; §4.2.3.3). Without the feature
        this is :meth:`notify` (the data is dropped)."""
        if index not in self._enabled:
            raise DriverError(f"notification for queue {index}, which is not set up")
        if not self._notification_data():
            self._wr(MmioReg.QUEUE_NOTIFY, index)
            return
        self._wr(MmioReg.QUEUE_NOTIFY, (index & 0xFFFF) | (data & 0xFFFF) << 16)

    def _notification_data(self) -> bool:
        return not self.legacy and has(self._driver_features, Feature.NOTIFICATION_DATA)

    # -- interrupts -------------------------------------------------------------------------

    def _on_irq(self) -> None:
        self._service(polled=False)

    def _service(self, polled: bool) -> None:
        status = self._rd(MmioReg.INTERRUPT_STATUS) & VIRTIO_MMIO_INT_MASK
        if not status:
            return  # shared line, or already acknowledged
        # §4.2.3.4: the driver acknowledges "by writing a value with corresponding bits
        # set to InterruptACK"
        self._wr(MmioReg.INTERRUPT_ACK, status)
        if polled:
            self.polled += 1
        else:
            self.interrupts += 1
        self._report(self._status_events(status, MmioInterrupt.VRING, MmioInterrupt.CONFIG))

    def poll_interrupts(self, timeout: float | None) -> set[int]:
        """Wait up to ``timeout`` seconds for the device's interrupt line; return the
        queue indexes (InterruptStatus bit 0: every set-up queue) and
        :data:`~pyvirtio.core.driver.CONFIG_CHANGE` (bit 1) it reported."""
        # a level-triggered line raised while nobody listened stays high and is
        # never reported again: look at the register once before giving up
        return self._poll(self._router, timeout, last_look=lambda: self._service(polled=True))

    def interrupt_fds(self) -> list[int]:
        """The bus's interrupt descriptors."""
        return self.bus.interrupt_fds()

    def close(self) -> None:
        """Reset the device (best effort) and release the interrupt route (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._wr(MmioReg.STATUS, 0)
        if self._router is not None and self.irq is not None:
            self._router.remove_intx(self.irq, self._on_irq)
