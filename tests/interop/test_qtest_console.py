"""The pyvirtio console driver against QEMU's own virtio-serial device, via qtest.

Peer: "QEMU 7.2 virtio-serial-pci (virtconsole + virtserialport) via qtest": PCI
modern (split and packed), legacy only (``disable-modern=on``), and
virtio-serial-device on microvm (virtio-mmio version 2). QEMU's
device model (hw/char/virtio-serial-bus.c) is an independent implementation of
virtio-v1.2 §5.3: it offers VIRTIO_CONSOLE_F_MULTIPORT (and EMERG_WRITE), answers
DEVICE_READY with DEVICE_ADD per port, PORT_READY with CONSOLE_PORT / PORT_NAME /
PORT_OPEN, and passes a port's input only once the driver opened it. The ports'
host sides are QEMU socket chardevs (``server=on``) the test connects to.

Shown: the handshake lists port 0 (a console port, ``virtconsole``) and the named
port 1 (``virtserialport``); bytes go both ways on both ports, byte-exact, including
a transfer larger than the receive buffers; a host-side disconnect reaches the
driver as PORT_OPEN 0; and without MULTIPORT (the driver declines it) port 0 works
alone.

Found: QEMU 7.2 sends VIRTIO_CONSOLE_PORT_NAME with a NUL terminator, which
virtio-v1.2 §5.3.6.2 says is not there ("without a NUL terminator"); the driver
ends the name at the NUL (as Linux does) and counts ``port_name_nul``.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.core.driver import DriverTransport
from pyvirtio.drivers.console import ConsoleDriver
from pyvirtio.spec.ids import DeviceId
from pyvirtio.transport.mmio.driver import VirtioMmioTransport, find_mmio_devices, microvm_irq
from pyvirtio.transport.pci.driver import open_virtio_pci
from pyvirtio.transport.pci.enumerate import bdf, enumerate_pci
from pyvirtio.transport.qtest import QtestBus

PEER = "QEMU 7.2 virtio-serial-pci / virtio-serial-device (virtconsole + virtserialport) via qtest"

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason=f"{PEER}: QEMU not installed"
    ),
]

SLOT = 3
NAME = "org.pyvirtio.qtest"


class Qemu:
    def __init__(self, bus: QtestBus, paths: list[str], machine: str = "pc") -> None:
        self.bus = bus
        self.paths = paths
        self.machine = machine

    def connect(self, port: int) -> socket.socket:
        deadline = time.monotonic() + 10
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.paths[port])
                s.settimeout(10)
                return s
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


#: case -> (machine, the virtio-serial device, ring)
CASES = {
    "pci-modern-split": ("pc", f"virtio-serial-pci,id=ser,addr={SLOT},disable-legacy=on", "off"),
    "pci-modern-packed": ("pc", f"virtio-serial-pci,id=ser,addr={SLOT},disable-legacy=on", "on"),
    "pci-legacy": ("pc", f"virtio-serial-pci,id=ser,addr={SLOT},disable-modern=on", "off"),
    "mmio": ("microvm", "virtio-serial-device,id=ser", "off"),
}


@pytest.fixture(scope="module", params=list(CASES))
def qemu(request: pytest.FixtureRequest) -> Iterator[Qemu]:
    machine, device, ring = CASES[request.param]
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"pvcon-{os.getpid()}-{request.param}"
    tmp.mkdir()
    paths = [str(tmp / "p0.sock"), str(tmp / "p1.sock")]
    args = [
        "-chardev", f"socket,id=c0,path={paths[0]},server=on,wait=off",
        "-chardev", f"socket,id=c1,path={paths[1]},server=on,wait=off",
        "-device", f"{device},max_ports=4,packed={ring}",
        "-device", "virtconsole,chardev=c0,bus=ser.0,nr=0",
        "-device", f"virtserialport,chardev=c1,bus=ser.0,nr=1,name={NAME}",
    ]  # fmt: skip
    if machine == "microvm":
        args += ["-global", "virtio-mmio.force-legacy=false"]
    bus = QtestBus(args, machine=machine)
    try:
        if machine == "pc":
            enumerate_pci(bus)
        yield Qemu(bus, paths, machine)
    finally:
        bus.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _driver(qemu: Qemu, **kw: object) -> ConsoleDriver:
    t: DriverTransport
    if qemu.machine == "microvm":
        found = {did: (slot, addr) for slot, addr, did in find_mmio_devices(qemu.bus)}
        slot, base = found[DeviceId.CONSOLE]
        t = VirtioMmioTransport(qemu.bus, base, irq=microvm_irq(slot))
    else:
        t = open_virtio_pci(qemu.bus, bdf(0, SLOT))
    drv = ConsoleDriver(t, **kw)  # type: ignore[arg-type]
    try:
        drv.initialize()
    except BaseException:
        t.close()
        raise
    return drv


def _close(drv: ConsoleDriver) -> None:
    t = drv.transport
    drv.close()
    t.close()


def _recv(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(65536)
        assert chunk, "QEMU closed the chardev"
        out += chunk
    return out


def test_multiport_handshake_and_both_ports(qemu: Qemu) -> None:
    p0 = qemu.connect(0)
    p1 = qemu.connect(1)
    time.sleep(0.2)  # QEMU's chardevs accept in its main loop
    drv = _driver(qemu)
    try:
        assert drv.has_multiport
        assert drv.config.max_nr_ports == 4
        ports = {p.id: p for p in drv.list_ports()}
        assert sorted(ports) == [0, 1]
        assert ports[0].console and ports[0].guest_open
        assert ports[1].name == NAME and not ports[1].console
        assert ports[0].host_open and ports[1].host_open
        drv.open(1)
        for pid, sock in ((0, p0), (1, p1)):
            msg = f"driver to port {pid}".encode()
            drv.write(pid, msg)
            assert _recv(sock, len(msg)) == msg
            back = f"host to port {pid}".encode()
            sock.sendall(back)
            assert drv.read(pid, len(back)) == back
        big = os.urandom(20000)  # five 4 KiB receive buffers
        p1.sendall(big)
        got = b""
        while len(got) < len(big):
            got += drv.read(1)
        assert got == big
        drv.write(1, big)
        assert _recv(p1, len(big)) == big
        drv.port_events.clear()
        p1.close()
        assert drv.wait_event("open", 1).value == 0
        # QEMU 7.2 ends PORT_NAME with a NUL the spec says is not there
        assert drv.device_errors == {"port_name_nul": 1}
    finally:
        _close(drv)
        p0.close()


def test_port0_only_without_multiport(qemu: Qemu) -> None:
    p0 = qemu.connect(0)
    time.sleep(0.2)
    drv = _driver(qemu, multiport=False)
    try:
        assert not drv.has_multiport
        assert [p.id for p in drv.list_ports()] == [0]
        drv.write(0, b"no multiport")
        assert _recv(p0, 12) == b"no multiport"
        p0.sendall(b"typed")
        assert drv.read(0, 5) == b"typed"
    finally:
        _close(drv)
        p0.close()
