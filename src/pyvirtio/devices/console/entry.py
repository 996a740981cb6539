"""The console device's registry entry: ``pyvirtio serve console``.

::

    pyvirtio serve console --socket /tmp/con.sock \\
        --port pty --port org.example.log=file:/tmp/guest.log --port ctl=socket:/tmp/ctl.sock

Each ``--port [NAME=]KIND`` adds a port in order (the first is port 0, a console
port: the guest's ``/dev/hvc0``; the others are generic ports, ``/dev/vport0pN``,
named NAME in the guest's ``/sys/class/virtio-ports/vport0pN/name``). KIND is
``pty`` (the slave's path is printed), ``socket:PATH`` (listened on, one peer),
``stdio`` or ``file:PATH`` (output only). Without ``--port`` port 0 is a pty.

``--control PATH`` opens a control socket (:mod:`pyvirtio.devices.console.control`):
``add [NAME=]KIND``, ``remove ID``, ``resize COLS ROWS [ID]`` and ``info`` while the
guest runs, one line per connection, answered with a JSON line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pyvirtio.core.device import VirtioDevice
from pyvirtio.devices.registry import DeviceType, int_range
from pyvirtio.errors import ConfigurationError
from pyvirtio.spec.console import VIRTIO_CONSOLE_CONFIG, ConsoleFeature
from pyvirtio.spec.ids import DeviceId

if TYPE_CHECKING:
    from pyvirtio.core.driver import DriverTransport, VirtioDriver
    from pyvirtio.devices.console.backend import ConsoleBackend
    from pyvirtio.vm.qemu import GuestResult

__all__ = ["DEVICE_TYPE", "parse_port"]


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--port",
        action="append",
        default=[],
        metavar="[NAME=]KIND",
        help="add a port (first: port 0, the console): KIND is pty, socket:PATH, stdio "
        "or file:PATH; NAME is the port's name in the guest",
    )
    p.add_argument(
        "--max-ports",
        type=int_range(1, 0x7FFF),
        default=None,
        help="max_nr_ports (default: the ports given, at least 4)",
    )
    p.add_argument(
        "--no-multiport",
        action="store_true",
        help="do not offer VIRTIO_CONSOLE_F_MULTIPORT (port 0 only, two queues)",
    )
    p.add_argument(
        "--control",
        metavar="PATH",
        help="control socket: one line per connection: 'add [NAME=]KIND', 'remove ID', "
        "'resize COLS ROWS [ID]', 'info'; answered with a JSON line",
    )
    p.add_argument("--cols", type=int_range(0, 0xFFFF), default=80)
    p.add_argument("--rows", type=int_range(0, 0xFFFF), default=25)


def parse_port(spec: str) -> tuple[str | None, ConsoleBackend]:
    """``[NAME=]KIND`` -> (name, back-end); :class:`ConfigurationError` if malformed."""
    from pyvirtio.devices.console.backend import (
        FileBackend,
        PtyBackend,
        SocketBackend,
        StdioBackend,
    )

    name: str | None = None
    kind = spec
    if "=" in spec:
        name, kind = spec.split("=", 1)
        if not name:
            raise ConfigurationError(f"--port {spec!r}: empty name")
    if kind == "pty":
        pty = PtyBackend()
        print(f"pyvirtio: console port {name or ''} pty {pty.path}", file=sys.stderr, flush=True)
        return name, pty
    if kind == "stdio":
        return name, StdioBackend()
    if kind.startswith("socket:") and len(kind) > 7:
        return name, SocketBackend(kind[7:])
    if kind.startswith("file:") and len(kind) > 5:
        return name, FileBackend(kind[5:])
    raise ConfigurationError(f"--port {spec!r}: KIND must be pty, socket:PATH, stdio or file:PATH")


def _create(args: argparse.Namespace) -> VirtioDevice:
    from pyvirtio.devices.console import ConsoleDevice, ConsolePort

    specs = args.port or ["pty"]
    multiport = not args.no_multiport
    if not multiport and len(specs) > 1:
        raise ConfigurationError("--no-multiport serves port 0 only: give one --port")
    ports = []
    for i, spec in enumerate(specs):
        name, backend = parse_port(spec)
        ports.append(ConsolePort(backend, name=name, console=i == 0))
    max_ports = args.max_ports if args.max_ports is not None else max(4, len(ports))
    if max_ports < len(ports):
        raise ConfigurationError(f"--max-ports {max_ports} is less than the {len(ports)} ports")
    dev = ConsoleDevice(
        ports, max_nr_ports=max_ports, multiport=multiport, cols=args.cols, rows=args.rows
    )
    if getattr(args, "control", None):
        from pyvirtio.devices.console.control import ConsoleControl

        try:
            ConsoleControl(dev, args.control)
        except ConfigurationError:
            dev.close()
            raise
    return dev


def _driver() -> type[VirtioDriver]:
    from pyvirtio.drivers.console import ConsoleDriver

    return ConsoleDriver


def _exercise(t: DriverTransport) -> dict[str, Any]:
    """Bring the driver up (with MULTIPORT: the control handshake) and list the
    ports; nothing is written to any port."""
    from pyvirtio.drivers.console import ConsoleDriver
    from pyvirtio.spec.features import Feature

    drv = ConsoleDriver(t, timeout=10.0)
    drv.initialize()
    try:
        return {
            "ring": "packed" if drv.has_feature(Feature.RING_PACKED) else "split",
            "multiport": drv.has_multiport,
            "max_nr_ports": drv.config.max_nr_ports,
            "ports": [
                {"id": p.id, "name": p.name, "console": p.console, "host_open": p.host_open}
                for p in drv.list_ports()
            ],
        }
    finally:
        drv.close()


def _describe(ex: dict[str, Any]) -> list[str]:
    lines = [f"    multiport={ex['multiport']} max_nr_ports={ex['max_nr_ports']}"]
    for p in ex["ports"]:
        kind = "console" if p["console"] else "generic"
        state = "host open" if p["host_open"] else "host closed"
        lines.append(f"    port {p['id']}: {kind}, name={p['name']!r}, {state}")
    return lines


def _guess(specific: int, config: bytes | None, num_queues: int | None) -> bool:
    """Only console feature bits (virtio-v1.2 §5.3.3), a 12-byte configuration space
    (§5.3.4: probe reads 24 bytes, which a 12-byte space refuses or pads with zeros)
    and a queue count that fits: 2 without MULTIPORT, ``2 * (max_nr_ports + 1)``
    with it (§5.3.2)."""
    if not specific or specific & ~0b111:
        return False
    size = VIRTIO_CONSOLE_CONFIG.size
    multiport = bool(specific & ConsoleFeature.MULTIPORT.mask)
    if config is not None:
        if len(config) < size or any(config[size:]):
            return False
        if multiport:
            n = VIRTIO_CONSOLE_CONFIG.unpack(config[:size]).max_nr_ports
            return n >= 1 and num_queues in (None, 2 * (n + 1))
    if multiport:
        return num_queues is None or (num_queues >= 4 and num_queues % 2 == 0)
    return num_queues in (None, 2)


#: The console device (virtio-v1.2 §5.3 "Console Device").
_DEMO_PORT = "org.pyvirtio.demo"
_CONSOLE_SCRIPT = f"""
echo "== guest: console device"
port=""
n=0
while [ -z "$port" ] && [ $n -lt 200 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name 2>/dev/null)" = "{_DEMO_PORT}" ] && port=$(basename $p)
  done
  [ -n "$port" ] || usleep 50000
  n=$((n + 1))
done
for p in /sys/class/virtio-ports/*; do
  echo "  $(basename $p): name '$(cat $p/name 2>/dev/null)'"
done
echo "GUEST-CONSOLE-PORT $(cat /sys/class/virtio-ports/$port/name)"
echo "hello from the guest on hvc0" > /dev/hvc0
echo "a line for the host's log on {_DEMO_PORT}" > /dev/$port
echo "  wrote a line to /dev/hvc0 and one to /dev/$port"
"""


class _ConsoleDemo:
    """The console part of the guest demo: a console port and a named port, each
    logged to a file on the host (QEMU 11.1's generic vhost-user front-end)."""

    qemu_device: str = "vhost-user-test-device-pci"
    qemu_options: str = ",virtio-id=3,num_vqs=6,config_size=12"
    modules: tuple[str, ...] = ()
    script: str = _CONSOLE_SCRIPT
    #: QEMU 7.2 has no generic vhost-user front-end
    peer_generation: str = "qemu11.1-linux7.3"

    def __init__(self, workdir: str, args: argparse.Namespace) -> None:
        import os

        self.files: Mapping[str, bytes] = {}
        self.hvc0 = os.path.join(workdir, "console-hvc0.log")
        self.port1 = os.path.join(workdir, "console-port1.log")

    def serve_args(self) -> list[str]:
        return [
            "--max-ports",
            "2",
            "--port",
            f"file:{self.hvc0}",
            "--port",
            f"{_DEMO_PORT}=file:{self.port1}",
        ]

    def check(self, result: GuestResult) -> dict[str, bool]:
        def text(path: str) -> str:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    return f.read()
            except OSError:
                return ""

        name = result.marker_values("GUEST-CONSOLE-PORT")
        return {
            "guest wrote to /dev/hvc0; the host's log has it": "hello from the guest on hvc0"
            in text(self.hvc0),
            f"guest saw the named port {_DEMO_PORT} and wrote to it": name == [_DEMO_PORT]
            and _DEMO_PORT in text(self.port1),
        }


DEVICE_TYPE = DeviceType(
    name="console",
    device_id=int(DeviceId.CONSOLE),
    summary="virtio console (ports on ptys, sockets, stdio, log files)",
    feature_names={
        int(ConsoleFeature.SIZE): "VIRTIO_CONSOLE_F_SIZE",
        int(ConsoleFeature.MULTIPORT): "VIRTIO_CONSOLE_F_MULTIPORT",
        int(ConsoleFeature.EMERG_WRITE): "VIRTIO_CONSOLE_F_EMERG_WRITE",
    },
    config_layout=VIRTIO_CONSOLE_CONFIG,
    fixed_queues=2,
    add_arguments=_add_arguments,
    create=_create,
    capabilities={"type": "console", "features": []},
    driver=_driver,
    exercise=_exercise,
    describe_exercise=_describe,
    guess=_guess,
    demo=_ConsoleDemo,
)
