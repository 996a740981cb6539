"""A generic PCI function model: what every device on a PCI bus has, virtio or not.

:class:`PciFunction` is a type 0 configuration space (PCI Local Bus 3.0 §6.1: ids,
class code, command/status, BARs, interrupt pin/line) with a capability list, BAR
decoding, an optional MSI-X capability with its table and pending bit array (PCI
3.0 §6.8.2) and the INTA# line. Subclasses serve the registers behind their BARs
and say when their interrupt condition holds; the virtio-pci function
(:class:`~pyvirtio.transport.pci.device.VirtioPciFunction`) is one. This module
knows nothing of virtio, so the same model can be served to any platform.
:class:`HostBridge` is the function at 00:00.0 of a machine.

Behaviour of the model:

- A register access never raises: a write goes through a per-byte write mask
  (read-only bits keep their value), a misaligned configuration access reads all
  ones and writes nothing, an unbacked BAR reads all ones.
- MSI-X messages are memory writes, so they are only sent while Bus Master is
  enabled in the command register (a message raised without it is dropped, as on
  hardware); a masked vector sets its pending bit and is sent when unmasked.
- INTA# follows the subclass's interrupt condition unless MSI-X is enabled or the
  Interrupt Disable bit of the command register is set; the Interrupt Status bit of
  the status register shows the condition while MSI-X is off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pyvirtio.errors import ConfigurationError
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.transport.pci.spec import (
    MSIX_BAR_MIN_SIZE,
    MSIX_CAP,
    MSIX_CONTROL_ENABLE,
    MSIX_CONTROL_FUNCTION_MASK,
    MSIX_ENTRY,
    MSIX_ENTRY_CTRL_MASKBIT,
    MSIX_MAX_VECTORS,
    MSIX_PBA_OFFSET,
    PCI_BAR_IO_ADDR_MASK,
    PCI_BAR_MEM_ADDR_MASK,
    PCI_BAR_MEM_PREFETCH,
    PCI_BAR_MEM_TYPE_64,
    PCI_BAR_SPACE_IO,
    PCI_CLASS_BRIDGE_HOST,
    PCI_CONFIG_SPACE_SIZE,
    PCI_HEADER_SIZE,
    PCI_HEADER_TYPE_NORMAL,
    PCI_NUM_BARS,
    PciCapId,
    PciCfg,
    PciCommand,
    PciStatus,
    bar_offset,
)

__all__ = [
    "BarMapping",
    "DmaWrite",
    "HostBridge",
    "IrqLine",
    "MsixSignal",
    "PciFunction",
    "pow2_at_least",
]

#: A device-initiated memory write (``addr``, ``data``): MSI-X messages.
DmaWrite = Callable[[int, bytes], None]
#: Drive the function's interrupt line: called with True for every interrupt event
#: (even while the line is already asserted) and with False when it is de-asserted.
IrqLine = Callable[[bool], None]
#: Signal MSI-X vector ``n`` on a platform that keeps the MSI-X table itself.
MsixSignal = Callable[[int], None]

_NOOP_DMA: DmaWrite = lambda addr, data: None  # noqa: E731
_NOOP_IRQ: IrqLine = lambda level: None  # noqa: E731


def pow2_at_least(n: int, minimum: int) -> int:
    """The smallest ``minimum * 2**k`` that is at least ``n`` (a BAR size)."""
    size = minimum
    while size < n:
        size <<= 1
    return size


@dataclass(frozen=True)
class BarMapping:
    """A BAR the function decodes now: ``index``, I/O or memory, ``base``, ``size``."""

    index: int
    io: bool
    base: int
    size: int

    @property
    def end(self) -> int:
        """One past the last address decoded."""
        return self.base + self.size


@dataclass
class _Bar:
    size: int
    io: bool
    mem64: bool
    prefetch: bool


class PciFunction:
    """A PCI function's type 0 configuration space (256 bytes) with BARs, a
    capability list, optionally MSI-X (:meth:`add_msix`), and INTA#.

    Writes go through a per-byte write mask (read-only bits keep their value, so a
    write to a read-only register is ignored); a BAR's low address bits are read-only
    zero, so writing all ones and reading back gives its size (``~(size - 1)`` plus
    the type bits). Subclasses serve their BARs (:meth:`bar_read`/:meth:`bar_write`,
    calling this class's for the MSI-X BAR), hook configuration accesses and give
    their INTx interrupt condition (:meth:`_intx_condition`).
    """

    def __init__(
        self,
        vendor_id: int,
        device_id: int,
        class_code: int,
        *,
        revision: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        interrupt_pin: int = 0,
    ) -> None:
        self.config = bytearray(PCI_CONFIG_SPACE_SIZE)
        self.wmask = bytearray(PCI_CONFIG_SPACE_SIZE)
        self._bars: list[_Bar | None] = [None] * PCI_NUM_BARS
        self._next_cap = PCI_HEADER_SIZE
        self._last_cap: int | None = None
        self._set(PciCfg.VENDOR_ID, 2, vendor_id)
        self._set(PciCfg.DEVICE_ID, 2, device_id)
        self._set(PciCfg.REVISION_ID, 1, revision)
        self._set(PciCfg.PROG_IF, 1, class_code & 0xFF)
        self._set(PciCfg.SUBCLASS, 1, class_code >> 8 & 0xFF)
        self._set(PciCfg.CLASS, 1, class_code >> 16 & 0xFF)
        self._set(PciCfg.HEADER_TYPE, 1, PCI_HEADER_TYPE_NORMAL)
        self._set(PciCfg.SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._set(PciCfg.SUBSYSTEM_ID, 2, subsystem_id)
        self._set(PciCfg.INTERRUPT_PIN, 1, interrupt_pin)
        # command: I/O, memory, bus master, INTx disable are writable
        cmd_mask = PciCommand.IO | PciCommand.MEMORY | PciCommand.MASTER
        cmd_mask |= PciCommand.INTX_DISABLE
        self._set_wmask(PciCfg.COMMAND, 2, int(cmd_mask))
        self._set_wmask(PciCfg.CACHE_LINE_SIZE, 1, 0xFF)
        self._set_wmask(PciCfg.LATENCY_TIMER, 1, 0xFF)
        self._set_wmask(PciCfg.INTERRUPT_LINE, 1, 0xFF)
        self._decode_cache: list[BarMapping] | None = None
        # platform (see connect)
        self._dma_write: DmaWrite = _NOOP_DMA
        self._set_irq: IrqLine = _NOOP_IRQ
        self._intx_asserted = False
        # MSI-X (see add_msix): none until added
        self._msix_n = 0
        self._msix_bar: int | None = None
        self._msix_cap: int | None = None
        self._msix_table = bytearray()
        self._msix_pba = bytearray()
        self._pba_offset = 0
        #: MSI-X messages dropped because Bus Master was disabled
        self.msix_dropped = 0
        # a platform that emulates the MSI-X table itself (see connect_msix)
        self._msix_signal: MsixSignal | None = None

    # -- construction helpers ------------------------------------------------------

    def _set(self, offset: int, size: int, value: int) -> None:
        self.config[offset : offset + size] = (value & ((1 << 8 * size) - 1)).to_bytes(
            size, "little"
        )

    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset : offset + size], "little")

    def _set_wmask(self, offset: int, size: int, mask: int) -> None:
        self.wmask[offset : offset + size] = mask.to_bytes(size, "little")

    def add_bar(
        self,
        index: int,
        size: int,
        *,
        io: bool = False,
        mem64: bool = False,
        prefetch: bool = False,
    ) -> None:
        """Declare BAR ``index`` of ``size`` bytes (a power of two)."""
        if size < 4 or size & (size - 1):
            raise ConfigurationError(f"BAR size {size} is not a power of two >= 4")
        if not 0 <= index < PCI_NUM_BARS - (1 if mem64 else 0):
            raise ConfigurationError(f"BAR index {index} is not usable")
        self._bars[index] = _Bar(size, io, mem64 and not io, prefetch and not io)
        off = bar_offset(index)
        if io:
            self._set(off, 4, PCI_BAR_SPACE_IO)
            self._set_wmask(off, 4, ~(size - 1) & PCI_BAR_IO_ADDR_MASK)
            return
        flags = (PCI_BAR_MEM_TYPE_64 if mem64 else 0) | (PCI_BAR_MEM_PREFETCH if prefetch else 0)
        self._set(off, 4, flags)
        self._set_wmask(off, 4, ~(size - 1) & PCI_BAR_MEM_ADDR_MASK)
        if mem64:
            self._set_wmask(off + 4, 4, 0xFFFFFFFF)

    def add_capability(self, cap_id: int, body: bytes) -> int:
        """Append a capability (``cap_id``, ``cap_next`` then ``body``) to the list;
        returns its offset in configuration space."""
        off = self._next_cap
        total = 2 + len(body)
        if off + total > PCI_CONFIG_SPACE_SIZE:
            raise ConfigurationError("capabilities do not fit in configuration space")
        self.config[off] = cap_id
        self.config[off + 1] = 0
        self.config[off + 2 : off + total] = body
        if self._last_cap is None:
            self._set(PciCfg.CAPABILITY_LIST, 1, off)
            self._set(PciCfg.STATUS, 2, self._get(PciCfg.STATUS, 2) | PciStatus.CAP_LIST)
        else:
            self.config[self._last_cap + 1] = off
        self._last_cap = off
        self._next_cap = (off + total + 3) & ~3
        return off

    def add_msix(self, vectors: int, bar: int) -> int:
        """Give the function an MSI-X capability (PCI 3.0 §6.8.2) with a table of
        ``vectors`` entries, every vector masked, at offset 0 of memory BAR ``bar``
        and the pending bit array behind it (at 0x800 or after the table); returns
        the capability's offset. Function Mask and MSI-X Enable are writable, the
        table size is not."""
        if not 1 <= vectors <= MSIX_MAX_VECTORS:
            raise ConfigurationError(f"an MSI-X table has 1..{MSIX_MAX_VECTORS} vectors")
        table_bytes = vectors * MSIX_ENTRY.size
        self._pba_offset = max(MSIX_PBA_OFFSET, (table_bytes + 7) & ~7)
        pba_bytes = (vectors + 63) // 64 * 8
        self._msix_table = bytearray(table_bytes)
        for v in range(vectors):
            self._msix_table[v * 16 + 12] = MSIX_ENTRY_CTRL_MASKBIT
        self._msix_pba = bytearray(pba_bytes)
        self.add_bar(bar, pow2_at_least(self._pba_offset + pba_bytes, MSIX_BAR_MIN_SIZE))
        self._msix_n = vectors
        self._msix_bar = bar
        self._msix_cap = self.add_capability(
            PciCapId.MSIX,
            MSIX_CAP.pack_values(PciCapId.MSIX, 0, vectors - 1, bar, self._pba_offset | bar)[2:],
        )
        self._set_wmask(self._msix_cap + 2, 2, MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK)
        return self._msix_cap

    # -- configuration space access --------------------------------------------------

    @property
    def command(self) -> int:
        """The Command register."""
        return self._get(PciCfg.COMMAND, 2)

    def cfg_read(self, offset: int, size: int) -> int:
        """Read configuration space (``size`` 1, 2 or 4, naturally aligned; anything
        else reads all ones, like a master abort)."""
        if size not in (1, 2, 4) or offset % size or not 0 <= offset <= 256 - size:
            return (1 << 8 * size) - 1 if size in (1, 2, 4) else 0xFFFFFFFF
        self._before_cfg_read(offset, size)
        return int.from_bytes(self.config[offset : offset + size], "little")

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        """Write configuration space through the write mask (ignored if misaligned).

        A write to the command register or to MSI-X Message Control updates INTA#
        (it is off while MSI-X is enabled or INTx is disabled); enabling or
        unmasking MSI-X sends the messages that are pending."""
        if size not in (1, 2, 4) or offset % size or not 0 <= offset <= 256 - size:
            return
        data = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        old = bytes(self.config[offset : offset + size])
        cfg, wm = self.config, self.wmask
        for i in range(size):
            m = wm[offset + i]
            cfg[offset + i] = (cfg[offset + i] & ~m | data[i] & m) & 0xFF
        self._decode_cache = None
        end = offset + size
        if offset <= PciCfg.COMMAND + 1 and end > PciCfg.COMMAND:
            self._update_intx()
        if self._msix_cap is not None and offset < self._msix_cap + 4 and self._msix_cap < end:
            # MSI-X enable / function mask changed: INTx is off while MSI-X is on, and
            # unmasking sends what is pending
            self._update_intx()
            self._msix_flush_pending()
        self._after_cfg_write(offset, size, old)

    def _before_cfg_read(self, offset: int, size: int) -> None:
        """Hook: refresh configuration bytes before a read."""

    def _after_cfg_write(self, offset: int, size: int, old: bytes) -> None:
        """Hook: react to a configuration write (``old``: the bytes before)."""

    # -- BAR decoding ---------------------------------------------------------------------

    def bar_address(self, index: int) -> int:
        """The address BAR ``index`` is programmed to (0 if unprogrammed or absent)."""
        bar = self._bars[index] if 0 <= index < PCI_NUM_BARS else None
        if bar is None:
            return 0
        raw = self._get(bar_offset(index), 4)
        if bar.io:
            return raw & PCI_BAR_IO_ADDR_MASK
        addr = raw & PCI_BAR_MEM_ADDR_MASK
        if bar.mem64:
            addr |= self._get(bar_offset(index) + 4, 4) << 32
        return addr

    def bar_size(self, index: int) -> int:
        """The size of BAR ``index`` (0 if absent)."""
        bar = self._bars[index] if 0 <= index < PCI_NUM_BARS else None
        return 0 if bar is None else bar.size

    def decoded_bars(self) -> list[BarMapping]:
        """The BARs that answer now: programmed (non-zero) and enabled by the I/O or
        Memory Space bit of the command register."""
        cached = self._decode_cache
        if cached is not None:
            return cached
        cmd = self.command
        out: list[BarMapping] = []
        for i, bar in enumerate(self._bars):
            if bar is None:
                continue
            if not cmd & (PciCommand.IO if bar.io else PciCommand.MEMORY):
                continue
            base = self.bar_address(i)
            if base:
                out.append(BarMapping(i, bar.io, base, bar.size))
        self._decode_cache = out
        return out

    def bar_read(self, index: int, offset: int, size: int) -> int:
        """Read ``size`` bytes at ``offset`` of BAR ``index``: the MSI-X table and
        PBA in the MSI-X BAR (a bad access reads 0), all ones anywhere unbacked."""
        if self._msix_n and index == self._msix_bar:
            if size not in (1, 2, 4, 8) or offset < 0:
                return 0
            return self._msix_bar_read(offset, size)
        return (1 << 8 * size) - 1

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        """Write ``size`` bytes at ``offset`` of BAR ``index``: the MSI-X table in the
        MSI-X BAR (the PBA is read-only), ignored anywhere unbacked."""
        if self._msix_n and index == self._msix_bar:
            if size not in (1, 2, 4, 8) or offset < 0:
                return
            self._msix_bar_write(offset, size, value & ((1 << 8 * size) - 1))

    # -- platform ---------------------------------------------------------------------------

    def connect(self, mem: GuestMemory, dma_write: DmaWrite, set_irq: IrqLine) -> None:
        """Attach to a platform: guest RAM, device-initiated writes (MSI-X messages),
        the INTx line."""
        self._dma_write = dma_write
        self._set_irq = set_irq

    def connect_msix(self, signal: MsixSignal | None) -> None:
        """Hand MSI-X delivery to a platform that keeps the MSI-X table, its masks and
        the pending bits itself (QEMU's vfio-pci traps the table and the PBA and only
        wants a vector signalled): with ``signal`` set, a vector raised while MSI-X is
        enabled calls ``signal(vector)`` and this function's own table, masks and
        Bus Master are not consulted. ``None`` goes back to sending messages."""
        self._msix_signal = signal

    def function_reset(self) -> None:
        """A function-level reset (PCIe base 3.0 §6.6.2 "Function-Level Reset"): the
        writable header registers (command, BARs, cache line, latency, interrupt line)
        and MSI-X go back to their reset values, INTA# is de-asserted; then
        :meth:`_function_reset` resets what the subclass keeps."""
        for off in range(PCI_HEADER_SIZE):
            m = self.wmask[off]
            if m and off != PciCfg.INTERRUPT_LINE:
                self.config[off] &= ~m & 0xFF
        if self._msix_cap is not None:
            self._set(
                self._msix_cap + 2,
                2,
                self._get(self._msix_cap + 2, 2)
                & ~(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK),
            )
            self._msix_table[:] = bytes(len(self._msix_table))
            for v in range(self._msix_n):
                self._msix_table[v * 16 + 12] = MSIX_ENTRY_CTRL_MASKBIT
            self._msix_pba[:] = bytes(len(self._msix_pba))
        self._decode_cache = None
        self._function_reset()
        self._update_intx()

    def _function_reset(self) -> None:
        """Hook: reset the subclass's own state on a function-level reset."""

    def close(self) -> None:
        """Release the function."""

    # -- INTx -------------------------------------------------------------------------------

    @property
    def intx_asserted(self) -> bool:
        """True while INTA# is asserted."""
        return self._intx_asserted

    def _intx_condition(self) -> bool:
        """Hook: True while the function has an interrupt condition for INTx."""
        return False

    def _update_intx(self) -> None:
        """INTx follows the interrupt condition unless MSI-X is enabled or INTx is
        disabled; the Interrupt Status bit of the status register shows the
        condition while MSI-X is off."""
        pending = self._intx_condition() and not self.msix_enabled
        status = self._get(PciCfg.STATUS, 2)
        status = status | PciStatus.INTERRUPT if pending else status & ~PciStatus.INTERRUPT
        self._set(PciCfg.STATUS, 2, status)
        level = pending and not self.command & PciCommand.INTX_DISABLE
        if level != self._intx_asserted:
            self._intx_asserted = level
            self._set_irq(level)

    def _intx_event(self) -> None:
        """An interrupt event once the condition holds: INTA# follows it, and an
        event while the line is already high is reported again."""
        was = self._intx_asserted
        self._update_intx()
        if was and self._intx_asserted:
            self._set_irq(True)  # another event while the line is high

    # -- MSI-X (PCI 3.0 §6.8.2) ----------------------------------------------------------

    @property
    def msix_cap_offset(self) -> int | None:
        """Offset of the MSI-X capability (None without MSI-X)."""
        return self._msix_cap

    @property
    def msix_table_size(self) -> int:
        """Entries in the MSI-X table (0 without MSI-X)."""
        return self._msix_n

    @property
    def msix_enabled(self) -> bool:
        """True while the MSI-X Enable bit of the capability is set."""
        cap = self._msix_cap
        return cap is not None and bool(self._get(cap + 2, 2) & MSIX_CONTROL_ENABLE)

    @property
    def _msix_function_masked(self) -> bool:
        cap = self._msix_cap
        return cap is not None and bool(self._get(cap + 2, 2) & MSIX_CONTROL_FUNCTION_MASK)

    def _msix_masked(self, vector: int) -> bool:
        return self._msix_function_masked or bool(
            self._msix_table[vector * 16 + 12] & MSIX_ENTRY_CTRL_MASKBIT
        )

    def _msix_notify(self, vector: int) -> None:
        """Signal ``vector``: send its message, or set its pending bit while masked."""
        if vector >= self._msix_n:
            return
        if self._msix_signal is not None:
            self._msix_signal(vector)
            return
        if self._msix_masked(vector):
            self._msix_pba[vector // 8] |= 1 << (vector % 8)
            return
        self._msix_send(vector)

    def _msix_send(self, vector: int) -> None:
        entry = MSIX_ENTRY.unpack_from(self._msix_table, vector * 16)
        if not self.command & PciCommand.MASTER:
            self.msix_dropped += 1
            return
        addr = entry.msg_addr_hi << 32 | entry.msg_addr_lo
        self._dma_write(addr, entry.msg_data.to_bytes(4, "little"))

    def _msix_flush_pending(self) -> None:
        if self._msix_signal is not None:
            return  # the platform keeps the pending bits
        if not self._msix_n or not self.msix_enabled or self._msix_function_masked:
            return
        for byte_i, byte in enumerate(self._msix_pba):
            if not byte:
                continue
            for bit in range(8):
                vec = byte_i * 8 + bit
                if byte >> bit & 1 and vec < self._msix_n and not self._msix_masked(vec):
                    self._msix_pba[byte_i] &= ~(1 << bit) & 0xFF
                    self._msix_send(vec)

    def msix_pending(self, vector: int) -> bool:
        """True if ``vector``'s pending bit is set."""
        if not 0 <= vector < self._msix_n:
            return False
        return bool(self._msix_pba[vector // 8] >> (vector % 8) & 1)

    def _msix_bar_read(self, offset: int, size: int) -> int:
        table_end = len(self._msix_table)
        if offset >= 0 and offset + size <= table_end:
            return int.from_bytes(self._msix_table[offset : offset + size], "little")
        pba = offset - self._pba_offset
        if pba >= 0 and pba + size <= len(self._msix_pba):
            return int.from_bytes(self._msix_pba[pba : pba + size], "little")
        return 0

    def _msix_bar_write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > len(self._msix_table):
            return  # the PBA is read-only; the rest of the BAR is reserved
        self._msix_table[offset : offset + size] = value.to_bytes(size, "little")
        # vector control: only the mask bit is defined, the rest reads 0
        first, last = offset // 16, (offset + size - 1) // 16
        for v in range(first, last + 1):
            ctl = v * 16 + 12
            self._msix_table[ctl] &= MSIX_ENTRY_CTRL_MASKBIT
            self._msix_table[ctl + 1 : ctl + 4] = b"\0\0\0"
        self._msix_flush_pending()


class HostBridge(PciFunction):
    """A host bridge at 00:00.0 (no BARs, no capabilities), so an enumeration sees a
    function that is not virtio, as on a real machine (ids of QEMU's i440FX)."""

    def __init__(self, vendor_id: int = 0x8086, device_id: int = 0x1237) -> None:
        super().__init__(vendor_id, device_id, PCI_CLASS_BRIDGE_HOST)
