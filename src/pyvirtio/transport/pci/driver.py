"""virtio-pci, the driver's side: modern (virtio-v1.2 §4.1) and legacy (§4.1.4.10).

Both transports implement :class:`~pyvirtio.core.driver.DriverTransport` over a
:class:`~pyvirtio.transport.bus.Bus` (in-process or qtest) for a function whose BARs
were assigned by :func:`~pyvirtio.transport.pci.enumerate.enumerate_pci`:

- :class:`VirtioPciModernTransport` finds the virtio structures through the vendor
  capabilities (virtio-v1.2 §4.1.4 "Virtio Structure PCI Capabilities"): common
  configuration, notification (``cap.offset + queue_notify_off *
  notify_off_multiplier``), ISR status and device configuration; a notification is
  the 16-bit queue index, or with VIRTIO_F_NOTIFICATION_DATA negotiated the 32-bit
  ``index | next_off << 16 | next_wrap << 31`` (``notify_data``, virtio-v1.2
  §4.1.5.2 "Available Buffer Notifications");
- :class:`VirtioPciLegacyTransport` uses the I/O BAR0 header of a legacy or
  transitional function (virtio-v1.2 §4.1.4.10 "Legacy Interfaces: A Note on PCI
  Device Layout"): 32-bit features, no FEATURES_OK, page frame numbers of rings laid
  out with 4096 alignment, device configuration at 20 or (MSI-X enabled) 24;
- :func:`open_virtio_pci` picks modern when the function offers it and legacy
  otherwise, or legacy when told to (``force_legacy``), as Linux's
  ``virtio_pci.force_legacy`` does.

Interrupts (virtio-v1.2 §4.1.5.1.2 "MSI-X Vector Configuration"): when the function
has an MSI-X capability, the table is programmed with messages the bus can observe
(``bus.msi_window`` when the bus has one, as :class:`~pyvirtio.transport.qtest.QtestBus`
does, else the x86 interrupt window at 0xFEE00000), one vector for configuration
changes and one per queue when the table is large enough (else one shared by the
queues, else one for everything). Without MSI-X the INTx line written into the
Interrupt Line register by enumeration is used, and the ISR status byte (read to
clear) says what happened: bit 0 queues, bit 1 configuration.
:meth:`~VirtioPciModernTransport.poll_interrupts` turns either into queue indexes
and :data:`~pyvirtio.core.driver.CONFIG_CHANGE`.

Several transports may share one bus: an
:class:`~pyvirtio.transport.interrupts.InterruptRouter` per bus hands each interrupt
to the transport it belongs to; the notification bookkeeping (pending events,
counters, waiting) is :class:`~pyvirtio.transport.interrupts.InterruptBookkeeping`,
shared with the MMIO transport.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from pyvirtio.core.driver import CONFIG_CHANGE
from pyvirtio.errors import ConfigurationError, DeviceError, DriverError
from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.features import Feature, has
from pyvirtio.transport.bus import Bus
from pyvirtio.transport.interrupts import InterruptBookkeeping, InterruptRouter
from pyvirtio.transport.pci.enumerate import (
    capabilities,
    format_bdf,
    read_bars,
    read_function,
)
from pyvirtio.transport.pci.spec import (
    MSIX_BIR_MASK,
    MSIX_CAP,
    MSIX_CONTROL_ENABLE,
    MSIX_CONTROL_FUNCTION_MASK,
    MSIX_CONTROL_TABLE_SIZE_MASK,
    MSIX_ENTRY,
    PCI_CONFIG_SPACE_SIZE,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_CAP,
    VIRTIO_PCI_CAP_BAR_MAX,
    VIRTIO_PCI_NOTIFY_CAP,
    VIRTIO_PCI_QUEUE_ADDR_SHIFT,
    VIRTIO_PCI_VRING_ALIGN,
    CommonCfg,
    IsrBits,
    LegacyReg,
    PciCapId,
    PciCfg,
    PciCommand,
    VirtioPciCap,
    VirtioPciCapType,
    is_virtio_pci_id,
    legacy_config_offset,
    legacy_vring_addresses,
    virtio_device_type,
)
from pyvirtio.virtqueue.common import QueueAddresses

__all__ = [
    "RESET_TIMEOUT",
    "VirtioPciLegacyTransport",
    "VirtioPciModernTransport",
    "open_virtio_pci",
    "virtio_capabilities",
]

#: How long :meth:`reset` waits for device_status to read 0 (seconds).
RESET_TIMEOUT = 5.0
#: Most queues a legacy function is probed for (it has no queue count register).
LEGACY_MAX_QUEUES = 1024

CLAUSE_CAPS = 'virtio-v1.2 §4.1.4 "Virtio Structure PCI Capabilities"'
CLAUSE_COMMON = (
    'virtio-v1.2 §4.1.4.3.2 "Driver Requirements: Common configuration structure layout"'
)
CLAUSE_NOTIFY = 'virtio-v1.2 §4.1.4.4.1 "Device Requirements: Notification capability"'
CLAUSE_MSIX = 'virtio-v1.2 §4.1.5.1.2 "MSI-X Vector Configuration"'
CLAUSE_LEGACY = 'virtio-v1.2 §4.1.4.10 "Legacy Interfaces: A Note on PCI Device Layout"'
CLAUSE_VQ = 'virtio-v1.2 §4.1.5.1.3 "Virtqueue Configuration"'
CLAUSE_NOTIFY_DRIVER = (
    'virtio-v1.2 §4.1.5.2.1 "Driver Requirements: Available Buffer Notifications"'
)

#: Sizes of the virtio structures a driver needs (the device may present more).
_COMMON_MIN_LEN = CommonCfg.QUEUE_DEVICE + 8
_NOTIFY_CAP_LEN = VIRTIO_PCI_NOTIFY_CAP.size
_CAP_LEN = VIRTIO_PCI_CAP.size
_U16 = 0xFFFF


class _Region:
    """A virtio structure inside a BAR: bounded register access through the bus."""

    __slots__ = ("base", "bus", "io", "length")

    def __init__(self, bus: Bus, base: int, length: int, io: bool) -> None:
        self.bus = bus
        self.base = base
        self.length = length
        self.io = io

    def _check(self, offset: int, size: int) -> None:
        if offset < 0 or offset + size > self.length:
            raise DriverError(
                f"access {offset:#x}+{size} is outside the {self.length:#x}-byte structure"
            )

    def read(self, offset: int, size: int) -> int:
        self._check(offset, size)
        if self.io:
            return self.bus.io_read(self.base + offset, size)
        return self.bus.mmio_read(self.base + offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._check(offset, size)
        if self.io:
            self.bus.io_write(self.base + offset, size, value)
        else:
            self.bus.mmio_write(self.base + offset, size, value)

    def read_bytes(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes with the widest naturally aligned accesses (1/2/4)."""
        out = bytearray()
        pos = offset
        end = offset + size
        while pos < end:
            width = 4
            while width > 1 and (pos % width or pos + width > end):
                width //= 2
            out += self.read(pos, width).to_bytes(width, "little")
            pos += width
        return bytes(out)

    def write_bytes(self, offset: int, data: bytes) -> None:
        """Write ``data`` with the widest naturally aligned accesses (1/2/4)."""
        pos = 0
        while pos < len(data):
            width = 4
            while width > 1 and ((offset + pos) % width or pos + width > len(data)):
                width //= 2
            value = int.from_bytes(data[pos : pos + width], "little")
            self.write(offset + pos, width, value)
            pos += width


# ---------------------------------------------------------------------------
# Interrupt plumbing common to modern and legacy functions
# ---------------------------------------------------------------------------


class _PciInterrupts:
    """MSI-X table programming, or INTx + ISR, for one function."""

    def __init__(self, owner: _PciTransportBase, use_msix: bool) -> None:
        self.owner = owner
        bus = owner.bus
        self.router = InterruptRouter.for_bus(bus)
        self.mode = "none"
        self.msix_cap = 0
        self.table: _Region | None = None
        self.table_size = 0
        self.keys: list[tuple[int, int]] = []
        self.intx_line: int | None = None
        #: what did not work out (refused vectors ...)
        self.problems: list[str] = []
        #: MSI-X vector -> what it reports (queue indexes, CONFIG_CHANGE)
        self.vector_events: dict[int, set[int]] = {}
        for cap_id, pos in owner.caps:
            if cap_id == PciCapId.MSIX and not self.msix_cap:
                self.msix_cap = pos
        if use_msix and self.msix_cap:
            cap = MSIX_CAP.unpack(_read_cap(bus, owner.bdf, self.msix_cap, MSIX_CAP.size))
            self.table_size = (cap.message_control & MSIX_CONTROL_TABLE_SIZE_MASK) + 1
            bir = cap.table & MSIX_BIR_MASK
            offset = cap.table & ~MSIX_BIR_MASK
            self.table = owner.region(bir, offset, self.table_size * MSIX_ENTRY.size, "MSI-X table")
            self.mode = "msix"
        else:
            if self.msix_cap:
                # INTx only works while MSI-X is off (an earlier user may have left it on)
                self._clear_msix_enable()
            pin = bus.pci_cfg_read(owner.bdf, PciCfg.INTERRUPT_PIN, 1)
            line = bus.pci_cfg_read(owner.bdf, PciCfg.INTERRUPT_LINE, 1)
            if 1 <= pin <= 4 and line != 0xFF:
                self.intx_line = line
                self.router.add_intx(line, owner._on_intx)
                self.mode = "intx"

    def vector_for_queue(self, index: int) -> int:
        """The vector of queue ``index``: its own when the table is large enough,
        else one shared by the queues, else the single vector."""
        n = self.table_size
        if n >= 2 + index:
            return 1 + index
        return 1 if n >= 2 else 0

    def enable_msix(self) -> None:
        """Program the table entries in use with fresh messages and enable MSI-X
        (the function is masked while the table is written)."""
        table = self.table
        if table is None:
            return
        bus = self.owner.bus
        bdf = self.owner.bdf
        ctrl_off = self.msix_cap + MSIX_CAP.offset_of("message_control")
        ctrl = bus.pci_cfg_read(bdf, ctrl_off, 2)
        bus.pci_cfg_write(bdf, ctrl_off, 2, ctrl | MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK)
        used = min(self.table_size, 1 + self.owner.num_queues())
        for v in range(used):
            key = self.router.allocate_msi(self._msi_handler(v))
            self.keys.append(key)
            address, data = key
            base = v * MSIX_ENTRY.size
            table.write(base + MSIX_ENTRY.offset_of("msg_addr_lo"), 4, address & 0xFFFFFFFF)
            table.write(base + MSIX_ENTRY.offset_of("msg_addr_hi"), 4, address >> 32)
            table.write(base + MSIX_ENTRY.offset_of("msg_data"), 4, data)
            table.write(base + MSIX_ENTRY.offset_of("vector_control"), 4, 0)
        ctrl = (ctrl | MSIX_CONTROL_ENABLE) & ~MSIX_CONTROL_FUNCTION_MASK & _U16
        bus.pci_cfg_write(bdf, ctrl_off, 2, ctrl)

    def _clear_msix_enable(self) -> None:
        bus = self.owner.bus
        ctrl_off = self.msix_cap + MSIX_CAP.offset_of("message_control")
        ctrl = bus.pci_cfg_read(self.owner.bdf, ctrl_off, 2)
        if ctrl & MSIX_CONTROL_ENABLE:
            bus.pci_cfg_write(self.owner.bdf, ctrl_off, 2, ctrl & ~MSIX_CONTROL_ENABLE & _U16)

    def disable_msix(self) -> None:
        """Turn MSI-X off again (best effort: the bus may be gone)."""
        if not self.msix_cap or self.mode != "msix":
            return
        with contextlib.suppress(Exception):
            self._clear_msix_enable()

    def _msi_handler(self, vector: int) -> Callable[[], None]:
        def handler() -> None:
            self.owner._on_msi(vector)

        return handler

    def close(self) -> None:
        """Release the messages and the INTx route, disable MSI-X."""
        for key in self.keys:
            self.router.release_msi(key)
        self.keys = []
        if self.intx_line is not None:
            self.router.remove_intx(self.intx_line, self.owner._on_intx)
            self.intx_line = None
        self.disable_msix()


# ---------------------------------------------------------------------------
# What modern and legacy functions share: identity, BARs, interrupts
# ---------------------------------------------------------------------------


class _PciTransportBase(InterruptBookkeeping):
    """Function identity, BAR regions, MSI-X / INTx interrupts, notification bookkeeping."""

    legacy = False
    #: guest RAM (the bus's)
    mem: GuestMemory
    #: the driver's allocator for rings and buffers
    allocator: GuestAllocator

    def __init__(self, bus: Bus, bdf: int, *, allocator: GuestAllocator | None, msix: bool) -> None:
        self.bus = bus
        self.bdf = bdf
        self.mem = bus.mem
        alloc = allocator if allocator is not None else getattr(bus, "allocator", None)
        if not isinstance(alloc, GuestAllocator):
            raise ConfigurationError("the bus has no allocator: pass allocator=")
        self.allocator = alloc
        fn = read_function(bus, bdf)
        if fn is None:
            raise ConfigurationError(f"no PCI function at {format_bdf(bdf)}")
        if not is_virtio_pci_id(fn.vendor_id, fn.device_id):
            raise ConfigurationError(f"{fn} is not a virtio device (virtio-v1.2 §4.1.2)")
        #: what enumeration reads about the function
        self.function = fn
        self.caps = fn.capabilities
        self.bars = read_bars(bus, bdf)
        self._use_msix = msix
        # set-up queues, pending events, interrupt_counts / interrupts / wakeups /
        # timeouts (interrupts: MSI-X messages or INTx raises that reached it)
        super().__init__()
        self._closed = False
        self._irq: _PciInterrupts | None = None
        self._last_generation = -1

    # -- BARs -------------------------------------------------------------------------

    def region(self, index: int, offset: int, length: int, what: str) -> _Region:
        """``length`` bytes at ``offset`` of BAR ``index``, checked against its size."""
        bar = self.bars.get(index)
        if bar is None or bar.address is None:
            raise ConfigurationError(
                f"{what}: BAR{index} of {format_bdf(self.bdf)} is not assigned "
                "(run enumerate_pci() on the bus first)"
            )
        if offset < 0 or length <= 0 or offset + length > bar.size:
            raise DeviceError(
                f"{what} at {offset:#x}+{length:#x} leaves BAR{index} ({bar.size:#x} bytes)",
                CLAUSE_CAPS,
            )
        cmd_bit = PciCommand.IO if bar.io else PciCommand.MEMORY
        if not self.bus.pci_cfg_read(self.bdf, PciCfg.COMMAND, 2) & cmd_bit:
            raise ConfigurationError(
                f"{what}: decoding of BAR{index} is off (run enumerate_pci() first)"
            )
        return _Region(self.bus, bar.address + offset, length, bar.io)

    # -- identity ------------------------------------------------------------------------

    def device_id(self) -> int:
        """The virtio device type (virtio-v1.2 §4.1.2: from the PCI Device ID, or the
        Subsystem Device ID of a transitional function)."""
        return virtio_device_type(self.function.device_id, self.function.subsystem_id)

    @property
    def interrupt_mode(self) -> str:
        """``"msix"``, ``"intx"`` or ``"none"`` (no interrupts: polling only)."""
        return self._irq.mode if self._irq is not None else "none"

    # -- hooks the subclasses provide ----------------------------------------------------

    def num_queues(self) -> int:  # pragma: no cover - overridden
        """How many virtqueues the device has."""
        raise NotImplementedError

    def _read_isr(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def _write_config_vector(self, vector: int) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def config_generation(self) -> int:
        """The configuration generation counter (0 where there is none)."""
        return 0

    # -- interrupts ----------------------------------------------------------------------

    def _start_interrupts(self) -> None:
        self._irq = _PciInterrupts(self, self._use_msix)
        if self._irq.mode == "msix":
            self._irq.enable_msix()
        elif self._irq.mode == "intx":
            # INTx is level-triggered and a bus reports edges: a status left pending
            # by an earlier user would hold the (maybe shared) line high for good.
            # Reading ISR clears it (virtio-v1.2 §4.1.4.5: read-to-clear).
            self._read_isr()

    def _map_config_vector(self) -> None:
        """After a reset: route configuration changes to vector 0 (MSI-X only).

        virtio-v1.2 §4.1.5.1.2.2: the driver writes a vector and reads it back; "if
        the mapping failed, the device MUST return VIRTIO_MSI_NO_VECTOR"."""
        irq = self._irq
        if irq is None or irq.mode != "msix":
            return
        irq.vector_events = {}
        if self._write_config_vector(0) == 0:
            irq.vector_events.setdefault(0, set()).add(CONFIG_CHANGE)
        else:
            irq.problems.append("the device refused the configuration change vector")

    def _map_queue_vector(self, index: int, write: Callable[[int], int]) -> None:
        irq = self._irq
        if irq is None or irq.mode != "msix":
            return
        vector = irq.vector_for_queue(index)
        got = write(vector)
        if got == vector:
            irq.vector_events.setdefault(vector, set()).add(index)
        elif got == VIRTIO_MSI_NO_VECTOR:
            # the device could not map it: this queue's notifications are lost, the
            # driver still finds its used buffers when it polls
            irq.problems.append(f"the device refused vector {vector} for queue {index}")
        else:
            raise DeviceError(
                f"queue {index}: queue_msix_vector reads {got:#x} after writing {vector}",
                CLAUSE_MSIX,
            )

    def _on_msi(self, vector: int) -> None:
        assert self._irq is not None
        events = set(self._irq.vector_events.get(vector, ()))
        if CONFIG_CHANGE in events and len(events) > 1:
            # configuration shares the vector with queues: only a new generation
            # (or, legacy, the ISR config bit) says it was a configuration change
            events.discard(CONFIG_CHANGE)
            if self._config_changed():
                events.add(CONFIG_CHANGE)
        self.interrupts += 1
        self._report(events)

    def _config_changed(self) -> bool:
        gen = self.config_generation()
        changed = gen != self._last_generation
        self._last_generation = gen
        return changed

    def _on_intx(self) -> None:
        isr = self._read_isr()
        if not isr:
            return  # the line is shared, or the device lowered it already
        self.interrupts += 1
        self._report(self._status_events(isr, IsrBits.QUEUE, IsrBits.CONFIG))

    def poll_interrupts(self, timeout: float | None) -> set[int]:
        """Wait up to ``timeout`` seconds (None: forever, 0: just look) for used
        buffer / configuration change notifications; return the queue indexes and
        :data:`~pyvirtio.core.driver.CONFIG_CHANGE` they concern.

        MSI-X: the vector says which queue (or the configuration); INTx: the ISR
        status byte is read (which also lowers the line): bit 0 reports every set-up
        queue, bit 1 a configuration change. With no interrupt source this just
        waits out the timeout.
        """
        router = self._irq.router if self._irq and self._irq.mode != "none" else None
        return self._poll(router, timeout)

    def interrupt_fds(self) -> list[int]:
        """The bus's interrupt descriptors (see :meth:`Bus.interrupt_fds`)."""
        return self.bus.interrupt_fds()

    def _stop_interrupts(self) -> None:
        if self._irq is not None:
            self._irq.close()
            self._irq = None


# ---------------------------------------------------------------------------
# Modern (virtio 1.x) interface
# ---------------------------------------------------------------------------


def _read_cap(bus: Bus, bdf: int, pos: int, size: int) -> bytes:
    """``size`` bytes of configuration space at ``pos`` (dword reads)."""
    if pos + size > PCI_CONFIG_SPACE_SIZE:
        raise DeviceError(
            f"capability at {pos:#x} ({size} bytes) runs past configuration space", CLAUSE_CAPS
        )
    out = bytearray()
    for off in range(pos & ~3, pos + size, 4):
        out += bus.pci_cfg_read(bdf, off, 4).to_bytes(4, "little")
    start = pos & 3
    return bytes(out[start : start + size])


def virtio_capabilities(bus: Bus, bdf: int) -> dict[int, tuple[VirtioPciCap, int]]:
    """The first usable virtio structure capability of each ``cfg_type``, with its
    position in configuration space.

    virtio-v1.2 §4.1.4: "The driver SHOULD use the first instance of each virtio
    structure type they can support"; "The driver MUST ignore any vendor-specific
    capability structure which has a reserved bar value"; capabilities shorter than
    ``struct virtio_pci_cap`` are ignored.
    """
    found: dict[int, tuple[VirtioPciCap, int]] = {}
    for cap_id, pos in capabilities(bus, bdf):
        if cap_id != PciCapId.VNDR or pos + _CAP_LEN > PCI_CONFIG_SPACE_SIZE:
            continue
        cap = VIRTIO_PCI_CAP.unpack(_read_cap(bus, bdf, pos, _CAP_LEN))
        if cap.cap_len < _CAP_LEN or cap.bar > VIRTIO_PCI_CAP_BAR_MAX:
            continue
        if cap.cfg_type == VirtioPciCapType.NOTIFY_CFG and (
            cap.cap_len < _NOTIFY_CAP_LEN or pos + _NOTIFY_CAP_LEN > PCI_CONFIG_SPACE_SIZE
        ):
            continue
        found.setdefault(cap.cfg_type, (cap, pos))
    return found


class VirtioPciModernTransport(_PciTransportBase):
    """:class:`~pyvirtio.core.driver.DriverTransport` over the virtio 1.x PCI
    capabilities of function ``bdf`` (virtio-v1.2 §4.1.4, §4.1.5).

    ``allocator`` defaults to the bus's; ``msix=False`` uses INTx even when MSI-X
    is there. Raises :class:`~pyvirtio.errors.ConfigurationError` if the function is
    not a virtio device, has no modern interface, or its BARs are not assigned;
    :class:`~pyvirtio.errors.DeviceError` for capabilities that break the spec.

    :attr:`notification_data` is True when the notification structure allows 32-bit
    notifications (``cap.offset`` 4-byte aligned, ``notify_off_multiplier`` 0 or a
    multiple of 4, as §4.1.4.4.1 requires of a device offering
    VIRTIO_F_NOTIFICATION_DATA): the driver may then accept that feature.
    """

    legacy = False

    def __init__(
        self,
        bus: Bus,
        bdf: int,
        *,
        allocator: GuestAllocator | None = None,
        msix: bool = True,
    ) -> None:
        super().__init__(bus, bdf, allocator=allocator, msix=msix)
        caps = virtio_capabilities(bus, bdf)
        missing = [
            t.name
            for t in (
                VirtioPciCapType.COMMON_CFG,
                VirtioPciCapType.NOTIFY_CFG,
                VirtioPciCapType.ISR_CFG,
            )
            if t not in caps
        ]
        if missing:
            raise ConfigurationError(
                f"{self.function} has no modern virtio interface (missing {', '.join(missing)})"
            )
        common, _ = caps[VirtioPciCapType.COMMON_CFG]
        if common.length < _COMMON_MIN_LEN:
            raise DeviceError(
                f"common configuration is {common.length} bytes, less than the "
                f"{_COMMON_MIN_LEN} of struct virtio_pci_common_cfg",
                CLAUSE_CAPS,
            )
        self.common = self.region(common.bar, common.offset, common.length, "common cfg")
        notify, notify_pos = caps[VirtioPciCapType.NOTIFY_CFG]
        raw = _read_cap(bus, bdf, notify_pos, _NOTIFY_CAP_LEN)
        #: notify_off_multiplier (virtio-v1.2 §4.1.4.4)
        self.notify_off_multiplier = VIRTIO_PCI_NOTIFY_CAP.unpack(raw).notify_off_multiplier
        self.notify_region = self.region(notify.bar, notify.offset, notify.length, "notify")
        #: True if VIRTIO_F_NOTIFICATION_DATA may be accepted (32-bit notifications fit)
        self.notification_data = notify.offset % 4 == 0 and self.notify_off_multiplier % 4 == 0
        isr, _ = caps[VirtioPciCapType.ISR_CFG]
        self.isr = self.region(isr.bar, isr.offset, max(1, isr.length), "ISR status")
        self.device_cfg: _Region | None = None
        if VirtioPciCapType.DEVICE_CFG in caps:
            dev, _ = caps[VirtioPciCapType.DEVICE_CFG]
            if dev.length:
                self.device_cfg = self.region(dev.bar, dev.offset, dev.length, "device cfg")
        self._queue_max: dict[int, int] = {}
        self._notify_at: dict[int, int] = {}
        self._driver_features = 0
        self._num_queues = self.common.read(CommonCfg.NUM_QUEUES, 2)
        self._start_interrupts()

    # -- status, features, configuration ---------------------------------------------

    def reset(self) -> None:
        """Write 0 to device_status and wait until it reads 0.

        virtio-v1.2 §4.1.4.3.2: "After writing 0 to device_status, the driver MUST
        wait for a read of device_status to return 0 before reinitializing the
        device." Raises :class:`~pyvirtio.errors.DeviceError` if it never does.
        """
        self.common.write(CommonCfg.DEVICE_STATUS, 1, 0)
        deadline = time.monotonic() + RESET_TIMEOUT
        pause = 0.0001
        while self.common.read(CommonCfg.DEVICE_STATUS, 1) != 0:
            if time.monotonic() > deadline:
                raise DeviceError("device_status never read 0 after reset", CLAUSE_COMMON)
            time.sleep(pause)
            pause = min(pause * 2, 0.01)
        self._enabled.clear()
        self._queue_max.clear()
        self._notify_at.clear()
        self._fired.clear()
        self._last_generation = self.config_generation()
        self._map_config_vector()

    def get_status(self) -> int:
        """Read device_status."""
        return self.common.read(CommonCfg.DEVICE_STATUS, 1)

    def set_status(self, status: int) -> None:
        """Write device_status."""
        self.common.write(CommonCfg.DEVICE_STATUS, 1, status & 0xFF)

    def get_device_features(self) -> int:
        """device_feature, read through device_feature_select 0 and 1 (64 bits)."""
        value = 0
        for sel in range(2):
            self.common.write(CommonCfg.DEVICE_FEATURE_SELECT, 4, sel)
            value |= self.common.read(CommonCfg.DEVICE_FEATURE, 4) << (32 * sel)
        return value

    def set_driver_features(self, features: int) -> None:
        """driver_feature, written through driver_feature_select 0 and 1."""
        if features >> 64:
            raise DriverError("feature bits above 63 cannot be written over virtio-pci")
        self._driver_features = features
        for sel in range(2):
            self.common.write(CommonCfg.DRIVER_FEATURE_SELECT, 4, sel)
            self.common.write(CommonCfg.DRIVER_FEATURE, 4, features >> (32 * sel) & 0xFFFFFFFF)

    def config_generation(self) -> int:
        """config_generation (virtio-v1.2 §4.1.4.3)."""
        return self.common.read(CommonCfg.CONFIG_GENERATION, 1)

    def read_config(self, offset: int, size: int) -> bytes:
        """Read the device-specific configuration through the device cfg capability
        (natural-width accesses). Bytes past the structure's length read as zero."""
        if offset < 0 or size < 0:
            raise ValueError("negative configuration offset or size")
        length = self.device_cfg.length if self.device_cfg is not None else 0
        inside = max(0, min(size, length - offset))
        data = self.device_cfg.read_bytes(offset, inside) if inside and self.device_cfg else b""
        return data + bytes(size - inside)

    def write_config(self, offset: int, data: bytes) -> None:
        """Write the device-specific configuration (it must lie inside the structure)."""
        if self.device_cfg is None:
            raise DriverError("the device has no device-specific configuration")
        self.device_cfg.write_bytes(offset, bytes(data))

    # -- queues ---------------------------------------------------------------------------

    def num_queues(self) -> int:
        """num_queues of the common configuration."""
        return self._num_queues

    def _select(self, index: int) -> None:
        self.common.write(CommonCfg.QUEUE_SELECT, 2, index)

    def queue_max_size(self, index: int) -> int:
        """The maximum size of queue ``index`` (queue_size as read after reset; 0:
        the queue does not exist)."""
        if not 0 <= index < self._num_queues:
            return 0
        if index not in self._queue_max:
            self._select(index)
            self._queue_max[index] = self.common.read(CommonCfg.QUEUE_SIZE, 2)
        return self._queue_max[index]

    def setup_queue(self, index: int, size: int, addrs: QueueAddresses) -> None:
        """Configure and enable queue ``index`` (virtio-v1.2 §4.1.5.1.3 "Virtqueue
        Configuration"): queue_size, its MSI-X vector (read back), the three ring
        addresses, then queue_enable = 1 ("The driver MUST configure the other
        virtqueue fields before enabling the virtqueue with queue_enable").

        Raises :class:`~pyvirtio.errors.DriverError` for a size the queue does not
        accept and :class:`~pyvirtio.errors.DeviceError` if the device's notify
        offset leaves the notification structure.
        """
        qmax = self.queue_max_size(index)
        if qmax == 0:
            raise DriverError(f"queue {index} does not exist", CLAUSE_VQ)
        if not 0 < size <= qmax:
            raise DriverError(f"queue {index}: size {size} is not in 1..{qmax}", CLAUSE_VQ)
        c = self.common
        self._select(index)
        if c.read(CommonCfg.QUEUE_ENABLE, 2):
            raise DriverError(f"queue {index} is already enabled", CLAUSE_VQ)
        c.write(CommonCfg.QUEUE_SIZE, 2, size)

        def write_vector(vector: int) -> int:
            c.write(CommonCfg.QUEUE_MSIX_VECTOR, 2, vector)
            return c.read(CommonCfg.QUEUE_MSIX_VECTOR, 2)

        self._map_queue_vector(index, write_vector)
        for reg, addr in (
            (CommonCfg.QUEUE_DESC, addrs.desc),
            (CommonCfg.QUEUE_DRIVER, addrs.driver),
            (CommonCfg.QUEUE_DEVICE, addrs.device),
        ):
            c.write(reg, 4, addr & 0xFFFFFFFF)
            c.write(reg + 4, 4, addr >> 32 & 0xFFFFFFFF)
        notify_off = c.read(CommonCfg.QUEUE_NOTIFY_OFF, 2)
        at = notify_off * self.notify_off_multiplier
        width = 4 if self._notification_data() else 2
        if at + width > self.notify_region.length:
            # §4.1.4.4.1: "cap.length >= queue_notify_off * notify_off_multiplier + 2"
            # (+ 4 for a device offering VIRTIO_F_NOTIFICATION_DATA)
            raise DeviceError(
                f"queue {index}: notify offset {at:#x} leaves the notification structure "
                f"({self.notify_region.length:#x} bytes)",
                CLAUSE_NOTIFY,
            )
        self._notify_at[index] = at
        c.write(CommonCfg.QUEUE_ENABLE, 2, 1)
        self._enabled.add(index)

    def _notification_data(self) -> bool:
        return has(self._driver_features, Feature.NOTIFICATION_DATA)

    def _notify_address(self, index: int) -> int:
        at = self._notify_at.get(index)
        if at is None:
            raise DriverError(f"notification for queue {index}, which is not set up")
        return at

    def notify(self, index: int) -> None:
        """Available buffer notification without data: the 16-bit queue index written
        at the queue's notify address (virtio-v1.2 §4.1.5.2 "Available Buffer
        Notifications"). With VIRTIO_F_NOTIFICATION_DATA negotiated "the driver
        notification MUST be a 32-bit notification": use :meth:`notify_data`
        (:class:`~pyvirtio.errors.DriverError` here)."""
        at = self._notify_address(index)
        if self._notification_data():
            raise DriverError(
                f"queue {index}: VIRTIO_F_NOTIFICATION_DATA is negotiated, a notification "
                "carries data (notify_data)",
                CLAUSE_NOTIFY_DRIVER,
            )
        self.notify_region.write(at, 2, index)

    def notify_data(self, index: int, data: int) -> None:
        """Available buffer notification with VIRTIO_F_NOTIFICATION_DATA: the 32-bit
        ``index | data << 16`` (``data`` = ``next_off | next_wrap << 15``) written at
        the queue's notify address; "If VIRTIO_F_NOTIFICATION_DATA is negotiated, the
        driver notification MUST be a 32-bit notification" (§4.1.5.2.1). Without the
        feature negotiated this is :meth:`notify` (the data is dropped)."""
        at = self._notify_address(index)
        if not self._notification_data():
            self.notify_region.write(at, 2, index)
            return
        self.notify_region.write(at, 4, (index & _U16) | (data & _U16) << 16)

    def reset_queue(self, index: int) -> None:
        """Reset queue ``index`` alone (VIRTIO_F_RING_RESET, virtio-v1.2 §2.6.1
        "Virtqueue Reset") by writing 1 to queue_reset; "the driver MUST NOT consider
        queue reset to be complete until it reads back 0 in queue_reset"
        (§4.1.4.3.2). The queue can then be set up again with :meth:`setup_queue`.
        """
        if not has(self._driver_features, Feature.RING_RESET):
            raise DriverError("queue_reset needs VIRTIO_F_RING_RESET negotiated", CLAUSE_COMMON)
        self._select(index)
        self.common.write(CommonCfg.QUEUE_RESET, 2, 1)
        deadline = time.monotonic() + RESET_TIMEOUT
        while self.common.read(CommonCfg.QUEUE_RESET, 2) != 0:
            if time.monotonic() > deadline:
                raise DeviceError(f"queue {index} reset never completed", CLAUSE_COMMON)
            time.sleep(0.0005)
        self._enabled.discard(index)
        self._notify_at.pop(index, None)

    # -- interrupts -------------------------------------------------------------------------

    def _read_isr(self) -> int:
        return self.isr.read(0, 1)

    def _write_config_vector(self, vector: int) -> int:
        self.common.write(CommonCfg.CONFIG_MSIX_VECTOR, 2, vector)
        return self.common.read(CommonCfg.CONFIG_MSIX_VECTOR, 2)

    def close(self) -> None:
        """Reset the device (best effort), disable MSI-X, release the interrupt
        routes (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.common.write(CommonCfg.DEVICE_STATUS, 1, 0)
        self._stop_interrupts()


# ---------------------------------------------------------------------------
# Legacy (virtio 0.9.5) interface
# ---------------------------------------------------------------------------


class VirtioPciLegacyTransport(_PciTransportBase):
    """:class:`~pyvirtio.core.driver.DriverTransport` over the legacy I/O BAR0 header
    of a legacy or transitional function (virtio-v1.2 §4.1.4.10).

    Features are 32 bits; there is no FEATURES_OK and no configuration generation;
    queue sizes are fixed by the device; rings are one block laid out with 4096
    alignment (VirtioDriver does so when ``legacy`` is True) and given as a page
    frame number. The device configuration starts at 20, or 24 while MSI-X is on.
    """

    legacy = True

    def __init__(
        self,
        bus: Bus,
        bdf: int,
        *,
        allocator: GuestAllocator | None = None,
        msix: bool = True,
    ) -> None:
        super().__init__(bus, bdf, allocator=allocator, msix=msix)
        bar0 = self.bars.get(0)
        if bar0 is None or not bar0.io:
            raise ConfigurationError(
                f"{self.function} has no legacy interface (BAR0 is not an I/O BAR)"
            )
        self.regs = self.region(0, 0, bar0.size, "legacy header")
        self._queue_count: int | None = None
        self._queue_max: dict[int, int] = {}
        self._start_interrupts()

    @property
    def config_offset(self) -> int:
        """Where the device configuration starts in BAR0 (20, or 24 with MSI-X on)."""
        return legacy_config_offset(self.interrupt_mode == "msix")

    def reset(self) -> None:
        """Write 0 to the Device Status register and wait until it reads 0."""
        self.regs.write(LegacyReg.STATUS, 1, 0)
        deadline = time.monotonic() + RESET_TIMEOUT
        while self.regs.read(LegacyReg.STATUS, 1) != 0:
            if time.monotonic() > deadline:
                raise DeviceError("device status never read 0 after reset", CLAUSE_LEGACY)
            time.sleep(0.001)
        self._enabled.clear()
        self._queue_max.clear()
        self._fired.clear()
        self._map_config_vector()

    def get_status(self) -> int:
        """Read the Device Status register."""
        return self.regs.read(LegacyReg.STATUS, 1)

    def set_status(self, status: int) -> None:
        """Write the Device Status register."""
        self.regs.write(LegacyReg.STATUS, 1, status & 0xFF)

    def get_device_features(self) -> int:
        """Device Features bits 0..31 (the legacy interface has no more)."""
        return self.regs.read(LegacyReg.HOST_FEATURES, 4)

    def set_driver_features(self, features: int) -> None:
        """Driver Features bits 0..31.

        Raises :class:`~pyvirtio.errors.DriverError` for bits above 31 (a legacy
        interface cannot carry them).
        """
        if features >> 32:
            raise DriverError(
                f"feature bits {features >> 32 << 32:#x} do not exist on the legacy interface",
                CLAUSE_LEGACY,
            )
        self.regs.write(LegacyReg.GUEST_FEATURES, 4, features)

    def read_config(self, offset: int, size: int) -> bytes:
        """Read device configuration (guest-native endian: little-endian on x86).
        Bytes past the end of BAR0 read as zero."""
        if offset < 0 or size < 0:
            raise ValueError("negative configuration offset or size")
        start = self.config_offset + offset
        inside = max(0, min(size, self.regs.length - start))
        data = self.regs.read_bytes(start, inside) if inside else b""
        return data + bytes(size - inside)

    def write_config(self, offset: int, data: bytes) -> None:
        """Write device configuration."""
        self.regs.write_bytes(self.config_offset + offset, bytes(data))

    def num_queues(self) -> int:
        """Queues with a non-zero size, probed from 0 up (the legacy header has no
        queue count)."""
        if self._queue_count is None:
            n = 0
            while n < LEGACY_MAX_QUEUES and self._probe_queue(n):
                n += 1
            self._queue_count = n
        return self._queue_count

    def _probe_queue(self, index: int) -> int:
        self.regs.write(LegacyReg.QUEUE_SEL, 2, index)
        return self.regs.read(LegacyReg.QUEUE_NUM, 2)

    def queue_max_size(self, index: int) -> int:
        """Queue Size of queue ``index`` (legacy: the one size the queue has)."""
        if not 0 <= index < LEGACY_MAX_QUEUES:
            return 0
        if index not in self._queue_max:
            self._queue_max[index] = self._probe_queue(index)
        return self._queue_max[index]

    def setup_queue(self, index: int, size: int, addrs: QueueAddresses) -> None:
        """Give the device queue ``index``: its MSI-X vector (read back), then the page
        frame number of the ring (which activates it).

        Raises :class:`~pyvirtio.errors.DriverError` if ``size`` is not the queue's
        size (legacy queue sizes are read-only) or the ring is not laid out as the
        legacy interface requires (contiguous, 4096-aligned, address below 2^44).
        """
        qsize = self.queue_max_size(index)
        if qsize == 0:
            raise DriverError(f"queue {index} does not exist", CLAUSE_LEGACY)
        if size != qsize:
            raise DriverError(
                f"queue {index}: the legacy interface fixes the queue size at {qsize}, not {size}",
                CLAUSE_LEGACY,
            )
        expected = legacy_vring_addresses(addrs.desc, size, VIRTIO_PCI_VRING_ALIGN)
        if addrs.desc % VIRTIO_PCI_VRING_ALIGN or expected != addrs:
            raise DriverError(
                f"queue {index}: legacy rings are one block aligned to "
                f"{VIRTIO_PCI_VRING_ALIGN} (got {addrs})",
                'virtio-v1.2 §2.7.2 "Legacy Interfaces: A Note on Virtqueue Layout"',
            )
        pfn = addrs.desc >> VIRTIO_PCI_QUEUE_ADDR_SHIFT
        if pfn >> 32:
            raise DriverError(f"queue {index}: ring address {addrs.desc:#x} is above 2^44")
        r = self.regs
        r.write(LegacyReg.QUEUE_SEL, 2, index)
        if r.read(LegacyReg.QUEUE_PFN, 4):
            raise DriverError(f"queue {index} is already active", CLAUSE_LEGACY)

        def write_vector(vector: int) -> int:
            r.write(LegacyReg.MSI_QUEUE_VECTOR, 2, vector)
            return r.read(LegacyReg.MSI_QUEUE_VECTOR, 2)

        self._map_queue_vector(index, write_vector)
        r.write(LegacyReg.QUEUE_PFN, 4, pfn)
        self._enabled.add(index)

    def notify(self, index: int) -> None:
        """Write the queue index to Queue Notify."""
        if index not in self._enabled:
            raise DriverError(f"notification for queue {index}, which is not set up")
        self.regs.write(LegacyReg.QUEUE_NOTIFY, 2, index)

    def _read_isr(self) -> int:
        return self.regs.read(LegacyReg.ISR, 1)

    def _write_config_vector(self, vector: int) -> int:
        self.regs.write(LegacyReg.MSI_CONFIG_VECTOR, 2, vector)
        return self.regs.read(LegacyReg.MSI_CONFIG_VECTOR, 2)

    def _config_changed(self) -> bool:
        # no generation counter: the ISR configuration bit tells
        return bool(self._read_isr() & IsrBits.CONFIG)

    def close(self) -> None:
        """Reset the device (best effort), disable MSI-X, release the interrupt
        routes (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.regs.write(LegacyReg.STATUS, 1, 0)
        self._stop_interrupts()


# ---------------------------------------------------------------------------
# Choosing an interface
# ---------------------------------------------------------------------------


def open_virtio_pci(
    bus: Bus,
    bdf: int,
    *,
    force_legacy: bool = False,
    allocator: GuestAllocator | None = None,
    msix: bool = True,
) -> VirtioPciModernTransport | VirtioPciLegacyTransport:
    """Open virtio function ``bdf``: the modern interface when it has one, else the
    legacy one; ``force_legacy`` picks the legacy interface of a transitional device.

    virtio-v1.2 §4.1.2.2 "Driver Requirements: PCI Device Discovery": drivers "MUST
    match any PCI Revision ID value"; a transitional device (ids 0x1000-0x103F)
    offers both interfaces.
    """
    fn = read_function(bus, bdf)
    if fn is None:
        raise ConfigurationError(f"no PCI function at {format_bdf(bdf)}")
    if not is_virtio_pci_id(fn.vendor_id, fn.device_id):
        raise ConfigurationError(f"{fn} is not a virtio device")
    if force_legacy:
        return VirtioPciLegacyTransport(bus, bdf, allocator=allocator, msix=msix)
    caps = virtio_capabilities(bus, bdf)
    if VirtioPciCapType.COMMON_CFG in caps:
        return VirtioPciModernTransport(bus, bdf, allocator=allocator, msix=msix)
    return VirtioPciLegacyTransport(bus, bdf, allocator=allocator, msix=msix)
