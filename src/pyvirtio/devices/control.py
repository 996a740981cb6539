"""A control socket for a device being served: one command line in, one JSON line out.

``pyvirtio serve balloon --control PATH`` and ``serve console --control PATH`` let a
user change a running device (a balloon target, a console port added at run time).
:class:`ControlSocket` listens on a unix stream socket declared as a host event
source of the device (:mod:`pyvirtio.core.events`), so commands run in the device's
own loop, under its lock, like every other entry point. Each connection carries one
line of at most :attr:`ControlSocket.max_line` bytes and gets one JSON object back
(``{"error": ...}`` for a bad command, which changes nothing); a client that sends
nothing is dropped after one second. :func:`control_command` is the client side.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable
from typing import Any, Protocol

from pyvirtio.core.events import HostEvents
from pyvirtio.errors import ConfigurationError

__all__ = ["ControlSocket", "ControlledDevice", "control_command"]


class ControlledDevice(Protocol):
    """What a control socket needs of its device."""

    events: HostEvents
    close_hooks: list[Callable[[], None]]


class ControlSocket:
    """Serve commands for ``device`` on unix socket ``path``; subclasses answer them
    in :meth:`command`. Closed with the device (``close_hooks``)."""

    max_line = 4096

    def __init__(self, device: ControlledDevice, path: str) -> None:
        self.device = device
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            if os.path.exists(path) and not os.path.isdir(path):
                os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind(path)
            self._sock.listen(8)
            self._sock.setblocking(False)
        except OSError as e:
            self._sock.close()
            raise ConfigurationError(f"cannot listen on control socket {path}: {e}") from e
        device.events.add_reader(self._sock.fileno(), self._accept)
        device.close_hooks.append(self.close)

    def _accept(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        with conn:
            conn.settimeout(1.0)
            try:
                line = b""
                while b"\n" not in line and len(line) < self.max_line:
                    chunk = conn.recv(self.max_line)
                    if not chunk:
                        break
                    line += chunk
                reply = self.command(line.decode(errors="replace"))
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                return

    def command(self, line: str) -> dict[str, Any]:
        """Run one command line; returns the reply (``{"error": ...}`` if bad)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop listening and remove the socket file."""
        if self._sock.fileno() >= 0:
            self.device.events.remove_reader(self._sock.fileno())
            self._sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def control_command(path: str, line: str, timeout: float = 5.0) -> dict[str, Any]:
    """Send one command to a device's control socket; returns the JSON reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(line.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    return reply
