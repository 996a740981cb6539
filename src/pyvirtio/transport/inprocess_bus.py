"""An in-process machine: guest RAM, a PCI bus and MMIO windows hosting pyvirtio's own
device-side transport models, behind the :class:`~pyvirtio.transport.bus.Bus`
interface the driver-side PCI and MMIO transports use.

What it models (x86 ``pc``/``microvm``-like, enough for virtio):

- guest RAM: memfd-backed :class:`~pyvirtio.memory.guest_memory.GuestMemory` at
  guest-physical 0 (shared with the device models, which access rings in it);
- PCI bus 0: configuration mechanism #1 (address register at I/O port 0xCF8, data at
  0xCFC..0xCFF) and direct :meth:`InProcessBus.pci_cfg_read` /
  :meth:`~InProcessBus.pci_cfg_write`; a host bridge at 00:00.0; BARs decode into
  memory and I/O space once the driver programs them and sets the I/O / Memory
  Space bits of the command register (nothing is assigned for it: that is the
  firmware's, i.e. the driver-side enumeration's, job);
- INTx: pin A of slot ``s`` is routed to GSI ``(10, 10, 11, 11)[(s + pin - 1) % 4]``
  (the PIRQ routing SeaBIOS gives QEMU's ``pc``), and written to the function's
  Interrupt Line register as firmware would;
- MSI-X: a device-initiated write to 0xFEE00000..0xFEEFFFFF is an interrupt message,
  recorded as ``Interrupt("msi", address=..., data=...)``; a write elsewhere is DMA
  into guest RAM (a driver may point a vector at a RAM word and watch it);
- virtio-mmio windows at microvm's addresses, 0xFEB00000 + n * 0x200, with GSI 5 + n.

Interrupts are recorded in order and handed out by
:meth:`InProcessBus.wait_interrupts`; an eventfd (:meth:`~InProcessBus.interrupt_fds`)
becomes readable when there are some. Every interrupt *event* of a line is recorded,
even while the line is already asserted (a level-triggered controller would deliver
it again after the EOI), so a driver never misses one; a driver reading ISR /
InterruptStatus may therefore see a spurious interrupt with nothing pending.

The host event sources of the virtio devices on the bus (descriptors and timers they
declare, e.g. a block device's I/O completion eventfd) are served by one
:class:`~pyvirtio.transport._events.HostEventThread`; each device's lock serializes
it with the driver's register accesses, which are expected from one thread.
Interrupt recording is thread-safe.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from dataclasses import dataclass

from pyvirtio.errors import ConfigurationError
from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.transport._events import HostEventThread
from pyvirtio.transport.bus import Interrupt
from pyvirtio.transport.mmio.device import VirtioMmioDevice
from pyvirtio.transport.mmio.spec import (
    MICROVM_MMIO_BASE,
    MICROVM_MMIO_COUNT,
    MICROVM_MMIO_IRQ_BASE,
    VIRTIO_MMIO_WINDOW_SIZE,
)
from pyvirtio.transport.pci.device import VirtioPciFunction
from pyvirtio.transport.pci.function import HostBridge, PciFunction
from pyvirtio.transport.pci.spec import (
    MSI_ADDRESS_BASE,
    MSI_ADDRESS_LIMIT,
    PciCfg,
)

__all__ = [
    "DEFAULT_RAM_SIZE",
    "LOW_RAM_RESERVED",
    "PCI_CONFIG_ADDRESS",
    "PCI_CONFIG_DATA",
    "InProcessBus",
    "MmioSlot",
    "make_bdf",
]

#: Guest RAM size unless told otherwise (64 MiB).
DEFAULT_RAM_SIZE = 64 << 20
#: Guest RAM the bus's allocator never hands out (the first MiB).
LOW_RAM_RESERVED = 1 << 20
#: Configuration mechanism #1 ports.
PCI_CONFIG_ADDRESS = 0xCF8
PCI_CONFIG_DATA = 0xCFC
#: CONFIG_ADDRESS bit 31: the data port accesses configuration space.
_CFG_ENABLE = 0x80000000
#: PIRQ routing of QEMU pc + SeaBIOS (PIRQA..D -> GSI 10, 10, 11, 11).
_PIRQ_GSI = (10, 10, 11, 11)
#: Number of device slots on a PCI bus.
PCI_SLOTS = 32


def make_bdf(bus: int, device: int, function: int = 0) -> int:
    """``bus << 8 | device << 3 | function`` (the ``bdf`` of the Bus interface)."""
    return (bus & 0xFF) << 8 | (device & 0x1F) << 3 | (function & 0x7)


@dataclass(frozen=True)
class MmioSlot:
    """A virtio-mmio device window: where it is and which interrupt line it uses
    (what a device tree or the kernel command line would tell a guest)."""

    base: int
    size: int
    irq: int


class InProcessBus:
    """A :class:`~pyvirtio.transport.bus.Bus` whose devices are pyvirtio models.

    ``ram_size`` bytes of guest RAM at guest-physical 0 (or the given ``mem``, which
    the bus then does not close). Add devices with :meth:`add_pci` and
    :meth:`add_mmio` before the driver starts.
    """

    def __init__(self, ram_size: int = DEFAULT_RAM_SIZE, *, mem: GuestMemory | None = None) -> None:
        self._owns_mem = mem is None
        self.mem: GuestMemory = (
            mem if mem is not None else GuestMemory.create(ram_size, name="pyvirtio-bus")
        )
        #: a driver-side allocator over guest RAM above the first MiB (the low MiB is
        #: left alone, as on a PC); transports use it unless given their own
        low = LOW_RAM_RESERVED if self.mem.size > 2 * LOW_RAM_RESERVED else 4096
        ram = self.mem.regions[0] if self.mem.regions else None
        if ram is None or ram.size <= low:
            raise ConfigurationError("the in-process bus needs guest RAM of at least 8 KiB")
        self.allocator = GuestAllocator(ram.guest_phys_addr + low, ram.size - low)
        self._pci: dict[int, PciFunction] = {}
        self._gsi: dict[int, int] = {}
        self._mmio: list[tuple[MmioSlot, VirtioMmioDevice]] = []
        self._cf8 = 0
        self._cond = threading.Condition()
        self._pending: list[Interrupt] = []
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed = False
        self._events = HostEventThread(name="pyvirtio-bus-events")
        #: every interrupt recorded so far (for tests and statistics)
        self.interrupt_count = 0
        self.add_pci(HostBridge(), device=0)

    # -- building the machine ------------------------------------------------------------

    def add_pci(self, function: PciFunction, *, device: int | None = None) -> int:
        """Plug ``function`` into bus 0 at slot ``device`` (default: the first free
        slot), route its INTx and connect it; returns its bdf."""
        if device is None:
            device = next((d for d in range(1, PCI_SLOTS) if make_bdf(0, d) not in self._pci), -1)
        if not 0 <= device < PCI_SLOTS or make_bdf(0, device) in self._pci:
            raise ConfigurationError(f"PCI slot {device} is not free")
        bdf = make_bdf(0, device)
        pin = function.config[PciCfg.INTERRUPT_PIN]
        if pin:
            gsi = _PIRQ_GSI[(device + pin - 1) % 4]
            self._gsi[bdf] = gsi
            function.config[PciCfg.INTERRUPT_LINE] = gsi
        self._pci[bdf] = function
        function.connect(self.mem, self.dma_write, functools.partial(self._intx, bdf))
        if isinstance(function, VirtioPciFunction):
            self._events.add(function.state.device)
        return bdf

    def add_mmio(
        self, model: VirtioMmioDevice, *, base: int | None = None, irq: int | None = None
    ) -> MmioSlot:
        """Map ``model``'s register window (default: the next microvm slot)."""
        n = len(self._mmio)
        if base is None:
            if n >= MICROVM_MMIO_COUNT:
                raise ConfigurationError("all microvm virtio-mmio slots are taken")
            base = MICROVM_MMIO_BASE + n * VIRTIO_MMIO_WINDOW_SIZE
        if irq is None:
            irq = MICROVM_MMIO_IRQ_BASE + n
        for slot, _ in self._mmio:
            if base < slot.base + slot.size and slot.base < base + VIRTIO_MMIO_WINDOW_SIZE:
                raise ConfigurationError(f"MMIO window at {base:#x} overlaps {slot.base:#x}")
        slot = MmioSlot(base, VIRTIO_MMIO_WINDOW_SIZE, irq)
        self._mmio.append((slot, model))
        model.connect(self.mem, functools.partial(self._line, irq))
        self._events.add(model.state.device)
        return slot

    @property
    def mmio_slots(self) -> list[MmioSlot]:
        """The virtio-mmio windows, in the order they were added."""
        return [slot for slot, _ in self._mmio]

    @property
    def pci_functions(self) -> dict[int, PciFunction]:
        """The PCI functions by bdf (including the host bridge)."""
        return dict(self._pci)

    def intx_line(self, bdf: int) -> int | None:
        """The GSI INTA# of function ``bdf`` is routed to (None: no INTx)."""
        return self._gsi.get(bdf)

    # -- interrupts ------------------------------------------------------------------------

    def _record(self, irq: Interrupt) -> None:
        with self._cond:
            self._pending.append(irq)
            self.interrupt_count += 1
            if self._efd >= 0:
                with contextlib.suppress(OSError):
                    os.eventfd_write(self._efd, 1)
            self._cond.notify_all()

    def _intx(self, bdf: int, level: bool) -> None:
        if level:
            self._record(Interrupt("intx", line=self._gsi.get(bdf, 0)))

    def _line(self, line: int, level: bool) -> None:
        if level:
            self._record(Interrupt("intx", line=line))

    def dma_write(self, addr: int, data: bytes) -> None:
        """A device-initiated memory write: an MSI message in the interrupt window,
        else guest RAM (dropped if it is not RAM, like a write to nowhere)."""
        if MSI_ADDRESS_BASE <= addr <= MSI_ADDRESS_LIMIT:
            value = int.from_bytes(data[:4].ljust(4, b"\0"), "little")
            self._record(Interrupt("msi", address=addr, data=value))
            return
        if self.mem.contains(addr, len(data)):
            self.mem.write(addr, data)

    def wait_interrupts(self, timeout: float | None) -> list[Interrupt]:
        """Interrupts recorded since the last call, waiting up to ``timeout`` seconds
        for one if there are none (0: just poll; None: until one arrives)."""
        with self._cond:
            if not self._pending and timeout != 0:
                self._cond.wait_for(lambda: bool(self._pending) or self._closed, timeout)
            out = self._pending
            self._pending = []
            if out and self._efd >= 0:
                with contextlib.suppress(OSError):
                    os.eventfd_read(self._efd)
        return out

    def interrupt_fds(self) -> list[int]:
        """An eventfd readable while interrupts are pending."""
        return [self._efd]

    # -- PCI configuration space -------------------------------------------------------------

    def pci_cfg_read(self, bdf: int, offset: int, size: int) -> int:
        """Read configuration space of ``bdf``; all ones if nothing answers."""
        fn = self._pci.get(bdf)
        if fn is None or size not in (1, 2, 4):
            return (1 << 8 * size) - 1 if size in (1, 2, 4) else 0xFFFFFFFF
        return fn.cfg_read(offset, size)

    def pci_cfg_write(self, bdf: int, offset: int, size: int, value: int) -> None:
        """Write configuration space of ``bdf`` (ignored if nothing answers)."""
        fn = self._pci.get(bdf)
        if fn is not None:
            fn.cfg_write(offset, size, value)

    # -- address decoding --------------------------------------------------------------------

    def _find_bar(self, addr: int, size: int, io: bool) -> tuple[PciFunction, int, int] | None:
        for fn in self._pci.values():
            for m in fn.decoded_bars():
                if m.io == io and m.base <= addr and addr + size <= m.end:
                    return fn, m.index, addr - m.base
        return None

    def _find_mmio(self, addr: int, size: int) -> tuple[VirtioMmioDevice, int] | None:
        for slot, model in self._mmio:
            if slot.base <= addr and addr + size <= slot.base + slot.size:
                return model, addr - slot.base
        return None

    def mmio_read(self, addr: int, size: int) -> int:
        """Read ``size`` bytes (little-endian) at physical ``addr``: a memory BAR, an
        MMIO window, guest RAM, or all ones."""
        hit = self._find_bar(addr, size, io=False)
        if hit is not None:
            fn, bar, off = hit
            return fn.bar_read(bar, off, size)
        win = self._find_mmio(addr, size)
        if win is not None:
            return win[0].read(win[1], size)
        if self.mem.contains(addr, size):
            return int.from_bytes(self.mem.read(addr, size), "little")
        return (1 << 8 * size) - 1

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        """Write ``size`` bytes (little-endian) at physical ``addr``."""
        value &= (1 << 8 * size) - 1
        hit = self._find_bar(addr, size, io=False)
        if hit is not None:
            fn, bar, off = hit
            fn.bar_write(bar, off, size, value)
            return
        win = self._find_mmio(addr, size)
        if win is not None:
            win[0].write(win[1], size, value)
            return
        if self.mem.contains(addr, size):
            self.mem.write(addr, value.to_bytes(size, "little"))

    # -- port I/O -------------------------------------------------------------------------------

    def io_read(self, port: int, size: int) -> int:
        """Read an I/O port: configuration mechanism #1 or an I/O BAR."""
        ones = (1 << 8 * size) - 1
        if port == PCI_CONFIG_ADDRESS and size == 4:
            return self._cf8
        if port >= PCI_CONFIG_DATA and port + size <= PCI_CONFIG_DATA + 4:
            target = self._cfg_target(port)
            if target is None:
                return ones
            bdf, offset = target
            return self.pci_cfg_read(bdf, offset, size)
        hit = self._find_bar(port, size, io=True)
        if hit is not None:
            fn, bar, off = hit
            return fn.bar_read(bar, off, size)
        return ones

    def io_write(self, port: int, size: int, value: int) -> None:
        """Write an I/O port."""
        value &= (1 << 8 * size) - 1
        if port == PCI_CONFIG_ADDRESS and size == 4:
            self._cf8 = value & 0x80FFFFFC
            return
        if port >= PCI_CONFIG_DATA and port + size <= PCI_CONFIG_DATA + 4:
            target = self._cfg_target(port)
            if target is not None:
                self.pci_cfg_write(target[0], target[1], size, value)
            return
        hit = self._find_bar(port, size, io=True)
        if hit is not None:
            fn, bar, off = hit
            fn.bar_write(bar, off, size, value)

    def _cfg_target(self, port: int) -> tuple[int, int] | None:
        addr = self._cf8
        if not addr & _CFG_ENABLE:
            return None
        bdf = addr >> 8 & 0xFFFF
        offset = (addr & 0xFC) + (port - PCI_CONFIG_DATA)
        return bdf, offset

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Reset and detach every device, release guest RAM (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with self._cond:
            self._cond.notify_all()
        try:
            for fn in self._pci.values():
                fn.close()
            for _, model in self._mmio:
                model.close()
        finally:
            self._events.close()
            with self._cond:
                efd, self._efd = self._efd, -1
            os.close(efd)
            if self._owns_mem:
                self.mem.close()

    def __enter__(self) -> InProcessBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
