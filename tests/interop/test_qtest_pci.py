"""The pyvirtio PCI driver transports against QEMU's own virtio-pci devices, via qtest.

Peer: "QEMU 7.2 virtio-blk-pci / virtio-rng-pci via qtest" (``qemu-system-x86_64
-machine pc``, the test process being the guest CPU: enumeration, BAR assignment,
capability walk, MSI-X table programming, INTx through ``irq_intercept_in``).

One QEMU per device configuration (split / packed ring, ``indirect_desc``,
``event_idx``), each holding five functions:

=====  =====================================================  ====================
slot   device                                                 interfaces
=====  =====================================================  ====================
3      virtio-blk-pci ``disable-legacy=on``                   modern only
4      virtio-blk-pci (default)                               transitional
5      virtio-blk-pci ``disable-modern=on``                   legacy only
6      virtio-rng-pci ``disable-legacy=on``                   modern only
7      virtio-rng-pci (default)                               transitional
=====  =====================================================  ====================

The blk driver writes, flushes and reads back, and the image file is checked on the
host; the rng driver must receive entropy. Every case asserts that interrupts
(MSI-X messages or INTx raises) reached the transport and woke the driver.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtio.drivers.blk import BlkDriver
from pyvirtio.drivers.blk.aio import AsyncBlkDriver
from pyvirtio.drivers.rng import RngDriver
from pyvirtio.spec.features import Feature, has
from pyvirtio.spec.ids import DeviceId
from pyvirtio.transport.pci.driver import (
    VirtioPciLegacyTransport,
    VirtioPciModernTransport,
    open_virtio_pci,
    virtio_capabilities,
)
from pyvirtio.transport.pci.enumerate import bdf, enumerate_pci
from pyvirtio.transport.pci.spec import VirtioPciCapType
from pyvirtio.transport.qtest import QtestBus

PEER = "QEMU 7.2 virtio-blk-pci / virtio-rng-pci via qtest"

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason=f"{PEER}: QEMU not installed"
    ),
]

IMAGE_BYTES = 4 << 20
SECTOR = 512
BLK_MODERN, BLK_TRANSITIONAL, BLK_LEGACY, RNG_MODERN, RNG_TRANSITIONAL = 3, 4, 5, 6, 7

#: device configurations: id -> (packed, indirect_desc, event_idx)
CONFIGS = {
    "split-indirect-eventidx": (False, True, True),
    "split-noindirect-noeventidx": (False, False, False),
    "packed-indirect-noeventidx": (True, True, False),
    "packed-noindirect-eventidx": (True, False, True),
}

#: QEMU 7.2 does not set VIRTQ_DESC_F_WRITE in the used descriptors of a packed ring;
#: virtio-rng reports what it wrote only through Element Length, so the rng cases on
#: packed rings check that the packed driver takes the length of a buffer that has a
#: device-writable part anyway (as Linux does).


def _opts(packed: bool, indirect: bool, event_idx: bool) -> str:
    def onoff(v: bool) -> str:
        return "on" if v else "off"

    return f"packed={onoff(packed)},indirect_desc={onoff(indirect)},event_idx={onoff(event_idx)}"


@dataclass
class Machine:
    """One QEMU with the five functions of the table above."""

    bus: QtestBus
    images: dict[int, Path]
    packed: bool
    indirect: bool
    event_idx: bool


@pytest.fixture(scope="module", params=list(CONFIGS))
def machine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Machine]:
    packed, indirect, event_idx = CONFIGS[request.param]
    tmp = tmp_path_factory.mktemp("qtest-pci")
    opts = _opts(packed, indirect, event_idx)
    args: list[str] = []
    images = {}
    for slot, extra in (
        (BLK_MODERN, "disable-legacy=on"),
        (BLK_TRANSITIONAL, "disable-legacy=off"),
        (BLK_LEGACY, "disable-modern=on"),
    ):
        img = tmp / f"disk{slot}.raw"
        img.write_bytes(b"")
        os.truncate(img, IMAGE_BYTES)
        images[slot] = img
        args += [
            "-drive",
            f"if=none,id=d{slot},file={img},format=raw",
            "-device",
            f"virtio-blk-pci,drive=d{slot},addr={slot},{extra},{opts}",
        ]
    args += [
        "-device",
        f"virtio-rng-pci,addr={RNG_MODERN},disable-legacy=on,{opts}",
        "-device",
        f"virtio-rng-pci,addr={RNG_TRANSITIONAL},{opts}",
    ]
    bus = QtestBus(args)
    try:
        enumerate_pci(bus)
        yield Machine(bus, images, packed, indirect, event_idx)
    finally:
        bus.close()


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 131 + seed * 7 + (i >> 9)) & 0xFF for i in range(n))


def _blk_first_request_interrupts(
    drv: BlkDriver, transport: VirtioPciModernTransport | VirtioPciLegacyTransport
) -> None:
    """The first request's completion is announced by an interrupt for queue 0."""
    req = drv.submit_read(0, SECTOR)
    fired = transport.poll_interrupts(10.0)
    assert 0 in fired
    drv.complete([req])


def _rng_first_buffer_interrupts(
    drv: RngDriver, transport: VirtioPciModernTransport | VirtioPciLegacyTransport
) -> None:
    """A buffer made available straight on the queue comes back with an interrupt."""
    addr = transport.allocator.alloc(64)
    try:
        q = drv.queues[0]
        q.add((), ((addr, 64),), "probe")
        drv.kick(0)
        assert 0 in transport.poll_interrupts(10.0)
        token, length = q.get_used() or (None, 0)
        assert token == "probe" and 0 < length <= 64
    finally:
        transport.allocator.free(addr)


def _check_interrupts(
    transport: VirtioPciModernTransport | VirtioPciLegacyTransport, msix: bool, bus: QtestBus
) -> None:
    """Interrupts arrived, were mapped to queue 0, and woke the driver up."""
    assert transport.interrupt_mode == ("msix" if msix else "intx")
    assert transport.interrupts > 0
    assert transport.interrupt_counts.get(0, 0) > 0
    assert transport.wakeups > 0
    assert bus.interrupt_counts["msi" if msix else "intx"] > 0


def test_enumeration_finds_the_qemu_functions(machine: Machine) -> None:
    functions = {fn.slot: fn for fn in enumerate_pci(machine.bus)}
    ids = {s: (functions[s].vendor_id, functions[s].device_id) for s in range(3, 8)}
    assert ids == {
        BLK_MODERN: (0x1AF4, 0x1042),
        BLK_TRANSITIONAL: (0x1AF4, 0x1001),
        BLK_LEGACY: (0x1AF4, 0x1001),
        RNG_MODERN: (0x1AF4, 0x1044),
        RNG_TRANSITIONAL: (0x1AF4, 0x1005),
    }
    assert functions[BLK_TRANSITIONAL].subsystem_id == DeviceId.BLOCK
    # every BAR placed, none overlapping, naturally aligned
    spans = []
    for fn in functions.values():
        assert not fn.problems
        for bar in fn.bars.values():
            assert bar.address is not None and bar.address % bar.size == 0
            spans.append((bar.io, bar.address, bar.address + bar.size))
    spans.sort()
    for (io1, _, end1), (io2, start2, _) in itertools.pairwise(spans):
        assert io1 != io2 or end1 <= start2
    caps = virtio_capabilities(machine.bus, bdf(0, BLK_MODERN))
    assert {
        VirtioPciCapType.COMMON_CFG,
        VirtioPciCapType.NOTIFY_CFG,
        VirtioPciCapType.ISR_CFG,
        VirtioPciCapType.DEVICE_CFG,
        VirtioPciCapType.PCI_CFG,
    } <= set(caps)
    assert VirtioPciCapType.COMMON_CFG not in virtio_capabilities(machine.bus, bdf(0, BLK_LEGACY))


BLK_CASES = {
    # id: (slot, force_legacy, msix, expected transport)
    "modern-msix": (BLK_MODERN, False, True, VirtioPciModernTransport),
    "modern-intx": (BLK_MODERN, False, False, VirtioPciModernTransport),
    "transitional-picks-modern": (BLK_TRANSITIONAL, False, True, VirtioPciModernTransport),
    "transitional-forced-legacy-msix": (BLK_TRANSITIONAL, True, True, VirtioPciLegacyTransport),
    "transitional-forced-legacy-intx": (BLK_TRANSITIONAL, True, False, VirtioPciLegacyTransport),
    "legacy-only-msix": (BLK_LEGACY, False, True, VirtioPciLegacyTransport),
    "legacy-only-intx": (BLK_LEGACY, False, False, VirtioPciLegacyTransport),
}


@pytest.mark.parametrize("case", list(BLK_CASES))
def test_blk_write_flush_read_back(machine: Machine, case: str) -> None:
    slot, force_legacy, msix, expected = BLK_CASES[case]
    bus = machine.bus
    transport = open_virtio_pci(bus, bdf(0, slot), force_legacy=force_legacy, msix=msix)
    assert type(transport) is expected
    drv = BlkDriver(transport, timeout=20)
    try:
        drv.initialize()
        legacy = expected is VirtioPciLegacyTransport
        assert transport.legacy is legacy
        assert drv.capacity == IMAGE_BYTES // SECTOR
        assert has(drv.features, Feature.VERSION_1) is not legacy
        assert has(drv.features, Feature.RING_PACKED) is (machine.packed and not legacy)
        assert has(drv.features, Feature.INDIRECT_DESC) is machine.indirect
        assert has(drv.features, Feature.EVENT_IDX) is machine.event_idx
        _blk_first_request_interrupts(drv, transport)
        seed = sum(map(ord, case))
        writes = [(8, _pattern(SECTOR, seed)), (100, _pattern(16 * SECTOR, seed + 1))]
        writes.append((1000, _pattern(128 * SECTOR, seed + 2)))
        for sector, data in writes:
            drv.write(sector, data)
        drv.flush()
        for sector, data in writes:
            assert drv.read(sector, len(data)) == data
        with open(machine.images[slot], "rb") as img:
            for sector, data in writes:
                img.seek(sector * SECTOR)
                assert img.read(len(data)) == data
        _check_interrupts(transport, msix, bus)
    finally:
        drv.close()
        transport.close()


RNG_CASES = {
    "modern-msix": (RNG_MODERN, False, True, VirtioPciModernTransport),
    "modern-intx": (RNG_MODERN, False, False, VirtioPciModernTransport),
    "transitional-picks-modern": (RNG_TRANSITIONAL, False, True, VirtioPciModernTransport),
    "transitional-forced-legacy": (RNG_TRANSITIONAL, True, True, VirtioPciLegacyTransport),
}


@pytest.mark.parametrize("case", list(RNG_CASES))
def test_rng_entropy_arrives(machine: Machine, case: str) -> None:
    slot, force_legacy, msix, expected = RNG_CASES[case]
    legacy = expected is VirtioPciLegacyTransport
    transport = open_virtio_pci(machine.bus, bdf(0, slot), force_legacy=force_legacy, msix=msix)
    assert type(transport) is expected
    drv = RngDriver(transport, buffer_size=1024, timeout=20)
    try:
        drv.initialize()
        assert has(drv.features, Feature.RING_PACKED) is (machine.packed and not legacy)
        _rng_first_buffer_interrupts(drv, transport)
        data = drv.read(8192)
        assert len(data) == 8192
        # entropy, not a constant fill: many distinct byte values
        assert len(set(data)) > 200
        _check_interrupts(transport, msix, machine.bus)
    finally:
        drv.close()
        transport.close()


def test_async_blk_driver_is_woken_by_the_interrupt_fds(machine: Machine) -> None:
    """The asyncio driver waits on ``interrupt_fds()``: MSI-X messages (memory writes
    into the qtest MSI window) must wake its event loop."""
    transport = open_virtio_pci(machine.bus, bdf(0, BLK_MODERN))
    drv = AsyncBlkDriver.create(transport, timeout=20)
    data = _pattern(8 * SECTOR, 99)

    async def run() -> list[bytes]:
        await asyncio.gather(*(drv.write(64 + 8 * i, data) for i in range(32)))
        await drv.flush()
        return await asyncio.gather(*(drv.read(64 + 8 * i, len(data)) for i in range(32)))

    try:
        assert asyncio.run(run()) == [data] * 32
        _check_interrupts(transport, True, machine.bus)
    finally:
        drv.driver.close()
        transport.close()
