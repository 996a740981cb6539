"""The entropy driver (virtio-v1.2 §5.4 "Entropy Device") against the package's own
:class:`RngDevice`, over the in-process and the two-process loopback transports."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.core.driver import RingOptions
from pyvirtio.devices.rng import CallableSource, RngDevice
from pyvirtio.drivers.rng import RngDriver, RngTimeoutError
from pyvirtio.errors import ConfigurationError, DeviceError, QueueBrokenError
from pyvirtio.spec.features import Feature
from pyvirtio.spec.ids import DeviceId
from pyvirtio.transport import loopback
from pyvirtio.transport.loopback_mp import driver_side as loopback_mp
from tests.devices.test_rng import StreamSource, deterministic_device, stream

MEM = 1 << 20
RING = [pytest.param(False, id="split"), pytest.param(True, id="packed")]


Connect = Callable[..., RngDriver]


@pytest.fixture(params=["in-process", "two-process"])
def connect(request: pytest.FixtureRequest) -> Iterator[Connect]:
    """``connect(device_kwargs, **driver_kw)`` over either loopback transport."""
    drivers: list[RngDriver] = []
    two = request.param == "two-process"

    def make(dev_kw: dict[str, Any] | None = None, **kw: Any) -> RngDriver:
        if two:
            drv = loopback_mp.connect(
                RngDriver, deterministic_device, mem_size=MEM, factory_kwargs=dev_kw, **kw
            )
        else:
            drv = loopback.connect(
                RngDriver, deterministic_device(**(dev_kw or {})), mem_size=MEM, **kw
            )
        drivers.append(drv)
        return drv

    yield make
    for d in drivers:
        d.close()
        d.transport.close()


def close(drv: RngDriver) -> None:
    drv.close()
    drv.transport.close()


# -- bytes arrive intact and in order ------------------------------------------------------


@pytest.mark.parametrize("packed", RING)
def test_bytes_arrive_intact_and_in_order(connect: Connect, packed: bool) -> None:
    drv = connect({"seed": 11}, ring=RingOptions(packed=packed), buffer_size=256, buffers=4)
    assert drv.has_feature(Feature.RING_PACKED) == packed
    sizes = [0, 1, 7, 256, 1000, 3, 4096, 5000]
    got = b"".join(drv.read(n) for n in sizes)
    assert got == stream(11, sum(sizes))
    assert drv.bytes_received >= sum(sizes)


@pytest.mark.parametrize("packed", RING)
def test_driver_examines_the_length_written(connect: Connect, packed: bool) -> None:
    # "The driver MUST examine the length written by the device to determine how many
    # random bytes were received": the device fills only 10 bytes of each buffer.
    drv = connect(
        {"seed": 5, "max_request_bytes": 10}, ring=RingOptions(packed=packed), buffer_size=64
    )
    got = drv.read(123) + drv.read(77)
    assert got == stream(5, 200)


@pytest.mark.parametrize("packed", RING)
def test_short_source_reads(connect: Connect, packed: bool) -> None:
    drv = connect({"seed": 6, "max_read": 3}, ring=RingOptions(packed=packed), buffer_size=100)
    assert drv.read(1000) == stream(6, 1000)


@pytest.mark.parametrize("packed", RING)
def test_several_buffers_are_kept_in_flight(connect: Connect, packed: bool) -> None:
    drv = connect(ring=RingOptions(packed=packed), buffers=6, buffer_size=32)
    drv.read(1)
    assert drv.in_flight == 6


@pytest.mark.parametrize("packed", RING)
@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("in_order", [False, True])
@pytest.mark.parametrize("indirect", [False, True])
def test_ring_feature_combinations(
    packed: bool, event_idx: bool, in_order: bool, indirect: bool
) -> None:
    drv = loopback.connect(
        RngDriver,
        deterministic_device(seed=3, queue_max_size=4),
        mem_size=MEM,
        ring=RingOptions(packed=packed, indirect=indirect, event_idx=event_idx, in_order=in_order),
        buffers=8,
        buffer_size=50,
    )
    try:
        assert drv.queues[0].size == 4
        assert drv.in_flight == 0
        assert drv.read(2000) == stream(3, 2000)
        assert drv.in_flight <= 4
    finally:
        close(drv)


class ReversingDevice(RngDevice):
    """Fills buffers in the order they were made available, returns them in reverse
    (allowed without VIRTIO_F_IN_ORDER)."""

    def handle_queue(self, index: int) -> None:
        vq = self.queues[0]
        assert vq is not None
        while True:
            chains = []
            while (c := vq.pop()) is not None:
                chains.append((c, self._fill(vq, c)))
            for c, n in reversed(chains):
                vq.push(c, n)
            if vq.flush() and self.host is not None:
                self.host.notify_used(0)
            # keep asking for notifications (avail_event follows with EVENT_IDX)
            if not vq.enable_notification():
                break


@pytest.mark.parametrize("packed", RING)
def test_out_of_order_completion_is_reassembled_in_ring_order(packed: bool) -> None:
    dev = ReversingDevice(StreamSource(8))
    drv = loopback.connect(
        RngDriver,
        dev,
        mem_size=MEM,
        ring=RingOptions(packed=packed, in_order=False),
        buffers=5,
        buffer_size=40,
    )
    try:
        assert not drv.has_feature(Feature.IN_ORDER)
        assert drv.read(1234) == stream(8, 1234)
    finally:
        close(drv)


@settings(max_examples=25, deadline=None)
@given(
    packed=st.booleans(),
    buffer_size=st.integers(1, 300),
    buffers=st.integers(1, 9),
    cap=st.none() | st.integers(1, 300),
    sizes=st.lists(st.integers(0, 700), max_size=8),
)
def test_any_read_pattern_yields_the_source_stream(
    packed: bool, buffer_size: int, buffers: int, cap: int | None, sizes: list[int]
) -> None:
    drv = loopback.connect(
        RngDriver,
        deterministic_device(seed=21, max_request_bytes=cap, queue_max_size=8),
        mem_size=MEM,
        ring=RingOptions(packed=packed),
        buffer_size=buffer_size,
        buffers=buffers,
        timeout=2,
    )
    try:
        got = b"".join(drv.read(n) for n in sizes)
        assert got == stream(21, sum(sizes))
    finally:
        close(drv)


# -- device misbehaviour and timeouts: an error, never a hang --------------------------------


class ZeroLengthDevice(RngDevice):
    """Breaks "The device MUST place one or more random bytes into the buffer"."""

    def handle_queue(self, index: int) -> None:
        vq = self.queues[0]
        assert vq is not None
        while (c := vq.pop()) is not None:
            vq.push(c, 0)
        if vq.flush() and self.host is not None:
            self.host.notify_used(0)


@pytest.mark.parametrize("packed", RING)
def test_device_must_place_one_or_more_random_bytes(packed: bool) -> None:
    drv = loopback.connect(
        RngDriver, ZeroLengthDevice(), mem_size=MEM, ring=RingOptions(packed=packed)
    )
    try:
        with pytest.raises(DeviceError, match="one or more random bytes"):
            drv.read(16)
        assert drv.queues[0].broken
        with pytest.raises(QueueBrokenError):
            drv.read(1)
    finally:
        close(drv)


class SilentDevice(RngDevice):
    """Never answers."""

    def handle_queue(self, index: int) -> None:
        pass


@pytest.mark.parametrize("packed", RING)
def test_silent_device_times_out(packed: bool) -> None:
    drv = loopback.connect(
        RngDriver, SilentDevice(), mem_size=MEM, ring=RingOptions(packed=packed), timeout=0.2
    )
    try:
        t0 = time.monotonic()
        with pytest.raises(RngTimeoutError):
            drv.read(8)
        with pytest.raises(RngTimeoutError):
            drv.read(8, timeout=0.05)
        assert time.monotonic() - t0 < 30  # it returned at all
        # the queue is still usable once the device answers
        dev = drv.transport.state.device  # type: ignore[attr-defined]
        RngDevice.handle_queue(dev, 0)
        assert len(drv.read(8)) == 8
    finally:
        close(drv)


def test_dry_device_process_times_out(connect: Connect) -> None:
    drv = connect({"dry": True}, timeout=0.3)
    with pytest.raises(RngTimeoutError):
        drv.read(1)


def test_device_process_that_died_is_an_error() -> None:
    drv = loopback_mp.connect(RngDriver, deterministic_device, mem_size=MEM, timeout=5)
    try:
        assert len(drv.read(4)) == 4
        transport = drv.transport
        assert isinstance(transport, loopback_mp.MultiprocessLoopbackTransport)
        proc = transport.process
        assert proc is not None
        proc.popen.kill()
        proc.popen.wait()
        with pytest.raises(DeviceError):
            drv.read(1 << 20)
    finally:
        with contextlib.suppress(DeviceError):
            drv.close()  # the reset cannot reach a dead device
        drv.transport.close()


# -- API ------------------------------------------------------------------------------------


def test_driver_identity_and_no_feature_bits() -> None:
    drv = loopback.connect(RngDriver, RngDevice(), mem_size=MEM)
    try:
        assert RngDriver.device_id == DeviceId.ENTROPY
        assert drv.specific_features(0xFFFFFF) == 0
        assert drv.queue_count() == 1
    finally:
        close(drv)


def test_bad_arguments() -> None:
    t = loopback.LoopbackTransport(RngDevice(), MEM)
    try:
        with pytest.raises(ConfigurationError):
            RngDriver(t, buffer_size=0)
        with pytest.raises(ConfigurationError):
            RngDriver(t, buffers=0)
        with pytest.raises(ConfigurationError):
            RngDriver(t, timeout=0)
        drv = RngDriver(t)
        with pytest.raises(ConfigurationError):
            drv.read(1)  # before initialize()
        drv.initialize()
        with pytest.raises(ValueError):
            drv.read(-1)
        assert drv.read(0) == b""
        drv.close()
    finally:
        t.close()


def test_close_returns_every_buffer_to_the_allocator() -> None:
    t = loopback.LoopbackTransport(RngDevice(), MEM)
    try:
        before = t.allocator.free_bytes
        drv = RngDriver(t, buffers=3, buffer_size=1000)
        drv.initialize()
        drv.read(100)
        assert t.allocator.free_bytes < before
        drv.close()
        assert t.allocator.free_bytes == before
        assert drv.buffered == 0
    finally:
        t.close()


def test_source_callable_device_end_to_end() -> None:
    counter = iter(range(1 << 30))
    dev = RngDevice(CallableSource(lambda n: bytes(next(counter) & 0xFF for _ in range(n))))
    drv = loopback.connect(RngDriver, dev, mem_size=MEM, buffer_size=16, buffers=2)
    try:
        assert drv.read(300) == bytes(i & 0xFF for i in range(300))
        assert dev.metrics.errors == {}
    finally:
        close(drv)
