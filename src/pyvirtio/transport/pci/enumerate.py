"""PCI enumeration and resource assignment, done the way firmware does it.

Nothing has programmed the PCI functions when a driver meets them over a
:class:`~pyvirtio.transport.bus.Bus` (QEMU started with ``-S`` never ran its
BIOS; pyvirtio's in-process bus starts from reset values). :func:`enumerate_pci`
plays the firmware's part:

1. scan bus 0 through configuration space (``vendor_id`` all ones = no function;
   functions 1-7 only when function 0's Header Type says multi-function);
2. size every BAR of every type 0 function (write all ones, read back the mask,
   restore), with decode disabled meanwhile;
3. place the BARs, largest first at their natural alignment: I/O BARs from
   :data:`IO_WINDOW` (0xC000..), 32-bit memory BARs in :data:`MMIO32_WINDOW`
   (0xE0000000..), 64-bit memory BARs in the same 32-bit window unless a 64-bit
   window is given (as SeaBIOS does while they fit);
4. enable I/O / memory decode and bus mastering in the Command register;
5. route INTx like the firmware of QEMU's ``pc`` (PIIX3 PIRQ registers -> ISA IRQs
   10/10/11/11) and ``q35`` (ICH9 PIRQ E-H -> I/O APIC GSI 20-23) machines and write
   the result into each function's Interrupt Line register.

Values read from the functions are not trusted: a BAR whose size is not a power of
two or does not fit the window is left unassigned (and reported in
:attr:`PciFunction.problems`), and capability list walks are bounded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pyvirtio.errors import ConfigurationError
from pyvirtio.transport.bus import Bus
from pyvirtio.transport.pci.spec import (
    PCI_BAR_IO_ADDR_MASK,
    PCI_BAR_MEM_ADDR_MASK,
    PCI_BAR_MEM_PREFETCH,
    PCI_BAR_MEM_TYPE_64,
    PCI_BAR_MEM_TYPE_MASK,
    PCI_BAR_SPACE_IO,
    PCI_CONFIG_SPACE_SIZE,
    PCI_HEADER_SIZE,
    PCI_NUM_BARS,
    PciCfg,
    PciCommand,
    PciStatus,
    bar_offset,
)

__all__ = [
    "IO_WINDOW",
    "MMIO32_WINDOW",
    "PciBar",
    "PciFunction",
    "bdf",
    "capabilities",
    "read_bars",
    "enumerate_pci",
    "find_functions",
    "format_bdf",
    "read_function",
]

#: I/O port window BARs are placed in: ``(base, limit)`` (limit exclusive).
IO_WINDOW = (0xC000, 0x10000)
#: 32-bit memory window: ``(base, limit)``, below the I/O APIC / HPET / LAPIC range.
MMIO32_WINDOW = (0xE0000000, 0xFE000000)
#: Header Type bit 7: the device has more than one function.
_MULTI_FUNCTION = 0x80
#: Header Type layout field (bits 6:0).
_HEADER_LAYOUT = 0x7F
#: Most capabilities a 256-byte configuration space can hold (loop guard).
_MAX_CAPS = (PCI_CONFIG_SPACE_SIZE - PCI_HEADER_SIZE) // 4
#: Smallest memory BAR placement granule (firmware keeps BARs page-aligned).
_MEM_MIN_ALIGN = 0x1000
#: PCI-to-ISA bridges whose PIRQ routing this module knows: (vendor, device) -> kind.
_PIIX3 = (0x8086, 0x7000)
_ICH9_LPC = (0x8086, 0x2918)
#: The ISA IRQs SeaBIOS routes PIRQ A-D to on PIIX.
_PIIX_PIRQ_IRQS = (10, 10, 11, 11)
#: PIIX3 PIRQ route control registers (one byte per PIRQ A-D).
_PIIX_PIRQRC = 0x60
#: ICH9 maps slot/pin to PIRQ E-H, which reach I/O APIC GSI 16 + n directly.
_ICH9_GSI_BASE = 16


def bdf(bus: int, device: int, function: int = 0) -> int:
    """The ``bdf`` number of a function: ``bus << 8 | device << 3 | function``."""
    if not (0 <= bus <= 0xFF and 0 <= device <= 0x1F and 0 <= function <= 7):
        raise ValueError(f"bad PCI address {bus}:{device}.{function}")
    return bus << 8 | device << 3 | function


def format_bdf(value: int) -> str:
    """``bb:dd.f`` spelling of a ``bdf`` number."""
    return f"{value >> 8:02x}:{value >> 3 & 0x1F:02x}.{value & 7}"


@dataclass
class PciBar:
    """One Base Address Register as sized (and placed) by enumeration."""

    #: BAR number (0..5); a 64-bit BAR also occupies ``index + 1``
    index: int
    #: True for an I/O space BAR
    io: bool
    #: True for a 64-bit memory BAR
    is64: bool
    #: size in bytes (a power of two)
    size: int
    #: prefetchable memory
    prefetchable: bool = False
    #: the assigned bus address (None: not assigned)
    address: int | None = None


@dataclass
class PciFunction:
    """What enumeration found out about one PCI function."""

    bdf: int
    vendor_id: int
    device_id: int
    revision_id: int
    class_code: int
    header_type: int
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0
    interrupt_pin: int = 0
    #: Interrupt Line as written by :func:`enumerate_pci` (0xFF: not routed)
    interrupt_line: int = 0xFF
    #: BARs by index
    bars: dict[int, PciBar] = field(default_factory=dict)
    #: ``(capability id, offset)`` in list order
    capabilities: list[tuple[int, int]] = field(default_factory=list)
    #: what was wrong with the function (unsized or unplaced BARs ...)
    problems: list[str] = field(default_factory=list)

    @property
    def slot(self) -> int:
        """The device number (0..31)."""
        return self.bdf >> 3 & 0x1F

    @property
    def function(self) -> int:
        """The function number (0..7)."""
        return self.bdf & 7

    def __str__(self) -> str:
        return (
            f"{format_bdf(self.bdf)} {self.vendor_id:04x}:{self.device_id:04x} "
            f"class {self.class_code:06x} rev {self.revision_id}"
        )


def capabilities(bus: Bus, function_bdf: int) -> Iterator[tuple[int, int]]:
    """Walk the capability list: yield ``(capability id, offset)``.

    Stops at a pointer below the standard header, at a repeated pointer, or after as
    many capabilities as fit in configuration space (a looping list cannot hang).
    """
    if not bus.pci_cfg_read(function_bdf, PciCfg.STATUS, 2) & PciStatus.CAP_LIST:
        return
    pos = bus.pci_cfg_read(function_bdf, PciCfg.CAPABILITY_LIST, 1) & 0xFC
    seen: set[int] = set()
    while pos >= PCI_HEADER_SIZE and pos not in seen and len(seen) < _MAX_CAPS:
        seen.add(pos)
        header = bus.pci_cfg_read(function_bdf, pos, 2)
        yield header & 0xFF, pos
        pos = (header >> 8) & 0xFC


def read_function(bus: Bus, function_bdf: int) -> PciFunction | None:
    """Read the identity of one function; None if nothing answers there."""
    ids = bus.pci_cfg_read(function_bdf, PciCfg.VENDOR_ID, 4)
    vendor = ids & 0xFFFF
    if vendor in (0xFFFF, 0x0000):
        return None
    rev_class = bus.pci_cfg_read(function_bdf, PciCfg.REVISION_ID, 4)
    fn = PciFunction(
        bdf=function_bdf,
        vendor_id=vendor,
        device_id=ids >> 16,
        revision_id=rev_class & 0xFF,
        class_code=rev_class >> 8,
        header_type=bus.pci_cfg_read(function_bdf, PciCfg.HEADER_TYPE, 1),
    )
    if fn.header_type & _HEADER_LAYOUT == 0:
        sub = bus.pci_cfg_read(function_bdf, PciCfg.SUBSYSTEM_VENDOR_ID, 4)
        fn.subsystem_vendor_id = sub & 0xFFFF
        fn.subsystem_id = sub >> 16
        fn.interrupt_pin = bus.pci_cfg_read(function_bdf, PciCfg.INTERRUPT_PIN, 1)
        fn.interrupt_line = bus.pci_cfg_read(function_bdf, PciCfg.INTERRUPT_LINE, 1)
    fn.capabilities = list(capabilities(bus, function_bdf))
    return fn


def find_functions(bus: Bus, buses: Iterable[int] = (0,)) -> list[PciFunction]:
    """Every function that answers on ``buses`` (no resources are touched)."""
    found = []
    for b in buses:
        for dev in range(32):
            first = read_function(bus, bdf(b, dev, 0))
            if first is None:
                continue
            found.append(first)
            if first.header_type & _MULTI_FUNCTION:
                for f in range(1, 8):
                    fn = read_function(bus, bdf(b, dev, f))
                    if fn is not None:
                        found.append(fn)
    return found


def _size_bars(bus: Bus, fn: PciFunction) -> None:
    """Find each BAR's type and size (decode off meanwhile, old values restored)."""
    cmd = bus.pci_cfg_read(fn.bdf, PciCfg.COMMAND, 2)
    bus.pci_cfg_write(
        fn.bdf, PciCfg.COMMAND, 2, cmd & ~(PciCommand.IO | PciCommand.MEMORY) & 0xFFFF
    )
    index = 0
    while index < PCI_NUM_BARS:
        off = bar_offset(index)
        old = bus.pci_cfg_read(fn.bdf, off, 4)
        bus.pci_cfg_write(fn.bdf, off, 4, 0xFFFFFFFF)
        probe = bus.pci_cfg_read(fn.bdf, off, 4)
        bus.pci_cfg_write(fn.bdf, off, 4, old)
        if probe in (0, 0xFFFFFFFF) and old in (0, 0xFFFFFFFF):
            index += 1
            continue
        if old & PCI_BAR_SPACE_IO:
            mask = probe & PCI_BAR_IO_ADDR_MASK & 0xFFFF
            size = (~mask & 0xFFFF) + 1 if mask else 0
            bar = PciBar(index, io=True, is64=False, size=size)
            width = 1
        else:
            is64 = old & PCI_BAR_MEM_TYPE_MASK == PCI_BAR_MEM_TYPE_64
            mask = probe & PCI_BAR_MEM_ADDR_MASK
            width = 1
            if is64 and index + 1 < PCI_NUM_BARS:
                hi_off = bar_offset(index + 1)
                old_hi = bus.pci_cfg_read(fn.bdf, hi_off, 4)
                bus.pci_cfg_write(fn.bdf, hi_off, 4, 0xFFFFFFFF)
                mask |= bus.pci_cfg_read(fn.bdf, hi_off, 4) << 32
                bus.pci_cfg_write(fn.bdf, hi_off, 4, old_hi)
                full = (1 << 64) - 1
                width = 2
            else:
                is64 = False
                full = 0xFFFFFFFF
            size = ((~mask) & full) + 1 if mask else 0
            bar = PciBar(
                index, io=False, is64=is64, size=size, prefetchable=bool(old & PCI_BAR_MEM_PREFETCH)
            )
        if size and not size & (size - 1):
            fn.bars[index] = bar
        elif mask:
            fn.problems.append(f"BAR{index}: size mask {mask:#x} is not a power of two")
        index += width
    bus.pci_cfg_write(fn.bdf, PciCfg.COMMAND, 2, cmd)


class _Window:
    """A bump allocator over ``[base, limit)`` with natural alignment."""

    def __init__(self, base: int, limit: int) -> None:
        self.next = base
        self.limit = limit

    def take(self, size: int, align: int) -> int | None:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.limit:
            return None
        self.next = addr + size
        return addr


def _assign(
    bus: Bus,
    functions: list[PciFunction],
    io: _Window,
    mem32: _Window,
    mem64: _Window | None,
) -> None:
    bars = [(fn, bar) for fn in functions for bar in fn.bars.values()]
    # largest first: natural alignment then packs without holes
    bars.sort(key=lambda fb: fb[1].size, reverse=True)
    for fn, bar in bars:
        if bar.io:
            window = io
            align = max(bar.size, 4)
        else:
            window = mem64 if bar.is64 and mem64 is not None else mem32
            align = max(bar.size, _MEM_MIN_ALIGN)
        addr = window.take(bar.size, align)
        if addr is None:
            fn.problems.append(f"BAR{bar.index}: {bar.size:#x} bytes do not fit the window")
            continue
        bar.address = addr
        bus.pci_cfg_write(fn.bdf, bar_offset(bar.index), 4, addr & 0xFFFFFFFF)
        if bar.is64:
            bus.pci_cfg_write(fn.bdf, bar_offset(bar.index + 1), 4, addr >> 32)


def _route_intx(bus: Bus, functions: list[PciFunction]) -> None:
    """Program the chipset's PIRQ routing and each function's Interrupt Line."""
    chipset = None
    for fn in functions:
        if (fn.vendor_id, fn.device_id) == _PIIX3:
            chipset = "piix"
            for i, irq in enumerate(_PIIX_PIRQ_IRQS):
                bus.pci_cfg_write(fn.bdf, _PIIX_PIRQRC + i, 1, irq)
        elif (fn.vendor_id, fn.device_id) == _ICH9_LPC:
            chipset = "ich9"
    for fn in functions:
        if fn.header_type & _HEADER_LAYOUT or not 1 <= fn.interrupt_pin <= 4:
            continue
        intx = fn.interrupt_pin - 1  # INTA# = 0
        if chipset == "piix":
            # PIIX swizzle: PIRQ = (slot - 1 + INTx) mod 4
            line = _PIIX_PIRQ_IRQS[(fn.slot - 1 + intx) & 3]
        elif chipset == "ich9":
            # ICH9 default routing: PIRQ E..H = 4 + (slot + INTx) mod 4, at GSI 16 + PIRQ
            line = _ICH9_GSI_BASE + 4 + ((fn.slot + intx) & 3)
        else:
            continue
        fn.interrupt_line = line
        bus.pci_cfg_write(fn.bdf, PciCfg.INTERRUPT_LINE, 1, line)


def read_bars(bus: Bus, function_bdf: int) -> dict[int, PciBar]:
    """The BARs of a function with their sizes and current addresses (as assigned).

    Sizing briefly turns decoding off (the Command register is restored). A BAR
    whose register reads 0 is reported with ``address`` None (not assigned).
    """
    fn = PciFunction(function_bdf, 0, 0, 0, 0, 0)
    _size_bars(bus, fn)
    for bar in fn.bars.values():
        low = bus.pci_cfg_read(function_bdf, bar_offset(bar.index), 4)
        if bar.io:
            addr = low & PCI_BAR_IO_ADDR_MASK & 0xFFFF
        else:
            addr = low & PCI_BAR_MEM_ADDR_MASK
            if bar.is64:
                addr |= bus.pci_cfg_read(function_bdf, bar_offset(bar.index + 1), 4) << 32
        bar.address = addr or None
    return fn.bars


def enumerate_pci(
    bus: Bus,
    *,
    io_window: tuple[int, int] = IO_WINDOW,
    mmio32_window: tuple[int, int] = MMIO32_WINDOW,
    mmio64_window: tuple[int, int] | None = None,
    route_interrupts: bool = True,
) -> list[PciFunction]:
    """Scan bus 0, size and assign every BAR, enable decode and bus mastering, route
    INTx; return the functions found (with their BAR addresses).

    Call it once per bus before opening transports (it re-assigns every BAR).
    Raises :class:`~pyvirtio.errors.ConfigurationError` for an empty window.
    """
    for name, (lo, hi) in (("I/O", io_window), ("32-bit memory", mmio32_window)):
        if not 0 <= lo < hi:
            raise ConfigurationError(f"the {name} window {lo:#x}..{hi:#x} is empty")
    if mmio64_window is not None and not 0 <= mmio64_window[0] < mmio64_window[1]:
        raise ConfigurationError("the 64-bit memory window is empty")
    functions = find_functions(bus)
    normal = [fn for fn in functions if fn.header_type & _HEADER_LAYOUT == 0]
    for fn in normal:
        _size_bars(bus, fn)
    mem64 = _Window(*mmio64_window) if mmio64_window is not None else None
    _assign(bus, normal, _Window(*io_window), _Window(*mmio32_window), mem64)
    for fn in normal:
        if not fn.bars:
            continue
        cmd = bus.pci_cfg_read(fn.bdf, PciCfg.COMMAND, 2)
        if any(b.io and b.address is not None for b in fn.bars.values()):
            cmd |= PciCommand.IO
        if any(not b.io and b.address is not None for b in fn.bars.values()):
            cmd |= PciCommand.MEMORY
        cmd |= PciCommand.MASTER
        bus.pci_cfg_write(fn.bdf, PciCfg.COMMAND, 2, cmd)
    if route_interrupts:
        _route_intx(bus, functions)
    return functions
