"""VIRTIO_F_NOTIFICATION_DATA end to end over virtio-pci (modern) and virtio-mmio
(version 2): pyvirtio's drivers against pyvirtio's device-side models on the
in-process bus, split and packed rings.

virtio-v1.2 §2.9 "Driver Notifications", §4.1.5.2 "Available Buffer Notifications"
(PCI: a 32-bit ``vq_index | next_off << 16 | next_wrap << 31`` at the Queue Notify
address), §4.2.2 "MMIO Device Register Layout" (QueueNotify takes the same value).
The device models record each notification write (``state.notify_writes``); the
device queue records the stated position and checks it against the ring.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyvirtio.core.driver import RingOptions
from pyvirtio.devices.blk import BlkDevice, MemoryBackend
from pyvirtio.devices.rng import RngDevice
from pyvirtio.drivers.blk import BlkDriver
from pyvirtio.drivers.rng import RngDriver
from pyvirtio.errors import DriverError
from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.spec.blk import SECTOR_SIZE
from pyvirtio.spec.features import Feature, has
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.transport.device_state import TransportDeviceState
from pyvirtio.transport.inprocess_bus import InProcessBus
from pyvirtio.transport.mmio.device import VirtioMmioDevice
from pyvirtio.transport.mmio.driver import VirtioMmioTransport
from pyvirtio.transport.mmio.spec import MmioReg
from pyvirtio.transport.pci.device import VirtioPciFunction
from pyvirtio.transport.pci.driver import (
    VirtioPciLegacyTransport,
    VirtioPciModernTransport,
    open_virtio_pci,
)
from pyvirtio.transport.pci.enumerate import enumerate_pci
from pyvirtio.virtqueue.packed import PackedDeviceQueue
from pyvirtio.virtqueue.split import SplitDeviceQueue

RAM = 16 << 20
DISK = 1 << 20

Transport = VirtioPciModernTransport | VirtioPciLegacyTransport | VirtioMmioTransport
Model = VirtioPciFunction | VirtioMmioDevice

_PCI_NOTIFY = "§4.1.5.2.1"


class Rig:
    """One device model on an in-process bus and the driver transport reaching it."""

    def __init__(self, kind: str, device: Any, *, force_legacy: bool = False, **kw: Any) -> None:
        self.bus = InProcessBus(RAM)
        self.kind = kind
        self.model: Model
        self.t: Transport
        if kind.startswith("pci"):
            mode = kind.split("-")[1]
            self.model = VirtioPciFunction(device, mode=mode, **kw)  # type: ignore[arg-type]
            bdf = self.bus.add_pci(self.model)
            enumerate_pci(self.bus)
            alloc = GuestAllocator(1 << 20, RAM - (1 << 20))
            self.t = open_virtio_pci(self.bus, bdf, allocator=alloc, force_legacy=force_legacy)
        else:
            self.model = VirtioMmioDevice(device, version=int(kind[-1]), **kw)
            slot = self.bus.add_mmio(self.model)
            self.t = VirtioMmioTransport(self.bus, slot.base, irq=slot.irq)

    @property
    def state(self) -> TransportDeviceState:
        return self.model.state

    def clauses(self) -> list[str]:
        return [str(v.clause) for v in self.state.violations]

    def close(self) -> None:
        self.t.close()
        self.bus.close()


@pytest.fixture
def rigs() -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(kind: str, device: Any, **kw: Any) -> Rig:
        r = Rig(kind, device, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed + (i >> 9)) & 0xFF for i in range(n))


KINDS = ["pci-modern", "pci-transitional", "mmio-v2"]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("kind", KINDS)
def test_blk_negotiates_and_sends_32_bit_notification_data(
    rigs: Callable[..., Rig], kind: str, packed: bool
) -> None:
    backend = MemoryBackend(DISK)
    r = rigs(kind, BlkDevice(backend))
    assert type(r.t) is not VirtioPciLegacyTransport
    drv = BlkDriver(r.t, ring=RingOptions(packed=packed), timeout=5)
    drv.initialize()
    assert has(drv.features, Feature.NOTIFICATION_DATA)
    assert r.state.notification_data
    assert has(drv.features, Feature.RING_PACKED) is packed
    for i in range(12):  # more than a packed lap of small requests
        data = _pattern(3 * SECTOR_SIZE, i)
        drv.write(3 * i, data)
        assert drv.read(3 * i, len(data)) == data
        # the last notification states exactly where the driver has published up to
        last = r.state.notify_writes[-1]
        assert last.width == 4
        assert last.value == 0 | drv.queues[0].notification_data() << 16
    drv.flush()
    assert bytes(backend.data[: 36 * SECTOR_SIZE]) == b"".join(
        _pattern(3 * SECTOR_SIZE, i) for i in range(12)
    )
    writes = list(r.state.notify_writes)
    assert writes and all(w.width == 4 and w.value & 0xFFFF == 0 for w in writes)
    # the device queue recorded the last statement
    vq = r.state.device_queue(0)
    stated = writes[-1].value >> 16
    if packed:
        assert isinstance(vq, PackedDeviceQueue)
        assert vq.notified_position == (stated & 0x7FFF, bool(stated >> 15))
    else:
        assert isinstance(vq, SplitDeviceQueue)
        assert vq.notified_idx == stated
        # split: the data is the avail idx, one request after another
        seq = [w.value >> 16 for w in writes]
        assert seq == sorted(seq) and seq[-1] == drv.queues[0].notification_data()
    assert list(r.state.violations) == []
    drv.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("kind", ["pci-modern", "mmio-v2"])
def test_rng_with_notification_data(rigs: Callable[..., Rig], kind: str, packed: bool) -> None:
    r = rigs(kind, RngDevice())
    drv = RngDriver(r.t, ring=RingOptions(packed=packed), buffer_size=256)
    drv.initialize()
    assert has(drv.features, Feature.NOTIFICATION_DATA)
    data = drv.read(3000)
    assert len(data) == 3000 and len(set(data)) > 200
    assert all(w.width == 4 for w in r.state.notify_writes)
    assert list(r.state.violations) == []
    drv.close()


@pytest.mark.parametrize("kind", KINDS)
def test_not_offered_when_disabled_the_notification_is_the_queue_index(
    rigs: Callable[..., Rig], kind: str
) -> None:
    backend = MemoryBackend(DISK)
    r = rigs(kind, BlkDevice(backend), notification_data=False)
    assert not has(r.t.get_device_features(), Feature.NOTIFICATION_DATA)
    drv = BlkDriver(r.t, timeout=5)
    drv.initialize()
    assert not has(drv.features, Feature.NOTIFICATION_DATA)
    drv.write(0, b"\x5a" * SECTOR_SIZE)
    width = 4 if kind.startswith("mmio") else 2  # MMIO registers are 32 bits wide
    assert [(w.width, w.value) for w in r.state.notify_writes] == [(width, 0)]
    assert list(r.state.violations) == []
    drv.close()


@pytest.mark.parametrize(
    ("kind", "force"),
    [("pci-legacy", False), ("pci-transitional", True), ("mmio-v1", False)],
    ids=["pci-legacy", "pci-transitional-forced", "mmio-v1"],
)
def test_never_offered_through_a_legacy_interface(
    rigs: Callable[..., Rig], kind: str, force: bool
) -> None:
    backend = MemoryBackend(DISK)
    r = rigs(kind, BlkDevice(backend), force_legacy=force)
    assert r.t.legacy
    assert not has(r.t.get_device_features(), Feature.NOTIFICATION_DATA)
    drv = BlkDriver(r.t, timeout=5)
    drv.initialize()
    assert r.state.legacy and not r.state.notification_data
    assert not has(drv.features, Feature.NOTIFICATION_DATA)
    drv.write(0, b"\xa5" * SECTOR_SIZE)
    assert bytes(backend.data[:SECTOR_SIZE]) == b"\xa5" * SECTOR_SIZE
    assert list(r.state.violations) == []
    drv.close()


@pytest.mark.parametrize("kind", ["pci-modern", "mmio-v2"])
def test_the_driver_refuses_a_notification_without_data_once_negotiated(
    rigs: Callable[..., Rig], kind: str
) -> None:
    r = rigs(kind, BlkDevice(MemoryBackend(DISK)))
    drv = BlkDriver(r.t, timeout=5)
    drv.initialize()
    with pytest.raises(DriverError, match="notify_data"):
        r.t.notify(0)
    drv.close()


# -- negative: a driver breaking the notification rules ---------------------------------------


def _hostile(r: Rig, send: Callable[[int, int], None]) -> None:
    """Make the transport's data notifications go through ``send(index, data)``."""
    assert isinstance(r.t, VirtioPciModernTransport | VirtioMmioTransport)
    r.t.notify_data = send  # type: ignore[method-assign,assignment]


def _raw_pci(r: Rig, width: int, value: int) -> None:
    assert isinstance(r.t, VirtioPciModernTransport)
    r.t.notify_region.write(r.t._notify_at[0], width, value)


def _raw_mmio(r: Rig, value: int) -> None:
    assert isinstance(r.t, VirtioMmioTransport)
    r.t._wr(MmioReg.QUEUE_NOTIFY, value)


def _io_still_correct(r: Rig, drv: BlkDriver, backend: MemoryBackend) -> None:
    data = _pattern(2 * SECTOR_SIZE, 9)
    drv.write(4, data)
    assert drv.read(4, len(data)) == data
    assert bytes(backend.data[4 * SECTOR_SIZE : 6 * SECTOR_SIZE]) == data
    assert not r.state.status & DeviceStatus.DEVICE_NEEDS_RESET


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_driver_notification_must_be_32_bit_when_negotiated(
    rigs: Callable[..., Rig], packed: bool
) -> None:
    backend = MemoryBackend(DISK)
    r = rigs("pci-modern", BlkDevice(backend))
    drv = BlkDriver(r.t, ring=RingOptions(packed=packed), timeout=5)
    drv.initialize()
    _hostile(r, lambda index, data: _raw_pci(r, 2, index))
    _io_still_correct(r, drv, backend)  # delivered, without data
    assert any(w.width == 2 for w in r.state.notify_writes)
    assert any("MUST be a 32-bit notification" in v.message for v in r.state.violations)
    assert all(_PCI_NOTIFY in c for c in r.clauses())


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("kind", ["pci-modern", "mmio-v2"])
def test_vq_index_out_of_range_is_logged_and_dropped(
    rigs: Callable[..., Rig], kind: str, packed: bool
) -> None:
    backend = MemoryBackend(DISK)
    r = rigs(kind, BlkDevice(backend))
    drv = BlkDriver(r.t, ring=RingOptions(packed=packed), timeout=5)
    drv.initialize()

    def send(index: int, data: int) -> None:
        bad = 7 | data << 16  # the blk device has one queue
        good = index | data << 16
        for value in (bad, good):
            if kind == "mmio-v2":
                _raw_mmio(r, value)
            else:
                _raw_pci(r, 4, value)

    _hostile(r, send)
    _io_still_correct(r, drv, backend)
    assert r.state.violations
    if kind == "mmio-v2":
        assert any("queue 7, which does not exist" in v.message for v in r.state.violations)
    else:
        assert any("vq_index 7" in v.message for v in r.state.violations)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("kind", ["pci-modern", "mmio-v2"])
def test_next_off_must_match_what_was_made_available(
    rigs: Callable[..., Rig], kind: str, packed: bool
) -> None:
    backend = MemoryBackend(DISK)
    r = rigs(kind, BlkDevice(backend))
    drv = BlkDriver(r.t, ring=RingOptions(packed=packed, indirect=False), timeout=5)
    drv.initialize()
    assert isinstance(r.t, VirtioPciModernTransport | VirtioMmioTransport)
    inner = r.t.notify_data

    def send(index: int, data: int) -> None:
        # claims two more ring entries than it made available
        off, wrap = data & 0x7FFF, data >> 15
        inner(index, (off + 2) & 0x7FFF | wrap << 15)

    _hostile(r, send)
    _io_still_correct(r, drv, backend)  # the device serves what the ring shows
    clause = (
        'virtio-v1.2 §2.8.16 "Driver Requirements: The Virtqueue Descriptor Table"'
        if packed
        else 'virtio-v1.2 §2.9 "Driver Notifications"'
    )
    assert r.state.violations and all(c == clause for c in r.clauses())
    vq = r.state.device_queue(0)
    assert vq is not None and not vq.broken


@pytest.mark.parametrize("kind", ["pci-modern", "mmio-v2"])
def test_a_notification_for_a_disabled_queue_is_logged(rigs: Callable[..., Rig], kind: str) -> None:
    backend = MemoryBackend(DISK)
    r = rigs(kind, BlkDevice(backend, num_queues=2))

    class OneQueue(BlkDriver):
        def queue_count(self) -> int:
            return 1

    drv = OneQueue(r.t, timeout=5)
    drv.initialize()
    assert not r.state.queue_enabled(1)
    if kind == "mmio-v2":
        _raw_mmio(r, 1 | 5 << 16)
    else:
        assert isinstance(r.t, VirtioPciModernTransport)
        r.t.notify_region.write(4, 4, 1 | 5 << 16)  # queue 1's Queue Notify address
    assert any("not" in v.message and "queue 1" in v.message for v in r.state.violations)
    _io_still_correct(r, drv, backend)
