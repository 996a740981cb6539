"""In-process loopback transport: a driver and a device end to end."""

from __future__ import annotations

import gc
import os
import threading
from typing import Any

import pytest

from pyvirtio.core.driver import CONFIG_CHANGE, RingOptions
from pyvirtio.errors import DeviceError, DriverError, QueueBrokenError
from pyvirtio.spec.features import Feature
from pyvirtio.spec.status import DeviceStatus as S
from pyvirtio.transport.loopback import LoopbackTransport, connect
from tests.transport.echo import (
    ECHO_F_UPPER,
    EchoDevice,
    EchoDriver,
    FlappingEchoDevice,
    packed_available,
)

_NO_PACKED = pytest.mark.skipif(not packed_available(), reason="packed ring not importable")
RING = [pytest.param(False, id="split"), pytest.param(True, id="packed", marks=_NO_PACKED)]


def open_fds() -> set[str]:
    # a mapping whose memoryviews are still referenced from a garbage cycle keeps
    # mmap's own fd until the cycle is collected
    gc.collect()
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair() -> Any:
    drivers: list[EchoDriver] = []

    def make(device: Any = None, **kw: Any) -> EchoDriver:
        drv = connect(EchoDriver, device or EchoDevice(), **kw)
        drivers.append(drv)
        return drv

    yield make
    for d in drivers:
        d.close()
        d.transport.close()


@pytest.mark.parametrize("packed", RING)
def test_echo_end_to_end(pair: Any, packed: bool) -> None:
    drv = pair(ring=RingOptions(packed=packed), upper=True)
    assert drv.has_feature(Feature.VERSION_1)
    assert drv.has_feature(Feature.RING_PACKED) == packed
    assert drv.has_feature(ECHO_F_UPPER)
    assert drv.transport.get_status() == S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK
    assert drv.echo(b"hello") == b"HELLO"
    assert drv.transport.interrupt_counts[0] >= 1


@pytest.mark.parametrize("packed", RING)
@pytest.mark.parametrize("event_idx", [False, True])
def test_many_buffers_in_flight(pair: Any, packed: bool, event_idx: bool) -> None:
    drv = pair(EchoDevice(queue_max_size=16), ring=RingOptions(packed=packed, event_idx=event_idx))
    payloads = [os.urandom(1 + i % 97) for i in range(600)]
    got = drv.echo_many(payloads)
    assert [got[i] for i in range(len(payloads))] == payloads
    assert drv.transport.interrupt_counts[0] >= 1
    assert drv.transport.state.violation_count == 0


def test_two_queues_are_independent(pair: Any) -> None:
    drv = pair(EchoDevice(num_queues=2))
    assert drv.echo(b"a", queue=1) == b"a"
    assert drv.transport.interrupt_counts == {1: 1}
    assert drv.echo(b"b", queue=0) == b"b"


def test_legacy_loopback(pair: Any) -> None:
    drv = pair(legacy=True, upper=True)
    assert not drv.has_feature(Feature.VERSION_1)
    assert drv.transport.get_status() == S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK
    assert drv.echo(b"legacy") == b"LEGACY"


def test_config_change_notification_reaches_the_driver(pair: Any) -> None:
    drv = pair()
    dev = drv.transport.state.device
    dev.bump()
    assert drv.transport.poll_interrupts(0) == {CONFIG_CHANGE}
    dev.bump()
    assert drv.wait(0) == set()
    assert drv.config_changes == 1
    assert drv.counter() == 2


def test_driver_reads_config_until_generation_is_stable(pair: Any) -> None:
    dev = FlappingEchoDevice(flaps=0)
    drv = pair(dev)
    dev.flaps = 3
    dev.config_reads = 0
    assert drv.counter() == 3  # the value after the last change
    assert dev.config_reads == 4  # three torn reads, one stable


def test_features_ok_refused_fails_initialization() -> None:
    dev = EchoDevice()
    dev.refuse_features = 1 << ECHO_F_UPPER
    t = LoopbackTransport(dev)
    try:
        drv = EchoDriver(t, upper=True)
        with pytest.raises(DeviceError, match="FEATURES_OK"):
            drv.initialize()
        assert t.get_status() & S.FAILED
    finally:
        t.close()


def test_setup_queue_rejects_a_bad_size() -> None:
    t = LoopbackTransport(EchoDevice())
    try:
        t.set_status(S.ACKNOWLEDGE | S.DRIVER)
        t.set_driver_features(Feature.VERSION_1.mask)
        t.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
        from pyvirtio.virtqueue.common import QueueAddresses

        with pytest.raises(DriverError, match="size"):
            t.setup_queue(0, 3, QueueAddresses(4096, 8192, 12288))
    finally:
        t.close()


def test_broken_ring_surfaces_as_needs_reset(pair: Any) -> None:
    drv = pair(ring=RingOptions(packed=False))
    q = drv.queues[0]
    mem = drv.transport.mem
    # a driver bug: publish an available entry naming a head past the queue size
    idx = mem.read_le16(q.addrs.driver + 2)
    mem.write_le16(q.addrs.driver + 4 + 2 * (idx % q.size), 0xFFFF)
    mem.write_le16(q.addrs.driver + 2, (idx + 1) & 0xFFFF)
    drv.transport.notify(0)
    with pytest.raises(QueueBrokenError):
        drv.wait(0)
    assert drv.transport.get_status() & S.DEVICE_NEEDS_RESET
    assert drv.transport.state.needs_reset_reason is not None


def test_poll_interrupts_wakes_for_a_backend_thread() -> None:
    t = LoopbackTransport(EchoDevice())
    try:
        drv = EchoDriver(t)
        drv.initialize()
        timer = threading.Timer(0.05, t.state.device.bump)
        timer.start()
        assert t.poll_interrupts(30) == {CONFIG_CHANGE}
        timer.join()
        drv.close()
    finally:
        t.close()


def test_queue_reset_over_loopback(pair: Any) -> None:
    drv = pair(EchoDevice(ring_reset=True), ring_reset=True)
    t = drv.transport
    assert drv.has_feature(Feature.RING_RESET)
    assert drv.echo(b"1") == b"1"
    t.reset_queue(0)
    assert not t.state.queue_enabled(0)
    # re-enable with a fresh ring, as during initialization (§2.6.1.2)
    old = drv.queues[0]
    old.detach_unused()
    old.close()
    from pyvirtio.virtqueue import make_driver_queue

    q = make_driver_queue(t.mem, t.allocator, 8, drv.features)
    drv.queues[0] = q
    t.setup_queue(0, 8, q.addrs)
    assert drv.echo(b"2") == b"2"


def test_queue_reset_needs_ring_reset(pair: Any) -> None:
    drv = pair(EchoDevice(ring_reset=True))
    with pytest.raises(DriverError, match="RING_RESET"):
        drv.transport.reset_queue(0)
    assert drv.echo(b"still") == b"still"


def test_close_releases_every_fd() -> None:
    # warm up imports and lazily created objects
    d = connect(EchoDriver, EchoDevice())
    d.close()
    d.transport.close()
    before = open_fds()
    for packed in (False, True) if packed_available() else (False,):
        drv = connect(EchoDriver, EchoDevice(), ring=RingOptions(packed=packed))
        assert drv.echo(b"x") == b"x"
        drv.close()
        drv.transport.close()
        drv.transport.close()  # idempotent
    assert open_fds() == before


def test_connect_closes_the_transport_on_failure() -> None:
    dev = EchoDevice()
    dev.refuse_features = 1 << ECHO_F_UPPER
    before = open_fds()
    with pytest.raises(DeviceError):
        connect(EchoDriver, dev, upper=True)
    assert open_fds() == before
    assert dev.host is None
