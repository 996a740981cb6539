"""Helpers of the console tests: a scriptable back-end, factories, control helpers."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from pyvirtio.devices.console import ConsoleDevice, ConsolePort, FdBackend, SocketBackend
from pyvirtio.spec.console import (
    CONTROL_RECEIVEQ,
    CONTROL_TRANSMITQ,
    VIRTIO_CONSOLE_CONTROL,
    VirtioConsoleControl,
)
from pyvirtio.testing import DeviceHarness


class FakeBackend:
    """Output only, taking at most ``accept`` bytes per write (None: all)."""

    def __init__(self, accept: int | None = None, connected: bool = True) -> None:
        self.out = bytearray()
        self.accept = accept
        self.is_connected = connected
        self.closed = False

    def fileno(self) -> int | None:
        return None

    @property
    def connected(self) -> bool:
        return self.is_connected

    def read(self, n: int) -> bytes | None:
        return None

    def write(self, data: bytes) -> int:
        n = len(data) if self.accept is None else min(self.accept, len(data))
        self.out += data[:n]
        return n

    def close(self) -> None:
        self.closed = True


class PipeBackend(FdBackend):
    """A back-end on two pipes: the test writes :attr:`host_w`, reads :attr:`host_r`."""

    def __init__(self) -> None:
        r_in, self.host_w = os.pipe()
        self.host_r, w_out = os.pipe()
        os.set_blocking(self.host_r, False)
        super().__init__(r_in, w_out, owns=True)

    def close(self) -> None:
        super().close()
        for fd in (self.host_w, self.host_r):
            with contextlib.suppress(OSError):
                os.close(fd)


def socket_console(
    paths: list[str], names: list[str | None] | None = None, **kw: Any
) -> ConsoleDevice:
    """Factory for ``open_driver``: a console whose ports listen at ``paths``
    (port 0 a console port)."""
    names = names or [None] * len(paths)
    ports = [
        ConsolePort(SocketBackend(p), name=n, console=i == 0)
        for i, (p, n) in enumerate(zip(paths, names, strict=True))
    ]
    return ConsoleDevice(ports, **kw)


class Control:
    """The driver end of the two control queues of a :class:`DeviceHarness`."""

    def __init__(self, h: DeviceHarness, buffers: int = 8, size: int = 64) -> None:
        self.h = h
        self.size = size
        self.segs: dict[Any, tuple[int, int]] = {}
        self.n = 0
        self.post(buffers)

    def post(self, count: int) -> None:
        for _ in range(count):
            tok = ("ctl", self.n)
            self.n += 1
            self.segs[tok] = self.h.add(CONTROL_RECEIVEQ, [], [self.size], token=tok)[0]
        self.h.kick(CONTROL_RECEIVEQ)

    def received(self) -> list[tuple[int, int, int, bytes]]:
        """``(id, event, value, extra)`` of each message the device sent since the
        last call (each buffer is posted again)."""
        out = []
        for tok, n in self.h.used(CONTROL_RECEIVEQ):
            data = self.h.read((self.segs.pop(tok)[0], n))
            m = VIRTIO_CONSOLE_CONTROL.unpack(data[:8])
            out.append((m.id, m.event, m.value, data[8:]))
        if out:
            self.post(len(out))
        return out

    def send(self, port: int, event: int, value: int, raw: bytes | None = None) -> None:
        data = (
            raw
            if raw is not None
            else VIRTIO_CONSOLE_CONTROL.pack(VirtioConsoleControl(port, int(event), value))
        )
        self.h.add(CONTROL_TRANSMITQ, [data], [])
        self.h.kick(CONTROL_TRANSMITQ)
        self.h.used(CONTROL_TRANSMITQ)
