"""A control socket for a console being served: add and remove ports and resize the
console while the guest runs.

``pyvirtio serve console --socket S --control C`` listens on the unix socket ``C``.
Each connection sends one line and gets one JSON line back, then is closed::

    add [NAME=]KIND        # hot-plug a port (KIND as for --port: pty, socket:PATH,
                           # stdio, file:PATH), the lowest free number; {"added": N, ...}
    remove ID              # hot-unplug port ID (DEVICE_REMOVE if the driver knew it)
    resize COLS ROWS [ID]  # the console size of port ID (default 0)
    info                   # {"max_nr_ports", "multiport", "cols", "rows", "ports": [...]}

for example ``echo 'add org.example.log=file:/tmp/log' | socat - UNIX-CONNECT:C`` or
:func:`console_command`. Every answer but an error carries the ``info`` fields; a
bad line is answered ``{"error": ...}`` and changes nothing. The listening socket is
one more host event source of the device
(:attr:`~pyvirtio.core.device.VirtioDevice.events`): whichever transport serves the
device accepts connections in its own loop, under the device lock, so the control
messages the commands queue (virtio-v1.2 §5.3.6.2 DEVICE_ADD, DEVICE_REMOVE,
RESIZE) go out from that loop.
"""

from __future__ import annotations

from typing import Any

from pyvirtio.devices.console.device import ConsoleDevice, ConsolePort
from pyvirtio.devices.control import ControlSocket, control_command
from pyvirtio.errors import ConfigurationError

__all__ = ["ConsoleControl", "console_command", "info"]


class ConsoleControl(ControlSocket):
    """Serve the control protocol (module docs) for ``device`` on unix socket ``path``."""

    max_line = 4096

    def __init__(self, device: ConsoleDevice, path: str) -> None:
        super().__init__(device, path)
        self.device: ConsoleDevice = device

    def command(self, line: str) -> dict[str, Any]:
        """Run one command line; returns the reply (``{"error": ...}`` if bad)."""
        from pyvirtio.devices.console.entry import parse_port

        dev = self.device
        words = line.split()
        extra: dict[str, Any] = {}
        try:
            if not words or (words[0] == "info" and len(words) == 1):
                pass
            elif words[0] == "add" and len(words) == 2:
                with dev.lock:
                    if len(dev.ports) >= dev.max_nr_ports:
                        raise ConfigurationError(f"all {dev.max_nr_ports} ports are in use")
                    if not dev.multiport_offered:
                        raise ConfigurationError("the device offers no MULTIPORT: port 0 only")
                    name, backend = parse_port(words[1])
                    try:
                        extra["added"] = dev.add_port(ConsolePort(backend, name=name))
                    except ConfigurationError:
                        backend.close()
                        raise
            elif words[0] == "remove" and len(words) == 2:
                port_id = int(words[1], 0)
                dev.remove_port(port_id)
                extra["removed"] = port_id
            elif words[0] == "resize" and len(words) in (3, 4):
                cols, rows = int(words[1], 0), int(words[2], 0)
                port_id = int(words[3], 0) if len(words) == 4 else 0
                if port_id and port_id not in dev.ports:
                    raise ConfigurationError(f"no port {port_id}")
                dev.resize(cols, rows, port_id)
            else:
                return {"error": f"unknown command {line.strip()[:200]!r}"}
        except (ValueError, ConfigurationError, OSError) as e:
            return {"error": str(e)}
        return {**extra, **info(dev)}


def info(dev: ConsoleDevice) -> dict[str, Any]:
    """What the console knows now, as JSON-able values."""
    with dev.lock:
        return {
            "max_nr_ports": dev.max_nr_ports,
            "multiport": dev.multiport_offered,
            "cols": dev.cols,
            "rows": dev.rows,
            "ports": [
                {
                    "id": p.id,
                    "name": p.name,
                    "console": p.console,
                    "cols": p.cols,
                    "rows": p.rows,
                    "added": p.added,
                    "ready": p.ready,
                    "guest_open": p.guest_open,
                    "host_connected": p.backend.connected,
                    "bytes_out": p.bytes_out,
                    "bytes_in": p.bytes_in,
                }
                for _, p in sorted(dev.ports.items())
            ],
        }


#: the client side: one command, the JSON reply
console_command = control_command
