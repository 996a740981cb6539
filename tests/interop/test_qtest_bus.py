"""QtestBus itself against a real QEMU: start-up, the qtest protocol, guest RAM shared
with QEMU, interrupt reports, and clean shutdown.

Peer: "QEMU 7.2 qemu-system-x86_64 via qtest" (``-machine pc`` and ``microvm``).
"""

from __future__ import annotations

import os
import select
import shutil
import time

import pytest

from pyvirtio.errors import ConfigurationError
from pyvirtio.transport.bus import Interrupt
from pyvirtio.transport.pci.enumerate import bdf, enumerate_pci, find_functions
from pyvirtio.transport.qtest import MSI_WINDOW_BASE, RAM_ALLOC_BASE, QtestBus, QtestError

PEER = "QEMU 7.2 qemu-system-x86_64 via qtest"

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason=f"{PEER}: QEMU not installed"
    ),
]


def test_qemu_starts_answers_and_stops_cleanly() -> None:
    bus = QtestBus(["-device", "virtio-rng-pci,addr=4"])
    proc = bus.proc
    tmp = bus._tmp
    try:
        # the host bridge of pc and the virtio function we asked for
        assert bus.pci_cfg_read(bdf(0, 0), 0, 4) == 0x1237_8086
        assert bus.pci_cfg_read(bdf(0, 4), 0, 4) == 0x1005_1AF4
        assert bus.pci_cfg_read(bdf(0, 4), 2, 2) == 0x1005
        assert bus.pci_cfg_read(bdf(0, 4), 0x3D, 1) == 1  # INTA#
        # nothing in slot 20: all ones
        assert bus.pci_cfg_read(bdf(0, 20), 0, 4) == 0xFFFF_FFFF
        assert bus.interrupt_fds() and bus.pid == proc.pid
    finally:
        bus.close()
    assert proc.poll() is not None
    assert not os.path.exists(tmp)
    bus.close()  # idempotent
    assert bus.interrupt_fds() == []
    with pytest.raises(QtestError, match="closed"):
        bus.mmio_read(0, 4)


def test_guest_ram_is_shared_with_qemu() -> None:
    with QtestBus() as bus:
        addr = RAM_ALLOC_BASE + 0x1234 * 4
        bus.mem.write_le32(addr, 0xDEADBEEF)
        assert bus.mmio_read(addr, 4) == 0xDEADBEEF
        bus.mmio_write(addr + 8, 8, 0x0123_4567_89AB_CDEF)
        assert bus.mem.read_le64(addr + 8) == 0x0123_4567_89AB_CDEF
        assert bus.allocator.alloc(4096) >= RAM_ALLOC_BASE


def test_msi_window_writes_are_reported_once_and_cleared() -> None:
    with QtestBus() as bus:
        # what a device's MSI-X message does: a 32-bit write into the window
        bus.mmio_write(MSI_WINDOW_BASE + 8, 4, 0x31)
        assert bus.wait_interrupts(1.0) == [
            Interrupt("msi", address=MSI_WINDOW_BASE + 8, data=0x31)
        ]
        assert bus.mem.read_le32(MSI_WINDOW_BASE + 8) == 0
        assert bus.wait_interrupts(0) == []
        assert bus.interrupt_counts["msi"] == 1


def test_refused_command_is_an_error_and_the_bus_goes_on() -> None:
    with QtestBus() as bus:
        with pytest.raises(QtestError, match="refused"):
            bus.command("no_such_command 1")
        assert bus.mmio_read(RAM_ALLOC_BASE, 4) == 0
        with pytest.raises(ValueError):
            bus.io_read(0x80, 8)
        with pytest.raises(ValueError):
            bus.pci_cfg_read(bdf(0, 0), 2, 4)  # not aligned


def test_qemu_that_fails_to_start_reports_its_error() -> None:
    with pytest.raises(QtestError, match="no-such-device"):
        QtestBus(["-device", "no-such-device"])


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"machine": "virt"}, "not supported"),
        ({"mem_size": 3 << 30}, "guest RAM"),
        ({"mem_size": (64 << 20) + 1}, "guest RAM"),
        ({"qemu": "no-such-qemu-binary"}, "not found"),
    ],
)
def test_bad_arguments_are_configuration_errors(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        QtestBus(**kw)  # type: ignore[arg-type]


def test_paused_vm_still_enumerates() -> None:
    with QtestBus(["-device", "virtio-rng-pci,addr=4"], running=False) as bus:
        found = {fn.slot: fn for fn in enumerate_pci(bus)}
        assert found[4].device_id == 0x1005
        assert found[4].bars


def test_microvm_has_no_pci_but_virtio_mmio_windows() -> None:
    with QtestBus(["-device", "virtio-rng-device"], machine="microvm") as bus:
        assert find_functions(bus) == []
        # the device sits in the highest of the 8 slots
        base = 0xFEB00000 + 7 * 0x200
        assert bus.mmio_read(base, 4) == 0x74726976
        assert bus.mmio_read(base + 8, 4) == 4


def test_interrupt_fds_wake_up_for_msi_messages() -> None:
    with QtestBus() as bus:
        fds = bus.interrupt_fds()
        assert len(fds) == 2
        assert select.select(fds, [], [], 0)[0] == []
        bus.mmio_write(MSI_WINDOW_BASE + 4, 4, 0x40)
        ready, _, _ = select.select(fds, [], [], 5.0)
        assert ready == [fds[1]]
        assert [i.data for i in bus.wait_interrupts(0)] == [0x40]
        # drained (a wake-up racing with the drain may be spurious: drain it too)
        time.sleep(0.01)
        assert bus.wait_interrupts(0) == []
        assert select.select([fds[1]], [], [], 0.05)[0] == []
