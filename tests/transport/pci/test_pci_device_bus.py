"""The in-process bus hosting the device models: configuration mechanism #1, address
decoding, guest RAM, interrupt recording and its eventfd."""

from __future__ import annotations

import os
import select
import threading

import pytest

from pyvirtio.devices.blk import BlkDevice, MemoryBackend
from pyvirtio.devices.rng import RngDevice
from pyvirtio.errors import ConfigurationError
from pyvirtio.spec.blk import SECTOR_SIZE
from pyvirtio.transport.bus import Bus, Interrupt
from pyvirtio.transport.inprocess_bus import (
    PCI_CONFIG_ADDRESS,
    PCI_CONFIG_DATA,
    InProcessBus,
    make_bdf,
)
from pyvirtio.transport.mmio.device import VirtioMmioDevice
from pyvirtio.transport.pci.device import VirtioPciFunction
from pyvirtio.transport.pci.spec import MSI_ADDRESS_BASE, PciCfg


def _cf8(bdf: int, offset: int) -> int:
    return 0x80000000 | bdf << 8 | offset & 0xFC


def test_is_a_bus() -> None:
    with InProcessBus(4 << 20) as bus:
        b: Bus = bus
        assert b.mem.size == 4 << 20


def test_config_mechanism_1() -> None:
    with InProcessBus(4 << 20) as bus:
        bdf = bus.add_pci(VirtioPciFunction(RngDevice()))
        assert bdf == make_bdf(0, 1)
        bus.io_write(PCI_CONFIG_ADDRESS, 4, _cf8(bdf, 0))
        assert bus.io_read(PCI_CONFIG_ADDRESS, 4) == _cf8(bdf, 0)
        assert bus.io_read(PCI_CONFIG_DATA, 4) == 0x1044 << 16 | 0x1AF4
        assert bus.io_read(PCI_CONFIG_DATA + 2, 2) == 0x1044
        bus.io_write(PCI_CONFIG_ADDRESS, 4, _cf8(bdf, PciCfg.INTERRUPT_LINE))
        bus.io_write(PCI_CONFIG_DATA, 1, 0x33)
        assert bus.pci_cfg_read(bdf, PciCfg.INTERRUPT_LINE, 1) == 0x33
        # the host bridge at 00:00.0, nothing at an empty slot, nothing when disabled
        bus.io_write(PCI_CONFIG_ADDRESS, 4, _cf8(0, 0))
        assert bus.io_read(PCI_CONFIG_DATA, 4) == 0x1237_8086
        bus.io_write(PCI_CONFIG_ADDRESS, 4, _cf8(make_bdf(0, 9), 0))
        assert bus.io_read(PCI_CONFIG_DATA, 4) == 0xFFFFFFFF
        bus.io_write(PCI_CONFIG_ADDRESS, 4, bdf << 8)
        assert bus.io_read(PCI_CONFIG_DATA, 2) == 0xFFFF


def test_slots_and_intx_routing() -> None:
    with InProcessBus(4 << 20) as bus:
        a = bus.add_pci(VirtioPciFunction(RngDevice()), device=3)
        b = bus.add_pci(VirtioPciFunction(RngDevice()), device=5)
        assert bus.intx_line(a) == 11 and bus.intx_line(b) == 10
        assert bus.pci_cfg_read(a, PciCfg.INTERRUPT_LINE, 1) == 11
        with pytest.raises(ConfigurationError):
            bus.add_pci(VirtioPciFunction(RngDevice()), device=3)
        assert set(bus.pci_functions) == {0, a, b}


def test_ram_and_unassigned_space() -> None:
    with InProcessBus(4 << 20) as bus:
        bus.mmio_write(0x2000, 8, 0x1122334455667788)
        assert bus.mem.read_le64(0x2000) == 0x1122334455667788
        assert bus.mmio_read(0x2004, 4) == 0x11223344
        assert bus.mmio_read(0xE000_0000, 4) == 0xFFFFFFFF
        assert bus.io_read(0x1234, 2) == 0xFFFF
        bus.mmio_write(0xE000_0000, 4, 1)  # nothing there: ignored
        bus.io_write(0x1234, 1, 1)


def test_dma_write_msi_window_and_ram() -> None:
    with InProcessBus(4 << 20) as bus:
        bus.dma_write(MSI_ADDRESS_BASE | 0x3000, (0x4041).to_bytes(4, "little"))
        bus.dma_write(0x5000, b"\x01\x02\x03\x04")
        bus.dma_write(1 << 40, b"\xff" * 4)  # not RAM: dropped
        assert bus.wait_interrupts(0) == [
            Interrupt("msi", address=MSI_ADDRESS_BASE | 0x3000, data=0x4041)
        ]
        assert bus.mem.read(0x5000, 4) == b"\x01\x02\x03\x04"


def test_interrupt_fd_and_wait() -> None:
    with InProcessBus(4 << 20) as bus:
        (fd,) = bus.interrupt_fds()
        assert select.select([fd], [], [], 0)[0] == []
        assert bus.wait_interrupts(0) == []
        assert bus.wait_interrupts(0.01) == []
        model = VirtioMmioDevice(RngDevice())
        slot = bus.add_mmio(model)
        threading.Timer(0.05, lambda: model._raise(1)).start()
        got = bus.wait_interrupts(5)
        assert got == [Interrupt("intx", line=slot.irq)]
        model._raise(2)
        assert select.select([fd], [], [], 0)[0] == [fd]
        assert bus.wait_interrupts(None) == [Interrupt("intx", line=slot.irq)]
        assert select.select([fd], [], [], 0)[0] == []
        assert bus.interrupt_count == 2


def test_mmio_windows_must_not_overlap() -> None:
    with InProcessBus(4 << 20) as bus:
        slot = bus.add_mmio(VirtioMmioDevice(RngDevice()))
        with pytest.raises(ConfigurationError):
            bus.add_mmio(VirtioMmioDevice(RngDevice()), base=slot.base + 0x100)


def test_close_releases_everything() -> None:
    before = set(os.listdir("/proc/self/fd"))
    bus = InProcessBus(4 << 20)
    dev = BlkDevice(MemoryBackend(8 * SECTOR_SIZE))
    bus.add_pci(VirtioPciFunction(dev))
    bus.close()
    bus.close()  # idempotent
    assert dev.host is None
    assert set(os.listdir("/proc/self/fd")) <= before
    assert bus.wait_interrupts(0) == []


def test_bus_allocator_avoids_low_memory() -> None:
    with InProcessBus(16 << 20) as bus:
        addr = bus.allocator.alloc(4096, 4096)
        assert addr >= 1 << 20
