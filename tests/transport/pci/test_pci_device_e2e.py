"""The device-side PCI function model driven end to end by pyvirtio drivers.

The drivers reach the models through minimal, hand-written register-poking
transports defined here (firmware-style BAR assignment, capability walk, MSI-X or
INTx + ISR), independent of the driver-side transports under
``pyvirtio.transport.pci.driver``, so the device models are checked against the
spec's register layout and not against a second reading of it in the same package.
BlkDevice and RngDevice run over modern, transitional (either interface) and legacy
functions, split and packed rings, indirect and event idx on and off.
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
from pyvirtio.transport.inprocess_bus import InProcessBus
from pyvirtio.transport.pci.device import VirtioPciFunction
from pyvirtio.transport.pci.spec import (
    MSI_ADDRESS_BASE,
    MSIX_CONTROL_ENABLE,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_QUEUE_ADDR_SHIFT,
    VIRTIO_PCI_VRING_ALIGN,
    CommonCfg,
    LegacyReg,
    PciCapId,
    PciCfg,
    PciCommand,
    VirtioPciCapType,
    bar_offset,
    legacy_config_offset,
    legacy_vring_addresses,
    virtio_device_type,
)
from pyvirtio.virtqueue.common import QueueAddresses

RAM = 32 << 20
DISK = 128 * SECTOR_SIZE


# -- firmware: BAR assignment -------------------------------------------------------------


def assign_bars(bus: InProcessBus, bdf: int) -> dict[int, int]:
    """Size every BAR (write all ones, read back) and place it, then enable decode."""
    io_next, mem32_next, mem64_next = 0xC000, 0xE0000000, 0x8_0000_0000
    bases: dict[int, int] = {}
    i = 0
    while i < 6:
        off = bar_offset(i)
        orig = bus.pci_cfg_read(bdf, off, 4)
        bus.pci_cfg_write(bdf, off, 4, 0xFFFFFFFF)
        probe = bus.pci_cfg_read(bdf, off, 4)
        bus.pci_cfg_write(bdf, off, 4, orig)
        if probe == 0:
            i += 1
            continue
        if probe & 1:
            size = (~(probe & 0xFFFFFFFC) & 0xFFFF) + 1
            base = (io_next + size - 1) & ~(size - 1)
            io_next = base + size
            bus.pci_cfg_write(bdf, off, 4, base)
            bases[i] = base
            i += 1
            continue
        is64 = probe & 0x6 == 0x4
        mask = probe & 0xFFFFFFF0
        if is64:
            bus.pci_cfg_write(bdf, off + 4, 4, 0xFFFFFFFF)
            hi = bus.pci_cfg_read(bdf, off + 4, 4)
            mask |= hi << 32
            size = (~mask & 0xFFFFFFFFFFFFFFFF) + 1
            base = (mem64_next + size - 1) & ~(size - 1)
            mem64_next = base + size
            bus.pci_cfg_write(bdf, off, 4, base & 0xFFFFFFFF)
            bus.pci_cfg_write(bdf, off + 4, 4, base >> 32)
        else:
            size = (~mask & 0xFFFFFFFF) + 1
            base = (mem32_next + size - 1) & ~(size - 1)
            mem32_next = base + size
            bus.pci_cfg_write(bdf, off, 4, base)
        bases[i] = base
        i += 2 if is64 else 1
    cmd = bus.pci_cfg_read(bdf, PciCfg.COMMAND, 2)
    cmd |= PciCommand.IO | PciCommand.MEMORY | PciCommand.MASTER
    bus.pci_cfg_write(bdf, PciCfg.COMMAND, 2, cmd)
    return bases


def walk_caps(bus: InProcessBus, bdf: int) -> list[tuple[int, int]]:
    """(offset, cap id) of every capability, in list order."""
    out = []
    ptr = bus.pci_cfg_read(bdf, PciCfg.CAPABILITY_LIST, 1)
    seen = 0
    while ptr and seen < 48:
        out.append((ptr, bus.pci_cfg_read(bdf, ptr, 1)))
        ptr = bus.pci_cfg_read(bdf, ptr + 1, 1)
        seen += 1
    return out


# -- a minimal register-poking DriverTransport for each PCI interface ----------------------


class _PokeBase:
    """What the PCI pokers share: RAM, allocator, MSI-X setup, interrupt decoding."""

    legacy = False

    def __init__(self, bus: InProcessBus, bdf: int, *, msix: bool) -> None:
        self.bus = bus
        self.bdf = bdf
        self.mem = bus.mem
        self.allocator = GuestAllocator(1 << 20, bus.mem.size - (1 << 20))
        self.bars = assign_bars(bus, bdf)
        caps = walk_caps(bus, bdf)
        self.msix_cap = next((off for off, cid in caps if cid == PciCapId.MSIX), None)
        self.use_msix = msix and self.msix_cap is not None
        self.vendor_caps = [off for off, cid in caps if cid == PciCapId.VNDR]
        self.nq = 0

    def cfg(self, off: int, size: int) -> int:
        return self.bus.pci_cfg_read(self.bdf, off, size)

    def enable_msix(self) -> None:
        assert self.msix_cap is not None
        ctl = self.cfg(self.msix_cap + 2, 2)
        table = self.cfg(self.msix_cap + 4, 4)
        base = self.bars[table & 7] + (table & ~7)
        for v in range((ctl & 0x7FF) + 1):
            self.bus.mmio_write(base + 16 * v, 4, MSI_ADDRESS_BASE)
            self.bus.mmio_write(base + 16 * v + 4, 4, 0)
            self.bus.mmio_write(base + 16 * v + 8, 4, v)
            self.bus.mmio_write(base + 16 * v + 12, 4, 0)  # unmask
        self.bus.pci_cfg_write(self.bdf, self.msix_cap + 2, 2, ctl | MSIX_CONTROL_ENABLE)

    def read_isr(self) -> int:
        raise NotImplementedError

    def poll_interrupts(self, timeout: float | None) -> set[int]:
        fired: set[int] = set()
        for irq in self.bus.wait_interrupts(timeout):
            if irq.kind == "msi":
                fired.add(CONFIG_CHANGE if irq.data == 0 else irq.data - 1)
            else:
                isr = self.read_isr()
                if isr & 1:
                    fired.update(range(self.nq))
                if isr & 2:
                    fired.add(CONFIG_CHANGE)
        return fired

    def interrupt_fds(self) -> list[int]:
        return self.bus.interrupt_fds()

    def close(self) -> None:
        pass


class PokePciModern(_PokeBase):
    """virtio-v1.2 §4.1.5.1 through the capabilities (memory BAR accesses)."""

    def __init__(self, bus: InProcessBus, bdf: int, *, msix: bool = True) -> None:
        super().__init__(bus, bdf, msix=msix)
        where: dict[int, tuple[int, int]] = {}
        self.notify_mult = 0
        for off in self.vendor_caps:
            ctype = self.cfg(off + 3, 1)
            if ctype in where or ctype == VirtioPciCapType.PCI_CFG:
                continue
            bar = self.cfg(off + 4, 1)
            where[ctype] = (self.bars[bar] + self.cfg(off + 8, 4), self.cfg(off + 12, 4))
            if ctype == VirtioPciCapType.NOTIFY_CFG:
                self.notify_mult = self.cfg(off + 16, 4)
        self.common = where[VirtioPciCapType.COMMON_CFG][0]
        self.isr = where[VirtioPciCapType.ISR_CFG][0]
        self.notify_base = where[VirtioPciCapType.NOTIFY_CFG][0]
        self.device_cfg = where.get(VirtioPciCapType.DEVICE_CFG, (0, 0))[0]
        self.nq = self.r(CommonCfg.NUM_QUEUES, 2)
        self.notify_addr: dict[int, int] = {}
        if self.use_msix:
            self.enable_msix()

    def r(self, off: int, size: int) -> int:
        return self.bus.mmio_read(self.common + off, size)

    def w(self, off: int, size: int, value: int) -> None:
        self.bus.mmio_write(self.common + off, size, value)

    def device_id(self) -> int:
        return virtio_device_type(self.cfg(PciCfg.DEVICE_ID, 2), self.cfg(PciCfg.SUBSYSTEM_ID, 2))

    def reset(self) -> None:
        self.w(CommonCfg.DEVICE_STATUS, 1, 0)
        assert self.r(CommonCfg.DEVICE_STATUS, 1) == 0
        if self.use_msix:
            self.w(CommonCfg.CONFIG_MSIX_VECTOR, 2, 0)
            assert self.r(CommonCfg.CONFIG_MSIX_VECTOR, 2) == 0

    def get_status(self) -> int:
        return self.r(CommonCfg.DEVICE_STATUS, 1)

    def set_status(self, status: int) -> None:
        self.w(CommonCfg.DEVICE_STATUS, 1, status)

    def get_device_features(self) -> int:
        f = 0
        for sel in range(2):
            self.w(CommonCfg.DEVICE_FEATURE_SELECT, 4, sel)
            f |= self.r(CommonCfg.DEVICE_FEATURE, 4) << 32 * sel
        return f

    def set_driver_features(self, features: int) -> None:
        for sel in range(2):
            self.w(CommonCfg.DRIVER_FEATURE_SELECT, 4, sel)
            self.w(CommonCfg.DRIVER_FEATURE, 4, features >> 32 * sel & 0xFFFFFFFF)

    def config_generation(self) -> int:
        return self.r(CommonCfg.CONFIG_GENERATION, 1)

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(self.bus.mmio_read(self.device_cfg + offset + i, 1) for i in range(size))

    def write_config(self, offset: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.bus.mmio_write(self.device_cfg + offset + i, 1, b)

    def num_queues(self) -> int:
        return self.nq

    def queue_max_size(self, index: int) -> int:
        self.w(CommonCfg.QUEUE_SELECT, 2, index)
        return self.r(CommonCfg.QUEUE_SIZE, 2)

    def setup_queue(self, index: int, size: int, addrs: QueueAddresses) -> None:
        self.w(CommonCfg.QUEUE_SELECT, 2, index)
        self.w(CommonCfg.QUEUE_SIZE, 2, size)
        for off, val in (
            (CommonCfg.QUEUE_DESC, addrs.desc),
            (CommonCfg.QUEUE_DRIVER, addrs.driver),
            (CommonCfg.QUEUE_DEVICE, addrs.device),
        ):
            self.w(off, 4, val & 0xFFFFFFFF)
            self.w(off + 4, 4, val >> 32)
        if self.use_msix:
            self.w(CommonCfg.QUEUE_MSIX_VECTOR, 2, index + 1)
            assert self.r(CommonCfg.QUEUE_MSIX_VECTOR, 2) == index + 1
        noff = self.r(CommonCfg.QUEUE_NOTIFY_OFF, 2)
        self.notify_addr[index] = self.notify_base + noff * self.notify_mult
        self.w(CommonCfg.QUEUE_ENABLE, 2, 1)
        if self.r(CommonCfg.QUEUE_ENABLE, 2) != 1:
            raise DriverError(f"queue {index} was not enabled")

    def notify(self, index: int) -> None:
        self.bus.mmio_write(self.notify_addr[index], 2, index)

    def read_isr(self) -> int:
        return self.bus.mmio_read(self.isr, 1)


class PokePciLegacy(_PokeBase):
    """The legacy interface: I/O BAR0 (virtio-v1.2 §4.1.4.10)."""

    legacy = True

    def __init__(self, bus: InProcessBus, bdf: int, *, msix: bool = True) -> None:
        super().__init__(bus, bdf, msix=msix)
        self.io = self.bars[0]
        if self.use_msix:
            self.enable_msix()
        self.nq = 0
        while True:  # legacy has no queue count: probe until queue_num reads 0
            self.w(LegacyReg.QUEUE_SEL, 2, self.nq)
            if not self.r(LegacyReg.QUEUE_NUM, 2):
                break
            self.nq += 1

    def r(self, off: int, size: int) -> int:
        return self.bus.io_read(self.io + off, size)

    def w(self, off: int, size: int, value: int) -> None:
        self.bus.io_write(self.io + off, size, value)

    def device_id(self) -> int:
        return self.cfg(PciCfg.SUBSYSTEM_ID, 2)

    def reset(self) -> None:
        self.w(LegacyReg.STATUS, 1, 0)
        assert self.r(LegacyReg.STATUS, 1) == 0
        if self.use_msix:
            self.w(LegacyReg.MSI_CONFIG_VECTOR, 2, 0)

    def get_status(self) -> int:
        return self.r(LegacyReg.STATUS, 1)

    def set_status(self, status: int) -> None:
        self.w(LegacyReg.STATUS, 1, status)

    def get_device_features(self) -> int:
        return self.r(LegacyReg.HOST_FEATURES, 4)

    def set_driver_features(self, features: int) -> None:
        self.w(LegacyReg.GUEST_FEATURES, 4, features & 0xFFFFFFFF)

    def config_generation(self) -> int:
        return 0

    def _cfg_base(self) -> int:
        return self.io + legacy_config_offset(self.use_msix)

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(self.bus.io_read(self._cfg_base() + offset + i, 1) for i in range(size))

    def write_config(self, offset: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.bus.io_write(self._cfg_base() + offset + i, 1, b)

    def num_queues(self) -> int:
        return self.nq

    def queue_max_size(self, index: int) -> int:
        self.w(LegacyReg.QUEUE_SEL, 2, index)
        return self.r(LegacyReg.QUEUE_NUM, 2)

    def setup_queue(self, index: int, size: int, addrs: QueueAddresses) -> None:
        assert addrs == legacy_vring_addresses(addrs.desc, size, VIRTIO_PCI_VRING_ALIGN)
        self.w(LegacyReg.QUEUE_SEL, 2, index)
        if self.use_msix:
            self.w(LegacyReg.MSI_QUEUE_VECTOR, 2, index + 1)
            assert self.r(LegacyReg.MSI_QUEUE_VECTOR, 2) == index + 1
        self.w(LegacyReg.QUEUE_PFN, 4, addrs.desc >> VIRTIO_PCI_QUEUE_ADDR_SHIFT)
        if self.r(LegacyReg.QUEUE_PFN, 4) != addrs.desc >> VIRTIO_PCI_QUEUE_ADDR_SHIFT:
            raise DriverError(f"queue {index} was not accepted")

    def notify(self, index: int) -> None:
        self.w(LegacyReg.QUEUE_NOTIFY, 2, index)

    def read_isr(self) -> int:
        return self.r(LegacyReg.ISR, 1)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def machine() -> Iterator[Any]:
    buses: list[InProcessBus] = []
    drivers: list[VirtioDriver] = []

    def make(
        device: Any,
        driver_cls: type[VirtioDriver],
        *,
        mode: str = "modern",
        interface: str = "modern",
        msix: bool = True,
        msix_vectors: int | None = None,
        **kw: Any,
    ) -> tuple[Any, VirtioPciFunction, InProcessBus]:
        bus = InProcessBus(RAM)
        buses.append(bus)
        fn = VirtioPciFunction(device, mode=mode, msix_vectors=msix_vectors)  # type: ignore[arg-type]
        bdf = bus.add_pci(fn)
        poke: Any = (
            PokePciModern(bus, bdf, msix=msix)
            if interface == "modern"
            else PokePciLegacy(bus, bdf, msix=msix)
        )
        drv = driver_cls(poke, **kw)
        drv.initialize()
        drivers.append(drv)
        return drv, fn, bus

    yield make
    for d in drivers:
        d.close()
    for b in buses:
        b.close()


MODES = [
    pytest.param("modern", "modern", id="modern"),
    pytest.param("transitional", "modern", id="transitional-modern"),
    pytest.param("transitional", "legacy", id="transitional-legacy"),
    pytest.param("legacy", "legacy", id="legacy"),
]
RINGS = [
    pytest.param({"packed": False}, id="split"),
    pytest.param({"packed": True}, id="packed"),
    pytest.param({"packed": False, "indirect": False, "event_idx": False}, id="split-plain"),
    pytest.param({"packed": True, "indirect": False, "event_idx": False}, id="packed-plain"),
]


#: every (mode, interface, ring) that exists: the legacy interface has no packed ring
COMBOS = [
    pytest.param(m.values[0], m.values[1], r.values[0], id=f"{m.id}-{r.id}")
    for m in MODES
    for r in RINGS
    if not (m.values[1] == "legacy" and r.values[0].get("packed"))
]


# -- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "interface", "ring"), COMBOS)
@pytest.mark.parametrize("msix", [True, False], ids=["msix", "intx"])
def test_blk_over_pci_function(
    machine: Any, mode: str, interface: str, ring: dict[str, Any], msix: bool
) -> None:
    kw = dict(ring)
    backend = MemoryBackend(DISK)
    dev = BlkDevice(backend)
    drv, fn, bus = machine(
        dev, BlkDriver, mode=mode, interface=interface, msix=msix, ring=RingOptions(**kw)
    )
    assert fn.state.legacy == (interface == "legacy")
    assert drv.has_feature(Feature.VERSION_1) == (interface == "modern")
    if kw.get("packed"):
        assert drv.has_feature(Feature.RING_PACKED)
    assert drv.has_feature(Feature.INDIRECT_DESC) == kw.get("indirect", True)
    data = bytes(range(256)) * 8
    before = bus.interrupt_count
    drv.write(3, data)
    drv.flush()
    assert drv.read(3, len(data)) == data
    assert backend.data[3 * SECTOR_SIZE : 3 * SECTOR_SIZE + len(data)] == data
    assert backend.flushes >= 1
    # interrupts were raised (and used by the driver to complete requests)
    assert bus.interrupt_count > before
    assert fn.msix_enabled == msix
    expected = S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK
    if interface == "modern":
        expected |= S.FEATURES_OK
    assert fn.state.status == expected
    assert not fn.state.violations, list(fn.state.violations)


@pytest.mark.parametrize(("mode", "interface"), MODES)
@pytest.mark.parametrize("msix", [True, False], ids=["msix", "intx"])
def test_rng_over_pci_function(machine: Any, mode: str, interface: str, msix: bool) -> None:
    drv, fn, bus = machine(RngDevice(), RngDriver, mode=mode, interface=interface, msix=msix)
    got = drv.read(64, timeout=5)
    assert len(got) == 64
    assert got != bytes(64)
    assert bus.interrupt_count > 0
    assert not fn.state.violations, list(fn.state.violations)


def test_msix_messages_carry_the_programmed_vector(machine: Any) -> None:
    dev = BlkDevice(MemoryBackend(DISK))
    drv, _fn, bus = machine(dev, BlkDriver, ring=RingOptions(event_idx=False))
    bus.wait_interrupts(0)
    req = drv.submit_read(0, SECTOR_SIZE)
    irqs = bus.wait_interrupts(5)
    assert [(i.kind, i.address, i.data) for i in irqs] == [("msi", MSI_ADDRESS_BASE, 1)]
    drv.poll()
    assert req.result() == bytes(SECTOR_SIZE)


def test_intx_line_and_isr_read_to_clear(machine: Any) -> None:
    dev = BlkDevice(MemoryBackend(DISK))
    drv, fn, bus = machine(dev, BlkDriver, msix=False, ring=RingOptions(event_idx=False))
    bus.wait_interrupts(0)
    drv.submit_read(0, SECTOR_SIZE)
    irqs = bus.wait_interrupts(5)
    assert irqs and all(i.kind == "intx" for i in irqs)
    assert irqs[0].line == bus.intx_line(drv.transport.bdf)
    assert fn.intx_asserted
    status = bus.pci_cfg_read(drv.transport.bdf, PciCfg.STATUS, 2)
    assert status & 0x8  # PCI Status: Interrupt Status
    assert drv.transport.read_isr() == 1
    assert not fn.intx_asserted
    assert drv.transport.read_isr() == 0  # read-to-clear
    assert not bus.pci_cfg_read(drv.transport.bdf, PciCfg.STATUS, 2) & 0x8
    drv.poll()


def test_config_change_reaches_the_driver(machine: Any) -> None:
    dev = BlkDevice(MemoryBackend(DISK))
    drv, _fn, _bus = machine(dev, BlkDriver)
    gen = drv.transport.config_generation()
    dev.config_changed()
    fired = drv.transport.poll_interrupts(5)
    assert CONFIG_CHANGE in fired
    assert drv.transport.config_generation() != gen


def test_queue_vector_no_vector_suppresses_interrupts(machine: Any) -> None:
    """virtio-v1.2 §4.1.5.3.1: "If MSI-X capability is enabled and queue_msix_vector
    is NO_VECTOR for a virtqueue, the device MUST NOT deliver an interrupt"."""
    dev = BlkDevice(MemoryBackend(DISK))
    drv, fn, bus = machine(dev, BlkDriver, ring=RingOptions(event_idx=False))
    fn._queue_vectors[0] = VIRTIO_MSI_NO_VECTOR
    bus.wait_interrupts(0)
    req = drv.submit_read(0, SECTOR_SIZE)
    assert bus.wait_interrupts(0) == []
    drv.poll()
    assert req.result() == bytes(SECTOR_SIZE)


# -- the same models under the package's own PCI driver transports --------------------------


@pytest.mark.parametrize(
    ("mode", "force_legacy", "packed"),
    [
        ("modern", False, False),
        ("modern", False, True),
        ("transitional", False, True),
        ("transitional", True, False),
        ("legacy", False, False),
    ],
)
@pytest.mark.parametrize("msix", [True, False], ids=["msix", "intx"])
def test_blk_and_rng_under_pyvirtio_pci_transports(
    mode: str, force_legacy: bool, packed: bool, msix: bool
) -> None:
    drv_mod = pytest.importorskip("pyvirtio.transport.pci.driver")
    enum_mod = pytest.importorskip("pyvirtio.transport.pci.enumerate")
    with InProcessBus(RAM) as bus:
        backend = MemoryBackend(DISK)
        blk_fn = VirtioPciFunction(BlkDevice(backend), mode=mode)  # type: ignore[arg-type]
        rng_fn = VirtioPciFunction(RngDevice(), mode=mode)  # type: ignore[arg-type]
        blk_bdf, rng_bdf = bus.add_pci(blk_fn), bus.add_pci(rng_fn)
        enum_mod.enumerate_pci(bus, mmio64_window=(0x8_0000_0000, 0x10_0000_0000))
        blk_t = drv_mod.open_virtio_pci(bus, blk_bdf, force_legacy=force_legacy, msix=msix)
        rng_t = drv_mod.open_virtio_pci(bus, rng_bdf, force_legacy=force_legacy, msix=msix)
        assert blk_t.legacy == (mode == "legacy" or force_legacy)
        blk = BlkDriver(blk_t, ring=RingOptions(packed=packed and not blk_t.legacy))
        rng = RngDriver(rng_t)
        blk.initialize()
        rng.initialize()
        data = bytes(range(256)) * 2
        blk.write(7, data)
        blk.flush()
        assert blk.read(7, len(data)) == data
        assert backend.data[7 * SECTOR_SIZE : 7 * SECTOR_SIZE + len(data)] == data
        assert len(rng.read(32, timeout=5)) == 32
        assert blk_fn.msix_enabled == msix and rng_fn.msix_enabled == msix
        assert not blk_fn.state.violations, list(blk_fn.state.violations)
        assert not rng_fn.state.violations, list(rng_fn.state.violations)
        for d, t in ((blk, blk_t), (rng, rng_t)):
            d.close()
            t.close()
