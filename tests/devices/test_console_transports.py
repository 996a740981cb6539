"""ConsoleDriver against ConsoleDevice over every transport of
:data:`pyvirtio.testing.TRANSPORTS`, split and packed, with and without
VIRTIO_CONSOLE_F_MULTIPORT.

The ports' host sides are unix sockets (:class:`~pyvirtio.devices.console.
SocketBackend`), so the test reaches them wherever the device lives (the
two-process transport builds it in a child process).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from pyvirtio.core.driver import RingOptions
from pyvirtio.drivers.console import ConsoleDriver
from pyvirtio.testing import TRANSPORTS, open_driver

FACTORY = "tests.devices._console_support:socket_console"
RING = [pytest.param(False, id="split"), pytest.param(True, id="packed")]


def _peer(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    s.settimeout(10)
    return s


@pytest.mark.parametrize("packed", RING)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_multiport_ports_both_ways(transport: str, packed: bool, tmp_path: Path) -> None:
    paths = [tmp_path / "p0.sock", tmp_path / "p1.sock"]
    kw = {"paths": [str(p) for p in paths], "names": [None, "org.pyvirtio.test"]}
    with open_driver(
        transport, FACTORY, ConsoleDriver, factory_kwargs=kw, ring=RingOptions(packed=packed)
    ) as o:
        drv: ConsoleDriver = o.driver
        assert drv.has_multiport
        ports = [(p.id, p.name, p.console, p.host_open) for p in drv.list_ports()]
        assert ports == [(0, None, True, False), (1, "org.pyvirtio.test", False, False)]
        assert drv.ports[0].guest_open  # CONSOLE_PORT answered with PORT_OPEN 1
        assert drv.port_by_name("org.pyvirtio.test").id == 1
        drv.port_events.clear()
        peer = _peer(paths[1])
        assert drv.wait_event("open", 1).value == 1
        assert drv.ports[1].host_open
        drv.open(1)
        drv.write(1, b"guest to host")
        got = b""
        while len(got) < 13:
            got += peer.recv(64)
        assert got == b"guest to host"
        peer.sendall(b"host to guest")
        data = drv.read(1, 13)
        assert data == b"host to guest"
        big = bytes(range(256)) * 200  # several receive buffers
        peer.sendall(big)
        data = b""
        while len(data) < len(big):
            data += drv.read(1)
        assert data == big
        peer.close()
        assert drv.wait_event("open", 1).value == 0
        assert not drv.device_errors


@pytest.mark.parametrize("packed", RING)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_single_port(transport: str, packed: bool, tmp_path: Path) -> None:
    path = tmp_path / "p0.sock"
    kw = {"paths": [str(path)], "multiport": False, "cols": 100, "rows": 40}
    with open_driver(
        transport, FACTORY, ConsoleDriver, factory_kwargs=kw, ring=RingOptions(packed=packed)
    ) as o:
        drv: ConsoleDriver = o.driver
        assert not drv.has_multiport
        assert [(p.id, p.console, p.cols, p.rows) for p in drv.list_ports()] == [(0, True, 100, 40)]
        peer = _peer(path)
        peer.sendall(b"typed")
        assert drv.read(0, 5) == b"typed"
        drv.write(0, b"printed")
        assert peer.recv(64) == b"printed"
        # resize from the test's thread: not over vhost_user, whose server loop only
        # wakes for its own descriptors (it installs no HostEvents listener), so a
        # host-side call from another thread waits for the next event there
        if o.device is not None and transport != "vhost_user":
            o.device.resize(120, 50)  # type: ignore[attr-defined]
            assert drv.wait_event("resize", 0).value == (120, 50)
        peer.close()


@pytest.mark.parametrize("transport", ["loopback", "pci"])
def test_hot_plug_and_emergency_write(transport: str, tmp_path: Path) -> None:
    from pyvirtio.devices.console import ConsolePort, SocketBackend

    paths = [tmp_path / "p0.sock"]
    kw = {"paths": [str(p) for p in paths]}
    with open_driver(transport, FACTORY, ConsoleDriver, factory_kwargs=kw) as o:
        drv: ConsoleDriver = o.driver
        dev = o.device
        assert dev is not None
        peer0 = _peer(paths[0])
        assert drv.wait_event("open", 0).value == 1
        drv.emergency_write(ord("!"))
        assert peer0.recv(8) == b"!"
        hot = tmp_path / "hot.sock"
        pid = dev.add_port(ConsolePort(SocketBackend(str(hot)), name="hot"))  # type: ignore[attr-defined]
        assert drv.wait_event("add", pid)
        assert drv.wait_event("name", pid).value == "hot"
        dev.remove_port(pid)  # type: ignore[attr-defined]
        drv.wait_event("remove", pid)
        assert [p.id for p in drv.list_ports()] == [0]
        # the number is free again: the same port comes back
        pid2 = dev.add_port(ConsolePort(SocketBackend(str(hot)), name="again"))  # type: ignore[attr-defined]
        assert pid2 == pid
        assert drv.wait_event("name", pid).value == "again"
        peer = _peer(hot)
        assert drv.wait_event("open", pid).value == 1
        drv.open(pid)
        peer.sendall(b"x" * 10)
        deadline = time.monotonic() + 10
        data = b""
        while len(data) < 10 and time.monotonic() < deadline:
            data += drv.read(pid)
        assert data == b"x" * 10
        peer.close()
        peer0.close()
