"""The driver-side virtio-mmio transport (version 2 and legacy version 1) driving
pyvirtio's own device-side MMIO models on the in-process bus, plus its negative
cases (a window without a device, misuse by its user, a device that never resets).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyvirtio.core.driver import CONFIG_CHANGE, RingOptions
from pyvirtio.devices.blk import BlkDevice, MemoryBackend
from pyvirtio.devices.rng import RngDevice
from pyvirtio.drivers.blk import BlkDriver
from pyvirtio.drivers.rng import RngDriver
from pyvirtio.errors import ConfigurationError, DeviceError, DriverError
from pyvirtio.spec.blk import SECTOR_SIZE
from pyvirtio.spec.features import Feature, has
from pyvirtio.spec.ids import DeviceId
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.transport.inprocess_bus import InProcessBus, MmioSlot
from pyvirtio.transport.mmio import driver as mmio_driver
from pyvirtio.transport.mmio.device import VirtioMmioDevice
from pyvirtio.transport.mmio.driver import VirtioMmioTransport, find_mmio_devices, microvm_irq
from pyvirtio.transport.mmio.spec import MICROVM_MMIO_BASE, MmioReg
from pyvirtio.transport.pci.spec import legacy_vring_addresses
from pyvirtio.virtqueue import make_driver_queue
from pyvirtio.virtqueue.common import QueueAddresses

RAM = 16 << 20
DISK = 1 << 20


class Machine:
    def __init__(self, bus: InProcessBus) -> None:
        self.bus = bus
        self.transports: list[VirtioMmioTransport] = []

    def add(self, model: VirtioMmioDevice) -> MmioSlot:
        return self.bus.add_mmio(model)

    def open(self, slot: MmioSlot, irq: bool = True) -> VirtioMmioTransport:
        t = VirtioMmioTransport(self.bus, slot.base, irq=slot.irq if irq else None)
        self.transports.append(t)
        return t


@pytest.fixture
def machine() -> Iterator[Machine]:
    m = Machine(InProcessBus(RAM))
    yield m
    for t in m.transports:
        t.close()
    m.bus.close()


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 29 + seed + (i >> 9)) & 0xFF for i in range(n))


# (version, packed, indirect, event_idx)
COMBOS = [
    (2, False, True, True),
    (2, True, True, False),
    (2, True, False, True),
    (2, False, False, False),
    (1, False, True, True),
    (1, False, False, False),
]


def _ids(c: tuple[Any, ...]) -> str:
    v, packed, ind, ev = c
    return f"v{v}-{'packed' if packed else 'split'}-{'ind' if ind else 'noind'}-" + (
        "evidx" if ev else "noevidx"
    )


@pytest.mark.parametrize("combo", COMBOS, ids=_ids)
def test_blk_driver_over_mmio(machine: Machine, combo: tuple[Any, ...]) -> None:
    version, packed, indirect, event_idx = combo
    backend = MemoryBackend(DISK)
    model = VirtioMmioDevice(BlkDevice(backend), version=version)
    t = machine.open(machine.add(model))
    assert t.version == version and t.legacy is (version == 1)
    assert t.device_id() == DeviceId.BLOCK
    drv = BlkDriver(
        t, ring=RingOptions(packed=packed, indirect=indirect, event_idx=event_idx), timeout=5
    )
    drv.initialize()
    assert has(drv.features, Feature.RING_PACKED) is packed
    assert has(drv.features, Feature.VERSION_1) is (version == 2)
    # the first completion is announced on the interrupt line
    req = drv.submit_read(0, SECTOR_SIZE)
    assert t.poll_interrupts(5.0) == {0}
    assert t.interrupts == 1 and t.interrupt_counts == {0: 1}
    drv.complete([req])
    data = _pattern(40 * SECTOR_SIZE, version)
    drv.write(7, data)
    drv.flush()
    assert drv.read(7, len(data)) == data
    assert bytes(backend.data[7 * SECTOR_SIZE : 7 * SECTOR_SIZE + len(data)]) == data
    drv.close()
    # the driver used only what the register layout allows
    assert list(model.state.violations) == []


@pytest.mark.parametrize("version", [2, 1])
def test_rng_driver_over_mmio(machine: Machine, version: int) -> None:
    model = VirtioMmioDevice(RngDevice(), version=version)
    t = machine.open(machine.add(model))
    drv = RngDriver(t, buffer_size=512)
    drv.initialize()
    data = drv.read(4000)
    assert len(data) == 4000 and len(set(data)) > 200
    assert 0 in t.poll_interrupts(0) or t.interrupts > 0
    drv.close()
    assert list(model.state.violations) == []


def test_without_an_interrupt_line_the_driver_polls(machine: Machine) -> None:
    backend = MemoryBackend(DISK)
    t = machine.open(machine.add(VirtioMmioDevice(BlkDevice(backend))), irq=False)
    drv = BlkDriver(t, timeout=5)
    drv.initialize()
    drv.write(0, b"\x77" * SECTOR_SIZE)
    assert drv.read(0, SECTOR_SIZE) == b"\x77" * SECTOR_SIZE
    assert t.interrupts == 0
    drv.close()


@pytest.mark.parametrize("version", [2, 1])
def test_configuration_change_is_reported_and_acknowledged(machine: Machine, version: int) -> None:
    model = VirtioMmioDevice(BlkDevice(MemoryBackend(DISK)), version=version)
    t = machine.open(machine.add(model))
    drv = BlkDriver(t, timeout=5)
    drv.initialize()
    model.device.config_changed()
    assert t.poll_interrupts(5.0) == {CONFIG_CHANGE}
    # acknowledged: InterruptStatus is clear again
    assert model.interrupt_status == 0
    drv.close()


def test_two_devices_keep_their_interrupts_apart(machine: Machine) -> None:
    ta = machine.open(machine.add(VirtioMmioDevice(BlkDevice(MemoryBackend(DISK)))))
    tb = machine.open(machine.add(VirtioMmioDevice(BlkDevice(MemoryBackend(DISK)), version=1)))
    da, db = BlkDriver(ta, timeout=5), BlkDriver(tb, timeout=5)
    da.initialize()
    db.initialize()
    req = db.submit_read(0, SECTOR_SIZE)
    assert tb.poll_interrupts(5.0) == {0}
    assert ta.poll_interrupts(0) == set()
    db.complete([req])
    da.close()
    db.close()


def test_find_mmio_devices_and_microvm_lines(machine: Machine) -> None:
    machine.add(VirtioMmioDevice(BlkDevice(MemoryBackend(DISK))))
    machine.add(VirtioMmioDevice(RngDevice(), version=1))
    found = find_mmio_devices(machine.bus)
    assert found == [
        (0, MICROVM_MMIO_BASE, DeviceId.BLOCK),
        (1, MICROVM_MMIO_BASE + 0x200, DeviceId.ENTROPY),
    ]
    # the in-process bus wires slot n like microvm without ACPI
    assert [s.irq for s in machine.bus.mmio_slots] == [microvm_irq(0, acpi=False), 6]
    assert microvm_irq(7) == 23
    with pytest.raises(ConfigurationError):
        microvm_irq(8)


def test_shared_memory_regions_read_as_absent(machine: Machine) -> None:
    t2 = machine.open(machine.add(VirtioMmioDevice(RngDevice())))
    t1 = machine.open(machine.add(VirtioMmioDevice(RngDevice(), version=1)))
    assert t2.shm_region(0) is None and t2.shm_region(5) is None
    assert t1.shm_region(0) is None


def test_queue_reset_and_setup_again(machine: Machine) -> None:
    class RingResetBlkDriver(BlkDriver):
        def ring_features(self, offered: int) -> int:
            return super().ring_features(offered) | (offered & Feature.RING_RESET.mask)

    backend = MemoryBackend(DISK)
    model = VirtioMmioDevice(BlkDevice(backend), ring_reset=True)
    t = machine.open(machine.add(model))
    drv = RingResetBlkDriver(t, timeout=5)
    drv.initialize()
    drv.write(0, b"\x01" * SECTOR_SIZE)
    t.reset_queue(0)
    with pytest.raises(DriverError, match="not set up"):
        t.notify(0)
    old = drv.queues[0]
    old.detach_unused()
    old.close()
    drv.queues[0] = make_driver_queue(t.mem, t.allocator, 32, drv.features)
    t.setup_queue(0, 32, drv.queues[0].addrs)
    drv.write(1, b"\x02" * SECTOR_SIZE)
    assert bytes(backend.data[SECTOR_SIZE : 2 * SECTOR_SIZE]) == b"\x02" * SECTOR_SIZE
    drv.close()
    assert list(model.state.violations) == []


# -- negative -------------------------------------------------------------------------------


def test_a_window_without_a_device_is_refused(machine: Machine) -> None:
    with pytest.raises(ConfigurationError, match="no virtio-mmio device"):
        VirtioMmioTransport(machine.bus, MICROVM_MMIO_BASE)


class LyingBus(InProcessBus):
    def __init__(self) -> None:
        super().__init__(RAM)
        self.lies: dict[int, Callable[[int], int]] = {}

    def mmio_read(self, addr: int, size: int) -> int:
        value = super().mmio_read(addr, size)
        lie = self.lies.get(addr)
        return lie(value) if lie is not None else value


@pytest.fixture
def lying() -> Iterator[tuple[LyingBus, MmioSlot]]:
    bus = LyingBus()
    slot = bus.add_mmio(VirtioMmioDevice(BlkDevice(MemoryBackend(DISK))))
    yield bus, slot
    bus.close()


def test_unknown_version_is_refused(lying: tuple[LyingBus, MmioSlot]) -> None:
    bus, slot = lying
    bus.lies[slot.base + MmioReg.VERSION] = lambda v: 3
    with pytest.raises(ConfigurationError, match="unknown version"):
        VirtioMmioTransport(bus, slot.base)


def test_device_id_zero_means_no_device(lying: tuple[LyingBus, MmioSlot]) -> None:
    # virtio-v1.2 §4.2.3.1.1: "If the device ID is zero (0x0) the driver MUST discard
    # the device and MUST NOT use the device"
    bus, slot = lying
    bus.lies[slot.base + MmioReg.DEVICE_ID] = lambda v: 0
    with pytest.raises(ConfigurationError, match="has no device"):
        VirtioMmioTransport(bus, slot.base)


def test_status_that_never_reads_zero_is_a_device_error(
    lying: tuple[LyingBus, MmioSlot], monkeypatch: pytest.MonkeyPatch
) -> None:
    bus, slot = lying
    monkeypatch.setattr(mmio_driver, "RESET_TIMEOUT", 0.05)
    bus.lies[slot.base + MmioReg.STATUS] = lambda v: v | DeviceStatus.ACKNOWLEDGE
    t = VirtioMmioTransport(bus, slot.base)
    with pytest.raises(DeviceError, match="never read 0"):
        t.reset()


def _negotiate(t: VirtioMmioTransport) -> None:
    t.reset()
    t.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
    t.set_driver_features(0 if t.legacy else Feature.VERSION_1.mask)
    if not t.legacy:
        t.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK)


@pytest.mark.parametrize("version", [2, 1])
def test_queue_size_above_the_maximum_is_refused(machine: Machine, version: int) -> None:
    t = machine.open(machine.add(VirtioMmioDevice(RngDevice(), version=version)))
    _negotiate(t)
    qmax = t.queue_max_size(0)
    addrs = legacy_vring_addresses(0x200000, qmax, 4096)
    with pytest.raises(DriverError, match="not in 1"):
        t.setup_queue(0, qmax + 1, addrs)
    assert t.num_queues() == 1 and t.queue_max_size(1) == 0
    with pytest.raises(DriverError, match="not available"):
        t.setup_queue(1, 8, addrs)


@pytest.mark.parametrize("version", [2, 1])
def test_a_queue_in_use_cannot_be_set_up_again(machine: Machine, version: int) -> None:
    t = machine.open(machine.add(VirtioMmioDevice(RngDevice(), version=version)))
    _negotiate(t)
    t.setup_queue(0, 8, legacy_vring_addresses(0x200000, 8, 4096))
    with pytest.raises(DriverError, match="already in use"):
        t.setup_queue(0, 8, legacy_vring_addresses(0x300000, 8, 4096))


def test_legacy_rings_must_be_one_block_on_a_page(machine: Machine) -> None:
    t = machine.open(machine.add(VirtioMmioDevice(RngDevice(), version=1)))
    _negotiate(t)
    with pytest.raises(DriverError, match="one block"):
        t.setup_queue(0, 8, QueueAddresses(0x200000, 0x204000, 0x208000))
    with pytest.raises(DriverError, match="one block"):
        t.setup_queue(0, 8, legacy_vring_addresses(0x200100, 8, 4096))


def test_notify_on_a_queue_not_set_up_is_refused(machine: Machine) -> None:
    t = machine.open(machine.add(VirtioMmioDevice(RngDevice())))
    _negotiate(t)
    with pytest.raises(DriverError, match="not set up"):
        t.notify(0)


def test_queue_reset_needs_ring_reset_and_version_2(machine: Machine) -> None:
    t2 = machine.open(machine.add(VirtioMmioDevice(RngDevice())))
    _negotiate(t2)
    with pytest.raises(DriverError, match="RING_RESET"):
        t2.reset_queue(0)
    t1 = machine.open(machine.add(VirtioMmioDevice(RngDevice(), version=1)))
    with pytest.raises(DriverError, match="no QueueReset"):
        t1.reset_queue(0)


def test_config_access_outside_the_window_is_refused(machine: Machine) -> None:
    t = machine.open(machine.add(VirtioMmioDevice(BlkDevice(MemoryBackend(DISK)))))
    assert int.from_bytes(t.read_config(0, 8), "little") == DISK // SECTOR_SIZE
    with pytest.raises(ValueError):
        t.read_config(0xF0, 0x20)
    with pytest.raises(ValueError):
        t.write_config(-1, b"\0")
