"""The console registry entry (``serve console`` arguments, guess, probe exercise)
and ConsoleDriver's answers to a device that breaks its MUSTs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pyvirtio.devices.console import ConsoleDevice, ConsolePort, FileBackend, PtyBackend
from pyvirtio.devices.console.entry import DEVICE_TYPE, parse_port
from pyvirtio.devices.registry import by_id, guess_device_id
from pyvirtio.drivers.console import ConsoleDriver
from pyvirtio.errors import ConfigurationError
from pyvirtio.spec.console import VIRTIO_CONSOLE_CONFIG, ConsoleEvent
from pyvirtio.spec.ids import DeviceId
from pyvirtio.testing import open_driver
from tests.devices._console_support import FakeBackend


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    DEVICE_TYPE.add_arguments(p)
    return p.parse_args(list(argv))


def test_registry_entry() -> None:
    assert by_id(DeviceId.CONSOLE) is DEVICE_TYPE
    assert DEVICE_TYPE.fixed_queues == 2
    assert DEVICE_TYPE.driver_class() is ConsoleDriver


def test_serve_arguments_build_the_ports(tmp_path: Path) -> None:
    assert DEVICE_TYPE.create is not None
    dev = DEVICE_TYPE.create(
        _args(
            "--port",
            "pty",
            "--port",
            f"org.log=file:{tmp_path / 'g.log'}",
            "--port",
            f"ctl=socket:{tmp_path / 'c.sock'}",
            "--cols",
            "100",
        )
    )
    assert isinstance(dev, ConsoleDevice)
    try:
        assert [(p.id, p.name, p.console) for p in dev.ports.values()] == [
            (0, None, True),
            (1, "org.log", False),
            (2, "ctl", False),
        ]
        assert isinstance(dev.ports[0].backend, PtyBackend)
        assert isinstance(dev.ports[1].backend, FileBackend)
        assert dev.max_nr_ports == 4 and dev.cols == 100
    finally:
        dev.close()
    single = DEVICE_TYPE.create(_args("--no-multiport"))
    assert isinstance(single, ConsoleDevice) and single.num_queues == 2
    single.close()


@pytest.mark.parametrize("spec", ["tty", "socket:", "=pty", "file:"])
def test_bad_port_spec_is_a_configuration_error(spec: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_port(spec)


def test_too_many_ports_is_a_configuration_error(tmp_path: Path) -> None:
    assert DEVICE_TYPE.create is not None
    with pytest.raises(ConfigurationError):
        DEVICE_TYPE.create(_args("--no-multiport", "--port", "pty", "--port", "pty"))
    with pytest.raises(ConfigurationError):
        DEVICE_TYPE.create(_args("--max-ports", "1", "--port", "pty", "--port", "pty"))


def test_guess() -> None:
    cfg = VIRTIO_CONSOLE_CONFIG.pack_values(80, 25, 4, 0)
    assert guess_device_id(0b111, cfg, 10) == DeviceId.CONSOLE
    assert guess_device_id(0b101, None, 2) == DeviceId.CONSOLE
    assert guess_device_id(0b111, cfg, 2) == 0  # 4 ports need 10 queues
    # a 24-byte read padded with zeros (pyvirtio's back-end does that) also looks like
    # a block device's configuration (non-zero "capacity", features within blk's
    # bits 0-17): no guess then, probe needs --type console
    assert guess_device_id(0b111, cfg + bytes(12), 10) == 0
    assert guess_device_id(0b011, None, 6) == DeviceId.CONSOLE  # 24-byte read refused
    assert guess_device_id(0b011, None, 3) == 0
    blk_like = (4096).to_bytes(8, "little") + bytes(12) + (512).to_bytes(4, "little")
    assert guess_device_id(0b110, blk_like, 1) == DeviceId.BLOCK


def test_probe_exercise_lists_ports() -> None:
    from pyvirtio.transport.loopback import LoopbackTransport

    dev = ConsoleDevice([ConsolePort(FakeBackend(), console=True), ConsolePort(FakeBackend(), "n")])
    t = LoopbackTransport(dev)
    try:
        assert DEVICE_TYPE.exercise is not None
        ex = DEVICE_TYPE.exercise(t)
    finally:
        t.close()
    assert ex["multiport"] and ex["max_nr_ports"] == 4
    assert [p["name"] for p in ex["ports"]] == [None, "n"]
    assert DEVICE_TYPE.describe_exercise(ex)[1].startswith("    port 0: console")


def make_device() -> ConsoleDevice:
    return ConsoleDevice([ConsolePort(FakeBackend(), console=True)], max_nr_ports=2)


def test_driver_ignores_device_add_of_existing_or_out_of_range_port() -> None:
    """§5.3.6.2.1: "The device MUST NOT specify a port which exists in a
    VIRTIO_CONSOLE_DEVICE_ADD message, nor a port which is equal or greater than
    max_nr_ports" - the driver ignores such a message and counts it."""
    with open_driver("loopback", f"{__name__}:make_device", ConsoleDriver) as o:
        drv: ConsoleDriver = o.driver
        dev = o.device
        assert isinstance(dev, ConsoleDevice)
        with dev.lock:
            dev._send(0, ConsoleEvent.DEVICE_ADD, 0)  # exists
            dev._send(2, ConsoleEvent.DEVICE_ADD, 0)  # not below max_nr_ports
            dev._send(1, ConsoleEvent.DEVICE_REMOVE, 0)  # never added
            dev._send(0, 42, 0)  # unknown event
        dev.flush_queue(2)
        drv.poll(0.2, until_quiet=True)
        assert drv.device_errors == {"bad_device_add": 2, "unknown_port": 1, "unknown_event": 1}
        assert [p.id for p in drv.list_ports()] == [0]


def test_probe_exercise_over_vhost_user(tmp_path: Path) -> None:
    """``pyvirtio probe --type console --exercise`` against a console served over
    vhost-user: the configuration is decoded and the ports listed. (Without --type
    the guess is ambiguous: a console's configuration read as 24 zero-padded bytes
    also passes for a block device's.)"""
    import io
    import threading
    from contextlib import redirect_stdout

    from pyvirtio.cli.main import build_parser
    from pyvirtio.transport.vhost_user.server import VhostUserServer

    path = tmp_path / "con.sock"
    dev = ConsoleDevice(
        [ConsolePort(FakeBackend(), console=True), ConsolePort(FakeBackend(), name="org.x")],
        max_nr_ports=2,
        cols=132,
    )
    server = VhostUserServer(dev, socket_path=str(path))
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        assert server.ready.wait(10)
        args = build_parser().parse_args(
            ["probe", "--socket", str(path), "--timeout", "5", "--type", "console", "--exercise"]
        )
        buf = io.StringIO()
        with redirect_stdout(buf):
            rc = args.func(args)
    finally:
        server.stop()
        thread.join(10)
        dev.close()
    out = buf.getvalue()
    assert rc == 0, out
    assert "device type: 3 (console)" in out
    assert "VIRTIO_CONSOLE_F_MULTIPORT" in out and "132" in out
    assert "port 1: generic, name='org.x'" in out
