"""The I/O edge of the vfio-user server: a unix socket, eventfds, one selector loop.

:class:`VfioUserServer` serves a device as a virtio-pci function
(:class:`~pyvirtio.transport.pci.device.VirtioPciFunction`) to vfio-user clients
(QEMU 10.1+ ``-device '{"driver":"vfio-user-pci","socket":{"type":"unix",
"path":"SOCK"}}'``): it listens on ``socket_path`` and serves one client after
another; each connection gets a fresh :class:`~.backend.VfioUserBackend` and, when the
client hangs up, the function is reset and its DMA windows unmapped.

One thread, one :mod:`selectors` loop: the listening socket, the connection (one
``recvmsg`` at a time with room for :data:`~.spec.MAX_MSG_FDS` descriptors;
``MSG_CTRUNC`` closes the connection), the device's host event sources
(:class:`~pyvirtio.transport._events.HostEventWatch`: descriptors and timers the
device declares, such as the block device's I/O completion eventfd), and a wake-up
socket for :meth:`VfioUserServer.stop` and signals. Replies are sent before the
interrupts the command caused are signalled; interrupts are non-blocking eventfd
writes. Queue notifications arrive as REGION_WRITEs to the notification area of the
modern BAR (or the legacy I/O BAR): the device runs inside that command.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import selectors
import signal
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from pyvirtio.core.device import VirtioDevice
from pyvirtio.errors import ConfigurationError
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.transport._events import HostEventWatch, HostFd
from pyvirtio.transport._unix import close_fds, fds_from_ancdata
from pyvirtio.transport.pci.device import PciMode, VirtioPciFunction
from pyvirtio.transport.vfio_user.backend import VfioUserBackend, VfioUserMetrics
from pyvirtio.transport.vfio_user.codec import MessageReader, VfioUserProtocolError, describe
from pyvirtio.transport.vfio_user.spec import MAX_MSG_FDS

__all__ = ["VfioUserServer"]

_log = logging.getLogger("pyvirtio.vfio_user.server")

RECV_SIZE = 256 * 1024
SEND_TIMEOUT = 10.0
_ANC_SIZE = socket.CMSG_SPACE(MAX_MSG_FDS * array.array("i").itemsize)
_ONE = (1).to_bytes(8, "little")
_WAKE = "wake"
_LISTEN = "listen"
_CONN = "conn"


class VfioUserServer:
    """Serves ``device`` as a virtio-pci function over vfio-user at ``socket_path``.

    ``pci_mode``: ``modern``, ``transitional`` or ``legacy``
    (:class:`~pyvirtio.transport.pci.device.VirtioPciFunction`). ``trust_client``
    accepts DMA descriptors that cannot be sealed against shrinking.
    ``handle_signals``: SIGINT/SIGTERM stop :meth:`serve` (main thread only).
    """

    def __init__(
        self,
        device: VirtioDevice,
        socket_path: str | os.PathLike[str],
        *,
        pci_mode: PciMode = "modern",
        trust_client: bool = False,
        handle_signals: bool = False,
        on_connection_end: Callable[[VfioUserMetrics], None] | None = None,
    ) -> None:
        self.device = device
        self.socket_path = Path(socket_path)
        self.mem = GuestMemory()
        self.function = VirtioPciFunction(device, mode=pci_mode, mem=self.mem)
        self.trust_client = trust_client
        self.handle_signals = handle_signals
        self.on_connection_end = on_connection_end
        self.ready = threading.Event()
        self.connections = 0
        self.backend: VfioUserBackend | None = None
        #: metrics of finished connections (last 64)
        self.history: list[VfioUserMetrics] = []
        self.trace = False
        self._sel: selectors.BaseSelector | None = None
        self._listen: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._reader: MessageReader | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._host: HostEventWatch | None = None
        self._stop = False
        self._stop_reason = ""
        self._created_path = False
        self._violations_at_start = 0

    # -- control --------------------------------------------------------------------------

    def stop(self, reason: str = "stop requested") -> None:
        """Ask :meth:`serve` to return (thread-safe and signal-safe)."""
        self._stop = True
        self._stop_reason = reason
        wake = self._wake_w
        if wake is not None:
            with contextlib.suppress(OSError):
                wake.send(b"x")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop(f"signal {signal.Signals(signum).name}")

    # -- setup ------------------------------------------------------------------------------

    def _open(self) -> None:
        sel = selectors.DefaultSelector()
        self._sel = sel
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._host = HostEventWatch(sel, self.device)
        self._listen = self._bind(self.socket_path)
        self._listen.setblocking(False)
        sel.register(self._listen, selectors.EVENT_READ, _LISTEN)
        _log.info("vfio-user: listening on %s", self.socket_path)
        self.ready.set()

    def _bind(self, path: Path) -> socket.socket:
        try:
            st = path.lstat()
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise ConfigurationError(f"{path} exists and is not a socket")
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # listen on a temporary name, then rename: a client connecting as soon as the
        # path appears is never refused
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            sock.bind(os.fspath(tmp))
            sock.listen(1)
            os.rename(tmp, path)
        except OSError as e:
            sock.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise ConfigurationError(f"cannot listen on {path}: {e.strerror or e}") from None
        self._created_path = True
        return sock

    # -- the loop ---------------------------------------------------------------------------

    def serve(self) -> None:
        """Serve until :meth:`stop` or a signal; releases everything before returning."""
        old: dict[signal.Signals, Any] = {}
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, self._on_signal)
        try:
            self._open()
            self._loop()
        finally:
            self._shutdown()
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def _loop(self) -> None:
        sel, host = self._sel, self._host
        assert sel is not None and host is not None
        while not self._stop:
            host.sync()
            ready = sel.select(host.timeout(None))
            if host.run_timers():
                self._signal()
            for key, _mask in ready:
                tag = key.data
                if isinstance(tag, HostFd):
                    tag.watch.dispatch(key.fd)
                    self._signal()
                elif tag == _WAKE:
                    with contextlib.suppress(OSError):
                        key.fileobj.recv(4096)  # type: ignore[union-attr]
                elif tag == _LISTEN:
                    self._accept()
                elif tag == _CONN:
                    self._read()
                if self._stop:
                    break
        if self._stop:
            _log.info("vfio-user: stopping: %s", self._stop_reason)

    def _accept(self) -> None:
        assert self._listen is not None and self._sel is not None
        try:
            conn, _ = self._listen.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self._conn is not None:
            _log.warning("vfio-user: a second client refused (one at a time)")
            conn.close()
            return
        conn.settimeout(SEND_TIMEOUT)
        self._conn = conn
        self._reader = MessageReader()
        self.backend = VfioUserBackend(self.function, self.mem, trust_client=self.trust_client)
        self._sel.register(conn, selectors.EVENT_READ, _CONN)
        self._violations_at_start = self.function.state.violation_count
        self.connections += 1
        _log.info("vfio-user: client connected (connection %d)", self.connections)

    def _read(self) -> None:
        conn, reader, backend = self._conn, self._reader, self.backend
        assert conn is not None and reader is not None and backend is not None
        try:
            data, anc, flags, _ = conn.recvmsg(RECV_SIZE, _ANC_SIZE)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        except OSError as e:
            self._drop(f"receive failed: {e}")
            return
        fds = fds_from_ancdata(anc)
        if flags & socket.MSG_CTRUNC:
            close_fds(fds)
            self._drop("descriptors truncated (MSG_CTRUNC)")
            return
        if not data:
            close_fds(fds)
            self._drop("client hung up")
            return
        try:
            messages = reader.feed(data, fds)
        except VfioUserProtocolError as e:
            self._drop(str(e))
            return
        for i, msg in enumerate(messages):
            if self.trace:
                _log.debug("vfio-user: <- %s", describe(msg))
            reply = backend.handle(msg)
            if reply is not None:
                try:
                    conn.sendall(reply)
                except OSError as e:
                    for m in messages[i + 1 :]:
                        m.close()
                    self._drop(f"send failed: {e}")
                    return
            self._signal()

    def _signal(self) -> None:
        backend = self.backend
        if backend is None:
            return
        for fd in backend.take_signals():
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(fd, _ONE)

    def _drop(self, why: str) -> None:
        """End the connection: reset the function, unmap guest memory, forget eventfds."""
        if self._conn is not None:
            _log.info("vfio-user: connection %d ended: %s", self.connections, why)
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._sel is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(conn)
            conn.close()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        backend, self.backend = self.backend, None
        if backend is not None:
            # what the client's driver did wrong at register level, for the log
            state = self.function.state
            new = state.violation_count - self._violations_at_start
            backend.metrics.driver_violations = new
            for err in list(state.violations)[-min(new, len(state.violations)) :] if new else []:
                _log.info("vfio-user: driver violation: %s", err)
            backend.close()
            self.history = [*self.history[-63:], backend.metrics]
            if self.on_connection_end is not None:
                self.on_connection_end(backend.metrics)

    def _shutdown(self) -> None:
        self._drop("server stopping")
        if self._host is not None:
            self._host.close()
        if self._listen is not None:
            self._listen.close()
            self._listen = None
        if self._created_path:
            with contextlib.suppress(OSError):
                self.socket_path.unlink()
            self._created_path = False
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._wake_r = self._wake_w = None
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        self.function.close()
        self.mem.close()
