"""The console driver (virtio-console), driver side. virtio-v1.2 §5.3 "Console Device".

:class:`ConsoleDriver` brings the device up (virtio-v1.2 §5.3.5 "Device
Initialization"), and with VIRTIO_CONSOLE_F_MULTIPORT negotiated runs the control
handshake of virtio-v1.2 §5.3.6.2 "Multiport Device Operation":

- "The driver MUST send a VIRTIO_CONSOLE_DEVICE_READY message if
  VIRTIO_CONSOLE_F_MULTIPORT is negotiated": sent at :meth:`~ConsoleDriver.initialize`;
- each DEVICE_ADD gets the port's receive buffers and a PORT_READY (value 1);
- "Upon receipt of a VIRTIO_CONSOLE_CONSOLE_PORT message, the driver ... MUST respond
  with a VIRTIO_CONSOLE_PORT_OPEN message, which MUST have value set to 1";
- PORT_NAME, PORT_OPEN, RESIZE and DEVICE_REMOVE update :attr:`ConsoleDriver.ports`
  and are recorded in :attr:`ConsoleDriver.port_events`.

Without MULTIPORT there is port 0 only, open from the start. Receive buffers are
device-writable only and transmit buffers device-readable only ("The driver MUST NOT
put a device-readable buffer in a receiveq. The driver MUST NOT put a device-writable
buffer in a transmitq", virtio-v1.2 §5.3.6.1).

A control message from the device that breaks a device MUST (DEVICE_ADD of a port
that exists or of one not below ``max_nr_ports``, DEVICE_REMOVE of a port never
added) is ignored and counted in :attr:`ConsoleDriver.device_errors`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from pyvirtio.core.driver import DriverTransport, RingOptions, VirtioDriver
from pyvirtio.errors import ConfigurationError, DeviceError, QueueBrokenError, QueueFullError
from pyvirtio.spec.console import (
    CONTROL_RECEIVEQ,
    CONTROL_TRANSMITQ,
    VIRTIO_CONSOLE_CONFIG,
    VIRTIO_CONSOLE_CONTROL,
    VIRTIO_CONSOLE_RESIZE,
    ConsoleEvent,
    ConsoleFeature,
    VirtioConsoleConfig,
    VirtioConsoleControl,
    receiveq,
    transmitq,
    virtqueue_count,
)
from pyvirtio.spec.ids import DeviceId
from pyvirtio.virtqueue.common import DriverVirtqueue

__all__ = ["ConsoleDriver", "DriverPort", "PortEvent"]

E = ConsoleEvent
F = ConsoleFeature

_CONTROL_BUF = 4096
_MAX_WRITE = 32 << 10  # bytes per transmit buffer, as Linux's virtio_console


class PortEvent(NamedTuple):
    """Something the device said about a port: ``kind`` is ``add``, ``remove``,
    ``open`` (value 1/0: host side open/closed), ``resize`` (value ``(cols, rows)``),
    ``name`` or ``console``."""

    kind: str
    port: int
    value: object = None


@dataclass
class DriverPort:
    """A port as the driver knows it."""

    id: int
    name: str | None = None
    console: bool = False
    #: the device's side is open (PORT_OPEN from the device; True without MULTIPORT)
    host_open: bool = False
    #: this driver has the port open (PORT_OPEN sent with value 1)
    guest_open: bool = False
    cols: int = 0
    rows: int = 0
    removed: bool = False
    input: bytearray = field(default_factory=bytearray)


class ConsoleDriver(VirtioDriver):
    """A virtio console driver over any :class:`~pyvirtio.core.driver.DriverTransport`.

    ``multiport`` accepts VIRTIO_CONSOLE_F_MULTIPORT when offered; ``buffers``
    receive buffers of ``buffer_size`` bytes are kept posted per port; the
    handshake at :meth:`initialize` waits until the device has been quiet for
    ``settle`` seconds (at most ``timeout``)::

        drv = ConsoleDriver(transport)
        drv.initialize()
        drv.write(0, b"hello")
        print(drv.read(0))
    """

    device_id = DeviceId.CONSOLE

    def __init__(
        self,
        transport: DriverTransport,
        *,
        multiport: bool = True,
        buffer_size: int = 4096,
        buffers: int = 4,
        timeout: float = 10.0,
        settle: float = 0.2,
        ring: RingOptions = RingOptions(),
    ) -> None:
        super().__init__(transport, ring=ring)
        if buffer_size <= 0 or buffers <= 0:
            raise ConfigurationError("buffer_size and buffers must be positive")
        self.multiport = multiport
        self.buffer_size = buffer_size
        self.buffers = buffers
        self.timeout = timeout
        self.settle = settle
        self.config = VirtioConsoleConfig(0, 0, 1, 0)
        #: the ports by number
        self.ports: dict[int, DriverPort] = {}
        #: what the device said, in order (see :class:`PortEvent`)
        self.port_events: deque[PortEvent] = deque(maxlen=4096)
        #: device violations seen (ignored messages), by kind
        self.device_errors: dict[str, int] = {}
        self._allocated: set[int] = set()
        self._ctrl_pending = 0
        # receive buffers posted per port; those of a removed port are abandoned: the
        # device forgets them (as Linux's remove_port_data detaches them)
        self._rx_posted: dict[int, set[int]] = {}
        self._abandoned: set[int] = set()

    # -- VirtioDriver hooks ---------------------------------------------------------

    def specific_features(self, offered: int) -> int:
        """SIZE and EMERG_WRITE when offered, MULTIPORT if asked for."""
        want = F.SIZE.mask | F.EMERG_WRITE.mask
        if self.multiport:
            want |= F.MULTIPORT.mask
        return offered & want

    @property
    def has_multiport(self) -> bool:
        """True if VIRTIO_CONSOLE_F_MULTIPORT was negotiated."""
        return self.has_feature(F.MULTIPORT)

    def setup(self) -> None:
        """Read the configuration space (virtio-v1.2 §5.3.5 items 2-3)."""
        self.config = VIRTIO_CONSOLE_CONFIG.unpack(self.read_config(0, VIRTIO_CONSOLE_CONFIG.size))
        if self.has_multiport and not 1 <= self.config.max_nr_ports <= 0x7FFF:
            raise DeviceError(f"max_nr_ports is {self.config.max_nr_ports}")

    def queue_count(self) -> int:
        """Two queues, or a pair per port plus the control pair with MULTIPORT."""
        return virtqueue_count(self.config.max_nr_ports, self.has_multiport)

    def initialize(self) -> None:
        """Initialize; with MULTIPORT post control buffers, send DEVICE_READY and
        run the handshake; without it port 0 is there and open."""
        super().initialize()
        if not self.has_multiport:
            port = DriverPort(0, console=True, host_open=True, guest_open=True)
            if self.has_feature(F.SIZE):
                port.cols, port.rows = self.config.cols, self.config.rows
            self.ports[0] = port
            self._post_receive(0)
            return
        q = self.queues[CONTROL_RECEIVEQ]
        for _ in range(min(16, q.size)):
            self._post(CONTROL_RECEIVEQ, _CONTROL_BUF)
        self.kick(CONTROL_RECEIVEQ)
        self._send_control(0, E.DEVICE_READY, 1)
        self.poll(self.settle, until_quiet=True)

    # -- buffers --------------------------------------------------------------------

    def _alloc(self, n: int) -> int:
        addr = self.transport.allocator.alloc(n, 16)
        self._allocated.add(addr)
        return addr

    def _free(self, addr: int) -> None:
        if addr in self._allocated:
            self._allocated.discard(addr)
            self.transport.allocator.free(addr)

    def _post(self, index: int, size: int) -> int | None:
        q = self.queues[index]
        if q.num_free < 1:
            return None
        addr = self._alloc(size)
        try:
            # §5.3.6.1: receive buffers are device-writable only
            q.add((), ((addr, size),), addr)
        except QueueFullError:
            self._free(addr)
            return None
        return addr

    def _post_receive(self, port_id: int) -> None:
        index = receiveq(port_id)
        q = self.queues[index]
        posted = False
        mine = self._rx_posted.setdefault(port_id, set())
        while q.num_free and len(mine) < self.buffers:
            addr = self._post(index, self.buffer_size)
            if addr is None:
                break
            mine.add(addr)
            posted = True
        if posted:
            self.kick(index)

    # -- control messages ---------------------------------------------------------------

    def _send_control(self, port_id: int, event: int, value: int) -> None:
        """Send one control message (device-readable only, §5.3.6.1)."""
        q = self.queues[CONTROL_TRANSMITQ]
        self._reap_control_tx()
        deadline = time.monotonic() + self.timeout
        while q.num_free < 1:
            self._wait_some(deadline, "control transmitq space")
            self._reap_control_tx()
        addr = self._alloc(VIRTIO_CONSOLE_CONTROL.size)
        self.transport.mem.write(
            addr, VIRTIO_CONSOLE_CONTROL.pack(VirtioConsoleControl(port_id, int(event), value))
        )
        q.add(((addr, VIRTIO_CONSOLE_CONTROL.size),), (), addr)
        self._ctrl_pending += 1
        self.kick(CONTROL_TRANSMITQ)

    def _reap_control_tx(self) -> None:
        q = self.queues[CONTROL_TRANSMITQ]
        while (used := q.get_used()) is not None:
            self._free(used[0])
            self._ctrl_pending -= 1

    def _device_error(self, kind: str) -> None:
        self.device_errors[kind] = self.device_errors.get(kind, 0) + 1

    def _reap_control_rx(self) -> int:
        q = self.queues[CONTROL_RECEIVEQ]
        handled = 0
        reposts = 0
        while (used := q.get_used()) is not None:
            addr, n = used
            data = self.transport.mem.read(addr, min(n, _CONTROL_BUF))
            self._free(addr)
            reposts += 1
            handled += 1
            if n < VIRTIO_CONSOLE_CONTROL.size:
                self._device_error("short_control")
                continue
            self._control_message(
                VIRTIO_CONSOLE_CONTROL.unpack(data[: VIRTIO_CONSOLE_CONTROL.size]),
                data[VIRTIO_CONSOLE_CONTROL.size :],
            )
        if reposts:
            for _ in range(reposts):
                self._post(CONTROL_RECEIVEQ, _CONTROL_BUF)
            self.kick(CONTROL_RECEIVEQ)
        return handled

    def _control_message(self, msg: VirtioConsoleControl, extra: bytes) -> None:
        pid, event, value = msg.id, msg.event, msg.value
        port = self.ports.get(pid)
        if event == E.DEVICE_ADD:
            # §5.3.6.2.1: the device "MUST NOT specify a port which exists ... nor a
            # port which is equal or greater than max_nr_ports"
            if pid >= self.config.max_nr_ports or (port is not None and not port.removed):
                self._device_error("bad_device_add")
                return
            self.ports[pid] = DriverPort(pid)
            self.port_events.append(PortEvent("add", pid))
            self._post_receive(pid)
            self._send_control(pid, E.PORT_READY, 1)
            return
        if port is None or port.removed:
            self._device_error("unknown_port")
            return
        if event == E.DEVICE_REMOVE:
            port.removed = True
            # the device forgets the port's receive buffers: they stay out of use
            # (their descriptors too: a ring cannot take back buffers mid-life)
            self._abandoned |= self._rx_posted.pop(pid, set())
            port.host_open = port.guest_open = False
            self.port_events.append(PortEvent("remove", pid))
        elif event == E.CONSOLE_PORT:
            port.console = True
            self.port_events.append(PortEvent("console", pid))
            # §5.3.6.2.2: "MUST respond with a VIRTIO_CONSOLE_PORT_OPEN message, which
            # MUST have value set to 1"
            self.open(pid)
        elif event == E.RESIZE:
            if len(extra) < VIRTIO_CONSOLE_RESIZE.size:
                self._device_error("short_resize")
                return
            size = VIRTIO_CONSOLE_RESIZE.unpack(extra[: VIRTIO_CONSOLE_RESIZE.size])
            port.cols, port.rows = size.cols, size.rows
            self.port_events.append(PortEvent("resize", pid, (size.cols, size.rows)))
        elif event == E.PORT_OPEN:
            port.host_open = bool(value)
            self.port_events.append(PortEvent("open", pid, int(bool(value))))
        elif event == E.PORT_NAME:
            # §5.3.6.2: "the UTF-8 name of the port ... (without a NUL terminator)";
            # QEMU's virtio-serial sends one: the name ends there (as in Linux)
            if b"\0" in extra:
                self._device_error("port_name_nul")
                extra = extra[: extra.index(b"\0")]
            port.name = extra.decode("utf-8", "replace")
            self.port_events.append(PortEvent("name", pid, port.name))
        else:
            self._device_error("unknown_event")

    def on_config_change(self) -> None:
        """Re-read the size (virtio-v1.2 §5.3.6 item 3: "This size applies to port 0
        only")."""
        if not self.queues:
            return
        self.config = VIRTIO_CONSOLE_CONFIG.unpack(self.read_config(0, VIRTIO_CONSOLE_CONFIG.size))
        port = self.ports.get(0)
        size = (self.config.cols, self.config.rows)
        if self.has_feature(F.SIZE) and port is not None and (port.cols, port.rows) != size:
            port.cols, port.rows = size
            self.port_events.append(PortEvent("resize", 0, size))

    # -- servicing ----------------------------------------------------------------------

    def _reap_receive(self) -> int:
        got = 0
        mem = self.transport.mem
        for pid, port in self.ports.items():
            index = receiveq(pid)
            q = self.queues[index]
            n_used = 0
            mine = self._rx_posted.setdefault(pid, set())
            while (used := q.get_used()) is not None:
                addr, n = used
                if addr in self._abandoned:
                    self._abandoned.discard(addr)
                    self._free(addr)
                    continue
                mine.discard(addr)
                if n > self.buffer_size:
                    err = DeviceError(f"port {pid}: used length {n} > buffer {self.buffer_size}")
                    q.broken_reason = q.broken_reason or err
                    raise err
                port.input += mem.read(addr, n)
                self._free(addr)
                n_used += 1
                got += n
            if n_used and not port.removed:
                self._post_receive(pid)
        return got

    def _service(self) -> int:
        """Handle whatever the device returned; how many things happened."""
        done = 0
        if self.has_multiport:
            self._reap_control_tx()
            done += self._reap_control_rx()
        done += self._reap_receive()
        return done

    def _wait_some(self, deadline: float, what: str) -> None:
        for q in self.queues:
            if q.enable_interrupts():
                return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self.check_status()
            raise TimeoutError(f"console: no {what} within {self.timeout:g} s")
        self.wait(min(remaining, 0.05))

    def poll(self, timeout: float = 0.0, *, until_quiet: bool = False) -> int:
        """Handle what the device sent, waiting up to ``timeout`` seconds for
        something (``until_quiet``: until nothing came for ``timeout`` seconds, at
        most the driver's ``timeout``). Returns how many things were handled."""
        total = 0
        end = time.monotonic() + self.timeout
        quiet_until = time.monotonic() + timeout
        while True:
            n = self._service()
            total += n
            now = time.monotonic()
            if n and until_quiet:
                quiet_until = now + timeout
            if (n and not until_quiet) or now >= quiet_until or now >= end:
                return total
            for q in self.queues:
                q.enable_interrupts()
            self.wait(min(quiet_until - now, 0.05))

    # -- ports ---------------------------------------------------------------------------

    def _port(self, port_id: int) -> DriverPort:
        port = self.ports.get(port_id)
        if port is None or port.removed:
            raise ConfigurationError(f"no port {port_id}")
        return port

    def list_ports(self) -> list[DriverPort]:
        """The ports present, by number."""
        self._service()
        return [p for _, p in sorted(self.ports.items()) if not p.removed]

    def port_by_name(self, name: str) -> DriverPort:
        """The present port called ``name``."""
        for port in self.list_ports():
            if port.name == name:
                return port
        raise ConfigurationError(f"no port named {name!r}")

    def open(self, port_id: int) -> None:
        """Open the port on the guest side (PORT_OPEN 1; nothing to send without
        MULTIPORT)."""
        port = self._port(port_id)
        if self.has_multiport:
            self._send_control(port_id, E.PORT_OPEN, 1)
        port.guest_open = True

    def close_port(self, port_id: int) -> None:
        """Close the port on the guest side (PORT_OPEN 0)."""
        port = self._port(port_id)
        if self.has_multiport:
            self._send_control(port_id, E.PORT_OPEN, 0)
        port.guest_open = False

    def write(self, port_id: int, data: bytes, timeout: float | None = None) -> None:
        """Send ``data`` on the port's transmitq; returns when the device used it."""
        self._port(port_id)
        index = transmitq(port_id)
        q: DriverVirtqueue[int] = self.queues[index]
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        for off in range(0, max(len(data), 1), _MAX_WRITE):
            chunk = data[off : off + _MAX_WRITE]
            if not chunk:
                break
            addr = self._alloc(len(chunk))
            self.transport.mem.write(addr, chunk)
            # §5.3.6.1: "MUST NOT put a device-writable buffer in a transmitq"
            q.add(((addr, len(chunk)),), (), addr)
            self.kick(index)
            while True:
                used = q.get_used()
                if used is not None:
                    self._free(used[0])
                    if used[0] == addr:
                        break
                    continue
                if q.broken:
                    raise QueueBrokenError(f"transmitq {index} is broken: {q.broken_reason}")
                self._service()
                self._wait_some(deadline, f"transmit completion on port {port_id}")

    def read(self, port_id: int, n: int = 1, timeout: float | None = None) -> bytes:
        """Everything received on the port once at least ``n`` bytes are there (or
        :class:`TimeoutError`)."""
        port = self._port(port_id)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            self._service()
            if len(port.input) >= n:
                out = bytes(port.input)
                port.input.clear()
                return out
            self._wait_some(deadline, f"input on port {port_id}")

    def wait_event(self, kind: str, port_id: int, timeout: float | None = None) -> PortEvent:
        """The next recorded event ``kind`` for ``port_id`` (taken out of
        :attr:`port_events`), waiting for it."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            self._service()
            for ev in list(self.port_events):
                if ev.kind == kind and ev.port == port_id:
                    self.port_events.remove(ev)
                    return ev
            self._wait_some(deadline, f"{kind} event for port {port_id}")

    def emergency_write(self, byte: int) -> None:
        """Write ``byte`` to ``emerg_wr`` (virtio-v1.2 §5.3.5 item 1: "can be written
        at any time")."""
        if not self.device_features >> F.EMERG_WRITE & 1:
            raise ConfigurationError("the device does not offer VIRTIO_CONSOLE_F_EMERG_WRITE")
        self.transport.write_config(
            VIRTIO_CONSOLE_CONFIG.offset_of("emerg_wr"), (byte & 0xFF).to_bytes(4, "little")
        )

    def close(self) -> list[object]:
        """Reset the device, free the rings and every buffer."""
        try:
            tokens: list[object] = super().close()
        finally:
            for addr in list(self._allocated):
                self._free(addr)
        return tokens
