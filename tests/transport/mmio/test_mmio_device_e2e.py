"""The device-side virtio-mmio model driven end to end by pyvirtio drivers.

A minimal, hand-written register-poking transport (virtio-v1.2 §4.2.3 for version 2,
§4.2.4 for the legacy version 1) reaches the model through the in-process bus at
microvm's addresses; BlkDevice and RngDevice run over both versions, split and packed
rings (version 2), indirect and event idx on and off, with the interrupt line and
InterruptStatus/InterruptACK used to complete requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pyvirtio.core.driver import CONFIG_CHANGE, RingOptions, VirtioDriver
from pyvirtio.devices.blk import BlkDevice, MemoryBackend
from pyvirtio.devices.rng import RngDevice
from pyvirtio.drivers.blk import BlkDriver
from pyvirtio.drivers.rng import RngDriver
from pyvirtio.errors import DriverError
from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.spec.blk import SECTOR_SIZE
from pyvirtio.spec.features import Feature
from pyvirtio.spec.status import DeviceStatus as S
from pyvirtio.transport.inprocess_bus import InProcessBus, MmioSlot
from pyvirtio.transport.mmio.device import VirtioMmioDevice
from pyvirtio.transport.mmio.spec import (
    MICROVM_MMIO_BASE,
    MICROVM_MMIO_IRQ_BASE,
    VIRTIO_MMIO_CONFIG,
    VIRTIO_MMIO_MAGIC_VALUE,
    MmioReg,
)
from pyvirtio.transport.pci.spec import legacy_vring_addresses
from pyvirtio.virtqueue.common import QueueAddresses

RAM = 32 << 20
DISK = 128 * SECTOR_SIZE
PAGE = 4096


class PokeMmio:
    """A DriverTransport poking virtio-mmio registers (32-bit accesses)."""

    def __init__(self, bus: InProcessBus, slot: MmioSlot) -> None:
        self.bus = bus
        self.slot = slot
        self.base = slot.base
        self.mem = bus.mem
        self.allocator = GuestAllocator(1 << 20, bus.mem.size - (1 << 20))
        assert self.r(MmioReg.MAGIC_VALUE) == VIRTIO_MMIO_MAGIC_VALUE
        self.version = self.r(MmioReg.VERSION)
        self.legacy = self.version == 1
        if self.legacy:
            self.w(MmioReg.GUEST_PAGE_SIZE, PAGE)
        self.nq = 0
        while self.nq < 64:
            self.w(MmioReg.QUEUE_SEL, self.nq)
            if not self.r(MmioReg.QUEUE_NUM_MAX):
                break
            self.nq += 1

    def r(self, off: int) -> int:
        return self.bus.mmio_read(self.base + off, 4)

    def w(self, off: int, value: int) -> None:
        self.bus.mmio_write(self.base + off, 4, value)

    def device_id(self) -> int:
        return self.r(MmioReg.DEVICE_ID)

    def reset(self) -> None:
        self.w(MmioReg.STATUS, 0)
        assert self.r(MmioReg.STATUS) == 0

    def get_status(self) -> int:
        return self.r(MmioReg.STATUS)

    def set_status(self, status: int) -> None:
        self.w(MmioReg.STATUS, status)

    def get_device_features(self) -> int:
        f = 0
        for sel in range(2):
            self.w(MmioReg.DEVICE_FEATURES_SEL, sel)
            f |= self.r(MmioReg.DEVICE_FEATURES) << 32 * sel
        return f

    def set_driver_features(self, features: int) -> None:
        for sel in (1, 0):  # the order Linux uses (upper word first)
            self.w(MmioReg.DRIVER_FEATURES_SEL, sel)
            self.w(MmioReg.DRIVER_FEATURES, features >> 32 * sel & 0xFFFFFFFF)

    def config_generation(self) -> int:
        return 0 if self.legacy else self.r(MmioReg.CONFIG_GENERATION)

    def read_config(self, offset: int, size: int) -> bytes:
        base = self.base + VIRTIO_MMIO_CONFIG + offset
        return bytes(self.bus.mmio_read(base + i, 1) for i in range(size))

    def write_config(self, offset: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.bus.mmio_write(self.base + VIRTIO_MMIO_CONFIG + offset + i, 1, b)

    def num_queues(self) -> int:
        return self.nq

    def queue_max_size(self, index: int) -> int:
        self.w(MmioReg.QUEUE_SEL, index)
        return self.r(MmioReg.QUEUE_NUM_MAX)

    def setup_queue(self, index: int, size: int, addrs: QueueAddresses) -> None:
        self.w(MmioReg.QUEUE_SEL, index)
        if self.legacy:
            assert self.r(MmioReg.QUEUE_PFN) == 0
            assert addrs == legacy_vring_addresses(addrs.desc, size, PAGE)
            self.w(MmioReg.QUEUE_NUM, size)
            self.w(MmioReg.QUEUE_ALIGN, PAGE)
            self.w(MmioReg.QUEUE_PFN, addrs.desc // PAGE)
            if self.r(MmioReg.QUEUE_PFN) != addrs.desc // PAGE:
                raise DriverError(f"queue {index} was not accepted")
            return
        assert self.r(MmioReg.QUEUE_READY) == 0
        self.w(MmioReg.QUEUE_NUM, size)
        for lo, val in (
            (MmioReg.QUEUE_DESC_LOW, addrs.desc),
            (MmioReg.QUEUE_DRIVER_LOW, addrs.driver),
            (MmioReg.QUEUE_DEVICE_LOW, addrs.device),
        ):
            self.w(lo, val & 0xFFFFFFFF)
            self.w(lo + 4, val >> 32)
        self.w(MmioReg.QUEUE_READY, 1)
        if self.r(MmioReg.QUEUE_READY) != 1:
            raise DriverError(f"queue {index} was not enabled")

    def notify(self, index: int) -> None:
        self.w(MmioReg.QUEUE_NOTIFY, index)

    def poll_interrupts(self, timeout: float | None) -> set[int]:
        fired: set[int] = set()
        for irq in self.bus.wait_interrupts(timeout):
            assert irq.kind == "intx" and irq.line == self.slot.irq
            status = self.r(MmioReg.INTERRUPT_STATUS)
            self.w(MmioReg.INTERRUPT_ACK, status)
            if status & 1:
                fired.update(range(self.nq))
            if status & 2:
                fired.add(CONFIG_CHANGE)
        return fired

    def interrupt_fds(self) -> list[int]:
        return self.bus.interrupt_fds()

    def close(self) -> None:
        pass


@pytest.fixture
def machine() -> Iterator[Any]:
    buses: list[InProcessBus] = []
    drivers: list[VirtioDriver] = []

    def make(
        device: Any, driver_cls: type[VirtioDriver], *, version: int = 2, **kw: Any
    ) -> tuple[Any, VirtioMmioDevice, InProcessBus]:
        bus = InProcessBus(RAM)
        buses.append(bus)
        model = VirtioMmioDevice(device, version=version)
        slot = bus.add_mmio(model)
        drv = driver_cls(PokeMmio(bus, slot), **kw)
        drv.initialize()
        drivers.append(drv)
        return drv, model, bus

    yield make
    for d in drivers:
        d.close()
    for b in buses:
        b.close()


RINGS = [
    pytest.param(2, {"packed": False}, id="v2-split"),
    pytest.param(2, {"packed": True}, id="v2-packed"),
    pytest.param(2, {"packed": False, "indirect": False, "event_idx": False}, id="v2-split-plain"),
    pytest.param(2, {"packed": True, "indirect": False, "event_idx": False}, id="v2-packed-plain"),
    pytest.param(1, {"packed": False}, id="v1-split"),
    pytest.param(1, {"packed": False, "indirect": False, "event_idx": False}, id="v1-plain"),
]


@pytest.mark.parametrize(("version", "ring"), RINGS)
def test_blk_over_mmio(machine: Any, version: int, ring: dict[str, Any]) -> None:
    backend = MemoryBackend(DISK)
    drv, model, bus = machine(
        BlkDevice(backend), BlkDriver, version=version, ring=RingOptions(**ring)
    )
    assert bus.mmio_slots[0].base == MICROVM_MMIO_BASE
    assert bus.mmio_slots[0].irq == MICROVM_MMIO_IRQ_BASE
    assert drv.has_feature(Feature.VERSION_1) == (version == 2)
    assert drv.has_feature(Feature.RING_PACKED) == bool(ring.get("packed"))
    data = bytes(range(256)) * 4
    before = bus.interrupt_count
    drv.write(5, data)
    drv.flush()
    assert drv.read(5, len(data)) == data
    assert backend.data[5 * SECTOR_SIZE : 5 * SECTOR_SIZE + len(data)] == data
    assert bus.interrupt_count > before
    status = S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK | (S.FEATURES_OK if version == 2 else 0)
    assert model.state.status == status
    assert not model.state.violations, list(model.state.violations)


@pytest.mark.parametrize("version", [2, 1])
def test_rng_over_mmio(machine: Any, version: int) -> None:
    drv, model, _bus = machine(RngDevice(), RngDriver, version=version)
    got = drv.read(48, timeout=5)
    assert len(got) == 48 and got != bytes(48)
    assert not model.state.violations, list(model.state.violations)


def test_interrupt_status_until_acknowledged(machine: Any) -> None:
    """§4.2.2.1: the device presents each event in InterruptStatus "until the driver
    acknowledges the interrupt by writing a corresponding bit mask to the
    InterruptACK register"."""
    dev = BlkDevice(MemoryBackend(DISK))
    drv, _model, bus = machine(dev, BlkDriver, ring=RingOptions(event_idx=False))
    bus.wait_interrupts(0)
    drv.submit_read(0, SECTOR_SIZE)
    assert bus.wait_interrupts(5)
    poke = drv.transport
    assert poke.r(MmioReg.INTERRUPT_STATUS) == 1
    assert poke.r(MmioReg.INTERRUPT_STATUS) == 1  # reading does not clear
    dev.config_changed()
    assert poke.r(MmioReg.INTERRUPT_STATUS) == 3
    poke.w(MmioReg.INTERRUPT_ACK, 1)
    assert poke.r(MmioReg.INTERRUPT_STATUS) == 2
    poke.w(MmioReg.INTERRUPT_ACK, 2)
    assert poke.r(MmioReg.INTERRUPT_STATUS) == 0
    drv.poll()


def test_config_change_over_mmio(machine: Any) -> None:
    dev = BlkDevice(MemoryBackend(DISK))
    drv, _model, _bus = machine(dev, BlkDriver)
    gen = drv.transport.config_generation()
    dev.config_changed()
    assert CONFIG_CHANGE in drv.transport.poll_interrupts(5)
    assert drv.transport.config_generation() != gen


def test_two_mmio_devices_each_with_its_window_and_line() -> None:
    with InProcessBus(RAM) as bus:
        a = bus.add_mmio(VirtioMmioDevice(RngDevice()))
        b = bus.add_mmio(VirtioMmioDevice(BlkDevice(MemoryBackend(DISK))))
        assert b.base == a.base + 0x200 and b.irq == a.irq + 1
        assert bus.mmio_read(a.base + MmioReg.DEVICE_ID, 4) == 4
        assert bus.mmio_read(b.base + MmioReg.DEVICE_ID, 4) == 2


@pytest.mark.parametrize(
    ("version", "packed"),
    [(2, False), (2, True), (1, False)],  # no packed ring through the legacy interface
    ids=["v2-split", "v2-packed", "v1-split"],
)
def test_blk_and_rng_under_pyvirtio_mmio_transport(version: int, packed: bool) -> None:
    mod = pytest.importorskip("pyvirtio.transport.mmio.driver")
    with InProcessBus(RAM) as bus:
        backend = MemoryBackend(DISK)
        blk_m = VirtioMmioDevice(BlkDevice(backend), version=version)
        rng_m = VirtioMmioDevice(RngDevice(), version=version)
        blk_s, rng_s = bus.add_mmio(blk_m), bus.add_mmio(rng_m)
        blk_t = mod.VirtioMmioTransport(bus, blk_s.base, irq=blk_s.irq)
        rng_t = mod.VirtioMmioTransport(bus, rng_s.base, irq=rng_s.irq)
        blk = BlkDriver(blk_t, ring=RingOptions(packed=packed))
        rng = RngDriver(rng_t)
        blk.initialize()
        rng.initialize()
        data = bytes(range(256)) * 2
        blk.write(9, data)
        blk.flush()
        assert blk.read(9, len(data)) == data
        assert backend.data[9 * SECTOR_SIZE : 9 * SECTOR_SIZE + len(data)] == data
        assert len(rng.read(32, timeout=5)) == 32
        assert not blk_m.state.violations, list(blk_m.state.violations)
        assert not rng_m.state.violations, list(rng_m.state.violations)
        for d, t in ((blk, blk_t), (rng, rng_t)):
            d.close()
            t.close()
