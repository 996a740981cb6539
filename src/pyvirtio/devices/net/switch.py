"""An in-process learning Ethernet switch joining pyvirtio network devices.

``switch = Switch()``, then one :meth:`Switch.port` per device
(``NetDevice(switch.port())``): what one device transmits reaches the others with
no host networking at all, so two guests served by one process can talk.

The switch learns which port each source MAC address lives behind and sends a
unicast frame only there; broadcast, multicast and frames for an address it has not
seen are flooded to every other port (IEEE 802.1D's transparent bridging, without
spanning tree: ports are devices, not links, so there are no loops). The table is
bounded (:data:`MAX_TABLE`; the oldest entry goes first).

Each port holds at most :data:`PORT_BACKLOG` frames for its device; beyond that a
frame is dropped and counted - a device whose driver posts no receive buffers
cannot make the switch grow without bound. A port signals its device through an
eventfd, so delivery never runs the receiving device's code on the sending
device's thread (two devices transmitting to each other at once cannot deadlock
on their locks).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence

__all__ = ["MAX_TABLE", "PORT_BACKLOG", "Switch", "SwitchPort"]

#: Frames a port keeps for its device before dropping.
PORT_BACKLOG = 256
#: MAC addresses the switch remembers.
MAX_TABLE = 4096


class SwitchPort:
    """One port of a :class:`Switch`: a :class:`~pyvirtio.devices.net.backend.
    NetBackend` with one channel and no offload header."""

    vnet_hdr = False
    channels = 1

    def __init__(self, switch: Switch, name: str, backlog: int = PORT_BACKLOG) -> None:
        self.switch = switch
        self.name = name
        self.backlog = backlog
        self._frames: deque[bytes] = deque()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed = False
        #: frames delivered to this port
        self.received = 0
        #: frames dropped because the device had not taken the earlier ones
        self.dropped = 0
        #: frames this port's device sent into the switch
        self.sent = 0

    def _deliver(self, frame: bytes) -> None:
        """Switch side (under the switch lock): queue a frame for the device."""
        if self._closed:
            return
        if len(self._frames) >= self.backlog:
            self.dropped += 1
            return
        self._frames.append(frame)
        self.received += 1
        with contextlib.suppress(BlockingIOError):  # the counter is nearly 2^64
            os.eventfd_write(self._efd, 1)

    def fileno(self, channel: int) -> int:
        """The eventfd that is readable while frames wait."""
        return self._efd

    def recv_into(self, channel: int, buf: memoryview) -> int | None:
        """The oldest waiting frame into ``buf`` (cut to its size)."""
        with self.switch.lock:
            if not self._frames:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._efd)
                return None
            frame = self._frames.popleft()
        n = min(len(frame), len(buf))
        buf[:n] = frame[:n]
        return n

    def send(self, channel: int, parts: Sequence[bytes | bytearray | memoryview]) -> bool:
        """Into the switch: learn the source, forward or flood."""
        frame = b"".join(parts)
        self.sent += 1
        return self.switch.forward(self, frame)

    def flush(self) -> bool:
        """Nothing is held back."""
        return True

    def set_offloads(self, tun_flags: int) -> None:
        """No offloads."""

    def set_active_channels(self, n: int) -> None:
        """One channel."""

    def close(self) -> None:
        """Leave the switch and close the eventfd."""
        if self._closed:
            return
        self._closed = True
        self.switch.remove(self)
        os.close(self._efd)


class Switch:
    """A learning switch; make ports with :meth:`port`."""

    def __init__(self, max_table: int = MAX_TABLE) -> None:
        self.lock = threading.Lock()
        self.max_table = max_table
        self._ports: list[SwitchPort] = []
        self._table: OrderedDict[bytes, SwitchPort] = OrderedDict()
        #: frames flooded (destination unknown, broadcast or multicast)
        self.flooded = 0
        #: frames sent to the one port their destination was learned on
        self.forwarded = 0

    def port(self, name: str | None = None, backlog: int = PORT_BACKLOG) -> SwitchPort:
        """A new port."""
        with self.lock:
            p = SwitchPort(self, name or f"port{len(self._ports)}", backlog)
            self._ports.append(p)
            return p

    @property
    def ports(self) -> tuple[SwitchPort, ...]:
        """The ports, in the order they were made."""
        return tuple(self._ports)

    def lookup(self, mac: bytes) -> SwitchPort | None:
        """The port ``mac`` was learned on, if any."""
        with self.lock:
            return self._table.get(bytes(mac))

    def remove(self, port: SwitchPort) -> None:
        """Take ``port`` out (and forget the addresses learned on it)."""
        with self.lock:
            if port in self._ports:
                self._ports.remove(port)
            for mac in [m for m, p in self._table.items() if p is port]:
                del self._table[mac]

    def forward(self, source: SwitchPort, frame: bytes) -> bool:
        """Switch one frame that came in on ``source``; False if it went nowhere."""
        if len(frame) < 14:
            return False
        dst, src = frame[0:6], frame[6:12]
        with self.lock:
            if not src[0] & 1:  # a multicast source address is not learned
                self._table[src] = source
                self._table.move_to_end(src)
                while len(self._table) > self.max_table:
                    self._table.popitem(last=False)
            target = None if dst[0] & 1 else self._table.get(dst)
            if target is not None:
                if target is source:
                    return False  # the destination is behind the port it came from
                self.forwarded += 1
                target._deliver(frame)
                return True
            self.flooded += 1
            others = [p for p in self._ports if p is not source]
            for p in others:
                p._deliver(frame)
            return bool(others)
