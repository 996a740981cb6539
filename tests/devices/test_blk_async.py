"""BlkDevice with its backend I/O on worker threads (virtio-v1.2 §5.2.6): a slow flush
stalls neither another queue nor the vhost-user control socket; requests complete out
of order unless VIRTIO_F_IN_ORDER was negotiated; data stays right with many requests
in flight completing in any order; a reset waits for the I/O in flight."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirtio.core.driver import RingOptions
from pyvirtio.devices.blk import BlkDevice, MemoryBackend
from pyvirtio.drivers.blk import BlkDriver, BlkTimeoutError
from pyvirtio.spec.blk import SECTOR_SIZE
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.transport.loopback import connect as loopback_connect
from pyvirtio.transport.vhost_user.frontend import connect as vhost_connect
from pyvirtio.transport.vhost_user.server import VhostUserServer

DISK = 1024 * SECTOR_SIZE


class GatedBackend(MemoryBackend):
    """A memory image whose flushes and chosen reads wait for a gate (a slow disk).

    It says it may block, so the device runs it on I/O threads. ``delay`` adds a
    random sleep (up to that many seconds) to every read and write.
    """

    may_block = True

    def __init__(self, size: int, *, delay: float = 0.0, seed: int = 0) -> None:
        super().__init__(size)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.gate_flush = False
        self.gated_offsets: set[int] = set()
        self.delay = delay
        self._rnd = random.Random(seed)
        self._lock = threading.Lock()

    def _pause(self) -> None:
        if self.delay:
            with self._lock:
                d = self._rnd.random() * self.delay
            time.sleep(d)

    def _wait_gate(self) -> None:
        self.entered.set()
        if not self.gate.wait(10):
            raise OSError("gate never opened")

    def readv(self, offset: int, bufs: list[memoryview]) -> int:
        if offset in self.gated_offsets:
            self._wait_gate()
        self._pause()
        return super().readv(offset, bufs)

    def writev(self, offset: int, bufs: list[memoryview]) -> int:
        self._pause()
        return super().writev(offset, bufs)

    def flush(self) -> None:
        if self.gate_flush:
            self._wait_gate()
        super().flush()


@pytest.fixture
def vhost(tmp_path: Path) -> Iterator[Any]:
    made: list[tuple[VhostUserServer, threading.Thread, BlkDriver]] = []

    def make(device: BlkDevice, num_queues: int) -> BlkDriver:
        path = str(tmp_path / "blk.sock")
        server = VhostUserServer(device, socket_path=path)
        t = threading.Thread(target=server.serve, daemon=True)
        t.start()
        assert server.ready.wait(10)
        drv = vhost_connect(BlkDriver, path, num_queues=num_queues, timeout=10.0)
        made.append((server, t, drv))
        return drv

    yield make
    for server, t, drv in made:
        drv.close()
        drv.transport.close()
        server.stop()
        t.join(10)
        server.device.close()


def test_a_slow_flush_stalls_neither_another_queue_nor_the_control_socket(vhost: Any) -> None:
    backend = GatedBackend(DISK)
    backend.data[:SECTOR_SIZE] = b"\x5a" * SECTOR_SIZE
    backend.gate_flush = True
    dev = BlkDevice(backend, num_queues=2)
    assert dev.io_threads > 0
    drv = vhost(dev, 2)
    assert drv.num_request_queues == 2
    flush = drv.submit_flush()
    assert flush.queue == 0
    assert backend.entered.wait(10), "the flush never reached the backend"
    t0 = time.monotonic()
    # while fdatasync is stuck: a read on the other queue completes ...
    read = drv.submit_read(0, SECTOR_SIZE)
    assert read.queue == 1
    assert drv.complete([read], timeout=5.0) == [b"\x5a" * SECTOR_SIZE]
    # ... and the control socket answers (GET_CONFIG, GET_STATUS round trips)
    assert drv.transport.read_config(0, 8) == (DISK // SECTOR_SIZE).to_bytes(8, "little")
    assert not drv.transport.get_status() & DeviceStatus.DEVICE_NEEDS_RESET
    assert not flush.done
    assert time.monotonic() - t0 < 5
    backend.gate.set()
    assert drv.complete([flush], timeout=10.0) == [None]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("in_order", [False, True], ids=["any-order", "in-order"])
def test_requests_complete_out_of_order_unless_in_order(packed: bool, in_order: bool) -> None:
    backend = GatedBackend(DISK)
    backend.gated_offsets = {0}
    for s in range(4):
        backend.data[s * SECTOR_SIZE : (s + 1) * SECTOR_SIZE] = bytes([s + 1]) * SECTOR_SIZE
    dev = BlkDevice(backend, io_threads=4)
    drv = loopback_connect(BlkDriver, dev, ring=RingOptions(packed=packed, in_order=in_order))
    try:
        assert drv.has_feature(35) == in_order
        slow = drv.submit_read(0, SECTOR_SIZE)
        assert backend.entered.wait(10)
        fast = [drv.submit_read(s, SECTOR_SIZE) for s in (1, 2, 3)]
        if in_order:
            # VIRTIO_F_IN_ORDER: "the device uses buffers in the same order in which
            # they have been available" - the later reads wait for the first
            with pytest.raises(BlkTimeoutError):
                drv.complete(fast, timeout=0.5)
            assert not slow.done and not any(r.done for r in fast)
        else:
            assert drv.complete(fast, timeout=5.0) == [
                bytes([s + 1]) * SECTOR_SIZE for s in (1, 2, 3)
            ]
            assert not slow.done
        backend.gate.set()
        assert drv.complete([slow, *fast], timeout=5.0) == [
            bytes([s + 1]) * SECTOR_SIZE for s in range(4)
        ]
    finally:
        backend.gate.set()
        drv.close()
        drv.transport.close()
        dev.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("transport", ["loopback", "vhost_user"])
def test_data_integrity_with_many_requests_in_flight_completing_in_any_order(
    vhost: Any, packed: bool, transport: str
) -> None:
    rnd = random.Random(7 if packed else 8)
    sectors = DISK // SECTOR_SIZE
    backend = GatedBackend(DISK, delay=0.002, seed=rnd.randrange(1 << 30))
    backend.gate.set()
    init = bytes(rnd.randrange(256) for _ in range(DISK))
    backend.data[:] = init
    shadow = bytearray(init)
    dev = BlkDevice(backend, num_queues=2, io_threads=4)
    ring = RingOptions(packed=packed, in_order=False)
    if transport == "loopback":
        drv = loopback_connect(BlkDriver, dev, ring=ring, timeout=20.0)
    else:
        drv = vhost(dev, 2)
    try:
        for _batch in range(12):
            # distinct extents per batch: the driver never has two requests on the
            # same sectors in flight, so the result of every read is known
            starts = rnd.sample(range(0, sectors, 8), 24)
            reqs = []
            writes = []
            for s in starts:
                n = rnd.choice((1, 2, 4, 8))
                if rnd.random() < 0.5:
                    data = os.urandom(n * SECTOR_SIZE)
                    reqs.append(("w", s, data, drv.submit_write(s, data, kick=False)))
                    writes.append((s, data))
                else:
                    reqs.append(("r", s, n, drv.submit_read(s, n * SECTOR_SIZE, kick=False)))
            if rnd.random() < 0.3:
                reqs.append(("f", 0, None, drv.submit_flush(kick=False)))
            drv.kick_pending()
            results = drv.complete([r[3] for r in reqs], timeout=20.0)
            for (kind, s, arg, _), got in zip(reqs, results, strict=True):
                if kind == "r":
                    assert got == bytes(shadow[s * SECTOR_SIZE : (s + arg) * SECTOR_SIZE])
            for s, data in writes:
                shadow[s * SECTOR_SIZE : s * SECTOR_SIZE + len(data)] = data
            assert bytes(backend.data) == bytes(shadow)
        assert drv.read(0, DISK // 8) == bytes(shadow[: DISK // 8])
    finally:
        if transport == "loopback":
            drv.close()
            drv.transport.close()
            dev.close()


def test_reset_waits_for_the_io_in_flight_and_nothing_is_written_after() -> None:
    backend = GatedBackend(DISK)
    backend.gated_offsets = {0}
    dev = BlkDevice(backend, io_threads=2)
    drv = loopback_connect(BlkDriver, dev)
    t = drv.transport
    try:
        req = drv.submit_read(0, SECTOR_SIZE)
        assert backend.entered.wait(10)
        assert dev.in_flight == 1
        opener = threading.Timer(0.3, backend.gate.set)
        opener.start()
        t0 = time.monotonic()
        t.reset()  # virtio-v1.2 §2.4: the device is reset when this returns
        assert time.monotonic() - t0 >= 0.25, "the reset did not wait for the read"
        assert dev.in_flight == 0 and not dev.active
        assert t.get_status() == 0
        assert not req.done  # the driver reset first: its request is simply gone
        # "MUST NOT ... interact with the queues" after the reset (virtio-v1.2 §2.4):
        # guest memory stays as the reset left it
        before = t.mem.read(0, 4 << 20)
        time.sleep(0.2)
        assert t.mem.read(0, 4 << 20) == before
        assert dev.metrics.errors.get("stale_completion", 0) == 0
        opener.join()
    finally:
        backend.gate.set()
        drv.close()
        t.close()
        dev.close()
