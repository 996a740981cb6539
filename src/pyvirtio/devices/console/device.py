"""The console device (virtio-console), device side. virtio-v1.2 §5.3 "Console Device".

Device ID 3. Each port has a receiveq (host to driver) and a transmitq (driver to
host); with VIRTIO_CONSOLE_F_MULTIPORT a control receiveq and control transmitq
carry the port handshake (virtio-v1.2 §5.3.2 "Virtqueues", numbering in
:mod:`pyvirtio.spec.console`). Each port's host side is a
:class:`~pyvirtio.devices.console.backend.ConsoleBackend` (pty, unix socket, stdio,
log file) whose descriptor is a host event source of the device.

**Receive** (virtio-v1.2 §5.3.6 "Device Operation", item 2): receive buffers are
held until host data arrives. The device reads a back-end only while it holds a
buffer for that port (and, with MULTIPORT, while the driver has the port open, as
QEMU's virtio-serial does); otherwise it stops watching the descriptor, so host
input waits in the host's own bounded buffer (pty, socket) and nothing is buffered
on the device.

**Transmit** (item 1): the readable bytes of each transmitq chain go to the port's
back-end; what the back-end cannot take now waits (one chain's worth per port) and
the transmitq is not served until it is written, retried from a timer.

**Multiport** (virtio-v1.2 §5.3.6.2 "Multiport Device Operation"): driver
DEVICE_READY -> device DEVICE_ADD per port -> driver PORT_READY -> device
CONSOLE_PORT (console ports), RESIZE (console ports), PORT_NAME (named ports) and
PORT_OPEN 1 if the host side is connected; driver PORT_OPEN opens and closes the
port on the guest side; :meth:`ConsoleDevice.add_port` / :meth:`~ConsoleDevice.
remove_port` hot-plug ports. Control messages for the driver wait for control
receiveq buffers (bounded: beyond :data:`MAX_CONTROL_BACKLOG` they are dropped and
counted).

**Host-side calls** (:meth:`ConsoleDevice.add_port`, :meth:`~ConsoleDevice.
remove_port`, :meth:`~ConsoleDevice.resize`) take the device lock and may come from
any thread. The in-process transports publish what they queue at once, and the
vhost-user server wakes its loop when a device queues work from another thread
(``VhostUserBackend.wakeup``), so the messages go out at once there too.

**Malformed input** is never a crash. The spec defines no answer to a bad control
message, so a short one, an unknown event, a device-only event sent by the driver,
a port id that was not added and a bad ``value`` are each ignored and counted in
:attr:`~pyvirtio.core.device.VirtioDevice.metrics` (``ctrl_short``,
``ctrl_unknown_event``, ``ctrl_device_event``, ``ctrl_bad_id``, ``ctrl_bad_value``).
A buffer in the wrong direction breaks a MUST of virtio-v1.2 §5.3.6.1 "Driver
Requirements: Device Operation" and stops the queue with DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

from pyvirtio.core.device import HOLD, UNPOP, VirtioDevice
from pyvirtio.core.events import Timer
from pyvirtio.devices.console.backend import ConsoleBackend
from pyvirtio.errors import ConfigurationError, DriverError, GuestMemoryError
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
    VirtioConsoleResize,
    port_of_queue,
    receiveq,
    transmitq,
    virtqueue_count,
)
from pyvirtio.spec.features import Feature
from pyvirtio.spec.ids import DeviceId
from pyvirtio.virtqueue.common import DescriptorChain, DeviceVirtqueue

__all__ = ["MAX_CONTROL_BACKLOG", "MAX_TX_CHAIN", "ConsoleDevice", "ConsolePort"]

#: Bytes of one transmitq chain the device takes; the rest is dropped and counted.
MAX_TX_CHAIN = 64 << 10
#: Bytes read from a back-end into one receive buffer at most.
_RX_CHUNK = 64 << 10
#: Control messages waiting for control receiveq buffers before new ones drop.
MAX_CONTROL_BACKLOG = 1024
#: Receive buffers taken from one port per host event before others get a turn.
_RX_BUDGET = 64
_TX_RETRY = 0.005

_C_OP = 'virtio-v1.2 §5.3.6.1 "Driver Requirements: Device Operation"'
_C_MP_DEV = 'virtio-v1.2 §5.3.6.2.1 "Device Requirements: Multiport Device Operation"'
_C_DESC = 'virtio-v1.2 §2.7.5 "The Virtqueue Descriptor Table"'

E = ConsoleEvent
F = ConsoleFeature


@dataclass(eq=False)
class ConsolePort:
    """One port: its host side, its name (VIRTIO_CONSOLE_PORT_NAME, None for none)
    and whether it is a console port (VIRTIO_CONSOLE_CONSOLE_PORT).

    The other fields are the device's state of the port in the current life.
    """

    backend: ConsoleBackend
    name: str | None = None
    console: bool = False
    #: size sent with VIRTIO_CONSOLE_RESIZE (port 0's is also in the config space)
    cols: int = 80
    rows: int = 25
    #: port number (set when the device takes the port)
    id: int = -1
    #: DEVICE_ADD was sent in this life
    added: bool = False
    #: the driver answered PORT_READY with value 1
    ready: bool = False
    #: the driver has the port open (PORT_OPEN value 1)
    guest_open: bool = False
    #: the host-side state last told the driver (PORT_OPEN)
    host_open_sent: bool | None = None
    tx_pending: bytes = b""
    watched: int | None = None
    #: bytes from the driver / to the driver
    bytes_out: int = 0
    bytes_in: int = 0
    timer: Timer | None = field(default=None, repr=False)


class ConsoleDevice(VirtioDevice):
    """A virtio console with ``ports`` (port numbers 0, 1, ... in order).

    - ``max_nr_ports``: ports the device can hold (the config field; hot-added
      ports get the lowest free number below it). ``multiport=False`` offers no
      VIRTIO_CONSOLE_F_MULTIPORT: the device then has port 0 only and two queues.
    - ``cols``/``rows``: port 0's size (VIRTIO_CONSOLE_F_SIZE, offered if ``size``);
      :meth:`resize` changes it.
    - ``emerg_write``: offer VIRTIO_CONSOLE_F_EMERG_WRITE (a config write of
      ``emerg_wr`` goes to port 0's back-end).
    - ``owns_backends``: :meth:`close` (and :meth:`remove_port`) close them.

    Without MULTIPORT negotiated only port 0 is used (virtio-v1.2 §5.3.2: "other
    queues only exist if VIRTIO_CONSOLE_F_MULTIPORT is set").
    """

    device_id = DeviceId.CONSOLE

    def __init__(
        self,
        ports: Sequence[ConsolePort] = (),
        *,
        max_nr_ports: int = 4,
        multiport: bool = True,
        cols: int = 80,
        rows: int = 25,
        size: bool = True,
        emerg_write: bool = True,
        owns_backends: bool = True,
        queue_max_size: int = 256,
    ) -> None:
        if not multiport:
            max_nr_ports = 1
        if not 1 <= max_nr_ports <= 0x7FFF:
            raise ConfigurationError("max_nr_ports must be between 1 and 32767")
        if len(ports) > max_nr_ports:
            raise ConfigurationError(f"{len(ports)} ports given, max_nr_ports is {max_nr_ports}")
        super().__init__(virtqueue_count(max_nr_ports, multiport), queue_max_size)
        self.max_nr_ports = max_nr_ports
        self.multiport_offered = multiport
        self.size_offered = size
        self.emerg_write_offered = emerg_write
        self.owns_backends = owns_backends
        self.cols = cols
        self.rows = rows
        #: the ports by number
        self.ports: dict[int, ConsolePort] = {}
        for i, port in enumerate(ports):
            port.id = i
            if i == 0:
                port.cols, port.rows = cols, rows
            self.ports[i] = port
        #: bytes written to ``emerg_wr`` (and passed to port 0's back-end)
        self.emergency_bytes = 0
        self._multiport = False
        self._driver_ready = False
        self._rx: dict[int, deque[tuple[DeviceVirtqueue, DescriptorChain]]] = {}
        self._ctrl_rx: deque[tuple[DeviceVirtqueue, DescriptorChain]] = deque()
        self._ctrl_out: deque[bytes] = deque()
        #: called (last added first) by :meth:`close` (e.g. a control socket's)
        self.close_hooks: list[Callable[[], None]] = []
        for port in self.ports.values():
            self._update_watch(port)

    # -- features and configuration (virtio-v1.2 §5.3.3, §5.3.4) -------------------

    def specific_features(self) -> int:
        """SIZE, MULTIPORT and EMERG_WRITE as configured."""
        f = 0
        if self.size_offered:
            f |= F.SIZE.mask
        if self.multiport_offered:
            f |= F.MULTIPORT.mask
        if self.emerg_write_offered:
            f |= F.EMERG_WRITE.mask
        return f

    def config_bytes(self) -> bytes:
        """``struct virtio_console_config``; ``emerg_wr`` reads 0."""
        return VIRTIO_CONSOLE_CONFIG.pack(
            VirtioConsoleConfig(self.cols, self.rows, self.max_nr_ports, 0)
        )

    def write_config(self, offset: int, data: bytes) -> None:
        """A write covering ``emerg_wr``'s lower byte is an emergency write.

        virtio-v1.2 §5.3.5.1 "Device Requirements: Device Initialization": "The device
        MUST allow a write to emerg_wr, even on an unconfigured device" (nothing here
        looks at the device status or the features) and "SHOULD transmit the lower
        byte written to emerg_wr to an appropriate log or output method": port 0's
        back-end. Other fields are read-only.
        """
        at = VIRTIO_CONSOLE_CONFIG.offset_of("emerg_wr")
        if not self.emerg_write_offered or not offset <= at < offset + len(data):
            return
        byte = data[at - offset : at - offset + 1]
        self.emergency_bytes += 1
        port = self.ports.get(0)
        if port is not None:
            port.backend.write(byte)

    # -- lifecycle -------------------------------------------------------------------

    def activate(self, features: int, queues: Sequence[DeviceVirtqueue | None]) -> None:
        """DRIVER_OK: without MULTIPORT port 0 is live at once; with it the device
        waits for the driver's DEVICE_READY."""
        super().activate(features, queues)
        self._multiport = self.negotiated(F.MULTIPORT)
        self._forget_life()
        for port in self.ports.values():
            self._update_watch(port)

    def _forget_life(self) -> None:
        self._driver_ready = False
        self._rx.clear()
        self._ctrl_rx.clear()
        self._ctrl_out.clear()
        for port in self.ports.values():
            port.added = port.ready = port.guest_open = False
            port.host_open_sent = None
            port.tx_pending = b""
            if port.timer is not None:
                port.timer.cancel()
                port.timer = None

    def reset(self) -> None:
        """Device reset: held buffers, control backlog and port states are gone."""
        self._forget_life()
        self._multiport = False
        super().reset()
        for port in self.ports.values():
            self._update_watch(port)

    def close(self) -> None:
        """Stop watching the back-ends; close them if the device owns them; run the
        close hooks."""
        while self.close_hooks:
            self.close_hooks.pop()()
        for port in self.ports.values():
            self._unwatch(port)
            if port.timer is not None:
                port.timer.cancel()
            if self.owns_backends:
                port.backend.close()

    def queue_stopped(self, index: int) -> None:
        """Buffers held for queue ``index`` are gone."""
        if index == CONTROL_RECEIVEQ:
            self._ctrl_rx.clear()
            return
        where = port_of_queue(index)
        if where is not None and not where[1]:
            self._rx.pop(where[0], None)
            port = self.ports.get(where[0])
            if port is not None:
                self._update_watch(port)

    def queue_started(self, index: int) -> None:
        """A queue came back: serve what it has."""
        self.handle_queue(index)

    # -- host-side API -----------------------------------------------------------------

    def _wake(self) -> None:
        """Wake the transport's loop after a host-side call from another thread (it
        sends what the call queued, e.g. a vhost-user CONFIG_CHANGE_MSG)."""
        listener = self.events.listener
        if listener is not None:
            listener()

    def add_port(self, port: ConsolePort, port_id: int | None = None) -> int:
        """Hot-plug ``port`` (number ``port_id`` or the lowest free); returns its number.

        virtio-v1.2 §5.3.6.2.1: "The device MUST NOT specify a port which exists in a
        VIRTIO_CONSOLE_DEVICE_ADD message, nor a port which is equal or greater than
        max_nr_ports": such a number is refused (:class:`ConfigurationError`).
        """
        with self.lock:
            if port_id is None:
                port_id = next((i for i in range(self.max_nr_ports) if i not in self.ports), -1)
                if port_id < 0:
                    raise ConfigurationError(f"all {self.max_nr_ports} ports are in use")
            if not 0 <= port_id < self.max_nr_ports:
                raise ConfigurationError(
                    f"port {port_id} is not below max_nr_ports {self.max_nr_ports}", _C_MP_DEV
                )
            if port_id in self.ports:
                raise ConfigurationError(f"port {port_id} exists", _C_MP_DEV)
            port.id = port_id
            self.ports[port_id] = port
            self.guarded("add port", self._announce, port)
        self._wake()
        return port_id

    def remove_port(self, port_id: int) -> ConsolePort:
        """Hot-unplug port ``port_id`` (DEVICE_REMOVE if the driver was told of it);
        returns it (its back-end is closed if the device owns back-ends).

        virtio-v1.2 §5.3.6.2.1: "The device MUST NOT specify a port in
        VIRTIO_CONSOLE_DEVICE_REMOVE which has not been created with a previous
        VIRTIO_CONSOLE_DEVICE_ADD": a port never announced is removed silently.
        Receive buffers held for it are forgotten (the driver takes them back, as
        Linux's ``remove_port_data`` does), except with VIRTIO_F_IN_ORDER, where they
        are returned with no byte written (a forgotten one would hold back the
        queue's later buffers).
        """
        with self.lock:
            port = self.ports.pop(port_id, None)
            if port is None:
                raise ConfigurationError(f"no port {port_id}")
            self._unwatch(port)
            if port.timer is not None:
                port.timer.cancel()
            held = self._rx.pop(port_id, None)
            if held and self.negotiated(Feature.IN_ORDER):
                # with VIRTIO_F_IN_ORDER a forgotten buffer would hold back every
                # later one of the queue: give them back empty
                for vq, chain in held:
                    self.complete(vq, chain, 0)
            if port.added and self.active and self._multiport:
                self.guarded("remove port", self._send, port_id, E.DEVICE_REMOVE, 0)
            port.added = port.ready = port.guest_open = False
            if self.owns_backends:
                port.backend.close()
        self._wake()
        return port

    def resize(self, cols: int, rows: int, port_id: int = 0) -> None:
        """The host console of ``port_id`` changed size.

        Port 0's size is the configuration space's ``cols``/``rows``: with
        VIRTIO_CONSOLE_F_SIZE negotiated a configuration change notification follows
        (virtio-v1.2 §5.3.6 item 3: "This size applies to port 0 only"). With
        MULTIPORT a console port the driver made ready also gets a
        VIRTIO_CONSOLE_RESIZE control message.
        """
        if not (0 <= cols <= 0xFFFF and 0 <= rows <= 0xFFFF):
            raise ConfigurationError("cols and rows are 16-bit values")
        with self.lock:
            port = self.ports.get(port_id)
            if port is not None:
                port.cols, port.rows = cols, rows
            if port_id == 0:
                self.cols, self.rows = cols, rows
                if self.active and self.negotiated(F.SIZE):
                    self.config_changed()
            if port is not None and port.console and port.ready and self._multiport:
                self.guarded("resize", self._send_resize, port)
        self._wake()

    # -- queues ---------------------------------------------------------------------------

    def handle_queue(self, index: int) -> None:
        """Control queues, or a port's receiveq (hold) / transmitq (send)."""
        if index in (CONTROL_RECEIVEQ, CONTROL_TRANSMITQ):
            if not self._multiport:
                self.metrics.error("bad_queue")
            elif index == CONTROL_RECEIVEQ:
                self.run_queue(index, self._post_control)
                self._deliver_control()
            else:
                self.run_queue(index, self._control)
            return
        where = port_of_queue(index)
        assert where is not None
        port_id, tx = where
        if port_id and not self._multiport:
            self.metrics.error("bad_queue")
            return
        if tx:
            self.run_queue(index, partial(self._transmit, port_id))
        else:
            self.run_queue(index, partial(self._post_receive, port_id))
            port = self.ports.get(port_id)
            if port is not None:
                self._receive(port)

    def _vq(self, index: int) -> DeviceVirtqueue:
        vq = self.queues[index]
        assert vq is not None
        return vq

    def _post_receive(self, port_id: int, chain: DescriptorChain) -> int:
        # §5.3.6.1: "The driver MUST NOT put a device-readable buffer in a receiveq."
        if chain.readable or not chain.writable_len:
            raise DriverError(
                f"receiveq of port {port_id}: buffer {chain.id} is device-readable "
                "(or has no device-writable byte): the driver MUST NOT put a "
                "device-readable buffer in a receiveq",
                _C_OP,
            )
        self._rx.setdefault(port_id, deque()).append((self._vq(receiveq(port_id)), chain))
        return HOLD

    def _read_out(self, vq: DeviceVirtqueue, chain: DescriptorChain, limit: int) -> bytes:
        try:
            return chain.read_all(vq.mem, limit)
        except GuestMemoryError as e:
            raise DriverError(
                f"buffer {chain.id} lies outside guest RAM: {e.message}", _C_DESC
            ) from e

    def _transmit(self, port_id: int, chain: DescriptorChain) -> int:
        # §5.3.6.1: "The driver MUST NOT put a device-writable buffer in a transmitq."
        if chain.writable:
            raise DriverError(
                f"transmitq of port {port_id}: buffer {chain.id} is device-writable: "
                "the driver MUST NOT put a device-writable buffer in a transmitq",
                _C_OP,
            )
        port = self.ports.get(port_id)
        if port is None:
            self.metrics.error("tx_no_port")
            return 0
        if port.tx_pending:
            return UNPOP  # the back-end has not taken the previous chain yet
        if chain.readable_len > MAX_TX_CHAIN:
            self.metrics.error("tx_truncated")
        data = self._read_out(self._vq(transmitq(port_id)), chain, MAX_TX_CHAIN)
        self.metrics.bytes_read += len(data)
        port.bytes_out += len(data)
        if not port.backend.connected:
            self.metrics.error("tx_host_closed")  # nobody on the host side: dropped
            return 0
        n = port.backend.write(data)
        if n < len(data):
            port.tx_pending = data[n:]
            self._retry_tx(port)
        return 0

    def _retry_tx(self, port: ConsolePort) -> None:
        if port.timer is None:
            port.timer = self.events.call_later(_TX_RETRY, partial(self._flush_tx, port))

    def _flush_tx(self, port: ConsolePort) -> None:
        port.timer = None
        if self.ports.get(port.id) is not port or not port.tx_pending:
            return
        n = port.backend.write(port.tx_pending)
        port.tx_pending = port.tx_pending[n:]
        if port.tx_pending:
            self._retry_tx(port)
        elif self.active:
            self.handle_queue(transmitq(port.id))

    # -- receive (host -> driver) -----------------------------------------------------

    def _can_receive(self, port: ConsolePort) -> bool:
        if not self.active or port.id not in self.ports:
            return False
        if self._multiport:
            return port.guest_open
        return port.id == 0

    def _update_watch(self, port: ConsolePort) -> None:
        """Watch the back-end while it can deliver (a buffer is held and the port is
        open) or while it waits for a connection; otherwise stop reading it."""
        fd = port.backend.fileno()
        want = fd is not None and (
            not port.backend.connected or (self._can_receive(port) and bool(self._rx.get(port.id)))
        )
        target = fd if want else None
        if port.watched == target:
            return
        self._unwatch(port)
        if target is not None:
            port.watched = target
            self.events.add_reader(target, partial(self._host_event, port))

    def _unwatch(self, port: ConsolePort) -> None:
        if port.watched is not None:
            self.events.remove_reader(port.watched)
            port.watched = None

    def _host_event(self, port: ConsolePort) -> None:
        if self.ports.get(port.id) is not port:
            self._unwatch(port)
            return
        self._receive(port, from_event=True)

    def _receive(self, port: ConsolePort, from_event: bool = False) -> None:
        backend = port.backend
        was = backend.connected
        rx = self._rx.get(port.id)
        for _ in range(_RX_BUDGET):
            if not backend.connected:
                if from_event:
                    backend.read(0)  # a listening back-end accepts its peer
                break
            if not rx or not self._can_receive(port):
                break
            vq, chain = rx[0]
            if vq.broken or self.queues[vq.index] is not vq:
                rx.popleft()
                continue
            data = backend.read(min(chain.writable_len, _RX_CHUNK))
            if data is None:
                break
            rx.popleft()
            try:
                written = chain.write_all(vq.mem, data)
            except GuestMemoryError as e:
                vq.broken_reason = DriverError(
                    f"receive buffer {chain.id} lies outside guest RAM: {e.message}", _C_DESC
                )
                raise vq.broken_reason from e
            self.metrics.bytes_written += written
            port.bytes_in += written
            self.complete(vq, chain, written)
        if backend.connected != was:
            self._host_state(port)
        self._update_watch(port)

    def _host_state(self, port: ConsolePort) -> None:
        """The host side opened or closed: tell the driver (PORT_OPEN)."""
        if not port.backend.connected:
            port.tx_pending = b""
        if self._multiport and port.ready:
            self._send_open(port)

    # -- control queues (virtio-v1.2 §5.3.6.2) --------------------------------------------

    def _post_control(self, chain: DescriptorChain) -> int:
        if chain.readable or not chain.writable_len:
            raise DriverError(
                f"control receiveq: buffer {chain.id} is device-readable: the driver "
                "MUST NOT put a device-readable buffer in a receiveq",
                _C_OP,
            )
        self._ctrl_rx.append((self._vq(CONTROL_RECEIVEQ), chain))
        return HOLD

    def _send(self, port_id: int, event: int, value: int, extra: bytes = b"") -> None:
        """Queue one control message for the driver."""
        if not self._multiport or not self.active:
            return
        if len(self._ctrl_out) >= MAX_CONTROL_BACKLOG:
            self.metrics.error("ctrl_backlog_full")
            return
        msg = VIRTIO_CONSOLE_CONTROL.pack(VirtioConsoleControl(port_id, int(event), value))
        self._ctrl_out.append(msg + extra)
        self._deliver_control()

    def _deliver_control(self) -> None:
        while self._ctrl_out and self._ctrl_rx:
            vq, chain = self._ctrl_rx.popleft()
            if vq.broken or self.queues[vq.index] is not vq:
                continue
            msg = self._ctrl_out.popleft()
            if len(msg) > chain.writable_len:
                self.metrics.error("ctrl_buffer_short")
            try:
                written = chain.write_all(vq.mem, msg)
            except GuestMemoryError as e:
                vq.broken_reason = DriverError(
                    f"control buffer {chain.id} lies outside guest RAM: {e.message}", _C_DESC
                )
                raise vq.broken_reason from e
            self.complete(vq, chain, written)

    def _announce(self, port: ConsolePort) -> None:
        """DEVICE_ADD ``port`` if the driver is ready for it and was not told yet."""
        self._update_watch(port)
        if self._multiport and self._driver_ready and not port.added and self.active:
            port.added = True
            self._send(port.id, E.DEVICE_ADD, 0)

    def _send_open(self, port: ConsolePort) -> None:
        state = port.backend.connected
        if port.host_open_sent is None and not state:
            port.host_open_sent = False  # closed is where a port starts
            return
        if port.host_open_sent != state:
            port.host_open_sent = state
            self._send(port.id, E.PORT_OPEN, int(state))

    def _send_resize(self, port: ConsolePort) -> None:
        self._send(
            port.id,
            E.RESIZE,
            0,
            VIRTIO_CONSOLE_RESIZE.pack(VirtioConsoleResize(port.cols, port.rows)),
        )

    def _control(self, chain: DescriptorChain) -> int:
        """One driver-to-device control message."""
        # §5.3.6.1: "The driver MUST NOT put a device-writable buffer in a transmitq."
        if chain.writable:
            raise DriverError(
                f"control transmitq: buffer {chain.id} is device-writable: the driver "
                "MUST NOT put a device-writable buffer in a transmitq",
                _C_OP,
            )
        size = VIRTIO_CONSOLE_CONTROL.size
        if chain.readable_len < size:
            self.metrics.error("ctrl_short")
            return 0
        msg = VIRTIO_CONSOLE_CONTROL.unpack(
            self._read_out(self._vq(CONTROL_TRANSMITQ), chain, size)
        )
        self._control_message(msg)
        return 0

    def _control_message(self, msg: VirtioConsoleControl) -> None:
        event, value = msg.event, msg.value
        if event == E.DEVICE_READY:
            # "A value of 1 indicates success, and 0 indicates failure. The port
            # number id is unused."
            if value != 1:
                self.metrics.error("driver_not_ready" if value == 0 else "ctrl_bad_value")
                return
            self._driver_ready = True
            for port_id in sorted(self.ports):
                self._announce(self.ports[port_id])
            return
        if event not in (E.PORT_READY, E.PORT_OPEN):
            known = event in E._value2member_map_
            self.metrics.error("ctrl_device_event" if known else "ctrl_unknown_event")
            return
        port = self.ports.get(msg.id)
        if port is None or not port.added:
            self.metrics.error("ctrl_bad_id")
            return
        if value not in (0, 1):
            self.metrics.error("ctrl_bad_value")
            return
        if event == E.PORT_READY:
            if not value:
                self.metrics.error("port_not_ready")
                port.ready = False
                return
            if port.ready:
                return
            port.ready = True
            if port.console:
                self._send(port.id, E.CONSOLE_PORT, 1)
                self._send_resize(port)
            if port.name is not None:
                self._send(port.id, E.PORT_NAME, 0, port.name.encode())
            self._send_open(port)
        else:
            port.guest_open = bool(value)
            if port.guest_open:
                self._receive(port)
            else:
                self._update_watch(port)
