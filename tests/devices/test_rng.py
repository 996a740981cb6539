"""The entropy device (virtio-v1.2 §5.4 "Entropy Device"), device side.

Most tests drive :class:`RngDevice` through a raw driver queue over one GuestMemory
(so malformed buffers can be offered); the last ones go through the in-process and
two-process loopback transports with the package's own :class:`RngDriver`.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirtio.core.driver import RingOptions
from pyvirtio.devices.rng import (
    CHUNK_SIZE,
    CallableSource,
    EntropySource,
    FileSource,
    OsRandomSource,
    RngDevice,
)
from pyvirtio.errors import ConfigurationError, QueueBrokenError
from pyvirtio.spec.ids import DeviceId
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.testing import DeviceHarness

MEM = 1 << 20
RING = [pytest.param(False, id="split"), pytest.param(True, id="packed")]


class StreamSource:
    """A deterministic entropy source: one fixed byte stream, whatever the read sizes.

    ``max_read`` makes it return short reads; ``dry`` makes it return nothing.
    """

    def __init__(self, seed: int = 1, max_read: int | None = None) -> None:
        self._rng = random.Random(seed)
        self._buf = bytearray()
        self.max_read = max_read
        self.dry = False
        self.requests: list[int] = []
        self.produced = 0

    def read(self, n: int) -> bytes:
        self.requests.append(n)
        if self.dry:
            return b""
        if self.max_read is not None:
            n = min(n, self.max_read)
        while len(self._buf) < n:
            self._buf += self._rng.randbytes(4096)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self.produced += n
        return out


def stream(seed: int, n: int) -> bytes:
    """The first ``n`` bytes a fresh ``StreamSource(seed)`` produces."""
    return StreamSource(seed).read(n)


def deterministic_device(
    seed: int = 1,
    max_request_bytes: int | None = None,
    max_read: int | None = None,
    dry: bool = False,
    queue_max_size: int = 256,
) -> RngDevice:
    """Device factory for the two-process tests (runs in the device process, so it
    lives in this light module rather than the hypothesis-importing driver tests)."""
    src = StreamSource(seed, max_read=max_read)
    src.dry = dry
    return RngDevice(src, max_request_bytes=max_request_bytes, queue_max_size=queue_max_size)


@pytest.fixture
def rig() -> Iterator[Any]:
    """An RngDevice on a 16-entry ring in test memory (``pyvirtio.testing``), with
    VIRTIO_F_EVENT_IDX; ``rig(packed, source, **device_kw)``."""
    made: list[DeviceHarness] = []

    def make(packed: bool, source: EntropySource | None = None, **kw: Any) -> DeviceHarness:
        h = DeviceHarness(RngDevice(source, **kw), packed=packed, indirect=False, mem_size=MEM)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def test_device_identity() -> None:
    dev = RngDevice()
    assert dev.device_id == DeviceId.ENTROPY
    assert int(dev.device_id) == 4
    assert dev.num_queues == 1
    assert dev.specific_features() == 0
    assert dev.config_bytes() == b""
    assert isinstance(dev.source, OsRandomSource)


def test_bad_arguments_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError):
        RngDevice(chunk_size=0)
    with pytest.raises(ConfigurationError):
        RngDevice(max_request_bytes=0)


@pytest.mark.parametrize("packed", RING)
def test_device_fills_each_buffer_completely_in_order(rig: Any, packed: bool) -> None:
    src = StreamSource(7)
    r = rig(packed, src)
    a, b = r.buf(100), r.buf(300)
    r.queues[0].add((), [(a, 100)], "a")
    r.queues[0].add((), [(b, 300)], "b")
    r.kick(0)
    assert r.used(0) == [("a", 100), ("b", 300)]
    want = stream(7, 400)
    assert r.mem.read(a, 100) == want[:100]
    assert r.mem.read(b, 300) == want[100:]
    # nothing written past the buffers
    assert r.mem.read(a + 100, 64) == b"\xee" * 64
    assert r.mem.read(b + 300, 64) == b"\xee" * 64
    assert r.device.metrics.requests == 2
    assert r.device.metrics.bytes_written == 400
    assert r.host.used == [0]
    assert r.host.resets == []


@pytest.mark.parametrize("packed", RING)
def test_device_fills_every_writable_segment(rig: Any, packed: bool) -> None:
    src = StreamSource(3)
    r = rig(packed, src)
    segs = [(r.buf(n), n) for n in (5, 1, 77)]
    r.queues[0].add((), segs, "multi")
    r.kick(0)
    assert r.used(0) == [("multi", 83)]
    want = stream(3, 83)
    assert b"".join(r.mem.read(a, n) for a, n in segs) == want
    for a, n in segs:
        assert r.mem.read(a + n, 64) == b"\xee" * 64


@pytest.mark.parametrize("packed", RING)
def test_source_reads_never_exceed_the_chunk_cap(rig: Any, packed: bool) -> None:
    src = StreamSource(5)
    r = rig(packed, src, chunk_size=64)
    a = r.buf(1000)
    r.queues[0].add((), [(a, 1000)], 0)
    r.kick(0)
    assert r.used(0) == [(0, 1000)]
    assert max(src.requests) <= 64
    assert r.mem.read(a, 1000) == stream(5, 1000)


def test_default_chunk_cap_bounds_host_allocation() -> None:
    assert 0 < CHUNK_SIZE <= 1 << 20


@pytest.mark.parametrize("packed", RING)
def test_short_source_reads_still_fill_the_buffer(rig: Any, packed: bool) -> None:
    src = StreamSource(9, max_read=7)
    r = rig(packed, src)
    a = r.buf(50)
    r.queues[0].add((), [(a, 50)], 0)
    r.kick(0)
    assert r.used(0) == [(0, 50)]
    assert r.mem.read(a, 50) == stream(9, 50)


@pytest.mark.parametrize("packed", RING)
def test_max_request_bytes_caps_each_buffer(rig: Any, packed: bool) -> None:
    # "it MAY use less than the entire buffer length"
    r = rig(packed, StreamSource(2), max_request_bytes=10)
    a = r.buf(100)
    r.queues[0].add((), [(a, 100)], 0)
    r.kick(0)
    assert r.used(0) == [(0, 10)]
    assert r.mem.read(a, 10) == stream(2, 10)
    assert r.mem.read(a + 10, 90) == b"\xee" * 90


@pytest.mark.parametrize("packed", RING)
def test_source_returning_too_much_is_truncated(rig: Any, packed: bool) -> None:
    r = rig(packed, CallableSource(lambda n: b"\x42" * (n + 100)))
    # bypass CallableSource's own truncation too
    r.device.source = type("Greedy", (), {"read": lambda self, n: b"\x43" * (n + 100)})()
    a = r.buf(32)
    r.queues[0].add((), [(a, 32)], 0)
    r.kick(0)
    assert r.used(0) == [(0, 32)]
    assert r.mem.read(a, 32) == b"\x43" * 32
    assert r.mem.read(a + 32, 64) == b"\xee" * 64


# -- "The device MUST place one or more random bytes into the buffer" --------------------


@pytest.mark.parametrize("packed", RING)
def test_device_must_place_one_or_more_bytes_waits_when_source_is_dry(
    rig: Any, packed: bool
) -> None:
    src = StreamSource(4)
    src.dry = True
    r = rig(packed, src)
    a, b = r.buf(16), r.buf(16)
    r.queues[0].add((), [(a, 16)], "a")
    r.queues[0].add((), [(b, 16)], "b")
    r.kick(0)
    # never answered with zero bytes: the request waits
    assert r.used(0) == []
    assert r.device.waiting
    assert r.device.metrics.errors.get("source_dry", 0) >= 1
    assert r.host.resets == []
    src.dry = False
    assert r.device.retry() == 2
    assert not r.device.waiting
    assert r.used(0) == [("a", 16), ("b", 16)]
    assert r.mem.read(a, 16) + r.mem.read(b, 16) == stream(4, 32)


@pytest.mark.parametrize("packed", RING)
def test_dry_source_request_is_retried_on_next_kick(rig: Any, packed: bool) -> None:
    src = StreamSource(4)
    src.dry = True
    r = rig(packed, src)
    a = r.buf(16)
    r.queues[0].add((), [(a, 16)], "a")
    r.kick(0)
    assert r.used(0) == []
    src.dry = False
    b = r.buf(16)
    r.queues[0].add((), [(b, 16)], "b")
    r.kick(0)
    assert r.used(0) == [("a", 16), ("b", 16)]


@pytest.mark.parametrize("packed", RING)
def test_source_oserror_is_counted_and_the_request_waits(rig: Any, packed: bool) -> None:
    def broken(n: int) -> bytes:
        raise OSError("hwrng gone")

    r = rig(packed, CallableSource(broken))
    a = r.buf(16)
    r.queues[0].add((), [(a, 16)], 0)
    r.kick(0)
    assert r.used(0) == []
    assert r.device.metrics.errors["source_error"] >= 1
    assert r.device.waiting
    r.device.reset()
    assert not r.device.waiting


@pytest.mark.parametrize("packed", RING)
def test_partial_source_then_dry_returns_what_was_written(rig: Any, packed: bool) -> None:
    data = iter([b"abc", b""])
    r = rig(packed, CallableSource(lambda n: next(data, b"")))
    a = r.buf(16)
    r.queues[0].add((), [(a, 16)], 0)
    r.kick(0)
    assert r.used(0) == [(0, 3)]
    assert r.mem.read(a, 3) == b"abc"


# -- "The driver MUST NOT place device-readable buffers into the queue" ------------------


@pytest.mark.parametrize("packed", RING)
def test_driver_must_not_place_device_readable_buffers(rig: Any, packed: bool) -> None:
    r = rig(packed, StreamSource(1))
    a, b = r.buf(16), r.buf(16)
    r.queues[0].add([(a, 16)], [(b, 16)], "mixed")
    r.kick(0)
    assert r.used(0) == []
    assert len(r.host.resets) == 1
    assert "§5.4.6.1" in str(r.host.resets[0])
    assert r.device.queues[0] is not None and r.device.queues[0].broken
    assert r.device.metrics.errors["readable_buffer"] == 1
    # the writable part was not touched
    assert r.mem.read(b, 16) == b"\xee" * 16
    # the broken queue is not served any more
    c = r.buf(16)
    r.queues[0].add((), [(c, 16)], "later")
    r.kick(0)
    assert r.used(0) == []
    assert r.mem.read(c, 16) == b"\xee" * 16


@pytest.mark.parametrize("packed", RING)
def test_driver_must_not_place_readable_only_buffers(rig: Any, packed: bool) -> None:
    r = rig(packed, StreamSource(1))
    a = r.buf(16)
    r.queues[0].add([(a, 16)], (), "readable")
    r.kick(0)
    assert r.used(0) == []
    assert len(r.host.resets) == 1
    assert r.mem.read(a, 16) == b"\xee" * 16


@pytest.mark.parametrize("packed", RING)
def test_buffers_before_the_bad_one_are_answered(rig: Any, packed: bool) -> None:
    r = rig(packed, StreamSource(1))
    a, b = r.buf(16), r.buf(16)
    r.queues[0].add((), [(a, 16)], "good")
    r.queues[0].add([(b, 16)], (), "bad")
    r.kick(0)
    assert r.used(0) == [("good", 16)]
    assert len(r.host.resets) == 1


def test_notification_for_a_queue_that_does_not_exist_is_counted() -> None:
    dev = RngDevice()
    dev.handle_queue(3)
    dev.handle_queue(0)  # not activated: nothing to do
    assert dev.metrics.errors == {"bad_queue": 1}


# -- sources ----------------------------------------------------------------------------


def test_os_random_source() -> None:
    s = OsRandomSource()
    assert len(s.read(33)) == 33
    assert isinstance(s, EntropySource)


def test_file_source_reads_until_eof(tmp_path: Path) -> None:
    p = tmp_path / "seed"
    p.write_bytes(b"0123456789")
    with FileSource(p) as s:
        assert s.read(4) == b"0123"
        assert s.read(100) == b"456789"
        assert s.read(4) == b""
    f = io.BytesIO(b"xy")
    s2 = FileSource(f)
    assert s2.read(5) == b"xy"
    s2.close()
    assert not f.closed  # not ours to close


def test_file_source_missing_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        FileSource(tmp_path / "nope")


def test_callable_source_truncates() -> None:
    s = CallableSource(lambda n: b"z" * (2 * n))
    assert s.read(3) == b"zzz"
    with pytest.raises(ConfigurationError):
        CallableSource(42)  # type: ignore[arg-type]


# -- over the loopback transports -------------------------------------------------------


def _readable_buffer_needs_reset(drv: Any) -> None:
    from pyvirtio.drivers.rng import RngDriver

    assert isinstance(drv, RngDriver)
    assert len(drv.read(8)) == 8
    q = drv.queues[0]
    addr = drv.transport.allocator.alloc(32)
    q.add([(addr, 16)], [(addr + 16, 16)], "bad")
    drv.kick(0)
    with pytest.raises(QueueBrokenError):
        drv.read(1 << 20, timeout=5)
    assert drv.transport.get_status() & DeviceStatus.DEVICE_NEEDS_RESET


@pytest.mark.parametrize("packed", RING)
def test_readable_buffer_sets_device_needs_reset_in_process(packed: bool) -> None:
    from pyvirtio.drivers.rng import RngDriver
    from pyvirtio.transport.loopback import connect

    dev = RngDevice(StreamSource(1))
    drv = connect(RngDriver, dev, mem_size=1 << 20, ring=RingOptions(packed=packed))
    try:
        _readable_buffer_needs_reset(drv)
        assert dev.metrics.errors["readable_buffer"] == 1
    finally:
        drv.close()
        drv.transport.close()


@pytest.mark.parametrize("packed", RING)
def test_readable_buffer_sets_device_needs_reset_two_processes(packed: bool) -> None:
    from pyvirtio.drivers.rng import RngDriver
    from pyvirtio.transport.loopback_mp.driver_side import connect

    drv = connect(RngDriver, RngDevice, mem_size=1 << 20, ring=RingOptions(packed=packed))
    try:
        _readable_buffer_needs_reset(drv)
    finally:
        drv.close()
        drv.transport.close()


def test_os_urandom_default_over_loopback() -> None:
    from pyvirtio.drivers.rng import RngDriver
    from pyvirtio.transport.loopback import connect

    dev = RngDevice()
    drv = connect(RngDriver, dev, mem_size=1 << 20)
    try:
        a, b = drv.read(64), drv.read(64)
        assert len(a) == len(b) == 64 and a != b
        assert dev.metrics.bytes_written >= 128
        assert dev.metrics.errors == {}
    finally:
        drv.close()
        drv.transport.close()
    assert os.urandom(1)  # keep the import honest
