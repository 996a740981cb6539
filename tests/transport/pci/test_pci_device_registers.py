"""Register-table tests of the device-side PCI function model.

Every register is checked against the spec's layout tables: the type 0 header and
ids (virtio-v1.2 §4.1.2), BAR sizing, the capability list (§4.1.4), the common
configuration structure (§4.1.4.3: offset, width, read-only fields, reset value of
each field), the notification, ISR and PCI-configuration-access structures, MSI-X
(table, masking, pending bits) and the legacy I/O header (§4.1.4.10).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from pyvirtio.devices.blk import BlkDevice, MemoryBackend
from pyvirtio.devices.rng import RngDevice
from pyvirtio.spec.blk import SECTOR_SIZE
from pyvirtio.spec.features import Feature
from pyvirtio.spec.status import DeviceStatus as S
from pyvirtio.transport.inprocess_bus import InProcessBus
from pyvirtio.transport.pci.device import VirtioPciFunction
from pyvirtio.transport.pci.spec import (
    COMMON_CFG_REGISTERS,
    LEGACY_MSIX_REGISTERS,
    LEGACY_REGISTERS,
    MSI_ADDRESS_BASE,
    MSIX_CONTROL_ENABLE,
    MSIX_CONTROL_FUNCTION_MASK,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_CAP,
    VIRTIO_PCI_CAP64,
    VIRTIO_PCI_CFG_CAP,
    VIRTIO_PCI_COMMON_CFG,
    VIRTIO_PCI_NOTIFY_CAP,
    CommonCfg,
    IsrBits,
    LegacyReg,
    PciCapId,
    PciCfg,
    PciCommand,
    Register,
    VirtioPciCapType,
    bar_offset,
    legacy_config_offset,
    legacy_vring_addresses,
    modern_pci_device_id,
    virtio_device_type,
)
from tests.transport.pci.test_pci_device_e2e import assign_bars, walk_caps

DISK = 64 * SECTOR_SIZE


@dataclass
class Rig:
    """A function on a bus with its BARs assigned (as firmware would)."""

    bus: InProcessBus
    fn: VirtioPciFunction
    bdf: int
    bars: dict[int, int]

    def cfg(self, off: int, size: int) -> int:
        return self.bus.pci_cfg_read(self.bdf, off, size)

    def cfg_w(self, off: int, size: int, value: int) -> None:
        self.bus.pci_cfg_write(self.bdf, off, size, value)

    def cr(self, off: int, size: int) -> int:
        return self.bus.mmio_read(self.bars[4] + off, size)

    def cw(self, off: int, size: int, value: int) -> None:
        self.bus.mmio_write(self.bars[4] + off, size, value)

    def lr(self, off: int, size: int) -> int:
        return self.bus.io_read(self.bars[0] + off, size)

    def lw(self, off: int, size: int, value: int) -> None:
        self.bus.io_write(self.bars[0] + off, size, value)

    def caps(self) -> dict[int, int]:
        """cfg_type -> capability offset of the virtio capabilities."""
        out: dict[int, int] = {}
        for off, cid in walk_caps(self.bus, self.bdf):
            if cid == PciCapId.VNDR:
                out.setdefault(self.cfg(off + 3, 1), off)
        return out


@pytest.fixture
def rig() -> Iterator[Callable[..., Rig]]:
    made: list[InProcessBus] = []

    def make(mode: str = "modern", device: object = None, **kw: object) -> Rig:
        bus = InProcessBus(16 << 20)
        made.append(bus)
        dev = device if device is not None else BlkDevice(MemoryBackend(DISK))
        fn = VirtioPciFunction(dev, mode=mode, **kw)  # type: ignore[arg-type]
        bdf = bus.add_pci(fn)
        return Rig(bus, fn, bdf, assign_bars(bus, bdf))

    yield make
    for b in made:
        b.close()


# -- layouts (one definition per wire struct; sizes and offsets as in the spec) ---------------


def test_struct_sizes_and_common_cfg_offsets() -> None:
    assert VIRTIO_PCI_CAP.size == 16
    assert VIRTIO_PCI_NOTIFY_CAP.size == 20
    assert VIRTIO_PCI_CFG_CAP.size == 20
    assert VIRTIO_PCI_CAP64.size == 24
    assert VIRTIO_PCI_COMMON_CFG.size == 64
    # offsets of <linux/virtio_pci.h> VIRTIO_PCI_COMMON_* (same layout as the spec)
    linux = {
        "device_feature_select": 0,
        "device_feature": 4,
        "driver_feature_select": 8,
        "driver_feature": 12,
        "config_msix_vector": 16,
        "num_queues": 18,
        "device_status": 20,
        "config_generation": 21,
        "queue_select": 22,
        "queue_size": 24,
        "queue_msix_vector": 26,
        "queue_enable": 28,
        "queue_notify_off": 30,
        "queue_desc": 32,
        "queue_driver": 40,
        "queue_device": 48,
        "queue_notify_data": 56,
        "queue_reset": 58,
    }
    for name, off in linux.items():
        assert VIRTIO_PCI_COMMON_CFG.offset_of(name) == off
        assert CommonCfg[name.upper()] == off
    for reg in COMMON_CFG_REGISTERS:
        base = reg.name.removesuffix("_lo").removesuffix("_hi")
        expect = VIRTIO_PCI_COMMON_CFG.offset_of(base) + (4 if reg.name.endswith("_hi") else 0)
        assert reg.offset == expect
    legacy = {"host_features": 0, "guest_features": 4, "queue_pfn": 8, "queue_num": 12}
    legacy |= {"queue_sel": 14, "queue_notify": 16, "status": 18, "isr": 19}
    legacy |= {"config_msix_vector": 20, "queue_msix_vector": 22}
    for reg in (*LEGACY_REGISTERS, *LEGACY_MSIX_REGISTERS):
        assert legacy[reg.name] == reg.offset
    assert legacy_config_offset(False) == 20 and legacy_config_offset(True) == 24


def test_legacy_vring_layout_4096() -> None:
    a = legacy_vring_addresses(0x10000, 256, 4096)
    assert a.desc == 0x10000
    assert a.driver == 0x10000 + 16 * 256
    # the used ring at the next 4096 boundary after the avail ring (6 + 2 * 256 bytes)
    assert a.device == 0x12000
    b = legacy_vring_addresses(0x20000, 8, 4096)
    assert (b.driver, b.device) == (0x20080, 0x21000)


# -- configuration header (§4.1.2) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "device_id", "revision", "subsystem"),
    [
        ("modern", 0x1042, 1, 0x1042),
        ("transitional", 0x1001, 0, 2),
        ("legacy", 0x1001, 0, 2),
    ],
)
def test_ids_per_mode(
    rig: Callable[..., Rig], mode: str, device_id: int, revision: int, subsystem: int
) -> None:
    r = rig(mode)
    assert r.cfg(PciCfg.VENDOR_ID, 2) == 0x1AF4
    assert r.cfg(PciCfg.DEVICE_ID, 2) == device_id
    assert r.cfg(PciCfg.REVISION_ID, 1) == revision
    assert r.cfg(PciCfg.SUBSYSTEM_VENDOR_ID, 2) == 0x1AF4
    assert r.cfg(PciCfg.SUBSYSTEM_ID, 2) == subsystem
    assert subsystem >= 0x40 or mode != "modern"
    assert virtio_device_type(device_id, subsystem) == 2
    assert r.cfg(PciCfg.CLASS, 1) == 0x01 and r.cfg(PciCfg.SUBCLASS, 1) == 0x80
    assert r.cfg(PciCfg.HEADER_TYPE, 1) == 0
    assert r.cfg(PciCfg.INTERRUPT_PIN, 1) == 1
    assert r.cfg(PciCfg.STATUS, 2) & 0x10  # capability list
    assert r.cfg(PciCfg.INTERRUPT_LINE, 1) == r.bus.intx_line(r.bdf)


def test_rng_ids_and_class() -> None:
    fn = VirtioPciFunction(RngDevice())
    assert fn.cfg_read(PciCfg.DEVICE_ID, 2) == modern_pci_device_id(4) == 0x1044
    assert fn.cfg_read(PciCfg.CLASS, 1) == 0x00 and fn.cfg_read(PciCfg.SUBCLASS, 1) == 0xFF
    tfn = VirtioPciFunction(RngDevice(), mode="transitional")
    assert tfn.cfg_read(PciCfg.DEVICE_ID, 2) == 0x1005
    fn.close()
    tfn.close()


@pytest.mark.parametrize(
    "offset",
    [
        PciCfg.VENDOR_ID,
        PciCfg.DEVICE_ID,
        PciCfg.REVISION_ID,
        PciCfg.CLASS,
        PciCfg.HEADER_TYPE,
        PciCfg.SUBSYSTEM_ID,
        PciCfg.CAPABILITY_LIST,
        PciCfg.INTERRUPT_PIN,
        PciCfg.ROM_ADDRESS,
    ],
)
def test_read_only_header_fields_ignore_writes(rig: Callable[..., Rig], offset: int) -> None:
    r = rig()
    size = 4 if offset == PciCfg.ROM_ADDRESS else 1
    before = r.cfg(offset, size)
    r.cfg_w(offset, size, (1 << 8 * size) - 1)
    assert r.cfg(offset, size) == before


def test_command_register_writable_bits(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.cfg_w(PciCfg.COMMAND, 2, 0xFFFF)
    allowed = PciCommand.IO | PciCommand.MEMORY | PciCommand.MASTER | PciCommand.INTX_DISABLE
    assert r.cfg(PciCfg.COMMAND, 2) == allowed


def test_unaligned_or_odd_config_access_reads_ones(rig: Callable[..., Rig]) -> None:
    r = rig()
    assert r.cfg(1, 2) == 0xFFFF
    assert r.cfg(2, 4) == 0xFFFFFFFF
    assert r.bus.pci_cfg_read(0x1F << 3, 0, 4) == 0xFFFFFFFF  # empty slot


# -- BARs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["modern", "transitional", "legacy"])
def test_bar_sizing(mode: str) -> None:
    fn = VirtioPciFunction(BlkDevice(MemoryBackend(DISK)), mode=mode)  # type: ignore[arg-type]
    probes = {}
    for i in range(6):
        fn.cfg_write(bar_offset(i), 4, 0xFFFFFFFF)
        probes[i] = fn.cfg_read(bar_offset(i), 4)
    cfg_size = fn.state.config_size()
    if mode != "modern":
        legacy_size = 1 << (24 + cfg_size - 1).bit_length()
        assert probes[0] == (~(legacy_size - 1) & 0xFFFFFFFC) | 1  # I/O BAR
    else:
        assert probes[0] == 0
    assert probes[1] == 0xFFFFF000  # MSI-X: 4 KiB, 32-bit, non-prefetchable
    if mode != "legacy":
        assert probes[4] == 0xFFFFC000 | 0x4 | 0x8  # 16 KiB, 64-bit, prefetchable
        assert probes[5] == 0xFFFFFFFF  # upper half of the 64-bit BAR
    else:
        assert probes[4] == probes[5] == 0
    assert probes[2] == probes[3] == 0
    fn.close()


def test_bars_decode_only_when_enabled(rig: Callable[..., Rig]) -> None:
    r = rig()
    nq_addr = r.bars[4] + CommonCfg.NUM_QUEUES
    assert r.bus.mmio_read(nq_addr, 2) == 1
    r.cfg_w(PciCfg.COMMAND, 2, r.cfg(PciCfg.COMMAND, 2) & ~PciCommand.MEMORY)
    assert r.bus.mmio_read(nq_addr, 2) == 0xFFFF
    r.cfg_w(PciCfg.COMMAND, 2, r.cfg(PciCfg.COMMAND, 2) | PciCommand.MEMORY)
    assert r.bus.mmio_read(nq_addr, 2) == 1
    # moving the BAR moves the registers
    r.cfg_w(bar_offset(4), 4, 0xF0000000 | 0xC)
    r.cfg_w(bar_offset(5), 4, 0)
    assert r.bus.mmio_read(0xF0000000 + CommonCfg.NUM_QUEUES, 2) == 1
    assert r.bus.mmio_read(nq_addr, 2) == 0xFFFF


# -- capabilities (§4.1.4) ------------------------------------------------------------------------


def test_capability_list(rig: Callable[..., Rig]) -> None:
    r = rig()
    caps = r.caps()
    assert set(caps) == {1, 2, 3, 4, 5}
    nq = r.cr(CommonCfg.NUM_QUEUES, 2)
    for ctype, off in caps.items():
        cap_len = r.cfg(off + 2, 1)
        bar = r.cfg(off + 4, 1)
        offset = r.cfg(off + 8, 4)
        length = r.cfg(off + 12, 4)
        if ctype == VirtioPciCapType.PCI_CFG:
            assert cap_len == VIRTIO_PCI_CFG_CAP.size
            continue
        assert bar == 4
        if ctype == VirtioPciCapType.COMMON_CFG:
            assert cap_len == 16 and offset % 4 == 0 and length >= 64
        elif ctype == VirtioPciCapType.NOTIFY_CFG:
            assert cap_len == VIRTIO_PCI_NOTIFY_CAP.size and offset % 2 == 0
            mult = r.cfg(off + 16, 4)
            # "either present notify_off_multiplier as an even power of 2, or ... 0"
            assert mult == 0 or (mult & (mult - 1) == 0 and mult.bit_length() % 2 == 1)
            for q in range(nq):
                r.cw(CommonCfg.QUEUE_SELECT, 2, q)
                assert length >= r.cr(CommonCfg.QUEUE_NOTIFY_OFF, 2) * mult + 2
        elif ctype == VirtioPciCapType.ISR_CFG:
            assert length >= 1
        elif ctype == VirtioPciCapType.DEVICE_CFG:
            assert offset % 4 == 0 and length == r.fn.state.config_size()
    msix = [off for off, cid in walk_caps(r.bus, r.bdf) if cid == PciCapId.MSIX]
    assert len(msix) == 1
    assert (r.cfg(msix[0] + 2, 2) & 0x7FF) + 1 == 2  # one queue + config
    assert r.cfg(msix[0] + 4, 4) == 1  # table at offset 0 of BAR1
    assert r.cfg(msix[0] + 8, 4) == 0x800 | 1  # PBA at 0x800 of BAR1


def test_rng_has_no_device_cfg_capability(rig: Callable[..., Rig]) -> None:
    r = rig(device=RngDevice())
    assert VirtioPciCapType.DEVICE_CFG not in r.caps()


def test_legacy_function_has_no_virtio_capabilities(rig: Callable[..., Rig]) -> None:
    r = rig("legacy")
    assert r.caps() == {}
    assert [cid for _, cid in walk_caps(r.bus, r.bdf)] == [PciCapId.MSIX]


def test_virtio_capabilities_are_read_only(rig: Callable[..., Rig]) -> None:
    r = rig()
    common = r.caps()[VirtioPciCapType.COMMON_CFG]
    before = [r.cfg(common + i, 4) for i in range(0, 16, 4)]
    for i in range(0, 16, 4):
        r.cfg_w(common + i, 4, 0xFFFFFFFF)
    assert [r.cfg(common + i, 4) for i in range(0, 16, 4)] == before


def test_pci_cfg_access_window(rig: Callable[..., Rig]) -> None:
    """§4.1.4.8: pci_cfg_data is a window of cap.length bytes into cap.bar at
    cap.offset, for reads and writes, whether or not the BAR is mapped."""
    r = rig()
    cap = r.caps()[VirtioPciCapType.PCI_CFG]
    r.cfg_w(PciCfg.COMMAND, 2, 0)  # no decode: only the window reaches the registers

    def window(offset: int, length: int) -> None:
        r.cfg_w(cap + 4, 1, 4)
        r.cfg_w(cap + 8, 4, offset)
        r.cfg_w(cap + 12, 4, length)

    window(CommonCfg.NUM_QUEUES, 2)
    assert r.cfg(cap + 16, 2) == 1
    window(CommonCfg.DEVICE_STATUS, 1)
    r.cfg_w(cap + 16, 1, S.ACKNOWLEDGE)
    assert r.fn.state.status == S.ACKNOWLEDGE
    window(CommonCfg.DEVICE_FEATURE_SELECT, 4)
    r.cfg_w(cap + 16, 4, 1)
    window(CommonCfg.DEVICE_FEATURE, 4)
    assert r.cfg(cap + 16, 4) == r.fn.state.device_features >> 32
    # the window reaches the device configuration (capacity, le64 at 0)
    window(0x2000, 4)
    assert r.cfg(cap + 16, 4) == DISK // SECTOR_SIZE
    # bar, offset, length and data are read-write
    assert r.cfg(cap + 4, 1) == 4 and r.cfg(cap + 8, 4) == 0x2000 and r.cfg(cap + 12, 4) == 4


# -- common configuration (§4.1.4.3) ------------------------------------------------------------


def test_common_cfg_reset_values(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.cw(CommonCfg.DEVICE_STATUS, 1, 0)
    for reg in COMMON_CFG_REGISTERS:
        if reg.reset is not None:
            assert r.cr(reg.offset, reg.width) == reg.reset, reg.name
    assert r.cr(CommonCfg.NUM_QUEUES, 2) == 1
    assert r.cr(CommonCfg.QUEUE_SIZE, 2) == 256
    assert r.cr(CommonCfg.QUEUE_NOTIFY_OFF, 2) == 0
    assert r.cr(CommonCfg.DEVICE_FEATURE, 4) == r.fn.state.device_features & 0xFFFFFFFF


@pytest.mark.parametrize("reg", [g for g in COMMON_CFG_REGISTERS if g.access == "R"], ids=str)
def test_common_cfg_read_only_fields_ignore_writes(rig: Callable[..., Rig], reg: Register) -> None:
    """§4.1.4.3.2: "The driver MUST NOT write to device_feature, num_queues,
    config_generation, queue_notify_off or queue_notify_data": ignored, logged."""
    r = rig()
    before = r.cr(reg.offset, reg.width)
    n = r.fn.state.violation_count
    r.cw(reg.offset, reg.width, (1 << 8 * reg.width) - 1)
    assert r.cr(reg.offset, reg.width) == before
    assert r.fn.state.violation_count == n + 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("device_feature_select", 1),
        ("driver_feature_select", 1),
        ("config_msix_vector", 1),
        ("queue_select", 0),
        ("queue_msix_vector", 1),
        ("queue_desc_lo", 0x1000),
        ("queue_desc_hi", 0x2),
        ("queue_driver_lo", 0x3000),
        ("queue_driver_hi", 0x4),
        ("queue_device_lo", 0x5000),
        ("queue_device_hi", 0x6),
        ("queue_size", 64),
    ],
)
def test_common_cfg_read_write_fields_read_back(
    rig: Callable[..., Rig], name: str, value: int
) -> None:
    r = rig()
    reg = next(g for g in COMMON_CFG_REGISTERS if g.name == name)
    r.cw(CommonCfg.DEVICE_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER)
    r.cw(reg.offset, reg.width, value)
    assert r.cr(reg.offset, reg.width) == value
    assert not r.fn.state.violations


def test_feature_windows(rig: Callable[..., Rig]) -> None:
    """device_feature shows bits device_feature_select*32 ..; 0 beyond (§4.1.4.3.1)."""
    r = rig()
    words = []
    for sel in range(4):
        r.cw(CommonCfg.DEVICE_FEATURE_SELECT, 4, sel)
        words.append(r.cr(CommonCfg.DEVICE_FEATURE, 4))
    offered = sum(w << 32 * i for i, w in enumerate(words))
    assert offered == r.fn.state.device_features
    assert offered >> Feature.VERSION_1 & 1
    assert offered >> Feature.RING_RESET & 1  # the transport implements queue_reset
    assert offered >> Feature.NOTIFICATION_DATA & 1  # implemented end to end
    assert not offered >> Feature.NOTIF_CONFIG_DATA & 1  # not implemented: not offered
    assert words[2] == words[3] == 0
    r.cw(CommonCfg.DRIVER_FEATURE_SELECT, 4, 1)
    r.cw(CommonCfg.DRIVER_FEATURE, 4, 1)
    assert r.cr(CommonCfg.DRIVER_FEATURE, 4) == 1
    assert r.fn.state.driver_features == 1 << 32


def test_64bit_fields_halves_are_independent(rig: Callable[..., Rig]) -> None:
    """§4.1.3.2: "the device MUST allow driver independent access to high and low
    32-bit parts of the field"."""
    r = rig()
    r.cw(CommonCfg.QUEUE_DESC + 4, 4, 0x12)
    r.cw(CommonCfg.QUEUE_DESC, 4, 0x3400)
    r.cw(CommonCfg.QUEUE_DESC + 4, 4, 0x56)
    assert r.fn.state.queue_addresses(0).desc == 0x56_0000_3400
    assert r.cr(CommonCfg.QUEUE_DESC, 4) == 0x3400


def test_config_generation_changes_with_configuration(rig: Callable[..., Rig]) -> None:
    r = rig()
    gen = r.cr(CommonCfg.CONFIG_GENERATION, 1)
    r.cr(0x2000, 4)
    r.fn.device.config_changed()
    assert r.cr(CommonCfg.CONFIG_GENERATION, 1) == (gen + 1) & 0xFF


def test_isr_read_to_clear_and_bits(rig: Callable[..., Rig]) -> None:
    r = rig(msix_vectors=0)
    r.fn._on_config()
    assert r.fn.intx_asserted
    assert r.cr(0x1000, 1) == IsrBits.CONFIG
    assert r.cr(0x1000, 1) == 0
    assert not r.fn.intx_asserted


def test_intx_disable_bit_masks_the_line(rig: Callable[..., Rig]) -> None:
    r = rig(msix_vectors=0)
    r.cfg_w(PciCfg.COMMAND, 2, r.cfg(PciCfg.COMMAND, 2) | PciCommand.INTX_DISABLE)
    r.bus.wait_interrupts(0)
    r.fn._on_used(0)
    assert not r.fn.intx_asserted and r.bus.wait_interrupts(0) == []
    assert r.cfg(PciCfg.STATUS, 2) & 0x8  # Interrupt Status still reflects ISR
    r.cfg_w(PciCfg.COMMAND, 2, r.cfg(PciCfg.COMMAND, 2) & ~PciCommand.INTX_DISABLE)
    assert r.fn.intx_asserted
    assert [i.kind for i in r.bus.wait_interrupts(0)] == ["intx"]


# -- MSI-X ---------------------------------------------------------------------------


def _msix(r: Rig) -> tuple[int, int]:
    cap = next(off for off, cid in walk_caps(r.bus, r.bdf) if cid == PciCapId.MSIX)
    return cap, r.bars[1]


def test_msix_table_reset_state_masked(rig: Callable[..., Rig]) -> None:
    r = rig()
    cap, base = _msix(r)
    assert r.cfg(cap + 2, 2) & (MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK) == 0
    for v in range(2):
        assert r.bus.mmio_read(base + 16 * v + 12, 4) == 1  # masked
    assert r.bus.mmio_read(base + 0x800, 8) == 0  # nothing pending
    r.cfg_w(cap + 2, 2, 0xFFFF)
    assert r.cfg(cap + 2, 2) == MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK | 1


def test_msix_pending_bit_and_delivery_on_unmask(rig: Callable[..., Rig]) -> None:
    r = rig()
    cap, base = _msix(r)
    r.bus.mmio_write(base + 16, 4, MSI_ADDRESS_BASE | 0x1000)
    r.bus.mmio_write(base + 24, 4, 0x41)
    r.cfg_w(cap + 2, 2, MSIX_CONTROL_ENABLE)
    r.cw(CommonCfg.QUEUE_MSIX_VECTOR, 2, 1)
    r.bus.wait_interrupts(0)
    r.fn._on_used(0)  # vector 1 still masked in its entry
    assert r.bus.wait_interrupts(0) == []
    assert r.fn.msix_pending(1)
    assert r.bus.mmio_read(base + 0x800, 4) == 0b10
    r.bus.mmio_write(base + 0x800, 4, 0)  # the PBA is read-only
    assert r.fn.msix_pending(1)
    r.bus.mmio_write(base + 28, 4, 0)  # unmask: the pending message goes out
    irqs = r.bus.wait_interrupts(0)
    assert [(i.kind, i.address, i.data) for i in irqs] == [("msi", MSI_ADDRESS_BASE | 0x1000, 0x41)]
    assert not r.fn.msix_pending(1)
    # function mask holds every vector
    r.cfg_w(cap + 2, 2, MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK)
    r.fn._on_used(0)
    assert r.bus.wait_interrupts(0) == [] and r.fn.msix_pending(1)
    r.cfg_w(cap + 2, 2, MSIX_CONTROL_ENABLE)
    assert len(r.bus.wait_interrupts(0)) == 1


def test_msix_to_ram_is_dma(rig: Callable[..., Rig]) -> None:
    r = rig()
    cap, base = _msix(r)
    r.bus.mmio_write(base + 16, 4, 0x8000)
    r.bus.mmio_write(base + 24, 4, 0xABCD)
    r.bus.mmio_write(base + 28, 4, 0)
    r.cfg_w(cap + 2, 2, MSIX_CONTROL_ENABLE)
    r.cw(CommonCfg.QUEUE_MSIX_VECTOR, 2, 1)
    r.fn._on_used(0)
    assert r.bus.mem.read_le32(0x8000) == 0xABCD


def test_msix_needs_bus_master(rig: Callable[..., Rig]) -> None:
    r = rig()
    cap, base = _msix(r)
    r.bus.mmio_write(base + 16, 4, MSI_ADDRESS_BASE)
    r.bus.mmio_write(base + 28, 4, 0)
    r.cfg_w(cap + 2, 2, MSIX_CONTROL_ENABLE)
    r.cw(CommonCfg.QUEUE_MSIX_VECTOR, 2, 1)
    r.cfg_w(PciCfg.COMMAND, 2, r.cfg(PciCfg.COMMAND, 2) & ~PciCommand.MASTER)
    r.bus.wait_interrupts(0)
    r.fn._on_used(0)
    assert r.bus.wait_interrupts(0) == [] and r.fn.msix_dropped == 1


def test_msix_enabled_config_vector_and_isr(rig: Callable[..., Rig]) -> None:
    """With MSI-X on, a configuration change still sets ISR bit 1 (§4.1.4.5.1) and
    goes to config_msix_vector; INTx stays quiet."""
    r = rig()
    cap, base = _msix(r)
    r.bus.mmio_write(base, 4, MSI_ADDRESS_BASE)
    r.bus.mmio_write(base + 12, 4, 0)
    r.cfg_w(cap + 2, 2, MSIX_CONTROL_ENABLE)
    r.cw(CommonCfg.CONFIG_MSIX_VECTOR, 2, 0)
    r.bus.wait_interrupts(0)
    r.cw(CommonCfg.DEVICE_STATUS, 1, S.ACKNOWLEDGE)
    r.fn._on_config()
    assert [i.kind for i in r.bus.wait_interrupts(0)] == ["msi"]
    assert r.fn.isr & IsrBits.CONFIG and not r.fn.intx_asserted


# -- legacy header (§4.1.4.10) ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["transitional", "legacy"])
def test_legacy_header_registers(rig: Callable[..., Rig], mode: str) -> None:
    r = rig(mode)
    r.lw(LegacyReg.STATUS, 1, 0)
    for reg in LEGACY_REGISTERS:
        if reg.reset is not None:
            assert r.lr(reg.offset, reg.width) == reg.reset, reg.name
    host = r.lr(LegacyReg.HOST_FEATURES, 4)
    assert host == r.fn.device.device_features() & 0xFFFFFFFF
    assert r.lr(LegacyReg.QUEUE_NUM, 2) == 256
    # read-only: host features and queue_num ignore writes
    r.lw(LegacyReg.HOST_FEATURES, 4, 0)
    r.lw(LegacyReg.QUEUE_NUM, 2, 16)
    assert r.lr(LegacyReg.HOST_FEATURES, 4) == host
    assert r.lr(LegacyReg.QUEUE_NUM, 2) == 256
    r.lw(LegacyReg.GUEST_FEATURES, 4, 1 << 28)
    assert r.lr(LegacyReg.GUEST_FEATURES, 4) == 1 << 28
    r.lw(LegacyReg.QUEUE_SEL, 2, 0)
    assert r.lr(LegacyReg.QUEUE_SEL, 2) == 0


def test_legacy_config_offset_moves_with_msix(rig: Callable[..., Rig]) -> None:
    r = rig("transitional")
    capacity = DISK // SECTOR_SIZE
    assert r.lr(20, 4) == capacity  # MSI-X off: configuration at 20
    cap, _ = _msix(r)
    r.cfg_w(cap + 2, 2, MSIX_CONTROL_ENABLE)
    assert r.lr(20, 2) == VIRTIO_MSI_NO_VECTOR  # config_msix_vector now lives here
    assert r.lr(22, 2) == VIRTIO_MSI_NO_VECTOR
    assert r.lr(24, 4) == capacity
    for reg in LEGACY_MSIX_REGISTERS:
        r.lw(reg.offset, reg.width, 1)
        assert r.lr(reg.offset, reg.width) == 1
    r.cfg_w(cap + 2, 2, 0)
    assert r.lr(20, 4) == capacity  # "If you turn it off again, they move back!"


def test_legacy_queue_pfn(rig: Callable[..., Rig]) -> None:
    r = rig("legacy")
    r.lw(LegacyReg.STATUS, 1, S.ACKNOWLEDGE | S.DRIVER)
    r.lw(LegacyReg.QUEUE_SEL, 2, 0)
    r.lw(LegacyReg.QUEUE_PFN, 4, 0x123)
    assert r.lr(LegacyReg.QUEUE_PFN, 4) == 0x123
    assert r.fn.state.queue_enabled(0)
    assert r.fn.state.queue_addresses(0) == legacy_vring_addresses(0x123000, 256, 4096)
    r.lw(LegacyReg.QUEUE_PFN, 4, 0)  # stop using the queue
    assert r.lr(LegacyReg.QUEUE_PFN, 4) == 0
    assert not r.fn.state.queue_enabled(0)


def test_legacy_features_have_no_version_1(rig: Callable[..., Rig]) -> None:
    r = rig("transitional")
    r.lw(LegacyReg.STATUS, 1, 0)
    assert r.fn.state.legacy
    assert r.fn.state.device_features >> 32 == 0
    r.cw(CommonCfg.DEVICE_STATUS, 1, 0)  # a modern reset switches back
    assert not r.fn.state.legacy
    r.cw(CommonCfg.DEVICE_FEATURE_SELECT, 4, 1)
    assert r.cr(CommonCfg.DEVICE_FEATURE, 4) & 1  # VERSION_1


def test_notification_area_covers_every_queue(rig: Callable[..., Rig]) -> None:
    """§4.1.4.4.1: cap.length "MUST be large enough to support queue notification
    offsets for all supported queues"; the BAR grows with it."""
    r = rig(device=BlkDevice(MemoryBackend(DISK), num_queues=1500), msix_vectors=4)
    notify = r.caps()[VirtioPciCapType.NOTIFY_CFG]
    length, mult = r.cfg(notify + 12, 4), r.cfg(notify + 16, 4)
    r.cw(CommonCfg.QUEUE_SELECT, 2, 1499)
    noff = r.cr(CommonCfg.QUEUE_NOTIFY_OFF, 2)
    assert length >= noff * mult + 2
    assert r.fn.bar_size(4) >= r.cfg(notify + 8, 4) + length
    r.cw(0x3000 + noff * mult, 2, 1499)  # reaches queue 1499 (not enabled: logged)
    assert "queue 1499" in r.fn.state.violations[-1].message
