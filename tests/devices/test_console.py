"""ConsoleDevice by hand (DeviceHarness): each rule of virtio-v1.2 §5.3, negatives
named after the MUST they check, and the pty and socket back-ends."""

from __future__ import annotations

import os
import select
import socket
import time

import pytest

from pyvirtio.devices.console import (
    MAX_CONTROL_BACKLOG,
    ConsoleDevice,
    ConsolePort,
    FileBackend,
    PtyBackend,
    SocketBackend,
)
from pyvirtio.errors import ConfigurationError
from pyvirtio.spec.console import (
    VIRTIO_CONSOLE_CONFIG,
    VIRTIO_CONSOLE_RESIZE,
    ConsoleEvent,
    ConsoleFeature,
    receiveq,
    transmitq,
)
from pyvirtio.testing import DeviceHarness
from tests.devices._console_support import Control, FakeBackend, PipeBackend

E = ConsoleEvent
MP = ConsoleFeature.MULTIPORT.mask
SIZE = ConsoleFeature.SIZE.mask
RING = [pytest.param(False, id="split"), pytest.param(True, id="packed")]


def _config(dev: ConsoleDevice) -> tuple[int, int, int, int]:
    return tuple(VIRTIO_CONSOLE_CONFIG.unpack(dev.config_bytes()))  # type: ignore[return-value]


def _ready(h: DeviceHarness, ctl: Control, ports: list[int]) -> list[tuple[int, int, int, bytes]]:
    """DEVICE_READY, PORT_READY for ``ports``; the device's answers."""
    ctl.send(0, E.DEVICE_READY, 1)
    got = ctl.received()
    for p in ports:
        ctl.send(p, E.PORT_READY, 1)
    return got + ctl.received()


# -- configuration and features (§5.3.3, §5.3.4) ------------------------------------


def test_config_layout_and_offer() -> None:
    dev = ConsoleDevice([ConsolePort(FakeBackend())], max_nr_ports=3, cols=132, rows=43)
    assert _config(dev) == (132, 43, 3, 0)
    assert dev.specific_features() == 0b111
    assert dev.num_queues == 8  # 2 * (3 + 1)
    single = ConsoleDevice([ConsolePort(FakeBackend())], multiport=False, emerg_write=False)
    assert single.specific_features() == SIZE
    assert single.num_queues == 2
    assert _config(single)[2] == 1


def test_device_must_allow_emerg_wr_write_even_on_unconfigured_device() -> None:
    """§5.3.5.1: "The device MUST allow a write to emerg_wr, even on an unconfigured
    device" and "SHOULD transmit the lower byte"."""
    be = FakeBackend()
    dev = ConsoleDevice([ConsolePort(be)])
    at = VIRTIO_CONSOLE_CONFIG.offset_of("emerg_wr")
    dev.write_config(at, (0x4241).to_bytes(4, "little"))  # never activated
    dev.write_config(at, b"C")
    dev.write_config(at + 1, b"X")  # not the lower byte
    dev.write_config(0, b"\x00\x01")  # cols is read-only
    assert bytes(be.out) == b"AC"
    assert dev.emergency_bytes == 2
    assert _config(dev)[0] == 80


# -- single port (no MULTIPORT) -------------------------------------------------------


@pytest.mark.parametrize("packed", RING)
def test_receive_buffers_held_until_host_data(packed: bool) -> None:
    be = PipeBackend()
    dev = ConsoleDevice([ConsolePort(be, console=True)], multiport=False)
    with DeviceHarness(dev, packed=packed, features=SIZE) as h:
        seg = h.add(0, [], [16], token="rx")[0]
        h.kick(0)
        assert h.used(0) == []
        os.write(be.host_w, b"hello")
        h.poll(1.0)
        assert h.used(0) == [("rx", 5)]
        assert h.read((seg[0], 5)) == b"hello"
        # no buffer posted: the device stops reading the host side
        os.write(be.host_w, b"more")
        assert h.poll(0.05) == 0
        assert be.fileno() not in dev.events.readers()
        seg = h.add(0, [], [16], token="rx2")[0]
        h.kick(0)
        assert h.used(0) == [("rx2", 4)]
        assert h.read((seg[0], 4)) == b"more"
    dev.close()


def test_transmit_goes_to_the_port_backend() -> None:
    be = FakeBackend()
    dev = ConsoleDevice([ConsolePort(be)], multiport=False)
    with DeviceHarness(dev) as h:
        h.add(1, [b"hel", b"lo"], [], token="tx")
        h.kick(1)
        assert h.used(1) == [("tx", 0)]
        assert bytes(be.out) == b"hello"
        assert not h.needs_reset


def test_transmit_without_host_peer_is_dropped_and_counted() -> None:
    be = FakeBackend(connected=False)
    dev = ConsoleDevice([ConsolePort(be)], multiport=False)
    with DeviceHarness(dev) as h:
        h.add(1, [b"lost"], [], token="tx")
        h.kick(1)
        assert h.used(1) == [("tx", 0)]
        assert be.out == b"" and dev.metrics.errors == {"tx_host_closed": 1}


def test_transmit_back_pressure_keeps_order_and_bounds_memory() -> None:
    be = FakeBackend(accept=2)
    dev = ConsoleDevice([ConsolePort(be)], multiport=False)
    with DeviceHarness(dev) as h:
        h.add(1, [b"abcdef"], [], token="a")
        h.add(1, [b"gh"], [], token="b")
        h.kick(1)
        assert h.used(1) == [("a", 0)]  # "b" waits: the back-end took 2 of 6 bytes
        assert dev.ports[0].tx_pending == b"cdef"
        deadline = time.monotonic() + 2
        while len(be.out) < 8 and time.monotonic() < deadline:
            h.poll(0.01)
        assert bytes(be.out) == b"abcdefgh"
        assert h.used(1) == [("b", 0)]


def test_driver_must_not_put_device_readable_buffer_in_receiveq() -> None:
    """§5.3.6.1: "The driver MUST NOT put a device-readable buffer in a receiveq."
    -> DEVICE_NEEDS_RESET."""
    dev = ConsoleDevice([ConsolePort(FakeBackend())], multiport=False)
    with DeviceHarness(dev) as h:
        h.add(0, [b"bad"], [16])
        h.kick(0)
        assert h.needs_reset
        assert "MUST NOT put a device-readable buffer in a receiveq" in str(h.host.resets[0])


def test_driver_must_not_put_device_writable_buffer_in_transmitq() -> None:
    """§5.3.6.1: "The driver MUST NOT put a device-writable buffer in a transmitq.\""""
    be = FakeBackend()
    dev = ConsoleDevice([ConsolePort(be)], multiport=False)
    with DeviceHarness(dev) as h:
        h.add(1, [b"x"], [4])
        h.kick(1)
        assert h.needs_reset
        assert be.out == b""


def test_driver_must_not_put_device_writable_buffer_in_control_transmitq() -> None:
    dev = ConsoleDevice([ConsolePort(FakeBackend())])
    with DeviceHarness(dev, features=MP) as h:
        h.add(3, [bytes(8)], [8])
        h.kick(3)
        assert h.needs_reset


def test_resize_is_a_config_change_with_size() -> None:
    dev = ConsoleDevice([ConsolePort(FakeBackend(), console=True)], multiport=False)
    with DeviceHarness(dev, features=SIZE) as h:
        dev.resize(100, 30)
        assert h.host.config == 1
        assert _config(dev)[:2] == (100, 30)
    dev2 = ConsoleDevice([ConsolePort(FakeBackend())], multiport=False)
    with DeviceHarness(dev2) as h:  # SIZE not negotiated: no notification
        dev2.resize(100, 30)
        assert h.host.config == 0


# -- multiport (§5.3.6.2) --------------------------------------------------------------


@pytest.mark.parametrize("packed", RING)
def test_multiport_handshake(packed: bool) -> None:
    ports = [
        ConsolePort(FakeBackend(), console=True),
        ConsolePort(FakeBackend(), name="org.example.one"),
        ConsolePort(FakeBackend(connected=False), name="two"),
    ]
    dev = ConsoleDevice(ports, max_nr_ports=4, cols=90, rows=30)
    with DeviceHarness(dev, packed=packed, features=MP | SIZE) as h:
        ctl = Control(h)
        assert ctl.received() == []  # nothing before DEVICE_READY
        ctl.send(0, E.DEVICE_READY, 1)
        assert ctl.received() == [(i, E.DEVICE_ADD, 0, b"") for i in range(3)]
        ctl.send(0, E.PORT_READY, 1)
        resize = VIRTIO_CONSOLE_RESIZE.pack_values(90, 30)
        assert ctl.received() == [
            (0, E.CONSOLE_PORT, 1, b""),
            (0, E.RESIZE, 0, resize),
            (0, E.PORT_OPEN, 1, b""),
        ]
        ctl.send(1, E.PORT_READY, 1)
        ctl.send(2, E.PORT_READY, 1)
        assert ctl.received() == [
            (1, E.PORT_NAME, 0, b"org.example.one"),
            (1, E.PORT_OPEN, 1, b""),
            (2, E.PORT_NAME, 0, b"two"),  # host side not connected: no PORT_OPEN
        ]
        ctl.send(0, E.PORT_OPEN, 1)
        assert dev.ports[0].guest_open
        assert not h.needs_reset and not dev.metrics.errors


def test_multiport_input_waits_for_guest_port_open() -> None:
    be = PipeBackend()
    dev = ConsoleDevice([ConsolePort(FakeBackend(), console=True), ConsolePort(be, name="p1")])
    with DeviceHarness(dev, features=MP) as h:
        ctl = Control(h)
        _ready(h, ctl, [0, 1])
        seg = h.add(receiveq(1), [], [32], token="rx")[0]
        h.kick(receiveq(1))
        os.write(be.host_w, b"early")
        assert h.poll(0.05) == 0  # port 1 not open on the guest side: not read
        ctl.send(1, E.PORT_OPEN, 1)  # read at once: the data is there
        assert h.used(receiveq(1)) == [("rx", 5)]
        assert h.read((seg[0], 5)) == b"early"
        h.add(transmitq(1), [b"out"], [], token="tx")
        h.kick(transmitq(1))
        assert h.used(transmitq(1)) == [("tx", 0)]
        assert os.read(be.host_r, 10) == b"out"
    dev.close()


def test_resize_sends_resize_message_to_console_port() -> None:
    dev = ConsoleDevice([ConsolePort(FakeBackend(), console=True)])
    with DeviceHarness(dev, features=MP | SIZE) as h:
        ctl = Control(h)
        _ready(h, ctl, [0])
        dev.resize(120, 50)
        assert ctl.received() == [(0, E.RESIZE, 0, VIRTIO_CONSOLE_RESIZE.pack_values(120, 50))]
        assert h.host.config == 1  # and port 0's config, with SIZE


def test_hot_add_and_remove() -> None:
    dev = ConsoleDevice([ConsolePort(FakeBackend(), console=True)], max_nr_ports=2)
    with DeviceHarness(dev, features=MP) as h:
        ctl = Control(h)
        _ready(h, ctl, [0])
        be = FakeBackend()
        assert dev.add_port(ConsolePort(be, name="hot")) == 1
        assert ctl.received() == [(1, E.DEVICE_ADD, 0, b"")]
        ctl.send(1, E.PORT_READY, 1)
        assert ctl.received() == [(1, E.PORT_NAME, 0, b"hot"), (1, E.PORT_OPEN, 1, b"")]
        dev.remove_port(1)
        assert ctl.received() == [(1, E.DEVICE_REMOVE, 0, b"")]
        assert be.closed


def test_device_must_not_add_existing_port_or_port_beyond_max_nr_ports() -> None:
    """§5.3.6.2.1: "The device MUST NOT specify a port which exists in a
    VIRTIO_CONSOLE_DEVICE_ADD message, nor a port which is equal or greater than
    max_nr_ports"."""
    dev = ConsoleDevice([ConsolePort(FakeBackend())], max_nr_ports=2)
    with DeviceHarness(dev, features=MP) as h:
        ctl = Control(h)
        _ready(h, ctl, [0])
        with pytest.raises(ConfigurationError):
            dev.add_port(ConsolePort(FakeBackend()), 0)
        with pytest.raises(ConfigurationError):
            dev.add_port(ConsolePort(FakeBackend()), 2)
        dev.add_port(ConsolePort(FakeBackend()))
        with pytest.raises(ConfigurationError, match="in use"):
            dev.add_port(ConsolePort(FakeBackend()))
        assert [m[:2] for m in ctl.received()] == [(1, E.DEVICE_ADD)]


def test_device_must_not_remove_port_not_created_with_device_add() -> None:
    """§5.3.6.2.1: "The device MUST NOT specify a port in VIRTIO_CONSOLE_DEVICE_REMOVE
    which has not been created with a previous VIRTIO_CONSOLE_DEVICE_ADD"."""
    dev = ConsoleDevice([ConsolePort(FakeBackend()), ConsolePort(FakeBackend())])
    with DeviceHarness(dev, features=MP) as h:
        ctl = Control(h)
        dev.remove_port(1)  # before DEVICE_READY: never added
        assert ctl.received() == []
        ctl.send(0, E.DEVICE_READY, 1)
        assert ctl.received() == [(0, E.DEVICE_ADD, 0, b"")]


def test_malformed_control_messages_are_counted_never_a_crash() -> None:
    dev = ConsoleDevice([ConsolePort(FakeBackend(), console=True)])
    with DeviceHarness(dev, features=MP) as h:
        ctl = Control(h)
        ctl.send(0, 0, 0, raw=b"\x00\x00\x00")  # short
        ctl.send(0, 99, 1)  # unknown event
        ctl.send(0, E.PORT_READY, 1)  # before DEVICE_ADD: bad id
        ctl.send(0, E.DEVICE_READY, 0)  # the driver failed
        ctl.send(0, E.DEVICE_READY, 7)
        _ready(h, ctl, [])
        ctl.send(5, E.PORT_OPEN, 1)  # no port 5
        ctl.send(0, E.PORT_OPEN, 2)  # bad value
        ctl.send(0, E.DEVICE_ADD, 0)  # a device-only event from the driver
        ctl.send(0, E.PORT_READY, 0)  # the driver could not set the port up
        assert dev.metrics.errors == {
            "ctrl_short": 1,
            "ctrl_unknown_event": 1,
            "ctrl_bad_id": 2,
            "driver_not_ready": 1,
            "ctrl_bad_value": 2,
            "ctrl_device_event": 1,
            "port_not_ready": 1,
        }
        assert not h.needs_reset
        assert not dev.ports[0].guest_open


def test_control_backlog_is_bounded() -> None:
    dev = ConsoleDevice([ConsolePort(FakeBackend(), console=True)])
    with DeviceHarness(dev, features=MP) as h:
        ctl = Control(h, buffers=4)
        _ready(h, ctl, [0])
        for i in range(MAX_CONTROL_BACKLOG + 10):
            dev.resize(80 + i % 5, 25)
        assert dev.metrics.errors.get("ctrl_backlog_full", 0) > 0
        assert len(dev._ctrl_out) == MAX_CONTROL_BACKLOG


def test_reset_forgets_the_handshake() -> None:
    dev = ConsoleDevice([ConsolePort(FakeBackend(), console=True)])
    h = DeviceHarness(dev, features=MP)
    ctl = Control(h)
    _ready(h, ctl, [0])
    assert dev.ports[0].ready
    h.close()
    assert not dev.ports[0].added and not dev.ports[0].ready


# -- back-ends ---------------------------------------------------------------------------


def test_pty_backend_both_ways() -> None:
    be = PtyBackend()
    dev = ConsoleDevice([ConsolePort(be, console=True)], multiport=False)
    host = os.open(be.path, os.O_RDWR | os.O_NOCTTY)
    try:
        with DeviceHarness(dev) as h:
            seg = h.add(0, [], [64], token="rx")[0]
            h.kick(0)
            os.write(host, b"typed\n")
            deadline = time.monotonic() + 2
            while not (used := h.used(0)) and time.monotonic() < deadline:
                h.poll(0.1)
            assert used == [("rx", 6)]
            assert h.read((seg[0], 6)) == b"typed\n"  # raw mode: no echo, no CRLF
            h.add(1, [b"shown\n"], [])
            h.kick(1)
            assert select.select([host], [], [], 2)[0]
            assert os.read(host, 64) == b"shown\n"
    finally:
        os.close(host)
        dev.close()


def test_socket_backend_one_peer_and_port_open_follows_connection(tmp_path) -> None:
    path = str(tmp_path / "p1.sock")
    be = SocketBackend(path)
    dev = ConsoleDevice([ConsolePort(FakeBackend(), console=True), ConsolePort(be, name="s")])
    with DeviceHarness(dev, features=MP) as h:
        ctl = Control(h)
        msgs = _ready(h, ctl, [0, 1])
        assert (1, E.PORT_OPEN, 1, b"") not in msgs  # nobody connected yet
        ctl.send(1, E.PORT_OPEN, 1)
        seg = h.add(receiveq(1), [], [64], token="rx")[0]
        h.kick(receiveq(1))
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.connect(path)
        h.poll(1.0)
        assert ctl.received() == [(1, E.PORT_OPEN, 1, b"")]
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.connect(path)
        peer.sendall(b"over the socket")
        deadline = time.monotonic() + 2
        while not (used := h.used(receiveq(1))) and time.monotonic() < deadline:
            h.poll(0.1)
        assert used == [("rx", 15)]
        assert h.read((seg[0], 15)) == b"over the socket"
        h.add(transmitq(1), [b"back"], [])
        h.kick(transmitq(1))
        assert peer.recv(64) == b"back"
        peer.close()
        h.add(receiveq(1), [], [64], token="rx2")
        h.kick(receiveq(1))
        deadline = time.monotonic() + 2
        got: list = []
        while not got and time.monotonic() < deadline:
            h.poll(0.1)
            got = ctl.received()
        # the peer hung up; the second, waiting in the listen backlog meanwhile,
        # is the next peer
        while len(got) < 2 and time.monotonic() < deadline:
            h.poll(0.1)
            got += ctl.received()
        assert got == [(1, E.PORT_OPEN, 0, b""), (1, E.PORT_OPEN, 1, b"")]
        second.sendall(b"2nd")
        while not (used := h.used(receiveq(1))) and time.monotonic() < deadline:
            h.poll(0.1)
        assert used == [("rx2", 3)]
        second.close()
    dev.close()


def test_file_backend_is_output_only(tmp_path) -> None:
    log = tmp_path / "guest.log"
    be = FileBackend(str(log))
    dev = ConsoleDevice([ConsolePort(be, console=True)], multiport=False)
    with DeviceHarness(dev) as h:
        h.add(0, [], [16])
        h.kick(0)
        h.add(1, [b"logged\n"], [])
        h.kick(1)
        assert h.used(0) == []
    dev.close()
    assert log.read_bytes() == b"logged\n"
