"""The vfio-user server over a real socket, driven by our own PCI driver transports
through the test client (tests/transport/vfio_user/client.py, a Bus that does what
QEMU's vfio-user-pci does: DMA_MAP of memfd RAM, region accesses, MSI-X kept on the
client side, eventfd interrupts)."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from pyvirtio.core.device import VirtioDevice
from pyvirtio.devices.blk import BlkDevice, MemoryBackend
from pyvirtio.devices.rng import RngDevice
from pyvirtio.drivers.blk import BlkDriver
from pyvirtio.drivers.rng import RngDriver
from pyvirtio.transport.pci.device import PciMode
from pyvirtio.transport.pci.driver import open_virtio_pci
from pyvirtio.transport.pci.enumerate import enumerate_pci
from pyvirtio.transport.pci.spec import PciCfg
from pyvirtio.transport.vfio_user.server import VfioUserServer
from tests.transport.vfio_user.client import BDF, INTX_LINE, VfioUserBus


@contextmanager
def served(device: VirtioDevice, mode: PciMode = "modern") -> Iterator[VfioUserServer]:
    with tempfile.TemporaryDirectory(prefix="pyvirtio-vfu-") as tmp:
        server = VfioUserServer(device, os.path.join(tmp, "dev.sock"), pci_mode=mode)
        thread = threading.Thread(target=server.serve, daemon=True)
        thread.start()
        assert server.ready.wait(10)
        try:
            yield server
        finally:
            server.stop()
            thread.join(10)
            assert not thread.is_alive()
            assert not os.path.exists(server.socket_path)


@pytest.mark.parametrize(
    ("mode", "force_legacy", "msix"),
    [("modern", False, True), ("modern", False, False), ("transitional", True, True),
     ("legacy", False, True), ("legacy", False, False)],
)  # fmt: skip
def test_our_blk_driver_over_vfio_user(mode: PciMode, force_legacy: bool, msix: bool) -> None:
    backend = MemoryBackend(1 << 20)
    with served(BlkDevice(backend), mode) as server, VfioUserBus(str(server.socket_path)) as bus:
        enumerate_pci(bus, route_interrupts=False)
        bus.pci_cfg_write(BDF, PciCfg.INTERRUPT_LINE, 1, INTX_LINE)
        t = open_virtio_pci(bus, BDF, force_legacy=force_legacy, msix=msix)
        drv = BlkDriver(t)
        drv.initialize()
        try:
            data = os.urandom(8192)
            drv.write(8, data)
            drv.flush()
            assert drv.read(8, len(data)) == data
            assert bytes(backend.data[8 * 512 : 8 * 512 + len(data)]) == data  # type: ignore[attr-defined]
        finally:
            drv.close()
            t.close()
        backend_metrics = server.backend.metrics if server.backend else None
        assert backend_metrics is not None and backend_metrics.errors == 0
        if msix:
            assert backend_metrics.msix_signals > 0
        else:
            assert backend_metrics.intx_signals > 0


def test_our_rng_driver_over_vfio_user_and_a_second_connection() -> None:
    with served(RngDevice()) as server:
        for _ in range(2):  # the function is reset between clients
            with VfioUserBus(str(server.socket_path)) as bus:
                enumerate_pci(bus, route_interrupts=False)
                t = open_virtio_pci(bus, BDF)
                drv = RngDriver(t)
                drv.initialize()
                try:
                    assert len(drv.read(32, timeout=5)) == 32
                finally:
                    drv.close()
                    t.close()
        deadline = 50
        while server.connections < 2 or server.backend is not None:
            threading.Event().wait(0.02)
            deadline -= 1
            assert deadline
        assert server.mem.regions == ()  # the last client's RAM is unmapped


def test_dma_unmap_under_live_rings_parks_the_queue_until_the_ram_comes_back() -> None:
    """vfio-user.rst DMA_UNMAP: "the server must release all references to that DMA
    region before replying". QEMU unmaps and maps guest RAM again when the guest
    changes its memory layout (SeaBIOS does, with its virtio-blk queue live)."""
    backend = MemoryBackend(1 << 20)
    with served(BlkDevice(backend)) as server, VfioUserBus(str(server.socket_path)) as bus:
        enumerate_pci(bus, route_interrupts=False)
        t = open_virtio_pci(bus, BDF)
        drv = BlkDriver(t)
        drv.initialize()
        try:
            drv.write(0, b"a" * 512)
            bus.dma_unmap()
            assert server.backend is not None
            assert server.backend.parked_queues == [0]
            assert server.mem.regions == ()
            bus.dma_map()
            assert server.backend.parked_queues == []
            drv.write(1, b"b" * 512)  # the ring carries on where it was
            assert drv.read(0, 1024) == b"a" * 512 + b"b" * 512
        finally:
            drv.close()
            t.close()
