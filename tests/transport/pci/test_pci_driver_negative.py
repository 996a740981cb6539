"""The driver-side virtio-pci transports facing a function that breaks the rules, and
the rules the transports enforce on their own user.

A device that breaks a MUST gets a :class:`DeviceError` (or is ignored where the spec
says the driver ignores it), never a crash or a hang; misuse by the driver's user is
a :class:`DriverError` before anything reaches the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyvirtio.core.driver import RingOptions
from pyvirtio.devices.blk import BlkDevice, MemoryBackend
from pyvirtio.drivers.blk import BlkDriver
from pyvirtio.errors import DeviceError, DriverError
from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.transport.bus import Interrupt
from pyvirtio.transport.inprocess_bus import InProcessBus
from pyvirtio.transport.pci import driver as pci_driver
from pyvirtio.transport.pci.device import VirtioPciFunction
from pyvirtio.transport.pci.driver import (
    VirtioPciLegacyTransport,
    VirtioPciModernTransport,
    open_virtio_pci,
    virtio_capabilities,
)
from pyvirtio.transport.pci.enumerate import bdf, capabilities, enumerate_pci
from pyvirtio.transport.pci.spec import (
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_CAP,
    CommonCfg,
    PciCapId,
    PciCfg,
    PciStatus,
    VirtioPciCapType,
)
from pyvirtio.virtqueue.common import QueueAddresses

RAM = 16 << 20
SECTOR = 512

# -- a configuration-space-only fake PCI bus ----------------------------------------------------


class FakePciBus:
    """Configuration spaces made by hand; BARs with a size mask; nothing behind them."""

    def __init__(self) -> None:
        self.mem = GuestMemory.create(RAM)
        self.allocator = GuestAllocator(1 << 20, RAM - (1 << 20))
        self.cfg: dict[int, bytearray] = {}
        self.bar_masks: dict[tuple[int, int], int] = {}

    def add(self, where: int, vendor: int, device: int, caps: list[tuple[int, bytes]]) -> None:
        """``caps``: (offset, body after id/next) in list order."""
        c = bytearray(256)
        c[0:2] = vendor.to_bytes(2, "little")
        c[2:4] = device.to_bytes(2, "little")
        if caps:
            c[PciCfg.STATUS] = PciStatus.CAP_LIST
            c[PciCfg.CAPABILITY_LIST] = caps[0][0]
        for i, (off, body) in enumerate(caps):
            nxt = caps[i + 1][0] if i + 1 < len(caps) else 0
            c[off + 1] = nxt
            c[off : off + 1] = body[:1]
            c[off + 2 : off + 1 + len(body)] = body[1:]
        self.cfg[where] = c

    def pci_cfg_read(self, where: int, offset: int, size: int) -> int:
        c = self.cfg.get(where)
        if c is None:
            return (1 << (8 * size)) - 1
        return int.from_bytes(c[offset : offset + size], "little")

    def pci_cfg_write(self, where: int, offset: int, size: int, value: int) -> None:
        c = self.cfg.get(where)
        if c is None:
            return
        if 0x10 <= offset < 0x28 and size == 4:
            mask = self.bar_masks.get((where, (offset - 0x10) // 4))
            if mask is None:
                return
            old = int.from_bytes(c[offset : offset + 4], "little")
            value = (value & mask) | (old & ~mask & 0xF)
        c[offset : offset + size] = value.to_bytes(size, "little")

    def mmio_read(self, addr: int, size: int) -> int:
        return 0

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        pass

    def io_read(self, port: int, size: int) -> int:
        return 0

    def io_write(self, port: int, size: int, value: int) -> None:
        pass

    def wait_interrupts(self, timeout: float | None) -> list[Interrupt]:
        return []

    def interrupt_fds(self) -> list[int]:
        return []

    def close(self) -> None:
        self.mem.close()


def vndr_cap(cfg_type: int, bar: int, offset: int, length: int, cap_len: int = 16) -> bytes:
    """Body of a virtio vendor capability (byte 0 = id, the next pointer is filled in)."""
    raw = VIRTIO_PCI_CAP.pack_values(PciCapId.VNDR, 0, cap_len, cfg_type, bar, 0, offset, length)
    return raw[:1] + raw[2:]


@pytest.fixture
def fake() -> Iterator[FakePciBus]:
    bus = FakePciBus()
    yield bus
    bus.close()


def test_capability_list_that_loops_is_walked_once(fake: FakePciBus) -> None:
    fake.add(bdf(0, 3), 0x1AF4, 0x1042, [(0x40, b"\x09"), (0x50, b"\x09")])
    fake.cfg[bdf(0, 3)][0x51] = 0x40  # 0x40 -> 0x50 -> 0x40 -> ...
    assert list(capabilities(fake, bdf(0, 3))) == [(9, 0x40), (9, 0x50)]


def test_capability_pointer_into_the_header_ends_the_walk(fake: FakePciBus) -> None:
    fake.add(bdf(0, 3), 0x1AF4, 0x1042, [(0x40, b"\x11")])
    fake.cfg[bdf(0, 3)][0x41] = 0x10  # points into the BARs
    assert list(capabilities(fake, bdf(0, 3))) == [(0x11, 0x40)]


def test_driver_must_ignore_capability_with_reserved_bar(fake: FakePciBus) -> None:
    # virtio-v1.2 §4.1.4.1: "The driver MUST ignore any vendor-specific capability
    # structure which has a reserved bar value."
    fake.add(
        bdf(0, 3),
        0x1AF4,
        0x1042,
        [
            (0x40, vndr_cap(VirtioPciCapType.COMMON_CFG, 7, 0, 0x38)),
            (0x50, vndr_cap(VirtioPciCapType.COMMON_CFG, 4, 0x1000, 0x38)),
            (0x60, vndr_cap(VirtioPciCapType.ISR_CFG, 4, 0x2000, 1, cap_len=8)),
        ],
    )
    caps = virtio_capabilities(fake, bdf(0, 3))
    common, pos = caps[VirtioPciCapType.COMMON_CFG]
    assert (common.bar, common.offset, pos) == (4, 0x1000, 0x50)
    # a capability shorter than struct virtio_pci_cap is ignored too
    assert VirtioPciCapType.ISR_CFG not in caps


def test_bar_with_a_size_mask_that_is_not_a_power_of_two_is_left_out(fake: FakePciBus) -> None:
    fake.add(bdf(0, 3), 0x1AF4, 0x1042, [])
    fake.bar_masks[(bdf(0, 3), 0)] = 0xFFFF_EFF0  # holes in the mask
    fake.bar_masks[(bdf(0, 3), 1)] = 0xFFFF_F000  # 4 KiB, fine
    (fn,) = enumerate_pci(fake)
    assert 0 not in fn.bars and fn.bars[1].size == 0x1000 and fn.bars[1].address
    assert any("BAR0" in p for p in fn.problems)


def test_bar_larger_than_the_window_is_left_unassigned(fake: FakePciBus) -> None:
    fake.add(bdf(0, 3), 0x1AF4, 0x1042, [])
    fake.bar_masks[(bdf(0, 3), 0)] = 0xC000_0000  # 1 GiB
    (fn,) = enumerate_pci(fake)
    assert fn.bars[0].address is None
    assert any("do not fit" in p for p in fn.problems)


# -- a real function behind a bus that can lie -------------------------------------------------


class LyingBus(InProcessBus):
    """The in-process bus, with MMIO reads of chosen addresses answered by ``lies``."""

    def __init__(self) -> None:
        super().__init__(RAM)
        self.lies: dict[int, Callable[[int], int]] = {}
        self.cfg_lies: dict[tuple[int, int], int] = {}

    def mmio_read(self, addr: int, size: int) -> int:
        value = super().mmio_read(addr, size)
        lie = self.lies.get(addr)
        return lie(value) if lie is not None else value

    def pci_cfg_read(self, where: int, offset: int, size: int) -> int:
        lie = self.cfg_lies.get((where, offset))
        return lie if lie is not None else super().pci_cfg_read(where, offset, size)


@pytest.fixture
def lying() -> Iterator[tuple[LyingBus, int]]:
    bus = LyingBus()
    where = bus.add_pci(VirtioPciFunction(BlkDevice(MemoryBackend(1 << 20)), mode="transitional"))
    enumerate_pci(bus)
    yield bus, where
    bus.close()


def _common_addr(bus: LyingBus, where: int, field: int) -> int:
    t = VirtioPciModernTransport(bus, where)
    addr = t.common.base + field
    t.close()
    return addr


def test_notify_offset_outside_the_notify_structure_is_a_device_error(
    lying: tuple[LyingBus, int],
) -> None:
    # §4.1.4.4.1: "The device MUST ensure that ... cap.length >= queue_notify_off *
    # notify_off_multiplier + 2"
    bus, where = lying
    bus.lies[_common_addr(bus, where, CommonCfg.QUEUE_NOTIFY_OFF)] = lambda v: 0xFFFF
    t = VirtioPciModernTransport(bus, where)
    drv = BlkDriver(t, timeout=1)
    with pytest.raises(DeviceError, match="notify offset"):
        drv.initialize()
    assert t.get_status() & DeviceStatus.FAILED
    t.close()


def test_status_that_never_reads_zero_after_reset_is_a_device_error(
    lying: tuple[LyingBus, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # §4.1.4.3.2: "After writing 0 to device_status, the driver MUST wait for a read of
    # device_status to return 0" - bounded: a device that never does is reported
    bus, where = lying
    monkeypatch.setattr(pci_driver, "RESET_TIMEOUT", 0.05)
    bus.lies[_common_addr(bus, where, CommonCfg.DEVICE_STATUS)] = lambda v: v | 1
    t = VirtioPciModernTransport(bus, where)
    with pytest.raises(DeviceError, match="never read 0"):
        t.reset()
    t.close()


def test_queue_vector_read_back_as_another_vector_is_a_device_error(
    lying: tuple[LyingBus, int],
) -> None:
    bus, where = lying
    bus.lies[_common_addr(bus, where, CommonCfg.QUEUE_MSIX_VECTOR)] = lambda v: 7
    t = VirtioPciModernTransport(bus, where)
    with pytest.raises(DeviceError, match="queue_msix_vector"):
        BlkDriver(t, timeout=1).initialize()
    t.close()


def test_refused_queue_vector_is_recorded_and_the_driver_still_works(
    lying: tuple[LyingBus, int],
) -> None:
    # §4.1.5.1.2.1: a device that cannot map the vector "MUST return
    # VIRTIO_MSI_NO_VECTOR"; the queue then gets no interrupt, the driver polls
    bus, where = lying
    bus.lies[_common_addr(bus, where, CommonCfg.QUEUE_MSIX_VECTOR)] = lambda v: VIRTIO_MSI_NO_VECTOR
    t = VirtioPciModernTransport(bus, where)
    drv = BlkDriver(t, timeout=5)
    drv.initialize()
    assert t._irq is not None and any("refused vector" in p for p in t._irq.problems)
    drv.write(0, b"\x5a" * SECTOR)
    assert drv.read(0, SECTOR) == b"\x5a" * SECTOR
    drv.close()
    t.close()


def test_structure_outside_its_bar_is_a_device_error(lying: tuple[LyingBus, int]) -> None:
    bus, where = lying
    caps = virtio_capabilities(bus, where)
    _, pos = caps[VirtioPciCapType.COMMON_CFG]
    bus.cfg_lies[(where, pos + 8)] = 0x7FFF_0000  # cap.offset far past the BAR's end
    with pytest.raises(DeviceError, match="leaves BAR"):
        VirtioPciModernTransport(bus, where)


def test_common_cfg_shorter_than_the_struct_is_a_device_error(
    lying: tuple[LyingBus, int],
) -> None:
    bus, where = lying
    _, pos = virtio_capabilities(bus, where)[VirtioPciCapType.COMMON_CFG]
    bus.cfg_lies[(where, pos + 12)] = 16  # cap.length
    with pytest.raises(DeviceError, match="common configuration"):
        VirtioPciModernTransport(bus, where)


# -- rules the transports enforce on their user ----------------------------------------------------


@pytest.fixture
def machine() -> Iterator[InProcessBus]:
    bus = InProcessBus(RAM)
    bus.add_pci(VirtioPciFunction(BlkDevice(MemoryBackend(1 << 20)), mode="transitional"))
    enumerate_pci(bus)
    yield bus
    bus.close()


def _bdf(bus: InProcessBus) -> int:
    return next(b for b in bus.pci_functions if b != 0)


def _negotiated(bus: InProcessBus, legacy: bool) -> Any:
    t = open_virtio_pci(bus, _bdf(bus), force_legacy=legacy)
    t.reset()
    t.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
    t.set_driver_features(t.get_device_features() & (0 if legacy else 1 << 32))
    if not legacy:
        t.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK)
    return t


def test_queue_size_above_the_maximum_is_refused(machine: InProcessBus) -> None:
    t = _negotiated(machine, legacy=False)
    qmax = t.queue_max_size(0)
    with pytest.raises(DriverError, match="not in 1"):
        t.setup_queue(0, qmax + 1, QueueAddresses(0x200000, 0x210000, 0x220000))
    with pytest.raises(DriverError, match="not in 1"):
        t.setup_queue(0, 0, QueueAddresses(0x200000, 0x210000, 0x220000))
    assert t.queue_max_size(t.num_queues()) == 0
    with pytest.raises(DriverError, match="does not exist"):
        t.setup_queue(t.num_queues(), 8, QueueAddresses(0x200000, 0x210000, 0x220000))
    t.close()


def test_a_queue_cannot_be_enabled_twice(machine: InProcessBus) -> None:
    t = _negotiated(machine, legacy=False)
    addrs = QueueAddresses(0x200000, 0x210000, 0x220000)
    t.setup_queue(0, 8, addrs)
    with pytest.raises(DriverError, match="already enabled"):
        t.setup_queue(0, 8, addrs)
    t.close()


@pytest.mark.parametrize("legacy", [False, True])
def test_notify_on_a_queue_not_set_up_is_refused(machine: InProcessBus, legacy: bool) -> None:
    t = _negotiated(machine, legacy=legacy)
    with pytest.raises(DriverError, match="not set up"):
        t.notify(0)
    t.close()


def test_legacy_queue_size_is_the_devices(machine: InProcessBus) -> None:
    # legacy: "Queue Size ... R" - the driver cannot choose it
    t = _negotiated(machine, legacy=True)
    assert isinstance(t, VirtioPciLegacyTransport)
    qsize = t.queue_max_size(0)
    addrs = pci_driver.legacy_vring_addresses(0x200000, qsize // 2, 4096)
    with pytest.raises(DriverError, match="fixes the queue size"):
        t.setup_queue(0, qsize // 2, addrs)
    t.close()


def test_legacy_rings_must_be_one_block_aligned_to_4096(machine: InProcessBus) -> None:
    t = _negotiated(machine, legacy=True)
    qsize = t.queue_max_size(0)
    with pytest.raises(DriverError, match="one block"):
        t.setup_queue(0, qsize, QueueAddresses(0x200000, 0x208000, 0x210000))
    good = pci_driver.legacy_vring_addresses(0x200800, qsize, 4096)
    with pytest.raises(DriverError, match="one block"):  # base not page aligned
        t.setup_queue(0, qsize, good)
    t.setup_queue(0, qsize, pci_driver.legacy_vring_addresses(0x200000, qsize, 4096))
    with pytest.raises(DriverError, match="already active"):
        t.setup_queue(0, qsize, pci_driver.legacy_vring_addresses(0x300000, qsize, 4096))
    t.close()


def test_legacy_interface_has_only_32_feature_bits(machine: InProcessBus) -> None:
    t = _negotiated(machine, legacy=True)
    assert t.get_device_features() >> 32 == 0
    with pytest.raises(DriverError, match="legacy interface"):
        t.set_driver_features(1 << 32)
    assert t.config_generation() == 0
    t.close()


def test_blk_driver_over_legacy_rejects_a_smaller_queue_size(machine: InProcessBus) -> None:
    t = open_virtio_pci(machine, _bdf(machine), force_legacy=True)
    drv = BlkDriver(t, ring=RingOptions(queue_size=16), timeout=1)
    with pytest.raises(DriverError, match="fixes the queue size"):
        drv.initialize()
    assert t.get_status() & DeviceStatus.FAILED
    t.close()


def test_msix_capability_running_past_configuration_space_is_a_device_error(
    fake: FakePciBus,
) -> None:
    fake.add(bdf(0, 3), 0x1AF4, 0x1001, [(0xF8, b"\x11")])
    fake.cfg[bdf(0, 3)][PciCfg.BAR0] = 1  # an I/O BAR (the legacy header)
    fake.bar_masks[(bdf(0, 3), 0)] = 0xFFFF_FFC0
    (fn,) = enumerate_pci(fake)
    assert fn.bars[0].io and fn.bars[0].address == 0xC000
    with pytest.raises(DeviceError, match="past configuration space"):
        VirtioPciLegacyTransport(fake, bdf(0, 3))
