"""The vhost-user server (I/O edge) and ``pyvirtio serve``, over real unix sockets."""

from __future__ import annotations

import array
import contextlib
import gc
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pyvirtio.cli.serve import parse_size
from pyvirtio.devices.blk import BlkDevice, MemoryBackend
from pyvirtio.devices.rng import CallableSource, RngDevice
from pyvirtio.errors import ConfigurationError
from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.features import Feature
from pyvirtio.transport.vhost_user.codec import Decoder, Message, encode
from pyvirtio.transport.vhost_user.server import VhostUserServer
from pyvirtio.transport.vhost_user.spec import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    FrontendRequest,
    VhostUserMemoryRegion,
    VhostUserU64,
    VhostVringAddr,
    VhostVringState,
)
from pyvirtio.virtqueue import make_driver_queue

R = FrontendRequest
UADDR = 0x7E00_0000_0000
SRC = str(Path(__file__).resolve().parents[3] / "src")


def fd_count() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


class Client:
    """A minimal front-end over a real socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.dec = Decoder(replies=True)

    def send(self, request: FrontendRequest, body: Any = None, *, fds: Sequence[int] = ()) -> None:
        data = encode(request, body, fds=fds)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def reply(self, timeout: float = 5.0) -> Message:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.dec.next_message()
            if msg is not None:
                return msg
            left = deadline - time.monotonic()
            assert left > 0, "no reply"
            r, _, _ = select.select([self.sock], [], [], left)
            if r:
                data = self.sock.recv(4096)
                assert data, "back-end hung up"
                self.dec.feed(data)

    def ask(self, request: FrontendRequest, body: Any = None) -> int:
        self.send(request, body)
        msg = self.reply()
        assert msg.request is request
        return msg.body_as(VhostUserU64).u64

    def close(self) -> None:
        self.sock.close()
        self.dec.close()


def connect(path: Path) -> Client:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    return Client(s)


@contextmanager
def running(server: VhostUserServer) -> Iterator[threading.Thread]:
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    try:
        assert server.ready.wait(5)
        yield t
    finally:
        server.stop()
        t.join(10)
        assert not t.is_alive()


def test_listening_server_serves_one_front_end_after_another(tmp_path: Path) -> None:
    before = fd_count()
    path = tmp_path / "blk.sock"
    device = BlkDevice(MemoryBackend(1 << 20), num_queues=3)
    server = VhostUserServer(device, socket_path=path)
    with running(server):
        for _ in range(3):
            c = connect(path)
            assert c.ask(R.GET_FEATURES) >> VHOST_USER_F_PROTOCOL_FEATURES & 1
            assert c.ask(R.GET_QUEUE_NUM) == 3
            c.close()
            deadline = time.monotonic() + 5
            while len(server.history) < server.connections and time.monotonic() < deadline:
                time.sleep(0.01)
        assert server.connections == 3 and len(server.history) == 3
        assert server.history[0].requests == {"GET_FEATURES": 1, "GET_QUEUE_NUM": 1}
    assert not path.exists()
    assert device.host is None
    assert fd_count() == before


def test_a_second_front_end_is_refused_while_one_is_served(tmp_path: Path) -> None:
    path = tmp_path / "blk.sock"
    server = VhostUserServer(BlkDevice(MemoryBackend(4096)), socket_path=path)
    with running(server):
        first = connect(path)
        assert first.ask(R.GET_QUEUE_NUM) == 1
        second = connect(path)
        second.sock.settimeout(5)
        assert second.sock.recv(16) == b""  # closed at once
        assert first.ask(R.GET_QUEUE_NUM) == 1
        first.close()
        second.close()


def test_stale_socket_file_is_replaced_and_other_files_are_not(tmp_path: Path) -> None:
    path = tmp_path / "blk.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    server = VhostUserServer(RngDevice(), socket_path=path)
    with running(server):
        c = connect(path)
        assert c.ask(R.GET_QUEUE_NUM) == 1
        c.close()
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(ConfigurationError, match="not a socket"):
        VhostUserServer(RngDevice(), socket_path=regular).serve()
    assert regular.read_text() == "x"


def test_connecting_server_ends_with_its_connection(tmp_path: Path) -> None:
    path = tmp_path / "front.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    server = VhostUserServer(RngDevice(), socket_path=path, connect=True)
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    conn, _ = listener.accept()
    c = Client(conn)
    assert c.ask(R.GET_QUEUE_NUM) == 1
    c.close()
    t.join(10)
    assert not t.is_alive() and server.connections == 1
    listener.close()
    assert path.exists()  # not ours to remove


def test_inherited_connected_descriptor(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    server = VhostUserServer(RngDevice(), fd=theirs.detach())
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    c = Client(ours)
    assert c.ask(R.GET_QUEUE_NUM) == 1
    c.close()
    t.join(10)
    assert not t.is_alive()


def test_inherited_listening_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "passed.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    server = VhostUserServer(RngDevice(), fd=listener.detach())
    with running(server):
        for _ in range(2):
            c = connect(path)
            assert c.ask(R.GET_QUEUE_NUM) == 1
            c.close()
    assert path.exists()  # created by someone else: left alone


def _rng_ring(c: Client, mem: GuestMemory, q: Any, call: int, kick: int) -> None:
    """Set up ring 0 of an entropy back-end (what the test above does step by step)."""
    features = Feature.VERSION_1.mask
    c.send(R.SET_FEATURES, features | 1 << VHOST_USER_F_PROTOCOL_FEATURES)
    c.send(R.SET_PROTOCOL_FEATURES, 1 << 15)  # CONFIGURE_MEM_SLOTS
    c.send(R.ADD_MEM_REG, VhostUserMemoryRegion(0, 1 << 20, UADDR, 0), fds=[mem.regions[0].fd])
    a = q.addrs
    c.send(R.SET_VRING_NUM, VhostVringState(0, 16))
    c.send(R.SET_VRING_BASE, VhostVringState(0, 0))
    c.send(
        R.SET_VRING_ADDR,
        VhostVringAddr(0, 0, UADDR + a.desc, UADDR + a.device, UADDR + a.driver, 0),
    )
    c.send(R.SET_VRING_CALL, 0, fds=[call])
    c.send(R.SET_VRING_KICK, 0, fds=[kick])
    c.send(R.SET_VRING_ENABLE, VhostVringState(0, 1))


def test_kick_eventfd_to_call_eventfd_through_the_loop(tmp_path: Path) -> None:
    """Entropy requests travel ring -> kick eventfd -> device -> call eventfd."""
    before = fd_count()
    path = tmp_path / "rng.sock"
    server = VhostUserServer(RngDevice(CallableSource(lambda n: b"\x33" * n)), socket_path=path)
    mem = GuestMemory.create(1 << 20)
    alloc = GuestAllocator(0x1000, (1 << 20) - 0x1000)
    features = Feature.VERSION_1.mask
    q = make_driver_queue(mem, alloc, 16, features)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    with running(server):
        c = connect(path)
        _rng_ring(c, mem, q, call, kick)
        bufs = []
        for i in range(30):
            buf = alloc.alloc(32)
            bufs.append(buf)
            q.add([], [(buf, 32)], i)
            if q.kick_prepare():
                os.write(kick, (1).to_bytes(8, "little"))
            got = None
            while got is None:  # notifications may be spurious, never missing
                r, _, _ = select.select([call], [], [], 5)
                assert r, f"no used buffer notification for request {i}"
                os.read(call, 8)
                got = q.get_used()
            assert got == (i, 32)
        assert all(mem.read(b, 32) == b"\x33" * 32 for b in bufs)
        c.send(R.GET_VRING_BASE, VhostVringState(0, 0))
        assert c.reply().body_as(VhostVringState).num == 30
        c.close()
    del q
    mem.close()
    os.close(kick)
    os.close(call)
    assert fd_count() == before


# -- the command line ------------------------------------------------------------------------


def _run_cli(*args: str, **kw: Any) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-m", "pyvirtio", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        **kw,
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_cleanly_on_ctrl_c_and_sigterm(tmp_path: Path, sig: signal.Signals) -> None:
    path = tmp_path / "rng.sock"
    proc = _run_cli("serve", "rng", "--socket", str(path))
    try:
        deadline = time.monotonic() + 20
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        # the path appears only once the server listens: no refused connection
        c = connect(path)
        assert c.ask(R.GET_QUEUE_NUM) == 1
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
        c.close()
    finally:
        if proc.poll() is None:  # never leave a server behind
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err
    assert not path.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "blk", "--socket", "/tmp/x.sock", "--null", "1X"],
        ["serve", "blk", "--null", "1G"],
        ["serve", "blk", "--socket", "/tmp/x.sock", "--image", "/nonexistent/disk.img"],
        ["serve", "blk", "--socket", "/tmp/x.sock", "--null", "1G", "--num-queues", "0"],
        ["serve", "blk", "--socket", "/tmp/x.sock"],
        ["serve", "rng", "--fd", "3", "--socket", "/tmp/x.sock"],
    ],
)
def test_bad_arguments_give_one_line_error(args: list[str]) -> None:
    proc = _run_cli(*args)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], err
    assert b"Traceback" not in err


def test_print_capabilities() -> None:
    proc = _run_cli("serve", "blk", "--print-capabilities")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert b'"type": "block"' in out


def test_parse_size() -> None:
    assert parse_size("1G") == 1 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("64k") == 64 << 10
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("4096") == 4096
    for bad in ("", "1X", "-1G", "100", "0"):
        with pytest.raises(Exception):  # noqa: B017 - argparse.ArgumentTypeError
            parse_size(bad)


@pytest.mark.parametrize("kind", ["eventfd-at-max", "full-pipe"])
def test_a_blocking_call_descriptor_that_cannot_take_a_write_does_not_hang_the_server(
    tmp_path: Path, kind: str
) -> None:
    """A hostile front-end's call fd is blocking and full (an eventfd whose counter is
    at its maximum, or a full pipe): the used notification is dropped, the server
    keeps answering and stops when told."""
    path = tmp_path / "rng.sock"
    server = VhostUserServer(RngDevice(CallableSource(lambda n: b"\x44" * n)), socket_path=path)
    mem = GuestMemory.create(1 << 20)
    alloc = GuestAllocator(0x1000, (1 << 20) - 0x1000)
    q = make_driver_queue(mem, alloc, 16, Feature.VERSION_1.mask)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    if kind == "eventfd-at-max":
        call = os.eventfd(0)  # blocking
        os.eventfd_write(call, 0xFFFF_FFFF_FFFF_FFFE)  # the counter's maximum
        keep = -1
    else:
        keep, call = os.pipe()  # blocking
        os.set_blocking(call, False)
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(call, b"x" * 65536)
        os.set_blocking(call, True)
    with running(server):
        c = connect(path)
        _rng_ring(c, mem, q, call, kick)
        buf = alloc.alloc(32)
        q.add([], [(buf, 32)], "r")
        q.kick_prepare()
        os.write(kick, (1).to_bytes(8, "little"))
        deadline = time.monotonic() + 5
        while q.get_used() is None:  # served, although the notification is lost
            assert time.monotonic() < deadline, "the request was not served"
            time.sleep(0.01)
        assert c.ask(R.GET_FEATURES) & Feature.VERSION_1.mask  # still answering
        c.close()
    mem.close()
    for fd in (kick, call, keep):
        if fd >= 0:
            os.close(fd)


def test_a_kick_descriptor_at_end_of_file_is_dropped_not_spun_on(tmp_path: Path) -> None:
    """A pipe whose write end is closed is always readable: the server stops watching
    it instead of spinning, and keeps answering."""
    path = tmp_path / "rng.sock"
    server = VhostUserServer(RngDevice(), socket_path=path)
    mem = GuestMemory.create(1 << 20)
    alloc = GuestAllocator(0x1000, (1 << 20) - 0x1000)
    q = make_driver_queue(mem, alloc, 16, Feature.VERSION_1.mask)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    r, w = os.pipe()
    os.close(w)  # r is at end of file for ever
    with running(server):
        c = connect(path)
        _rng_ring(c, mem, q, call, r)
        t0 = time.process_time()
        time.sleep(0.5)
        spent = time.process_time() - t0  # this process runs the server thread
        assert c.ask(R.GET_FEATURES) & Feature.VERSION_1.mask
        c.close()
    mem.close()
    os.close(call)
    os.close(r)
    assert spent < 0.25, f"the server spun on the kick fd ({spent:.2f} s of CPU in 0.5 s)"


def test_history_is_bounded(tmp_path: Path) -> None:
    from pyvirtio.transport.vhost_user.server import HISTORY

    path = tmp_path / "rng.sock"
    server = VhostUserServer(RngDevice(), socket_path=path)
    with running(server):
        for _ in range(HISTORY + 10):
            c = connect(path)
            c.ask(R.GET_FEATURES)
            c.close()
        deadline = time.monotonic() + 10
        while server.connections < HISTORY + 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
    assert server.connections == HISTORY + 10
    assert len(server.history) == HISTORY


@pytest.mark.parametrize("violation", ["device-rule", "ring-rule"])
def test_guest_ram_and_its_fd_are_released_after_a_needs_reset_session_without_gc(
    tmp_path: Path, violation: str
) -> None:
    """After a session that ended in DEVICE_NEEDS_RESET, the back-end's mapping of
    guest RAM and its memfd go with the connection, without waiting for the cyclic
    garbage collector (a kept error's traceback must not pin the queue's views)."""
    from pyvirtio.drivers.blk import BlkDriver
    from pyvirtio.spec.status import DeviceStatus
    from pyvirtio.transport.vhost_user.frontend import connect as vconnect

    path = tmp_path / "blk.sock"
    server = VhostUserServer(BlkDevice(MemoryBackend(1 << 20)), socket_path=path)
    gc.collect()
    gc.disable()
    try:
        with running(server):
            before = fd_count()
            from pyvirtio.core.driver import RingOptions

            drv = vconnect(BlkDriver, str(path), ring=RingOptions(packed=False))
            q = drv.queues[0]
            t = drv.transport
            if violation == "device-rule":
                buf = t.allocator.alloc(16)
                q.add([(buf, 16)], [], "no status byte")  # §5.2.6: needs a status byte
                drv.kick(0)
            else:
                t.mem.write_le16(q.addrs.driver + 2, 0x1000)  # avail idx jumps (§2.7.13)
                t.notify(0)
            deadline = time.monotonic() + 5
            while not t.get_status() & DeviceStatus.DEVICE_NEEDS_RESET:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            drv.close()
            t.close()
            deadline = time.monotonic() + 5
            while not server.history and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.history
            assert fd_count() == before, "the back-end kept descriptors of the session"
    finally:
        gc.enable()
