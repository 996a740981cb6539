"""The pyvirtio MMIO driver transport against QEMU's own virtio-mmio devices, via qtest.

Peer: "QEMU 7.2 virtio-blk-device / virtio-rng-device (microvm) via qtest"
(``qemu-system-x86_64 -machine microvm,ioapic2=off``: eight virtio-mmio windows at
0xFEB00000 + n * 0x200, interrupt of slot n on I/O APIC input 16 + n, intercepted
with ``irq_intercept_in``). QEMU's virtio-mmio is version 1 (legacy) by default;
``-global virtio-mmio.force-legacy=false`` gives version 2.

One QEMU per configuration (version, split / packed ring, ``indirect_desc``,
``event_idx``) with a virtio-blk-device and a virtio-rng-device. The blk driver
writes, flushes and reads back, and the image file is checked on the host; the rng
driver must receive entropy; interrupts must reach the transport and wake the driver.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtio.drivers.blk import BlkDriver
from pyvirtio.drivers.rng import RngDriver
from pyvirtio.spec.features import Feature, has
from pyvirtio.spec.ids import DeviceId
from pyvirtio.transport.mmio.driver import VirtioMmioTransport, find_mmio_devices, microvm_irq
from pyvirtio.transport.qtest import QtestBus

PEER = "QEMU 7.2 virtio-blk-device / virtio-rng-device (microvm) via qtest"

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason=f"{PEER}: QEMU not installed"
    ),
]

IMAGE_BYTES = 4 << 20
SECTOR = 512

#: configurations: id -> (version, packed, indirect_desc, event_idx)
CONFIGS = {
    "v2-split-indirect-eventidx": (2, False, True, True),
    "v2-split-noindirect-noeventidx": (2, False, False, False),
    "v2-packed-indirect-noeventidx": (2, True, True, False),
    "v1-split-indirect-eventidx": (1, False, True, True),
    "v1-split-noindirect-noeventidx": (1, False, False, False),
}


@dataclass
class Microvm:
    bus: QtestBus
    image: Path
    version: int
    packed: bool
    indirect: bool
    event_idx: bool
    #: device id -> (slot, base address)
    devices: dict[int, tuple[int, int]]


@pytest.fixture(scope="module", params=list(CONFIGS))
def microvm(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Microvm]:
    version, packed, indirect, event_idx = CONFIGS[request.param]
    img = tmp_path_factory.mktemp("qtest-mmio") / "disk.raw"
    img.write_bytes(b"")
    os.truncate(img, IMAGE_BYTES)

    def onoff(v: bool) -> str:
        return "on" if v else "off"

    opts = f"packed={onoff(packed)},indirect_desc={onoff(indirect)},event_idx={onoff(event_idx)}"
    args = [
        "-drive",
        f"if=none,id=d0,file={img},format=raw",
        "-device",
        f"virtio-blk-device,drive=d0,{opts}",
        "-device",
        f"virtio-rng-device,{opts}",
    ]
    if version == 2:
        args += ["-global", "virtio-mmio.force-legacy=false"]
    bus = QtestBus(args, machine="microvm")
    try:
        devices = {did: (slot, addr) for slot, addr, did in find_mmio_devices(bus)}
        yield Microvm(bus, img, version, packed, indirect, event_idx, devices)
    finally:
        bus.close()


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 151 + seed * 3 + (i >> 9)) & 0xFF for i in range(n))


def _open(vm: Microvm, device: DeviceId) -> VirtioMmioTransport:
    slot, base = vm.devices[device]
    transport = VirtioMmioTransport(vm.bus, base, irq=microvm_irq(slot))
    assert transport.version == vm.version
    assert transport.legacy is (vm.version == 1)
    assert transport.device_id() == device
    return transport


def _check_interrupts(transport: VirtioMmioTransport, bus: QtestBus) -> None:
    assert transport.interrupts > 0
    assert transport.interrupt_counts.get(0, 0) > 0
    assert transport.wakeups > 0
    assert bus.interrupt_counts["intx"] > 0


def test_probe_finds_both_devices(microvm: Microvm) -> None:
    assert set(microvm.devices) == {DeviceId.BLOCK, DeviceId.ENTROPY}
    transport = _open(microvm, DeviceId.BLOCK)
    try:
        assert transport.num_queues() == 1
        if microvm.version == 2:
            # no shared memory regions: SHMLen reads as all ones
            assert transport.shm_region(0) is None
    finally:
        transport.close()


def test_blk_write_flush_read_back(microvm: Microvm) -> None:
    transport = _open(microvm, DeviceId.BLOCK)
    drv = BlkDriver(transport, timeout=20)
    try:
        drv.initialize()
        legacy = microvm.version == 1
        assert drv.capacity == IMAGE_BYTES // SECTOR
        assert has(drv.features, Feature.VERSION_1) is not legacy
        assert has(drv.features, Feature.RING_PACKED) is microvm.packed
        assert has(drv.features, Feature.INDIRECT_DESC) is microvm.indirect
        assert has(drv.features, Feature.EVENT_IDX) is microvm.event_idx
        # the first completion is announced by an interrupt for queue 0
        req = drv.submit_read(0, SECTOR)
        assert 0 in transport.poll_interrupts(10.0)
        drv.complete([req])
        seed = microvm.version * 10 + microvm.packed * 2 + microvm.indirect
        writes = [(3, _pattern(SECTOR, seed)), (64, _pattern(24 * SECTOR, seed + 1))]
        writes.append((2000, _pattern(128 * SECTOR, seed + 2)))
        for sector, data in writes:
            drv.write(sector, data)
        drv.flush()
        for sector, data in writes:
            assert drv.read(sector, len(data)) == data
        with open(microvm.image, "rb") as img:
            for sector, data in writes:
                img.seek(sector * SECTOR)
                assert img.read(len(data)) == data
        _check_interrupts(transport, microvm.bus)
    finally:
        drv.close()
        transport.close()


def test_rng_entropy_arrives(microvm: Microvm) -> None:
    transport = _open(microvm, DeviceId.ENTROPY)
    drv = RngDriver(transport, buffer_size=1024, timeout=20)
    try:
        drv.initialize()
        # a buffer made available straight on the queue comes back with an interrupt
        addr = transport.allocator.alloc(64)
        q = drv.queues[0]
        q.add((), ((addr, 64),), "probe")
        drv.kick(0)
        assert 0 in transport.poll_interrupts(10.0)
        token, length = q.get_used() or (None, 0)
        transport.allocator.free(addr)
        assert token == "probe" and 0 < length <= 64
        data = drv.read(8192)
        assert len(data) == 8192 and len(set(data)) > 200
        _check_interrupts(transport, microvm.bus)
    finally:
        drv.close()
        transport.close()
