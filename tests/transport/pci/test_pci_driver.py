"""The driver-side virtio-pci transports (enumeration, modern, legacy, the chooser)
driving pyvirtio's own device-side PCI function models on the in-process bus.

The blk and rng drivers run over modern, transitional (either interface) and legacy
functions, split and packed rings, indirect and event idx on and off, with MSI-X and
with INTx + ISR; interrupts are checked to reach the right transport and queue.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import pytest

from pyvirtio.core.driver import CONFIG_CHANGE, RingOptions
from pyvirtio.devices.blk import BlkDevice, MemoryBackend
from pyvirtio.devices.rng import RngDevice
from pyvirtio.drivers.blk import BlkDriver
from pyvirtio.drivers.rng import RngDriver
from pyvirtio.errors import ConfigurationError, DriverError
from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.spec.blk import SECTOR_SIZE
from pyvirtio.spec.features import Feature, has
from pyvirtio.spec.ids import DeviceId
from pyvirtio.transport.inprocess_bus import InProcessBus
from pyvirtio.transport.interrupts import InterruptRouter
from pyvirtio.transport.pci.device import VirtioPciFunction
from pyvirtio.transport.pci.driver import (
    VirtioPciLegacyTransport,
    VirtioPciModernTransport,
    open_virtio_pci,
    virtio_capabilities,
)
from pyvirtio.transport.pci.enumerate import (
    IO_WINDOW,
    MMIO32_WINDOW,
    bdf,
    enumerate_pci,
    find_functions,
    format_bdf,
    read_bars,
)
from pyvirtio.transport.pci.spec import (
    MSI_ADDRESS_BASE,
    CommonCfg,
    PciCfg,
    PciCommand,
    VirtioPciCapType,
)
from pyvirtio.virtqueue import make_driver_queue

RAM = 32 << 20
DISK = 2 << 20

Transport = VirtioPciModernTransport | VirtioPciLegacyTransport


class Machine:
    """An in-process bus with functions plugged in and enumerated."""

    def __init__(
        self,
        *functions: VirtioPciFunction,
        mmio64: bool = False,
        slots: list[int] | None = None,
    ) -> None:
        self.bus = InProcessBus(RAM)
        where = slots or [None] * len(functions)
        self.bdfs = [self.bus.add_pci(f, device=s) for f, s in zip(functions, where, strict=True)]
        self.functions = functions
        window = (0x8_0000_0000, 0x9_0000_0000) if mmio64 else None
        self.found = enumerate_pci(self.bus, mmio64_window=window)
        self.allocator = GuestAllocator(1 << 20, RAM - (1 << 20))
        self.transports: list[Transport] = []

    def open(self, index: int = 0, **kw: Any) -> Transport:
        t = open_virtio_pci(self.bus, self.bdfs[index], allocator=self.allocator, **kw)
        self.transports.append(t)
        return t

    def close(self) -> None:
        for t in self.transports:
            t.close()
        self.bus.close()


@pytest.fixture
def machines() -> Iterator[list[Machine]]:
    made: list[Machine] = []
    yield made
    for m in made:
        m.close()


def blk_function(mode: str = "modern", **kw: Any) -> tuple[VirtioPciFunction, MemoryBackend]:
    backend = MemoryBackend(DISK)
    dev_kw = {k: kw.pop(k) for k in ("num_queues",) if k in kw}
    return VirtioPciFunction(BlkDevice(backend, **dev_kw), mode=mode, **kw), backend  # type: ignore[arg-type]


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 17 + seed + (i >> 9)) & 0xFF for i in range(n))


# -- enumeration ------------------------------------------------------------------------------


def test_enumeration_sizes_places_and_enables_every_bar(machines: list[Machine]) -> None:
    f1, _ = blk_function("modern")
    f2, _ = blk_function("transitional")
    f3, _ = blk_function("legacy")
    m = Machine(f1, f2, f3)
    machines.append(m)
    virtio = [fn for fn in m.found if fn.vendor_id == 0x1AF4]
    assert [fn.bdf for fn in virtio] == m.bdfs
    assert [fn.device_id for fn in virtio] == [0x1042, 0x1001, 0x1001]
    spans = []
    for fn, model in zip(virtio, m.functions, strict=True):
        assert not fn.problems
        assert fn.bars, format_bdf(fn.bdf)
        for bar in fn.bars.values():
            assert bar.address is not None and bar.address % bar.size == 0
            lo, hi = IO_WINDOW if bar.io else MMIO32_WINDOW
            assert lo <= bar.address and bar.address + bar.size <= hi
            assert model.bar_address(bar.index) == bar.address
            assert model.bar_size(bar.index) == bar.size
            spans.append((bar.io, bar.address, bar.address + bar.size))
        cmd = m.bus.pci_cfg_read(fn.bdf, PciCfg.COMMAND, 2)
        assert cmd & PciCommand.MASTER and cmd & PciCommand.MEMORY
        assert bool(cmd & PciCommand.IO) is any(b.io for b in fn.bars.values())
        # no chipset whose routing we know: the bus's own Interrupt Line stays
        assert fn.interrupt_line == m.bus.intx_line(fn.bdf)
    spans.sort()
    for (io1, _, end1), (io2, start2, _) in itertools.pairwise(spans):
        assert io1 != io2 or end1 <= start2
    # the legacy function has its I/O BAR0 and no virtio capabilities
    assert virtio[2].bars[0].io
    assert VirtioPciCapType.COMMON_CFG not in virtio_capabilities(m.bus, m.bdfs[2])


def test_64_bit_bars_go_to_the_64_bit_window_when_given(machines: list[Machine]) -> None:
    f, backend = blk_function("modern")
    m = Machine(f, mmio64=True)
    machines.append(m)
    bars = read_bars(m.bus, m.bdfs[0])
    high = [b for b in bars.values() if b.is64]
    assert high and all(b.address is not None and b.address >= 0x8_0000_0000 for b in high)
    t = m.open()
    drv = BlkDriver(t, timeout=5)
    drv.initialize()
    drv.write(0, b"\xaa" * SECTOR_SIZE)
    assert bytes(backend.data[:SECTOR_SIZE]) == b"\xaa" * SECTOR_SIZE
    drv.close()


def test_find_functions_sees_only_what_answers(machines: list[Machine]) -> None:
    f, _ = blk_function()
    m = Machine(f)
    machines.append(m)
    found = find_functions(m.bus)
    assert [fn.bdf for fn in found] == [bdf(0, 0), m.bdfs[0]]
    assert str(found[1]).startswith(format_bdf(m.bdfs[0]))


# -- the chooser ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "force", "expected"),
    [
        ("modern", False, VirtioPciModernTransport),
        ("transitional", False, VirtioPciModernTransport),
        ("transitional", True, VirtioPciLegacyTransport),
        ("legacy", False, VirtioPciLegacyTransport),
        ("legacy", True, VirtioPciLegacyTransport),
    ],
)
def test_chooser_picks_modern_when_offered_and_legacy_when_forced(
    machines: list[Machine], mode: str, force: bool, expected: type
) -> None:
    f, _ = blk_function(mode)
    m = Machine(f)
    machines.append(m)
    t = m.open(force_legacy=force)
    assert type(t) is expected
    assert t.legacy is (expected is VirtioPciLegacyTransport)
    assert t.device_id() == DeviceId.BLOCK


def test_forcing_legacy_on_a_modern_only_function_is_refused(machines: list[Machine]) -> None:
    f, _ = blk_function("modern")
    m = Machine(f)
    machines.append(m)
    with pytest.raises(ConfigurationError, match="no legacy interface"):
        m.open(force_legacy=True)


def test_a_legacy_only_function_has_no_modern_interface(machines: list[Machine]) -> None:
    f, _ = blk_function("legacy")
    m = Machine(f)
    machines.append(m)
    with pytest.raises(ConfigurationError, match="no modern virtio interface"):
        VirtioPciModernTransport(m.bus, m.bdfs[0], allocator=m.allocator)


def test_non_virtio_and_missing_functions_are_refused(machines: list[Machine]) -> None:
    f, _ = blk_function()
    m = Machine(f)
    machines.append(m)
    with pytest.raises(ConfigurationError, match="not a virtio device"):
        open_virtio_pci(m.bus, bdf(0, 0), allocator=m.allocator)
    with pytest.raises(ConfigurationError, match="no PCI function"):
        open_virtio_pci(m.bus, bdf(0, 30), allocator=m.allocator)


def test_unassigned_bars_are_a_configuration_error() -> None:
    with InProcessBus(RAM) as bus:
        f, _ = blk_function()
        b = bus.add_pci(f)
        with pytest.raises(ConfigurationError, match="enumerate_pci"):
            open_virtio_pci(bus, b, allocator=GuestAllocator(1 << 20, 1 << 20))


# -- the drivers end to end ------------------------------------------------------------------------

# (mode, force_legacy, msix, packed, indirect, event_idx)
BLK_COMBOS = [
    ("modern", False, True, False, True, True),
    ("modern", False, True, True, True, True),
    ("modern", False, False, True, False, False),
    ("modern", False, False, False, False, True),
    ("transitional", False, True, True, False, True),
    ("transitional", True, True, False, True, False),
    ("transitional", True, False, False, False, True),
    ("legacy", False, True, False, True, True),
    ("legacy", False, False, False, False, False),
]


def _ids(combo: tuple[Any, ...]) -> str:
    mode, force, msix, packed, indirect, event_idx = combo
    parts = [mode, "forced-legacy" if force else "", "msix" if msix else "intx"]
    parts += ["packed" if packed else "split", "ind" if indirect else "noind"]
    parts.append("evidx" if event_idx else "noevidx")
    return "-".join(p for p in parts if p)


def _expect_interrupt(t: Transport, bus: InProcessBus, queue: int, msix: bool) -> None:
    before = t.interrupts
    fired = t.poll_interrupts(5.0)
    assert queue in fired
    assert t.interrupts > before
    assert t.interrupt_mode == ("msix" if msix else "intx")


@pytest.mark.parametrize("combo", BLK_COMBOS, ids=_ids)
def test_blk_driver_over_pci(machines: list[Machine], combo: tuple[Any, ...]) -> None:
    mode, force, msix, packed, indirect, event_idx = combo
    f, backend = blk_function(mode)
    m = Machine(f)
    machines.append(m)
    t = m.open(force_legacy=force, msix=msix)
    drv = BlkDriver(
        t, ring=RingOptions(packed=packed, indirect=indirect, event_idx=event_idx), timeout=5
    )
    drv.initialize()
    assert has(drv.features, Feature.RING_PACKED) is packed
    assert has(drv.features, Feature.INDIRECT_DESC) is indirect
    assert has(drv.features, Feature.EVENT_IDX) is event_idx
    assert has(drv.features, Feature.VERSION_1) is not t.legacy
    # an interrupt announces the first completion, for queue 0
    req = drv.submit_read(0, SECTOR_SIZE)
    _expect_interrupt(t, m.bus, 0, msix)
    drv.complete([req])
    data = _pattern(24 * SECTOR_SIZE, 3)
    drv.write(16, data)
    drv.flush()
    assert drv.read(16, len(data)) == data
    assert bytes(backend.data[16 * SECTOR_SIZE : 16 * SECTOR_SIZE + len(data)]) == data
    drv.close()
    # the device was reset by close()
    assert t.get_status() == 0
    # and the driver used only what the register layout allows
    assert list(f.state.violations) == []


RNG_COMBOS = [
    ("modern", False, True, True, True, False),
    ("modern", False, False, False, False, True),
    ("transitional", True, True, False, True, True),
    ("legacy", False, False, False, False, False),
]


@pytest.mark.parametrize("combo", RNG_COMBOS, ids=_ids)
def test_rng_driver_over_pci(machines: list[Machine], combo: tuple[Any, ...]) -> None:
    mode, force, msix, packed, indirect, event_idx = combo
    m = Machine(VirtioPciFunction(RngDevice(), mode=mode))  # type: ignore[arg-type]
    machines.append(m)
    t = m.open(force_legacy=force, msix=msix)
    drv = RngDriver(
        t, ring=RingOptions(packed=packed, indirect=indirect, event_idx=event_idx), buffer_size=256
    )
    drv.initialize()
    assert has(drv.features, Feature.RING_PACKED) is packed
    # a buffer made available straight on the queue comes back with an interrupt
    addr = t.allocator.alloc(64)
    drv.queues[0].add((), ((addr, 64),), "probe")
    drv.kick(0)
    _expect_interrupt(t, m.bus, 0, msix)
    assert drv.queues[0].get_used() == ("probe", 64)
    t.allocator.free(addr)
    data = drv.read(3000)
    assert len(data) == 3000 and len(set(data)) > 200
    drv.close()
    assert list(m.functions[0].state.violations) == []


def test_multi_queue_device_gets_a_vector_per_queue(machines: list[Machine]) -> None:
    f, _ = blk_function("modern", num_queues=3)
    m = Machine(f)
    machines.append(m)
    t = m.open()
    drv = BlkDriver(t, timeout=5)
    drv.initialize()
    assert drv.num_request_queues == 3
    assert t._irq is not None and t._irq.vector_events == {
        0: {CONFIG_CHANGE},
        1: {0},
        2: {1},
        3: {2},
    }
    for q in range(3):
        req = drv.submit_read(q, SECTOR_SIZE)
        assert req.queue == q
        assert t.poll_interrupts(5.0) == {q}
        drv.complete([req])
    drv.close()


@pytest.mark.parametrize("vectors", [1, 2])
def test_small_msix_tables_share_vectors(machines: list[Machine], vectors: int) -> None:
    f, _ = blk_function("modern", num_queues=2, msix_vectors=vectors)
    m = Machine(f)
    machines.append(m)
    t = m.open()
    drv = BlkDriver(t, timeout=5)
    drv.initialize()
    assert t._irq is not None
    if vectors == 2:
        assert t._irq.vector_events == {0: {CONFIG_CHANGE}, 1: {0, 1}}
    else:
        assert t._irq.vector_events == {0: {CONFIG_CHANGE, 0, 1}}
    req = drv.submit_read(0, SECTOR_SIZE)
    fired = t.poll_interrupts(5.0)
    # a shared vector reports every queue on it, but no configuration change
    assert fired == {0, 1}
    drv.complete([req])
    drv.close()


def test_function_without_msix_uses_intx(machines: list[Machine]) -> None:
    f, _ = blk_function("modern", msix_vectors=0)
    m = Machine(f)
    machines.append(m)
    t = m.open()
    assert t.interrupt_mode == "intx"
    drv = BlkDriver(t, timeout=5)
    drv.initialize()
    req = drv.submit_read(0, SECTOR_SIZE)
    _expect_interrupt(t, m.bus, 0, msix=False)
    drv.complete([req])
    drv.close()


@pytest.mark.parametrize(("mode", "msix"), [("modern", True), ("modern", False), ("legacy", True)])
def test_configuration_change_is_reported(machines: list[Machine], mode: str, msix: bool) -> None:
    f, _ = blk_function(mode)
    m = Machine(f)
    machines.append(m)
    t = m.open(msix=msix)
    drv = BlkDriver(t, timeout=5)
    drv.initialize()
    f.device.config_changed()
    assert CONFIG_CHANGE in t.poll_interrupts(5.0)
    assert t.interrupt_counts[CONFIG_CHANGE] == 1
    drv.close()


def test_interrupts_reach_the_transport_they_belong_to(machines: list[Machine]) -> None:
    # slots 1 and 5 share an INTx line; two MSI-X functions share the router
    fa, _ = blk_function("modern")
    fb, _ = blk_function("modern")
    m = Machine(fa, fb, slots=[1, 5])
    machines.append(m)
    bus = m.bus
    ba, bb = m.bdfs
    assert bus.intx_line(ba) == bus.intx_line(bb)
    for msix in (True, False):
        ta, tb = m.open(0, msix=msix), m.open(1, msix=msix)
        da, db = BlkDriver(ta, timeout=5), BlkDriver(tb, timeout=5)
        da.initialize()
        db.initialize()
        req = db.submit_read(0, SECTOR_SIZE)
        assert tb.poll_interrupts(5.0) == {0}
        assert ta.poll_interrupts(0) == set()
        db.complete([req])
        req = da.submit_read(0, SECTOR_SIZE)
        assert ta.poll_interrupts(5.0) == {0}
        da.complete([req])
        da.close()
        db.close()
        ta.close()
        tb.close()
    assert InterruptRouter.for_bus(bus).unclaimed == 0


def test_msix_messages_target_the_x86_interrupt_window(machines: list[Machine]) -> None:
    f, _ = blk_function()
    m = Machine(f)
    machines.append(m)
    t = m.open()
    assert t._irq is not None
    assert t._irq.keys and all(addr == MSI_ADDRESS_BASE for addr, _ in t._irq.keys)
    assert len({data for _, data in t._irq.keys}) == len(t._irq.keys)


def test_interrupt_fds_are_the_bus_ones(machines: list[Machine]) -> None:
    f, _ = blk_function()
    m = Machine(f)
    machines.append(m)
    t = m.open()
    assert t.interrupt_fds() == m.bus.interrupt_fds()


def test_config_reads_past_the_structure_read_as_zero(machines: list[Machine]) -> None:
    f, _ = blk_function()
    m = Machine(f)
    machines.append(m)
    t = m.open()
    assert isinstance(t, VirtioPciModernTransport) and t.device_cfg is not None
    length = t.device_cfg.length
    tail = t.read_config(length - 4, 12)
    assert tail[4:] == bytes(8)
    assert t.read_config(length + 100, 4) == bytes(4)
    # the capacity field, read through the device cfg capability
    assert int.from_bytes(t.read_config(0, 8), "little") == DISK // SECTOR_SIZE


class RingResetBlkDriver(BlkDriver):
    """A blk driver that also accepts VIRTIO_F_RING_RESET."""

    def ring_features(self, offered: int) -> int:
        return super().ring_features(offered) | (offered & Feature.RING_RESET.mask)


def test_queue_reset_then_setup_again(machines: list[Machine]) -> None:
    f, backend = blk_function(ring_reset=True)
    m = Machine(f)
    machines.append(m)
    t = m.open()
    assert isinstance(t, VirtioPciModernTransport)
    drv = RingResetBlkDriver(t, timeout=5)
    drv.initialize()
    assert has(drv.features, Feature.RING_RESET)
    drv.write(0, b"\x11" * SECTOR_SIZE)
    t.reset_queue(0)
    t._select(0)
    # §4.1.4.3.1: "present 0 in both queue_reset and queue_enable when queue reset
    # has completed"
    assert t.common.read(CommonCfg.QUEUE_ENABLE, 2) == 0
    with pytest.raises(DriverError, match="not set up"):
        t.notify(0)
    # a fresh ring for the same queue
    q = drv.queues[0]
    q.detach_unused()
    q.close()
    new = make_driver_queue(t.mem, t.allocator, 64, drv.features)
    drv.queues[0] = new
    t.setup_queue(0, 64, new.addrs)
    drv.write(1, b"\x22" * SECTOR_SIZE)
    assert bytes(backend.data[SECTOR_SIZE : 2 * SECTOR_SIZE]) == b"\x22" * SECTOR_SIZE
    drv.close()


def test_queue_reset_needs_ring_reset_negotiated(machines: list[Machine]) -> None:
    f, _ = blk_function(ring_reset=True)
    m = Machine(f)
    machines.append(m)
    t = m.open()
    assert isinstance(t, VirtioPciModernTransport)
    drv = BlkDriver(t, timeout=5)
    drv.initialize()
    with pytest.raises(DriverError, match="RING_RESET"):
        t.reset_queue(0)
    drv.close()


def test_device_survives_open_close_cycles(machines: list[Machine]) -> None:
    f, backend = blk_function("transitional")
    m = Machine(f)
    machines.append(m)
    for i, force in enumerate((False, True, False, True)):
        t = m.open(force_legacy=force, msix=bool(i % 2))
        drv = BlkDriver(t, timeout=5)
        drv.initialize()
        data = bytes([i + 1]) * SECTOR_SIZE
        drv.write(i, data)
        assert drv.read(i, SECTOR_SIZE) == data
        drv.close()
        t.close()
    assert bytes(backend.data[3 * SECTOR_SIZE : 4 * SECTOR_SIZE]) == b"\x04" * SECTOR_SIZE


def test_big_writes_are_split_and_land_in_the_backend(machines: list[Machine]) -> None:
    f, backend = blk_function()
    m = Machine(f)
    machines.append(m)
    t = m.open()
    drv = BlkDriver(t, timeout=5, max_request_bytes=64 * 1024)
    drv.initialize()
    data = os.urandom(300 * 1024)
    drv.write(0, data)
    assert bytes(backend.data[: len(data)]) == data
    drv.close()


def test_intx_after_a_user_that_left_msix_enabled(machines: list[Machine]) -> None:
    f, _backend = blk_function("transitional")
    m = Machine(f)
    machines.append(m)
    m.open(force_legacy=True)  # enables MSI-X and is never closed
    assert f.msix_enabled
    t = m.open(force_legacy=True, msix=False)
    assert t.interrupt_mode == "intx" and not f.msix_enabled
    drv = BlkDriver(t, timeout=5)
    drv.initialize()
    # the legacy configuration is read at offset 20 again, where MSI-X is off
    assert drv.capacity == DISK // SECTOR_SIZE
    req = drv.submit_read(0, SECTOR_SIZE)
    _expect_interrupt(t, m.bus, 0, msix=False)
    drv.complete([req])
    drv.close()
