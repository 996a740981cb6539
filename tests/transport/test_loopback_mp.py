"""Two-process loopback: the driver here, the device in a child process."""

from __future__ import annotations

import array
import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pyvirtio.core.driver import CONFIG_CHANGE, RingOptions
from pyvirtio.errors import DeviceError, DriverError, QueueBrokenError
from pyvirtio.spec.features import Feature
from pyvirtio.spec.status import DeviceStatus as S
from pyvirtio.transport.loopback_mp import protocol as P
from pyvirtio.transport.loopback_mp.driver_side import (
    DeviceProcess,
    MultiprocessLoopbackTransport,
    connect,
)
from pyvirtio.virtqueue.common import QueueAddresses
from tests.transport.echo import (
    BUMP,
    CRASH,
    ECHO_F_UPPER,
    EchoDevice,
    EchoDriver,
    FlappingEchoDevice,
    packed_available,
)

_NO_PACKED = pytest.mark.skipif(not packed_available(), reason="packed ring not importable")
RING = [pytest.param(False, id="split"), pytest.param(True, id="packed", marks=_NO_PACKED)]
#: generous bound so a broken implementation fails instead of hanging; never a timing test
PATIENCE = 30.0


def open_fds() -> set[str]:
    gc.collect()
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def mp() -> Iterator[Any]:
    drivers: list[EchoDriver] = []

    def make(factory: Any = EchoDevice, **kw: Any) -> EchoDriver:
        drv = connect(EchoDriver, factory, **kw)
        drivers.append(drv)
        return drv

    yield make
    for d in drivers:
        with contextlib.suppress(Exception):
            d.close()
        d.transport.close()


@pytest.mark.parametrize("packed", RING)
def test_echo_across_processes(mp: Any, packed: bool) -> None:
    drv = mp(ring=RingOptions(packed=packed), upper=True)
    t = drv.transport
    assert t.process is not None and t.process.pid != os.getpid()
    assert drv.has_feature(Feature.RING_PACKED) == packed
    assert drv.has_feature(ECHO_F_UPPER)
    assert t.get_status() == S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK
    assert drv.echo(b"over there") == b"OVER THERE"


@pytest.mark.parametrize("packed", RING)
@pytest.mark.parametrize("event_idx", [False, True])
def test_many_buffers_in_flight(mp: Any, packed: bool, event_idx: bool) -> None:
    drv = mp(
        EchoDevice,
        factory_kwargs={"queue_max_size": 32},
        ring=RingOptions(packed=packed, event_idx=event_idx),
    )
    payloads = [os.urandom(1 + i % 200) for i in range(1500)]
    got = drv.echo_many(payloads, timeout=PATIENCE)
    assert [got[i] for i in range(len(payloads))] == payloads


def test_used_buffer_notification_arrives_on_the_call_eventfd(mp: Any) -> None:
    drv = mp(factory_kwargs={"num_queues": 2})
    t = drv.transport
    fds = t.interrupt_fds()
    assert len(fds) == 3  # configuration + one call eventfd per queue
    drv.submit(b"abc", 7, queue=1)
    drv.kick(1)
    fired: set[int] = set()
    deadline = time.monotonic() + PATIENCE
    while not fired and time.monotonic() < deadline:
        fired = t.poll_interrupts(1.0)
    assert fired == {1}
    assert drv.reap(1) == [(7, b"abc")]


def test_config_change_notification_across_processes(mp: Any) -> None:
    drv = mp()
    assert drv.counter() == 0
    assert drv.echo(BUMP) == BUMP
    seen: set[int] = set()
    deadline = time.monotonic() + PATIENCE
    while drv.config_changes == 0 and time.monotonic() < deadline:
        seen |= drv.wait(1.0)
    assert drv.config_changes == 1
    assert drv.counter() == 1
    assert CONFIG_CHANGE not in seen  # wait() consumed it


def test_driver_reads_config_until_generation_is_stable(mp: Any) -> None:
    drv = mp(FlappingEchoDevice, factory_kwargs={"flaps": 3})
    assert drv.counter() == 3  # torn reads were retried
    assert drv.counter() == 3


def test_legacy_across_processes(mp: Any) -> None:
    drv = mp(legacy=True, upper=True)
    assert not drv.has_feature(Feature.VERSION_1)
    assert drv.transport.get_status() == S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK
    assert drv.echo(b"old") == b"OLD"


def test_setup_queue_refused_raises_driver_error() -> None:
    t = MultiprocessLoopbackTransport.spawn(EchoDevice)
    try:
        t.set_status(S.ACKNOWLEDGE | S.DRIVER)
        t.set_driver_features(Feature.VERSION_1.mask)
        t.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
        with pytest.raises(DriverError, match="power of 2"):
            t.setup_queue(0, 3, QueueAddresses(4096, 8192, 12288))
        with pytest.raises(DriverError, match="not set up"):
            t.notify(0)
        assert t.get_status() & S.FEATURES_OK  # the connection is still fine
    finally:
        t.close()


def test_device_model_bug_sets_needs_reset_and_device_survives(mp: Any) -> None:
    drv = mp()
    drv.submit(CRASH, 1)
    drv.kick(0)
    with pytest.raises(QueueBrokenError):
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            drv.wait(1.0)
    assert drv.transport.get_status() & S.DEVICE_NEEDS_RESET
    # recover by a reset and a fresh initialization
    drv.close()
    drv.initialize()
    assert drv.echo(b"fine") == b"fine"


def test_device_survives_malformed_control_messages() -> None:
    proc = DeviceProcess(EchoDevice)
    sock = proc.sock
    try:
        junk = [
            b"\x00",
            P.HEADER.pack(P.Header(99, 0, 0)),
            P.HEADER.pack(P.Header(P.Op.SET_STATUS, 0, 100)) + bytes(3),
            P.encode(P.Op.GET_STATUS),  # before HELLO
            bytes(P.MAX_MESSAGE + 100),  # truncated
        ]
        for data in junk:
            sock.send(data)
            reply = P.decode(sock.recv(P.MAX_MESSAGE), reply=True)
            assert reply.is_error
        # fds with a message that takes none: refused, and closed by the device
        efd = os.eventfd(0)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [efd]))]
        sock.sendmsg([P.encode(P.Op.GET_STATUS)], anc)
        os.close(efd)
        assert P.decode(sock.recv(P.MAX_MESSAGE), reply=True).is_error
        # the same connection still works
        t = MultiprocessLoopbackTransport(sock, process=proc)
        drv = EchoDriver(t)
        drv.initialize()
        assert drv.echo(b"still here") == b"still here"
        drv.close()
        t.close()
        assert proc.popen.returncode == 0
    finally:
        proc.close()


def test_device_exits_when_the_driver_closes_without_shutdown() -> None:
    proc = DeviceProcess(EchoDevice)
    t = MultiprocessLoopbackTransport(proc.sock)  # does not own the process
    drv = EchoDriver(t)
    drv.initialize()
    for i in range(10):
        drv.submit(b"in flight", i)
    drv.kick(0)
    t.close()  # just closes the socket: EOF for the device
    assert proc.popen.wait(PATIENCE) == 0
    proc.close()


_DRIVER_SCRIPT = """
import os, signal, sys
from pyvirtio.transport.loopback_mp.driver_side import connect
from tests.transport.echo import EchoDevice, EchoDriver
drv = connect(EchoDriver, EchoDevice)
for i in range(20):
    drv.submit(b"pending", i)
drv.kick(0)
print(drv.transport.process.pid, flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGKILL)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_driver_death_does_not_hang_the_device_process() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER_SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert driver.stdout is not None and driver.stdin is not None
        device_pid = int(driver.stdout.readline())
        assert not _gone(device_pid)
        driver.stdin.write("go\n")
        driver.stdin.flush()
        assert driver.wait(PATIENCE) == -signal.SIGKILL
        deadline = time.monotonic() + PATIENCE
        while not _gone(device_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(device_pid)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for f in (driver.stdin, driver.stdout):
            if f is not None:
                f.close()


def test_device_death_is_reported_not_hung() -> None:
    t = MultiprocessLoopbackTransport.spawn(EchoDevice)
    try:
        drv = EchoDriver(t)
        drv.initialize()
        assert t.process is not None
        t.process.popen.kill()
        t.process.popen.wait()
        with pytest.raises(DeviceError):
            t.poll_interrupts(None)
        with pytest.raises(DeviceError):
            t.get_status()
    finally:
        t.close()


def test_close_leaves_no_fd_and_no_zombie() -> None:
    warm = connect(EchoDriver, EchoDevice)
    warm.close()
    warm.transport.close()
    before = open_fds()
    procs = []
    for packed in (False, True) if packed_available() else (False,):
        drv = connect(
            EchoDriver,
            EchoDevice,
            factory_kwargs={"num_queues": 2},
            ring=RingOptions(packed=packed),
        )
        assert drv.echo(b"x", queue=1) == b"x"
        procs.append(drv.transport.process)
        drv.close()
        drv.transport.close()
        drv.transport.close()  # idempotent
    assert open_fds() == before
    for p in procs:
        assert p is not None and p.popen.returncode == 0  # exited cleanly, reaped


def test_factory_must_be_importable() -> None:
    from pyvirtio.errors import ConfigurationError

    def local() -> EchoDevice:  # pragma: no cover - never called
        return EchoDevice()

    with pytest.raises(ConfigurationError):
        DeviceProcess(local)
