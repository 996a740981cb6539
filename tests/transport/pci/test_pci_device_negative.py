"""Negative tests of the device-side PCI function: each driver misuse is answered as
the spec says (ignored, NO_VECTOR, zeros, DEVICE_NEEDS_RESET), logged with its clause,
and never raises out of the bus. Tests are named after the MUST they check."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtio.devices.blk import BlkDevice, MemoryBackend
from pyvirtio.spec.blk import SECTOR_SIZE
from pyvirtio.spec.features import Feature
from pyvirtio.spec.status import DeviceStatus as S
from pyvirtio.transport.inprocess_bus import InProcessBus
from pyvirtio.transport.pci.device import VirtioPciFunction
from pyvirtio.transport.pci.spec import (
    MSI_ADDRESS_BASE,
    VIRTIO_MSI_NO_VECTOR,
    CommonCfg,
    LegacyReg,
    VirtioPciCapType,
)
from tests.transport.pci.test_pci_device_e2e import assign_bars, walk_caps
from tests.transport.pci.test_pci_device_registers import Rig

DISK = 64 * SECTOR_SIZE
NOTIFY = 0x3000
DEVCFG = 0x2000


@pytest.fixture
def rig() -> Iterator[Callable[..., Rig]]:
    made: list[InProcessBus] = []

    def make(mode: str = "modern", **kw: object) -> Rig:
        bus = InProcessBus(16 << 20)
        made.append(bus)
        fn = VirtioPciFunction(BlkDevice(MemoryBackend(DISK)), mode=mode, **kw)  # type: ignore[arg-type]
        bdf = bus.add_pci(fn)
        return Rig(bus, fn, bdf, assign_bars(bus, bdf))

    yield make
    for b in made:
        b.close()


def negotiate(r: Rig, extra: int = 0) -> None:
    r.cw(CommonCfg.DEVICE_STATUS, 1, 0)
    r.cw(CommonCfg.DEVICE_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER)
    want = Feature.VERSION_1.mask | extra
    for sel in range(2):
        r.cw(CommonCfg.DRIVER_FEATURE_SELECT, 4, sel)
        r.cw(CommonCfg.DRIVER_FEATURE, 4, want >> 32 * sel & 0xFFFFFFFF)
    r.cw(CommonCfg.DEVICE_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
    assert r.cr(CommonCfg.DEVICE_STATUS, 1) & S.FEATURES_OK


def place_queue(r: Rig, index: int = 0, size: int = 16, base: int = 0x10000) -> None:
    r.cw(CommonCfg.QUEUE_SELECT, 2, index)
    r.cw(CommonCfg.QUEUE_SIZE, 2, size)
    for off, addr in (
        (CommonCfg.QUEUE_DESC, base),
        (CommonCfg.QUEUE_DRIVER, base + 0x1000),
        (CommonCfg.QUEUE_DEVICE, base + 0x2000),
    ):
        r.cw(off, 4, addr & 0xFFFFFFFF)
        r.cw(off + 4, 4, addr >> 32)


def last_clause(r: Rig) -> str:
    return r.fn.state.violations[-1].clause or ""


def test_driver_must_not_write_a_0_to_queue_enable(rig: Callable[..., Rig]) -> None:
    r = rig()
    negotiate(r)
    place_queue(r)
    r.cw(CommonCfg.QUEUE_ENABLE, 2, 1)
    assert r.cr(CommonCfg.QUEUE_ENABLE, 2) == 1
    r.cw(CommonCfg.QUEUE_ENABLE, 2, 0)
    assert r.cr(CommonCfg.QUEUE_ENABLE, 2) == 1  # ignored
    assert "4.1.4.3.2" in last_clause(r)


def test_device_must_present_0_in_queue_size_for_unavailable_queue(
    rig: Callable[..., Rig],
) -> None:
    r = rig()
    negotiate(r)
    r.cw(CommonCfg.QUEUE_SELECT, 2, 7)
    assert r.cr(CommonCfg.QUEUE_SELECT, 2) == 7
    assert r.cr(CommonCfg.QUEUE_SIZE, 2) == 0
    assert r.cr(CommonCfg.QUEUE_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR
    assert r.cr(CommonCfg.QUEUE_ENABLE, 2) == 0
    n = r.fn.state.violation_count
    r.cw(CommonCfg.QUEUE_SIZE, 2, 16)
    r.cw(CommonCfg.QUEUE_DESC, 4, 0x1000)
    r.cw(CommonCfg.QUEUE_ENABLE, 2, 1)
    r.cw(CommonCfg.QUEUE_MSIX_VECTOR, 2, 0)
    assert r.fn.state.violation_count == n + 4
    assert r.cr(CommonCfg.QUEUE_SIZE, 2) == 0 and r.cr(CommonCfg.QUEUE_ENABLE, 2) == 0


def test_driver_must_not_write_a_queue_size_which_is_not_a_power_of_2(
    rig: Callable[..., Rig],
) -> None:
    r = rig()
    negotiate(r)
    place_queue(r, size=100)
    assert r.cr(CommonCfg.QUEUE_SIZE, 2) == 100  # the register keeps what was written
    r.cw(CommonCfg.QUEUE_ENABLE, 2, 1)
    assert r.cr(CommonCfg.QUEUE_ENABLE, 2) == 0  # the device refuses the queue


def test_packed_ring_allows_any_queue_size(rig: Callable[..., Rig]) -> None:
    r = rig()
    negotiate(r, Feature.RING_PACKED.mask)
    place_queue(r, size=100)
    r.cw(CommonCfg.QUEUE_ENABLE, 2, 1)
    assert r.cr(CommonCfg.QUEUE_ENABLE, 2) == 1


def test_queue_size_above_the_maximum_is_refused(rig: Callable[..., Rig]) -> None:
    r = rig()
    negotiate(r)
    place_queue(r, size=512)
    r.cw(CommonCfg.QUEUE_ENABLE, 2, 1)
    assert r.cr(CommonCfg.QUEUE_ENABLE, 2) == 0
    assert any("outside 1..256" in v.message for v in r.fn.state.violations)


def test_queue_must_not_be_enabled_before_features_ok(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.cw(CommonCfg.DEVICE_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER)
    place_queue(r)
    r.cw(CommonCfg.QUEUE_ENABLE, 2, 1)
    assert r.cr(CommonCfg.QUEUE_ENABLE, 2) == 0
    assert "3.1.1" in last_clause(r)


def test_notify_on_a_disabled_queue_is_ignored(rig: Callable[..., Rig]) -> None:
    r = rig()
    negotiate(r)
    r.cw(CommonCfg.DEVICE_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    before = r.fn.device.metrics.requests
    r.cw(NOTIFY, 2, 0)
    assert r.fn.device.metrics.requests == before
    assert "not enabled" in r.fn.state.violations[-1].message
    # a notification at an address that is no queue's, too
    r.cw(NOTIFY + 0x40, 2, 0)
    assert "not a Queue Notify address" in r.fn.state.violations[-1].message
    assert r.cr(CommonCfg.DEVICE_STATUS, 1) & S.DEVICE_NEEDS_RESET == 0


def test_notification_must_be_the_16_bit_queue_index(rig: Callable[..., Rig]) -> None:
    r = rig()
    negotiate(r)
    place_queue(r)
    r.cw(CommonCfg.QUEUE_ENABLE, 2, 1)
    r.cw(CommonCfg.DEVICE_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    r.cw(NOTIFY, 2, 5)
    assert "MUST set the notification value" in r.fn.state.violations[-1].message
    r.cw(NOTIFY, 4, 0)
    assert "MUST be a 16-bit notification" in r.fn.state.violations[-1].message
    assert not r.cr(CommonCfg.DEVICE_STATUS, 1) & S.DEVICE_NEEDS_RESET


def test_config_read_past_the_end_reads_zero(rig: Callable[..., Rig]) -> None:
    r = rig()
    size = r.fn.state.config_size()
    assert r.cr(DEVCFG + size, 4) == 0
    assert r.cr(DEVCFG + 0xFFC, 4) == 0
    assert "2.5" in last_clause(r)
    # the legacy interface: past the end reads zero as well
    t = rig("transitional")
    assert t.lr(20 + size, 4) == 0


def test_driver_must_not_write_configuration_before_features_ok(
    rig: Callable[..., Rig],
) -> None:
    r = rig()
    wce = 32  # virtio_blk_config.writeback
    before = r.cr(DEVCFG + wce, 1)
    r.cw(DEVCFG + wce, 1, before ^ 1)
    assert r.cr(DEVCFG + wce, 1) == before
    assert "3.1.1" in last_clause(r)


def test_mapping_a_vector_outside_the_table_reads_no_vector(rig: Callable[..., Rig]) -> None:
    """§4.1.5.1.2.1: "Devices MUST report mapping failures by returning the NO_VECTOR
    value"; the driver "MUST NOT attempt to map an event to a vector outside the
    MSI-X Table"."""
    r = rig()
    r.cw(CommonCfg.CONFIG_MSIX_VECTOR, 2, 2)  # the table has 2 entries: 0 and 1
    assert r.cr(CommonCfg.CONFIG_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR
    r.cw(CommonCfg.QUEUE_MSIX_VECTOR, 2, 0x7FF)
    assert r.cr(CommonCfg.QUEUE_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR
    assert "4.1.5.1.2" in last_clause(r)
    nomsix = rig(msix_vectors=0)
    nomsix.cw(CommonCfg.QUEUE_MSIX_VECTOR, 2, 0)
    assert nomsix.cr(CommonCfg.QUEUE_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR


def test_queue_reset_resets_the_queue(rig: Callable[..., Rig]) -> None:
    """§4.1.4.3.1: "The device MUST reset the queue when 1 is written to queue_reset
    ... MUST present 0 in both queue_reset and queue_enable when queue reset has
    completed"."""
    r = rig()
    negotiate(r, Feature.RING_RESET.mask)
    place_queue(r, size=16)
    r.cw(CommonCfg.QUEUE_ENABLE, 2, 1)
    r.cw(CommonCfg.DEVICE_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    assert r.fn.state.device_queue(0) is not None
    r.cw(CommonCfg.QUEUE_RESET, 2, 1)
    assert r.cr(CommonCfg.QUEUE_RESET, 2) == 0
    assert r.cr(CommonCfg.QUEUE_ENABLE, 2) == 0
    assert r.cr(CommonCfg.QUEUE_SIZE, 2) == 256  # back to the default
    assert r.cr(CommonCfg.QUEUE_DESC, 4) == 0
    assert r.fn.state.device_queue(0) is None
    place_queue(r, size=32, base=0x40000)
    r.cw(CommonCfg.QUEUE_ENABLE, 2, 1)  # re-enabled while the device is live
    assert r.fn.state.device_queue(0) is not None
    assert r.cr(CommonCfg.QUEUE_RESET, 2) == 0


def test_queue_reset_without_ring_reset_negotiated_is_ignored(rig: Callable[..., Rig]) -> None:
    r = rig()
    negotiate(r)
    place_queue(r)
    r.cw(CommonCfg.QUEUE_ENABLE, 2, 1)
    r.cw(CommonCfg.QUEUE_RESET, 2, 1)
    assert r.cr(CommonCfg.QUEUE_ENABLE, 2) == 1
    assert "2.6.1" in last_clause(r)


def test_driver_must_use_natural_width_accesses(rig: Callable[..., Rig]) -> None:
    """§4.1.3.1: 8-bit fields with 8-bit accesses, 16-bit with 16-bit ...: anything
    else is not a register access (reads 0, writes ignored)."""
    r = rig()
    assert r.cr(CommonCfg.NUM_QUEUES, 4) == 0
    assert r.cr(CommonCfg.DEVICE_STATUS, 2) == 0
    r.cw(CommonCfg.DEVICE_STATUS, 4, S.ACKNOWLEDGE)
    assert r.fn.state.status == 0
    r.cw(CommonCfg.QUEUE_SELECT + 1, 1, 1)
    assert r.cr(CommonCfg.QUEUE_SELECT, 2) == 0
    assert r.cr(0x40, 4) == 0  # past the structure
    assert r.fn.state.violation_count == 5


def test_isr_status_is_read_only(rig: Callable[..., Rig]) -> None:
    r = rig(msix_vectors=0)
    r.cw(0x1000, 1, 3)
    assert r.fn.isr == 0 and not r.fn.intx_asserted


def test_device_reset_unmaps_vectors_and_disables_queues(rig: Callable[..., Rig]) -> None:
    """§4.1.5.1.2.1: "The device MUST have all queue and configuration change events
    ... unmapped upon reset"; §4.1.4.3.1: "MUST present a 0 in queue_enable on reset"."""
    r = rig()
    negotiate(r)
    place_queue(r)
    r.cw(CommonCfg.QUEUE_MSIX_VECTOR, 2, 1)
    r.cw(CommonCfg.CONFIG_MSIX_VECTOR, 2, 0)
    r.cw(CommonCfg.QUEUE_ENABLE, 2, 1)
    r.cw(CommonCfg.DEVICE_FEATURE_SELECT, 4, 1)
    r.cw(CommonCfg.DEVICE_STATUS, 1, 0)
    assert r.cr(CommonCfg.DEVICE_STATUS, 1) == 0
    assert r.cr(CommonCfg.QUEUE_ENABLE, 2) == 0
    assert r.cr(CommonCfg.QUEUE_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR
    assert r.cr(CommonCfg.CONFIG_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR
    assert r.cr(CommonCfg.DEVICE_FEATURE_SELECT, 4) == 0


def test_bad_ring_placement_sets_device_needs_reset(rig: Callable[..., Rig]) -> None:
    r = rig(msix_vectors=0)
    negotiate(r)
    place_queue(r, base=0x7FFF_0000_0000)  # not guest RAM
    r.cw(CommonCfg.QUEUE_ENABLE, 2, 1)
    r.bus.wait_interrupts(0)
    r.cw(CommonCfg.DEVICE_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    assert r.cr(CommonCfg.DEVICE_STATUS, 1) & S.DEVICE_NEEDS_RESET
    # "the device MUST send a device configuration change notification"
    assert [i.kind for i in r.bus.wait_interrupts(0)] == ["intx"]
    assert r.cr(0x1000, 1) & 2


def test_broken_ring_sets_device_needs_reset_with_a_config_interrupt(
    rig: Callable[..., Rig],
) -> None:
    """A driver error found in the ring (here: the available index jumps past the
    queue size) marks the device DEVICE_NEEDS_RESET and sends a configuration change
    notification on config_msix_vector (§2.1.2), never an exception."""
    r = rig()
    cap = next(off for off, cid in walk_caps(r.bus, r.bdf) if cid == 0x11)
    table = r.bars[1]
    r.bus.mmio_write(table, 4, MSI_ADDRESS_BASE)
    r.bus.mmio_write(table + 12, 4, 0)
    r.cfg_w(cap + 2, 2, 0x8000)
    negotiate(r)  # (resets the device: vectors are unmapped, map them after)
    r.cw(CommonCfg.CONFIG_MSIX_VECTOR, 2, 0)
    place_queue(r)
    r.cw(CommonCfg.QUEUE_ENABLE, 2, 1)
    r.cw(CommonCfg.DEVICE_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    r.bus.mem.write_le16(0x11000 + 2, 1000)  # avail.idx
    r.bus.wait_interrupts(0)
    r.cw(NOTIFY, 2, 0)
    assert r.cr(CommonCfg.DEVICE_STATUS, 1) & S.DEVICE_NEEDS_RESET
    assert [(i.kind, i.data) for i in r.bus.wait_interrupts(0)] == [("msi", 0)]


def test_pci_cfg_offset_must_be_a_multiple_of_length(rig: Callable[..., Rig]) -> None:
    r = rig()
    cap = r.caps()[VirtioPciCapType.PCI_CFG]
    r.cfg_w(cap + 4, 1, 4)
    r.cfg_w(cap + 8, 4, CommonCfg.DEVICE_STATUS + 1)
    r.cfg_w(cap + 12, 4, 2)
    r.cfg_w(cap + 16, 2, 0xFFFF)
    assert "4.1.4.8" in last_clause(r)
    # outside every structure: not executed either
    r.cfg_w(cap + 8, 4, 0x3800)
    r.cfg_w(cap + 12, 4, 4)
    r.cfg_w(cap + 16, 4, 0)
    assert "outside every virtio structure" in r.fn.state.violations[-1].message
    r.cfg_w(cap + 4, 1, 9)  # a reserved BAR number
    assert r.cfg(cap + 16, 4) == 0
    assert r.fn.state.status == 0


def test_legacy_queue_address_rewrite_while_in_use_is_ignored(rig: Callable[..., Rig]) -> None:
    r = rig("legacy")
    r.lw(LegacyReg.STATUS, 1, S.ACKNOWLEDGE | S.DRIVER)
    r.lw(LegacyReg.QUEUE_PFN, 4, 0x40)
    r.lw(LegacyReg.QUEUE_PFN, 4, 0x80)
    assert r.lr(LegacyReg.QUEUE_PFN, 4) == 0x40
    r.lw(LegacyReg.QUEUE_NUM, 2, 8)  # read-only
    r.lw(LegacyReg.ISR, 1, 1)  # read-only
    r.lw(LegacyReg.QUEUE_NOTIFY, 2, 9)  # no such queue
    r.lw(LegacyReg.STATUS + 1, 2, 0)  # not a register
    assert r.fn.state.violation_count == 5


def test_transitional_interface_switches_only_at_reset(rig: Callable[..., Rig]) -> None:
    r = rig("transitional")
    negotiate(r)  # modern, live
    r.lr(LegacyReg.HOST_FEATURES, 4)  # the legacy interface while modern is in use
    assert not r.fn.state.legacy
    assert "4.1.4.10" in last_clause(r)
    r.cw(CommonCfg.DEVICE_STATUS, 1, 0)
    r.lw(LegacyReg.STATUS, 1, 0)
    assert r.fn.state.legacy


def test_a_reset_through_the_other_interface_switches_a_live_transitional_device(
    rig: Callable[..., Rig],
) -> None:
    """Firmware (SeaBIOS) left the modern interface live; a legacy driver starts by
    writing 0 to the legacy status register: that reset selects the legacy interface
    and is no violation (Linux 7.3 with force_legacy=1 under QEMU 11.1 vfio-user-pci)."""
    r = rig("transitional")
    negotiate(r)  # modern, live
    before = r.fn.state.violation_count
    r.lw(LegacyReg.STATUS, 1, 0)
    assert r.fn.state.legacy and r.fn.state.status == 0
    assert r.fn.state.violation_count == before
    # and back: a modern reset while the legacy interface is live
    r.lw(LegacyReg.STATUS, 1, S.ACKNOWLEDGE)
    r.cw(CommonCfg.DEVICE_STATUS, 1, 0)
    assert not r.fn.state.legacy and r.fn.state.violation_count == before


def test_features_not_offered_refused_at_features_ok(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.cw(CommonCfg.DEVICE_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER)
    r.cw(CommonCfg.DRIVER_FEATURE_SELECT, 4, 1)
    r.cw(CommonCfg.DRIVER_FEATURE, 4, 1 | 1 << (Feature.NOTIF_CONFIG_DATA - 32))
    r.cw(CommonCfg.DEVICE_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
    assert not r.cr(CommonCfg.DEVICE_STATUS, 1) & S.FEATURES_OK


_access = st.tuples(
    st.sampled_from(["cfg", "mem", "io", "ram", "notify"]),
    st.integers(0, 0x4100),
    st.sampled_from([1, 2, 4, 8]),
    st.integers(0, 0xFFFFFFFFFFFFFFFF),
    st.booleans(),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(_access, max_size=60),
    mode=st.sampled_from(["modern", "transitional"]),
    live=st.booleans(),
    packed=st.booleans(),
)
def test_random_register_accesses_never_raise(
    rig: Callable[..., Rig],
    ops: list[tuple[str, int, int, int, bool]],
    mode: str,
    live: bool,
    packed: bool,
) -> None:
    """Garbage register accesses, and garbage in a live ring, never raise out of the
    bus; the device ends in a defined state."""
    r = rig(mode)
    if live:
        negotiate(r, Feature.RING_PACKED.mask if packed else 0)
        place_queue(r)
        r.cw(CommonCfg.QUEUE_ENABLE, 2, 1)
        r.cw(CommonCfg.DEVICE_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    for space, off, size, value, write in ops:
        if space == "ram":
            r.bus.mem.write(0x10000 + (off & 0x2FF8), value.to_bytes(8, "little"))
        elif space == "notify":
            r.bus.mmio_write(r.bars[4] + NOTIFY, 2, 0)
        elif space == "cfg":
            size = min(size, 4)
            if write:
                r.cfg_w(off & 0xFF, size, value)
            else:
                r.cfg(off & 0xFF, size)
        elif space == "mem":
            base = r.bars[4] if off < 0x4000 else r.bars[1] - 0x4000
            addr = base + off
            if write:
                r.bus.mmio_write(addr, size, value)
            else:
                r.bus.mmio_read(addr, size)
        else:
            size = min(size, 4)
            port = r.bars[0] + (off & 0x7F) if 0 in r.bars else 0xCF8 + (off & 7)
            if write:
                r.bus.io_write(port, size, value)
            else:
                r.bus.io_read(port, size)
    assert 0 <= r.fn.state.status <= 0xFF
