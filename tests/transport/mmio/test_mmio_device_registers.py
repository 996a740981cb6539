"""Register-table and negative tests of the device-side virtio-mmio model.

Every register of virtio-v1.2 §4.2.2 (version 2) and §4.2.4 (legacy version 1) is
checked for offset, width, direction and reset value; misuse is answered as the spec
says and never raises. Negative tests are named after the MUST they check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtio.devices.blk import BlkDevice, MemoryBackend
from pyvirtio.devices.rng import RngDevice
from pyvirtio.spec.blk import SECTOR_SIZE
from pyvirtio.spec.features import Feature
from pyvirtio.spec.status import DeviceStatus as S
from pyvirtio.transport.inprocess_bus import InProcessBus
from pyvirtio.transport.mmio.device import VirtioMmioDevice
from pyvirtio.transport.mmio.spec import (
    MMIO_V1_REGISTERS,
    MMIO_V2_REGISTERS,
    VIRTIO_MMIO_CONFIG,
    MmioReg,
    MmioRegister,
)
from pyvirtio.transport.pci.spec import legacy_vring_addresses

DISK = 64 * SECTOR_SIZE

#: <linux/virtio_mmio.h> offsets (the same as the spec's tables)
LINUX = {
    "MagicValue": 0x000,
    "Version": 0x004,
    "DeviceID": 0x008,
    "VendorID": 0x00C,
    "DeviceFeatures": 0x010,
    "HostFeatures": 0x010,
    "DeviceFeaturesSel": 0x014,
    "HostFeaturesSel": 0x014,
    "DriverFeatures": 0x020,
    "GuestFeatures": 0x020,
    "DriverFeaturesSel": 0x024,
    "GuestFeaturesSel": 0x024,
    "GuestPageSize": 0x028,
    "QueueSel": 0x030,
    "QueueSizeMax": 0x034,
    "QueueSize": 0x038,
    "QueueAlign": 0x03C,
    "QueuePFN": 0x040,
    "QueueReady": 0x044,
    "QueueNotify": 0x050,
    "InterruptStatus": 0x060,
    "InterruptACK": 0x064,
    "Status": 0x070,
    "QueueDescLow": 0x080,
    "QueueDescHigh": 0x084,
    "QueueDriverLow": 0x090,
    "QueueDriverHigh": 0x094,
    "QueueDeviceLow": 0x0A0,
    "QueueDeviceHigh": 0x0A4,
    "SHMSel": 0x0AC,
    "SHMLenLow": 0x0B0,
    "SHMLenHigh": 0x0B4,
    "SHMBaseLow": 0x0B8,
    "SHMBaseHigh": 0x0BC,
    "QueueReset": 0x0C0,
    "ConfigGeneration": 0x0FC,
}


@dataclass
class Win:
    bus: InProcessBus
    model: VirtioMmioDevice
    base: int

    def r(self, off: int, size: int = 4) -> int:
        return self.bus.mmio_read(self.base + off, size)

    def w(self, off: int, value: int, size: int = 4) -> None:
        self.bus.mmio_write(self.base + off, size, value)

    @property
    def violations(self) -> int:
        return self.model.state.violation_count

    def last(self) -> str:
        return str(self.model.state.violations[-1])


@pytest.fixture
def win() -> Iterator[Callable[..., Win]]:
    made: list[InProcessBus] = []

    def make(version: int = 2, device: object = None) -> Win:
        bus = InProcessBus(16 << 20)
        made.append(bus)
        dev = device if device is not None else BlkDevice(MemoryBackend(DISK))
        model = VirtioMmioDevice(dev, version=version)  # type: ignore[arg-type]
        slot = bus.add_mmio(model)
        return Win(bus, model, slot.base)

    yield make
    for b in made:
        b.close()


def negotiate(w: Win, extra: int = 0) -> None:
    w.w(MmioReg.STATUS, 0)
    w.w(MmioReg.STATUS, S.ACKNOWLEDGE | S.DRIVER)
    want = (Feature.VERSION_1.mask if w.model.version == 2 else 0) | extra
    for sel in range(2):
        w.w(MmioReg.DRIVER_FEATURES_SEL, sel)
        w.w(MmioReg.DRIVER_FEATURES, want >> 32 * sel & 0xFFFFFFFF)
    if w.model.version == 2:
        w.w(MmioReg.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)


def place_queue(w: Win, size: int = 16, base: int = 0x10000) -> None:
    w.w(MmioReg.QUEUE_SEL, 0)
    w.w(MmioReg.QUEUE_NUM, size)
    for lo, addr in (
        (MmioReg.QUEUE_DESC_LOW, base),
        (MmioReg.QUEUE_DRIVER_LOW, base + 0x1000),
        (MmioReg.QUEUE_DEVICE_LOW, base + 0x2000),
    ):
        w.w(lo, addr & 0xFFFFFFFF)
        w.w(lo + 4, addr >> 32)


# -- the register tables -------------------------------------------------------------------------


@pytest.mark.parametrize("table", [MMIO_V2_REGISTERS, MMIO_V1_REGISTERS], ids=["v2", "v1"])
def test_offsets_match_the_spec_tables(table: tuple[MmioRegister, ...]) -> None:
    for reg in table:
        assert reg.offset == LINUX[reg.name], reg.name
        assert reg.access in ("R", "W", "RW")
    assert VIRTIO_MMIO_CONFIG == 0x100


@pytest.mark.parametrize(
    ("version", "reg"),
    [pytest.param(2, g, id=f"v2-{g.name}") for g in MMIO_V2_REGISTERS]
    + [pytest.param(1, g, id=f"v1-{g.name}") for g in MMIO_V1_REGISTERS],
)
def test_register_direction_and_reset_value(
    win: Callable[..., Win], version: int, reg: MmioRegister
) -> None:
    w = win(version)
    w.w(MmioReg.STATUS, 0)
    n = w.violations
    if "R" in reg.access:
        value = w.r(reg.offset)
        if reg.reset is not None:
            assert value == reg.reset
        assert w.violations == n
        assert w.r(reg.offset, 2) == 0  # 32-bit accesses only
        assert w.violations == n + 1
    else:
        # "MUST NOT read from the write-only registers": reads 0, logged
        assert w.r(reg.offset) == 0
        assert w.violations == n + 1
    n = w.violations
    if "W" not in reg.access:
        before = w.r(reg.offset)
        w.w(reg.offset, 0x5A5A5A5A)
        # "MUST NOT write to the read-only registers": ignored, logged
        assert w.r(reg.offset) == before
        assert w.violations == n + 1


@pytest.mark.parametrize("version", [2, 1])
def test_undefined_offsets_read_zero(win: Callable[..., Win], version: int) -> None:
    w = win(version)
    v2_only = [0x044, 0x080, 0x0AC, 0x0C0, 0x0FC]
    v1_only = [0x028, 0x03C, 0x040]
    holes = [0x018, 0x02C, 0x048, 0x054, 0x068, 0x0C4, 0x0F8]
    for off in holes + (v2_only if version == 1 else v1_only):
        n = w.violations
        assert w.r(off) == 0
        w.w(off, 0xFFFFFFFF)
        assert w.violations == n + 2, hex(off)
    assert "4.2.2.2" in w.last()


def test_identity_and_features(win: Callable[..., Win]) -> None:
    w = win(2)
    assert w.r(MmioReg.DEVICE_ID) == 2
    words = []
    for sel in range(3):
        w.w(MmioReg.DEVICE_FEATURES_SEL, sel)
        words.append(w.r(MmioReg.DEVICE_FEATURES))
    offered = words[0] | words[1] << 32
    assert offered == w.model.state.device_features
    assert offered >> Feature.VERSION_1 & 1 and offered >> Feature.RING_RESET & 1
    assert offered >> Feature.NOTIFICATION_DATA & 1  # implemented end to end (v2)
    assert not offered >> Feature.NOTIF_CONFIG_DATA & 1
    assert words[2] == 0
    legacy = win(1, RngDevice())
    assert legacy.r(MmioReg.DEVICE_ID) == 4
    legacy.w(MmioReg.DEVICE_FEATURES_SEL, 1)
    assert legacy.r(MmioReg.DEVICE_FEATURES) == 0  # no VERSION_1 through v1


def test_shared_memory_regions_read_as_absent(win: Callable[..., Win]) -> None:
    """§4.2.2: "Reading from a non-existent region ... results in a length of -1" and
    "a base address of 0xffffffffffffffff"."""
    w = win(2)
    for sel in (0, 1, 255):
        w.w(MmioReg.SHM_SEL, sel)
        assert w.r(MmioReg.SHM_LEN_LOW) == w.r(MmioReg.SHM_LEN_HIGH) == 0xFFFFFFFF
        assert w.r(MmioReg.SHM_BASE_LOW) == w.r(MmioReg.SHM_BASE_HIGH) == 0xFFFFFFFF


def test_config_space_any_width_and_generation(win: Callable[..., Win]) -> None:
    w = win(2)
    capacity = DISK // SECTOR_SIZE
    assert w.r(VIRTIO_MMIO_CONFIG, 4) == capacity
    assert w.r(VIRTIO_MMIO_CONFIG, 1) == capacity & 0xFF
    assert w.r(VIRTIO_MMIO_CONFIG, 8) == capacity
    gen = w.r(MmioReg.CONFIG_GENERATION)
    w.model.device.config_changed()
    assert w.r(MmioReg.CONFIG_GENERATION) == gen + 1


def test_queue_registers_v2(win: Callable[..., Win]) -> None:
    w = win(2)
    negotiate(w)
    assert w.r(MmioReg.QUEUE_NUM_MAX) == 256
    place_queue(w, size=64, base=0x1_0000_0000 + 0x20000)
    addrs = w.model.state.queue_addresses(0)
    assert (addrs.desc, addrs.driver, addrs.device) == (0x100020000, 0x100021000, 0x100022000)
    assert w.model.state.queue_size(0) == 64
    assert w.r(MmioReg.QUEUE_READY) == 0
    assert not w.violations


def test_queue_registers_v1(win: Callable[..., Win]) -> None:
    w = win(1)
    negotiate(w)
    w.w(MmioReg.GUEST_PAGE_SIZE, 0x1000)
    w.w(MmioReg.QUEUE_SEL, 0)
    assert w.r(MmioReg.QUEUE_PFN) == 0
    w.w(MmioReg.QUEUE_NUM, 32)
    w.w(MmioReg.QUEUE_ALIGN, 0x100)
    w.w(MmioReg.QUEUE_PFN, 0x30)
    assert w.r(MmioReg.QUEUE_PFN) == 0x30
    assert w.model.state.queue_addresses(0) == legacy_vring_addresses(0x30000, 32, 0x100)
    w.w(MmioReg.QUEUE_PFN, 0)  # "When the driver stops using the queue it writes zero"
    assert w.r(MmioReg.QUEUE_PFN) == 0 and not w.model.state.queue_enabled(0)
    assert not w.violations


def test_reset_clears_interrupt_status_and_queue_ready(win: Callable[..., Win]) -> None:
    """§4.2.2.1: "Upon reset, the device MUST clear all bits in InterruptStatus and
    ready bits in the QueueReady register for all queues in the device"."""
    w = win(2)
    negotiate(w)
    place_queue(w)
    w.w(MmioReg.QUEUE_READY, 1)
    w.w(MmioReg.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    w.model.device.config_changed()
    assert w.r(MmioReg.INTERRUPT_STATUS) == 2
    w.w(MmioReg.STATUS, 0)
    assert w.r(MmioReg.STATUS) == 0
    assert w.r(MmioReg.INTERRUPT_STATUS) == 0
    assert w.r(MmioReg.QUEUE_READY) == 0


def test_queue_ready_0_stops_the_queue(win: Callable[..., Win]) -> None:
    """ "The device MUST NOT access virtqueue contents when QueueReady is zero"."""
    w = win(2)
    negotiate(w)
    place_queue(w)
    w.w(MmioReg.QUEUE_READY, 1)
    w.w(MmioReg.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    assert w.model.state.device_queue(0) is not None
    w.w(MmioReg.QUEUE_READY, 0)
    assert w.r(MmioReg.QUEUE_READY) == 0
    assert w.model.state.device_queue(0) is None
    w.w(MmioReg.QUEUE_NOTIFY, 0)
    assert "not ready" in w.last()


def test_queue_reset(win: Callable[..., Win]) -> None:
    w = win(2)
    negotiate(w, Feature.RING_RESET.mask)
    place_queue(w)
    w.w(MmioReg.QUEUE_READY, 1)
    w.w(MmioReg.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    w.w(MmioReg.QUEUE_RESET, 1)
    # "The device MUST present 0 in both QueueReset and QueueReady when queue reset
    # has completed"
    assert w.r(MmioReg.QUEUE_RESET) == 0 and w.r(MmioReg.QUEUE_READY) == 0
    assert w.model.state.queue_addresses(0).desc == 0
    place_queue(w, base=0x40000)
    w.w(MmioReg.QUEUE_READY, 1)
    assert w.model.state.device_queue(0) is not None
    assert not w.violations


# -- negative tests --------------------------------------------------------------------------------


def test_queue_select_out_of_range(win: Callable[..., Win]) -> None:
    w = win(2)
    negotiate(w)
    w.w(MmioReg.QUEUE_SEL, 9)
    assert w.r(MmioReg.QUEUE_NUM_MAX) == 0  # "zero (0x0) if the queue is not available"
    w.w(MmioReg.QUEUE_NUM, 16)
    w.w(MmioReg.QUEUE_READY, 1)
    assert w.r(MmioReg.QUEUE_READY) == 0
    assert "does not exist" in w.last()


def test_driver_must_write_a_queue_size_at_most_queue_size_max(win: Callable[..., Win]) -> None:
    w = win(2)
    negotiate(w)
    place_queue(w, size=1024)
    w.w(MmioReg.QUEUE_READY, 1)
    assert w.r(MmioReg.QUEUE_READY) == 0


def test_split_queue_size_must_be_a_power_of_2(win: Callable[..., Win]) -> None:
    w = win(2)
    negotiate(w)
    place_queue(w, size=48)
    w.w(MmioReg.QUEUE_READY, 1)
    assert w.r(MmioReg.QUEUE_READY) == 0


def test_queue_must_not_be_ready_before_features_ok(win: Callable[..., Win]) -> None:
    w = win(2)
    w.w(MmioReg.STATUS, S.ACKNOWLEDGE | S.DRIVER)
    place_queue(w)
    w.w(MmioReg.QUEUE_READY, 1)
    assert w.r(MmioReg.QUEUE_READY) == 0
    assert "3.1.1" in w.last()


def test_driver_must_not_access_queue_registers_while_ready(win: Callable[..., Win]) -> None:
    """§4.2.2.2: "When QueueReady is not zero, the driver MUST NOT access QueueSize,
    QueueDescLow ...": such writes are ignored."""
    w = win(2)
    negotiate(w)
    place_queue(w)
    w.w(MmioReg.QUEUE_READY, 1)
    w.w(MmioReg.QUEUE_DESC_LOW, 0x90000)
    w.w(MmioReg.QUEUE_NUM, 8)
    assert w.model.state.queue_addresses(0).desc == 0x10000
    assert w.model.state.queue_size(0) == 16


def test_interrupt_ack_must_not_set_undefined_bits(win: Callable[..., Win]) -> None:
    w = win(2)
    w.model.device.config_changed()  # before DRIVER_OK: no notification
    assert w.r(MmioReg.INTERRUPT_STATUS) == 0
    w.w(MmioReg.STATUS, S.ACKNOWLEDGE)
    w.model._on_config()
    w.w(MmioReg.INTERRUPT_ACK, 0xFFFFFFFC)
    assert w.r(MmioReg.INTERRUPT_STATUS) == 2  # defined bits untouched
    assert "undefined" in w.last()
    w.w(MmioReg.INTERRUPT_ACK, 0xFFFFFFFF)
    assert w.r(MmioReg.INTERRUPT_STATUS) == 0


def test_notify_for_a_queue_that_does_not_exist(win: Callable[..., Win]) -> None:
    w = win(2)
    negotiate(w)
    w.w(MmioReg.QUEUE_NOTIFY, 5)
    assert "does not exist" in w.last()
    assert not w.r(MmioReg.STATUS) & S.DEVICE_NEEDS_RESET


def test_config_read_past_the_end_reads_zero(win: Callable[..., Win]) -> None:
    w = win(2)
    size = w.model.state.config_size()
    assert w.r(VIRTIO_MMIO_CONFIG + size, 4) == 0
    assert w.r(VIRTIO_MMIO_CONFIG + 0xFC, 4) == 0
    assert "2.5" in w.last()


def test_legacy_page_size_and_align_must_be_powers_of_2(win: Callable[..., Win]) -> None:
    w = win(1)
    n = w.violations
    w.w(MmioReg.GUEST_PAGE_SIZE, 3000)
    w.w(MmioReg.QUEUE_ALIGN, 100)
    assert w.violations == n + 2
    negotiate(w)
    w.w(MmioReg.QUEUE_NUM, 16)
    w.w(MmioReg.QUEUE_PFN, 0x20)
    # the defaults (4096) still apply
    assert w.model.state.queue_addresses(0) == legacy_vring_addresses(0x20000, 16, 4096)


def test_legacy_queue_pfn_rewrite_while_in_use_is_ignored(win: Callable[..., Win]) -> None:
    w = win(1)
    negotiate(w)
    w.w(MmioReg.QUEUE_NUM, 16)
    w.w(MmioReg.QUEUE_PFN, 0x20)
    w.w(MmioReg.QUEUE_PFN, 0x40)
    assert w.r(MmioReg.QUEUE_PFN) == 0x20
    assert "in use" in w.last()


def test_legacy_features_written_through_an_upper_window(win: Callable[..., Win]) -> None:
    w = win(1)
    w.w(MmioReg.DRIVER_FEATURES_SEL, 1)
    n = w.violations
    w.w(MmioReg.DRIVER_FEATURES, 0)  # what Linux writes: tolerated
    assert w.violations == n
    w.w(MmioReg.DRIVER_FEATURES, 1)
    assert w.violations == n + 1


_access = st.tuples(
    st.integers(0, 0x1FF),
    st.sampled_from([1, 2, 4, 8]),
    st.integers(0, 0xFFFFFFFFFFFFFFFF),
    st.booleans(),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(_access, max_size=60), version=st.sampled_from([1, 2]), live=st.booleans())
def test_random_register_accesses_never_raise(
    win: Callable[..., Win], ops: list[tuple[int, int, int, bool]], version: int, live: bool
) -> None:
    """Garbage register accesses, and garbage in a live ring, never raise."""
    w = win(version)
    if live:
        negotiate(w)
        if version == 2:
            place_queue(w)
            w.w(MmioReg.QUEUE_READY, 1)
        else:
            w.w(MmioReg.QUEUE_NUM, 16)
            w.w(MmioReg.QUEUE_PFN, 0x10)
        w.w(MmioReg.STATUS, w.r(MmioReg.STATUS) | S.DRIVER_OK)
    for off, size, value, write in ops:
        if off >= 0x1C0:  # garbage in the ring, then a notification
            w.bus.mem.write(0x10000 + (value & 0x2FF8), value.to_bytes(8, "little"))
            w.w(MmioReg.QUEUE_NOTIFY, 0)
            continue
        if write:
            w.w(off, value, size)
        else:
            w.r(off, size)
    assert 0 <= w.model.state.status <= 0xFF
