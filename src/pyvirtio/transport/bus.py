"""Bus access: how a driver-side transport reaches hardware registers and guest RAM.

A PCI or MMIO driver transport never talks to a device model or a QEMU process
directly; it uses a :class:`Bus`: PCI configuration space, port I/O, MMIO, guest RAM
and interrupts. Two implementations exist: an in-process bus hosting pyvirtio's own
device-side PCI/MMIO models (``transport.inprocess_bus``), and a qtest bus that drives
a QEMU process as its CPU (``transport.qtest``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pyvirtio.memory.guest_memory import GuestMemory


@dataclass(frozen=True)
class Interrupt:
    """One interrupt the driver observed.

    ``kind`` is ``"intx"`` (``line`` is the interrupt line/GSI) or ``"msi"``
    (``address``/``data`` are the message the device wrote).
    """

    kind: str
    line: int = 0
    address: int = 0
    data: int = 0


class Bus(Protocol):
    """Register and memory access for driver-side PCI and MMIO transports."""

    #: guest RAM, shared with the device side (rings and buffers live here)
    mem: GuestMemory

    def pci_cfg_read(self, bdf: int, offset: int, size: int) -> int:
        """Read ``size`` (1, 2, 4) bytes of PCI configuration space of function ``bdf``
        (bus << 8 | device << 3 | function); all ones if no function answers."""
        ...

    def pci_cfg_write(self, bdf: int, offset: int, size: int, value: int) -> None:
        """Write PCI configuration space."""
        ...

    def mmio_read(self, addr: int, size: int) -> int:
        """Read a little-endian register of ``size`` bytes at physical ``addr``."""
        ...

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        """Write a little-endian register."""
        ...

    def io_read(self, port: int, size: int) -> int:
        """Read an I/O port."""
        ...

    def io_write(self, port: int, size: int, value: int) -> None:
        """Write an I/O port."""
        ...

    def wait_interrupts(self, timeout: float | None) -> list[Interrupt]:
        """Interrupts raised since the last call, waiting up to ``timeout`` seconds
        for at least one (``0``: just poll)."""
        ...

    def interrupt_fds(self) -> list[int]:
        """File descriptors readable when :meth:`wait_interrupts` has something."""
        ...

    def close(self) -> None:
        """Release the bus (stop QEMU, unmap RAM)."""
        ...
