"""The device framework on every transport: held buffers completed from host events
and timers, out-of-order completion (in order with VIRTIO_F_IN_ORDER), and the one
failure path for each kind of device callback.

Every test runs over ``pyvirtio.testing.TRANSPORTS``: in-process loopback, the
two-process loopback, the in-process PCI and MMIO buses, and vhost-user (our server in
a thread, our front-end).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.core.driver import RingOptions
from pyvirtio.errors import QueueBrokenError
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.testing import TRANSPORTS, EchoDriver, open_driver

HELD = "pyvirtio.testing.echo:HeldEchoDevice"


@pytest.fixture
def control(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A FIFO the device reads commands from, and our write end of it."""
    path = str(tmp_path / "control")
    os.mkfifo(path)
    # the device opens it read-write; a read-write open of our own keeps the open of
    # the write end from blocking before the device is there
    keep = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    wfd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    yield path, wfd
    os.close(wfd)
    os.close(keep)


def _none_within(drv: EchoDriver, seconds: float) -> list[tuple[int, bytes]]:
    deadline = time.monotonic() + seconds
    got: list[tuple[int, bytes]] = []
    while time.monotonic() < deadline:
        got.extend(drv.reap())
        time.sleep(0.02)
    return got


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("in_order", [False, True], ids=["any-order", "in-order"])
def test_held_buffers_are_answered_when_the_host_side_says(
    control: tuple[str, int], transport: str, packed: bool, in_order: bool
) -> None:
    path, ctl = control
    ring = RingOptions(packed=packed, in_order=in_order)
    with open_driver(transport, HELD, EchoDriver, factory_kwargs={"control": path}, ring=ring) as o:
        drv = o.driver
        assert drv.has_feature(34) == packed and drv.has_feature(35) == in_order
        for i in range(5):
            drv.submit(b"request %d" % i, i)
        drv.kick(0)
        # held: nothing is answered until the host side delivers a command
        assert _none_within(drv, 0.3) == []
        os.write(ctl, b"n")  # answer the newest request first
        if in_order:
            # with VIRTIO_F_IN_ORDER the device must use buffers in the order they
            # were made available: request 4 waits for 0..3
            assert _none_within(drv, 0.3) == []
        else:
            assert drv.wait_reaped(1) == [(4, b"request 4")]
        os.write(ctl, b"r")  # the rest, newest first
        done = drv.wait_reaped(5 if in_order else 4)
        if in_order:
            assert [t for t, _ in done] == [0, 1, 2, 3, 4]
        else:
            assert [t for t, _ in done] == [3, 2, 1, 0]
        assert all(data == b"request %d" % t for t, data in done)
        # the device keeps serving afterwards
        drv.submit(b"again", 9)
        drv.kick(0)
        assert _none_within(drv, 0.2) == []  # held (and the kick surely arrived)
        os.write(ctl, b"o")
        assert drv.wait_reaped(1) == [(9, b"again")]
        assert not drv.transport.get_status() & DeviceStatus.DEVICE_NEEDS_RESET


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_timers_complete_held_buffers(
    control: tuple[str, int], transport: str, packed: bool
) -> None:
    path, _ = control
    with open_driver(
        transport,
        "tests.core.framework_devices:TimerEchoDevice",
        EchoDriver,
        factory_kwargs={"control": path, "delay": 0.05},
        ring=RingOptions(packed=packed),
    ) as o:
        drv = o.driver
        for i in range(3):
            drv.submit(b"tick %d" % i, i)
        drv.kick(0)
        done = drv.wait_reaped(3)
        assert sorted(done) == [(i, b"tick %d" % i) for i in range(3)]


def _wait_needs_reset(drv: EchoDriver, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not drv.transport.get_status() & DeviceStatus.DEVICE_NEEDS_RESET:
        if time.monotonic() > deadline:
            raise AssertionError("the device did not set DEVICE_NEEDS_RESET")
        time.sleep(0.02)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", ["queue", "host_event", "config_write", "timer"])
def test_a_device_model_bug_in_any_callback_ends_in_needs_reset(
    control: tuple[str, int],
    transport: str,
    kind: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    path, ctl = control
    caplog.set_level(logging.ERROR, logger="pyvirtio")
    with open_driver(
        transport,
        "tests.core.framework_devices:FaultyDevice",
        EchoDriver,
        factory_kwargs={"control": path, "fail_in": kind},
    ) as o:
        drv = o.driver
        if transport == "vhost_user" and kind != "queue":
            # a vhost-user device goes live (the timer is armed at activation) when
            # its first ring starts, at the ring's first kick; while every ring is
            # stopped it sends no notification (vhost-user.rst "Ring states",
            # "Suspended device state")
            drv.transport.notify(0)
        if kind == "queue":
            drv.submit(b"x", 0)
            drv.kick(0)
        elif kind == "host_event":
            os.write(ctl, b"!")
        elif kind == "config_write":
            drv.transport.write_config(0, b"\x01")
        _wait_needs_reset(drv)
        # the driver also got a configuration change notification (virtio-v1.2
        # §2.1.2; VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on vhost-user): its next wait
        # handles it, re-reads the status and says the device broke
        with pytest.raises(QueueBrokenError):
            for _ in range(50):
                drv.wait(0.1)
    # the traceback of the bug was logged (in the device process for loopback_mp)
    needle = (
        "device model bug in a host event callback (test)"
        if kind == "host_event"
        else f"device model bug in {kind} (test)"
    )
    if transport == "loopback_mp":
        err = capfd.readouterr().err
        assert "Traceback" in err and needle in err
    else:
        records = [r for r in caplog.records if r.exc_info and needle in str(r.exc_info[1])]
        assert records, "no traceback logged"


def test_vhost_user_rings_stopped_with_chains_held(tmp_path: Path) -> None:
    """A front-end that goes away while the device holds chains: the chains are given
    back as the ring stops (no inflight area: returned with nothing written), the
    device forgets them, and the next front-end is served normally."""
    import threading

    from pyvirtio.testing import HeldEchoDevice
    from pyvirtio.transport.vhost_user.frontend import connect
    from pyvirtio.transport.vhost_user.server import VhostUserServer

    dev = HeldEchoDevice()
    path = str(tmp_path / "held.sock")
    server = VhostUserServer(dev, socket_path=path)
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    assert server.ready.wait(10)

    def wait_held(n: int) -> None:
        deadline = time.monotonic() + 10
        while len(dev.held) != n:
            assert time.monotonic() < deadline, f"device holds {len(dev.held)}, not {n}"
            time.sleep(0.01)

    try:
        drv = connect(EchoDriver, path)
        for i in range(3):
            drv.submit(b"left %d" % i, i)
        drv.kick(0)
        wait_held(3)
        drv.close()
        drv.transport.close()
        wait_held(0)
        deadline = time.monotonic() + 10
        while not server.history:
            assert time.monotonic() < deadline, "the server did not see the front-end go"
            time.sleep(0.01)
        assert server.history[-1].served[0] == (3, 3)  # fetched 3, completed 3
        drv = connect(EchoDriver, path)
        drv.submit(b"next", 7)
        drv.kick(0)
        wait_held(1)
        dev.command(b"o")
        assert drv.wait_reaped(1) == [(7, b"next")]
        drv.close()
        drv.transport.close()
    finally:
        server.stop()
        t.join(10)
        dev.close()


def _counting_echo() -> object:
    from pyvirtio.testing import EchoDevice

    class Counting(EchoDevice):
        def __init__(self) -> None:
            super().__init__(num_queues=2)
            self.calls: list[str] = []

        def activate(self, features: int, queues: object) -> None:
            self.calls.append("activate")
            super().activate(features, queues)  # type: ignore[arg-type]

        def queue_started(self, index: int) -> None:
            self.calls.append(f"started {index}")

        def queue_stopped(self, index: int) -> None:
            self.calls.append(f"stopped {index}")

        def reset(self) -> None:
            self.calls.append("reset")
            super().reset()

    return Counting()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_activate_is_called_once_per_life_on_every_transport(transport: str) -> None:
    """virtio-v1.2 §3.1.1 step 8 (DRIVER_OK): the device goes live once per life; on
    vhost-user the rings start one by one (at their first kick) and only the first
    activates the device, the others attach to it."""
    with open_driver(transport, "tests.core.test_framework:_counting_echo", EchoDriver) as o:
        drv = o.driver
        assert drv.echo(b"zero", 0) == b"zero"
        assert drv.echo(b"one", 1) == b"one"
        dev = o.device
        if dev is not None:
            calls = [c for c in dev.calls if c != "reset"]  # type: ignore[attr-defined]
            assert calls.count("activate") == 1, dev.calls  # type: ignore[attr-defined]
            if transport == "vhost_user":
                assert calls == ["activate", "started 1"], calls
            else:
                assert calls == ["activate"], calls
