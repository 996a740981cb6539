"""The console's control socket (``serve console --control PATH``): ``add``,
``remove``, ``resize`` and ``info`` change a device the driver is using, and what
each queues reaches the driver's control receiveq (virtio-v1.2 §5.3.6.2)."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

from pyvirtio.devices.console import (
    ConsoleControl,
    ConsoleDevice,
    ConsolePort,
    console_command,
)
from pyvirtio.devices.console.entry import DEVICE_TYPE
from pyvirtio.spec.console import VIRTIO_CONSOLE_RESIZE, ConsoleEvent, ConsoleFeature
from pyvirtio.testing import DeviceHarness
from tests.devices._console_support import Control, FakeBackend
from tests.devices.test_console import _ready
from tests.devices.test_console_entry import _args

E = ConsoleEvent
MP = ConsoleFeature.MULTIPORT.mask


def _short_dir() -> Path:
    # unix socket paths are limited to 108 bytes: pytest's tmp_path may be longer
    import tempfile

    return Path(tempfile.mkdtemp(prefix="pyv-cctl-"))


def test_commands_add_resize_remove_reach_the_driver() -> None:
    d = _short_dir()
    dev = ConsoleDevice([ConsolePort(FakeBackend(), console=True)], max_nr_ports=3)
    ctl_sock = ConsoleControl(dev, str(d / "ctl"))
    with DeviceHarness(dev, features=MP) as h:
        ctl = Control(h)
        _ready(h, ctl, [0])
        reply = ctl_sock.command(f"add org.example.hot=socket:{d / 'hot.sock'}")
        assert reply["added"] == 1, reply
        assert [(p["id"], p["name"]) for p in reply["ports"]] == [(0, None), (1, "org.example.hot")]
        assert ctl.received() == [(1, E.DEVICE_ADD, 0, b"")]
        ctl.send(1, E.PORT_READY, 1)
        # the socket has no peer yet: no PORT_OPEN 1
        assert ctl.received() == [(1, E.PORT_NAME, 0, b"org.example.hot")]
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.connect(str(d / "hot.sock"))
        h.poll(1.0)  # the back-end accepts its peer
        assert ctl.received() == [(1, E.PORT_OPEN, 1, b"")]
        assert ctl_sock.command("info")["ports"][1]["host_connected"] is True

        reply = ctl_sock.command("resize 100 30")
        assert (reply["cols"], reply["rows"]) == (100, 30)
        got = ctl.received()
        assert [(m[0], m[1]) for m in got] == [(0, E.RESIZE)]
        size = VIRTIO_CONSOLE_RESIZE.unpack(got[0][3])
        assert (size.cols, size.rows) == (100, 30)

        assert ctl_sock.command("remove 1")["removed"] == 1
        assert ctl.received() == [(1, E.DEVICE_REMOVE, 0, b"")]
        peer.close()
        assert [p["id"] for p in ctl_sock.command("info")["ports"]] == [0]
    dev.close()
    assert not (d / "ctl").exists()


def test_bad_commands_are_answered_with_an_error_and_change_nothing() -> None:
    d = _short_dir()
    dev = ConsoleDevice([ConsolePort(FakeBackend(), console=True)], max_nr_ports=2)
    ctl_sock = ConsoleControl(dev, str(d / "ctl"))
    with DeviceHarness(dev, features=MP) as h:
        ctl = Control(h)
        _ready(h, ctl, [0])
        for line in (
            "bogus",
            "add",
            "add weird:thing",
            "add =pty",
            "remove 7",
            "remove x",
            "resize 1",
            "resize 70000 1",
            "resize 80 25 5",
            "info extra",
        ):
            assert "error" in ctl_sock.command(line), line
        assert ctl_sock.command(f"add file:{d / 'log'}")["added"] == 1
        assert "in use" in ctl_sock.command(f"add file:{d / 'log2'}")["error"]
        assert len(dev.ports) == 2
        assert ctl.received() == [(1, E.DEVICE_ADD, 0, b"")]
    dev.close()


def test_control_socket_over_the_wire_and_from_the_entry() -> None:
    """``--control`` builds the socket; a client line is answered from the loop."""
    d = _short_dir()
    dev = DEVICE_TYPE.create(
        _args("--port", f"file:{d / 'p0'}", "--max-ports", "2", "--control", str(d / "c"))
    )
    assert isinstance(dev, ConsoleDevice)
    with DeviceHarness(dev, features=MP) as h:
        ctl = Control(h)
        _ready(h, ctl, [0])
        t = threading.Thread(target=h.poll, args=(5.0,))
        t.start()
        reply = console_command(str(d / "c"), f"add log=file:{d / 'p1'}")
        t.join()
        assert reply["added"] == 1 and reply["ports"][1]["name"] == "log"
        assert ctl.received() == [(1, E.DEVICE_ADD, 0, b"")]
    dev.close()
    assert not os.path.exists(d / "c")
