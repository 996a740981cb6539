"""BlkDriver end to end against BlkDevice over the in-process loopback: every request
type on split and packed rings (indirect and event idx on/off), errors, read-only,
writeback, multiqueue, the submission API, data integrity against a shadow image,
and a misbehaving device (errors, never hangs)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirtio.core.driver import RingOptions
from pyvirtio.devices.blk import BlkDevice, FileBackend, MemoryBackend
from pyvirtio.drivers.blk import (
    BlkDriver,
    BlkIOError,
    BlkRequest,
    BlkTimeoutError,
    BlkUnsupportedError,
)
from pyvirtio.errors import DeviceError, DriverError, QueueBrokenError, VirtioError
from pyvirtio.spec.blk import SECTOR_SIZE, BlkFeature, BlkReqType, BlkStatus
from pyvirtio.spec.features import Feature, bit
from pyvirtio.transport.loopback import connect
from pyvirtio.virtqueue.common import DescriptorChain, DeviceVirtqueue

RING = [pytest.param(False, id="split"), pytest.param(True, id="packed")]
DISK = 256 * SECTOR_SIZE


@pytest.fixture
def blk() -> Iterator[Any]:
    made: list[BlkDriver] = []

    def make(device: BlkDevice | None = None, driver_cls: Any = BlkDriver, **kw: Any) -> Any:
        dev = device or BlkDevice(MemoryBackend(DISK))
        drv = connect(driver_cls, dev, **kw)
        made.append(drv)
        return drv

    yield make
    for d in made:
        d.close()
        d.transport.close()


def exercise_all_request_types(drv: BlkDriver, dev: BlkDevice) -> None:
    rnd = random.Random(7)
    data = rnd.randbytes(8 * SECTOR_SIZE)
    drv.write(10, data)
    assert drv.read(10, len(data)) == data
    assert drv.read(11, SECTOR_SIZE) == data[SECTOR_SIZE : 2 * SECTOR_SIZE]
    drv.flush()
    assert drv.get_id() == b"pyvirtio"
    drv.discard(10, 2)
    assert drv.read(10, 1024) == bytes(1024)  # MemoryBackend: a hole reads zeros
    drv.write_zeroes(12, 2)
    drv.write_zeroes(14, 2, unmap=True)
    assert drv.read(10, len(data)) == bytes(6 * SECTOR_SIZE) + data[6 * SECTOR_SIZE :]
    m = dev.metrics
    assert m.writes == 1 and m.flushes == 1 and m.get_ids == 1
    assert m.discards == 1 and m.write_zeroes == 2 and m.reads == 4
    assert m.errors == {}


@pytest.mark.parametrize("packed", RING)
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
@pytest.mark.parametrize("event_idx", [False, True], ids=["no-event-idx", "event-idx"])
def test_every_request_type(blk: Any, packed: bool, indirect: bool, event_idx: bool) -> None:
    dev = BlkDevice(MemoryBackend(DISK))
    drv = blk(dev, ring=RingOptions(packed=packed, indirect=indirect, event_idx=event_idx))
    assert drv.has_feature(Feature.RING_PACKED) == packed
    assert drv.has_feature(Feature.INDIRECT_DESC) == indirect
    assert drv.has_feature(Feature.EVENT_IDX) == event_idx
    exercise_all_request_types(drv, dev)
    assert drv.transport.state.violation_count == 0


@pytest.mark.parametrize("packed", RING)
def test_in_order_off(blk: Any, packed: bool) -> None:
    dev = BlkDevice(MemoryBackend(DISK))
    drv = blk(dev, ring=RingOptions(packed=packed, in_order=False))
    assert not drv.has_feature(Feature.IN_ORDER)
    exercise_all_request_types(drv, dev)


def test_configuration_is_read(blk: Any) -> None:
    dev = BlkDevice(MemoryBackend(DISK + 300), blk_size=4096, geometry=(1, 2, 3))
    drv = blk(dev)
    assert drv.capacity == 256
    assert drv.size == DISK
    assert drv.blk_size == 4096
    assert drv.has_feature(BlkFeature.GEOMETRY)
    assert (drv.config.cylinders, drv.config.heads, drv.config.sectors) == (1, 2, 3)
    assert not drv.read_only
    assert drv.num_request_queues == 1


def test_large_io_is_split_at_size_max_and_seg_max(blk: Any) -> None:
    """The driver honours size_max (segment size) and seg_max (segments/request)."""
    dev = BlkDevice(MemoryBackend(DISK), size_max=1024, seg_max=3)
    drv = blk(dev)
    assert drv.max_request_bytes == 3072
    data = os.urandom(20 * SECTOR_SIZE)
    drv.write(3, data)
    assert dev.metrics.writes == 4  # 10240 bytes / 3072
    assert drv.read(3, len(data)) == data


def test_io_larger_than_queue_and_memory(blk: Any) -> None:
    """More data than fits in flight at once: requests wait for room (queue slots and
    guest memory) instead of failing."""
    dev = BlkDevice(MemoryBackend(4 << 20), queue_max_size=4)
    drv = blk(dev, mem_size=1 << 20, max_request_bytes=64 << 10)
    data = os.urandom(3 << 20)
    free0 = drv.transport.allocator.free_bytes
    drv.write(0, data)
    assert drv.read(0, len(data)) == data
    assert drv.transport.allocator.free_bytes == free0


# -- statuses and errors -----------------------------------------------------------


def test_ioerr_and_unsupp_raise_typed_errors(blk: Any) -> None:
    drv = blk()
    with pytest.raises(BlkIOError) as ei:
        drv.complete([drv.submit_request(BlkReqType.IN, 256, in_len=512)])
    assert ei.value.status == BlkStatus.IOERR
    with pytest.raises(BlkUnsupportedError) as eu:
        drv.complete([drv.submit_request(BlkReqType.GET_LIFETIME, in_len=8)])
    assert eu.value.status == BlkStatus.UNSUPP
    assert isinstance(eu.value, VirtioError)
    # the driver keeps working after request errors
    drv.write(0, bytes(512))


def test_driver_must_not_submit_beyond_capacity(blk: Any) -> None:
    """§5.2.6.1: "A driver MUST NOT submit a request which would cause a read or write
    beyond capacity" - refused before anything is sent."""
    drv = blk()
    for call in (
        lambda: drv.read(255, 1024),
        lambda: drv.write(256, bytes(512)),
        lambda: drv.read(-1, 512),
        lambda: drv.discard(250, 7),
        lambda: drv.write_zeroes(2**40, 1),
    ):
        with pytest.raises(ValueError):
            call()
    assert drv.transport.state.device.metrics.requests == 0


def test_driver_data_length_must_be_multiple_of_512(blk: Any) -> None:
    drv = blk()
    with pytest.raises(ValueError):
        drv.read(0, 100)
    with pytest.raises(ValueError):
        drv.write(0, b"x" * 513)


def test_read_only_device(blk: Any) -> None:
    backend = MemoryBackend(DISK, readonly=True, data=b"\x42" * DISK)
    drv = blk(BlkDevice(backend))
    assert drv.read_only
    assert drv.read(0, 512) == b"\x42" * 512
    with pytest.raises(BlkIOError):
        drv.write(0, bytes(512))
    # a write sent anyway is refused by the device (VIRTIO_BLK_S_IOERR)
    with pytest.raises(BlkIOError):
        drv.complete([drv.submit_request(BlkReqType.OUT, 0, out=bytes(512))])
    with pytest.raises(BlkIOError):
        drv.discard(0, 1)
    with pytest.raises(BlkIOError):
        drv.write_zeroes(0, 1)
    assert backend.data == b"\x42" * DISK


def test_features_not_negotiated(blk: Any) -> None:
    dev = BlkDevice(MemoryBackend(DISK), discard=False, write_zeroes=False)
    drv = blk(dev)
    with pytest.raises(BlkUnsupportedError):
        drv.discard(0, 1)
    with pytest.raises(BlkUnsupportedError):
        drv.write_zeroes(0, 1)


def test_writeback_toggle(blk: Any) -> None:
    backend = MemoryBackend(DISK)
    dev = BlkDevice(backend, writeback=False)
    drv = blk(dev)
    assert drv.has_feature(BlkFeature.CONFIG_WCE)
    assert drv.writeback is False
    drv.write(0, bytes(2048))
    assert backend.flushes == 1  # writethrough: one flush per write request
    drv.writeback = True
    assert drv.writeback is True and dev.writeback
    drv.write(0, bytes(2048))
    assert backend.flushes == 1
    drv.flush()
    assert backend.flushes == 2


def test_writeback_needs_config_wce(blk: Any) -> None:
    class NoWce(BlkDriver):
        def specific_features(self, offered: int) -> int:
            return super().specific_features(offered) & ~bit(BlkFeature.CONFIG_WCE)

    drv = blk(driver_cls=NoWce)
    assert drv.writeback is True  # §5.2.5.1: FLUSH alone -> assume a writeback cache
    with pytest.raises(BlkUnsupportedError):
        drv.writeback = False


# -- multiqueue ------------------------------------------------------------------------


@pytest.mark.parametrize("nq", [2, 3, 4])
@pytest.mark.parametrize("packed", RING)
def test_multiqueue_spreads_requests(blk: Any, nq: int, packed: bool) -> None:
    dev = BlkDevice(MemoryBackend(DISK), num_queues=nq)
    drv = blk(dev, ring=RingOptions(packed=packed))
    assert drv.has_feature(BlkFeature.MQ)
    assert drv.num_request_queues == nq
    rnd = random.Random(nq)
    blocks = {s: rnd.randbytes(SECTOR_SIZE) for s in range(0, 64, 2)}
    reqs = [drv.submit_write(s, b, kick=False) for s, b in blocks.items()]
    assert {r.queue for r in reqs} == set(range(nq))
    drv.complete(reqs)
    reads = {s: drv.submit_read(s, SECTOR_SIZE) for s in blocks}
    drv.wait_all()
    assert {s: r.result() for s, r in reads.items()} == blocks
    assert set(drv.transport.interrupt_counts) == set(range(nq))


def test_max_queues_caps_queue_count(blk: Any) -> None:
    drv = blk(BlkDevice(MemoryBackend(DISK), num_queues=4), max_queues=2)
    assert drv.num_request_queues == 2
    exercise = [drv.submit_flush() for _ in range(4)]
    drv.complete(exercise)


# -- submission API ----------------------------------------------------------------------


@pytest.mark.parametrize("packed", RING)
def test_many_requests_in_flight(blk: Any, packed: bool) -> None:
    dev = BlkDevice(MemoryBackend(DISK), queue_max_size=16)
    drv = blk(dev, ring=RingOptions(packed=packed))
    rnd = random.Random(3)
    writes = [drv.submit_write(s, rnd.randbytes(SECTOR_SIZE), kick=False) for s in range(200)]
    assert drv.in_flight > 0
    drv.wait_all()
    assert all(w.done and w.error is None for w in writes)
    assert drv.in_flight == 0
    reads = [drv.submit_read(s, SECTOR_SIZE, kick=False) for s in range(200)]
    out = drv.complete(reads)
    backend = dev.backend
    assert isinstance(backend, MemoryBackend)
    assert b"".join(d or b"" for d in out) == bytes(backend.data[: 200 * SECTOR_SIZE])


def test_request_handle(blk: Any) -> None:
    drv = blk()
    req = drv.submit_get_id(kick=False)
    assert isinstance(req, BlkRequest) and not req.done
    with pytest.raises(RuntimeError):
        req.result()
    assert drv.poll() == 1
    assert req.done and req.status == BlkStatus.OK
    assert req.result() == b"pyvirtio".ljust(20, b"\0")


def test_complete_raises_first_error_after_all_done(blk: Any) -> None:
    drv = blk()
    good = drv.submit_flush()
    bad = drv.submit_request(BlkReqType.IN, 10_000, in_len=512)
    good2 = drv.submit_read(0, 512)
    with pytest.raises(BlkIOError):
        drv.complete([good, bad, good2])
    assert good.done and bad.done and good2.done
    assert good2.result() == bytes(512)


def test_request_memory_is_freed(blk: Any) -> None:
    drv = blk()
    free0 = drv.transport.allocator.free_bytes
    drv.write(0, bytes(8192))
    drv.read(0, 8192)
    with pytest.raises(BlkIOError):
        drv.complete([drv.submit_request(BlkReqType.IN, 99999, in_len=512)])
    assert drv.transport.allocator.free_bytes == free0


# -- data integrity (randomized, against a shadow copy of the image) ----------------------


def random_io(drv: BlkDriver, shadow: bytearray, seed: int, ops: int) -> None:
    rnd = random.Random(seed)
    nsect = len(shadow) // SECTOR_SIZE
    for _ in range(ops):
        op = rnd.random()
        sector = rnd.randrange(nsect)
        n = rnd.randint(1, min(48, nsect - sector))
        lo, hi = sector * SECTOR_SIZE, (sector + n) * SECTOR_SIZE
        if op < 0.4:
            data = rnd.randbytes(hi - lo)
            drv.write(sector, data)
            shadow[lo:hi] = data
        elif op < 0.75:
            assert drv.read(sector, hi - lo) == bytes(shadow[lo:hi])
        elif op < 0.85:
            drv.write_zeroes(sector, n, unmap=rnd.random() < 0.5)
            shadow[lo:hi] = bytes(hi - lo)
        elif op < 0.9:
            drv.discard(sector, n)  # contents undefined: re-read them from the device
            shadow[lo:hi] = drv.read(sector, hi - lo)
        else:
            drv.flush()


@pytest.mark.parametrize("packed", RING)
@pytest.mark.parametrize("seed", [1, 2])
def test_data_integrity_file_backend(blk: Any, tmp_path: Path, packed: bool, seed: int) -> None:
    path = tmp_path / "disk.img"
    initial = random.Random(seed + 100).randbytes(DISK)
    path.write_bytes(initial)
    shadow = bytearray(initial)
    dev = BlkDevice(FileBackend(path), num_queues=2, size_max=4096, seg_max=5)
    drv = blk(dev, ring=RingOptions(packed=packed), max_request_bytes=8192)
    random_io(drv, shadow, seed, 150)
    drv.flush()
    assert drv.read(0, DISK) == bytes(shadow)
    assert path.read_bytes() == bytes(shadow)
    dev.close()


# -- a misbehaving device: errors, never hangs -------------------------------------------------


class SilentDevice(BlkDevice):
    """Takes requests and never completes them."""

    def handle_queue(self, index: int) -> None:
        pass


class NoStatusDevice(BlkDevice):
    """Completes requests without writing the status byte."""

    def _serve(self, vq: DeviceVirtqueue, chain: DescriptorChain) -> int:
        return 1


class BadStatusDevice(BlkDevice):
    """Writes a status value the spec does not define."""

    def _serve(self, vq: DeviceVirtqueue, chain: DescriptorChain) -> int:
        addr, n = chain.writable[-1]
        vq.mem.write(addr + n - 1, b"\x07")
        return 1


class ResettingDevice(BlkDevice):
    """Signals DEVICE_NEEDS_RESET instead of serving."""

    def _serve(self, vq: DeviceVirtqueue, chain: DescriptorChain) -> int:
        raise DriverError("simulated device failure")


def test_silent_device_times_out(blk: Any) -> None:
    drv = blk(SilentDevice(MemoryBackend(DISK)), timeout=0.3)
    with pytest.raises(BlkTimeoutError):
        drv.read(0, 512)
    assert drv.in_flight == 1


def test_status_never_written_is_device_error(blk: Any) -> None:
    drv = blk(NoStatusDevice(MemoryBackend(DISK)))
    with pytest.raises(DeviceError, match="status"):
        drv.flush()


def test_unknown_status_is_device_error(blk: Any) -> None:
    drv = blk(BadStatusDevice(MemoryBackend(DISK)))
    with pytest.raises(DeviceError, match="unknown block status 7"):
        drv.read(0, 512)


@pytest.mark.parametrize("packed", RING)
def test_device_needs_reset_fails_requests(blk: Any, packed: bool) -> None:
    drv = blk(ResettingDevice(MemoryBackend(DISK)), ring=RingOptions(packed=packed), timeout=5)
    reqs = [drv.submit_read(i, 512, kick=False) for i in range(3)]
    with pytest.raises(QueueBrokenError):
        drv.complete(reqs)
    assert all(r.done and isinstance(r.error, QueueBrokenError) for r in reqs)
    assert drv.in_flight == 0
    with pytest.raises(QueueBrokenError):
        drv.read(0, 512)


def test_close_fails_requests_in_flight_and_frees_memory(blk: Any) -> None:
    drv = blk(SilentDevice(MemoryBackend(DISK)))
    t = drv.transport
    free0 = t.allocator.free_bytes
    reqs = [drv.submit_write(i, bytes(512)) for i in range(5)]
    drv.close()
    assert all(isinstance(r.error, QueueBrokenError) for r in reqs)
    assert t.allocator.free_bytes > free0  # ring memory freed too
