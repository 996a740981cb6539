"""The I/O edge of the vhost-user back-end: sockets, eventfds, one selector loop.

:class:`VhostUserServer` runs a :class:`~.backend.VhostUserBackend` for a device over
a unix socket, in either role:

- **listen** (default): bind ``socket_path``, accept one front-end at a time (QEMU
  ``-chardev socket,path=...`` connects, with ``reconnect=N`` it comes back after a
  restart of either side); when the front-end hangs up, the back-end is reset to a
  fresh state and the next connection is accepted;
- **connect**: connect to ``socket_path`` where the front-end listens (QEMU
  ``-chardev socket,server=on``) and serve that one connection;
- **inherited descriptor** (``fd=N``, the ``--fd`` convention of vhost-user.rst
  "Backend program conventions"): a listening socket is served like ``listen``, a
  connected one like ``connect``.

Everything runs in one thread around a :mod:`selectors` loop: the connection socket
(one ``recvmsg`` per :meth:`~.backend.VhostUserBackend.receive`, with room for
:data:`~.spec.VHOST_USER_MAX_FDS` descriptors; ``MSG_CTRUNC`` is fatal), each started
ring's kick eventfd, the device's host event sources (descriptors and timers it
declares in :class:`~pyvirtio.core.events.HostEvents`, watched whether or not a
front-end is connected), and a wake-up socket for :meth:`VhostUserServer.stop` and
signals. A kick runs one budgeted round of that ring only; rings that still have work
get further rounds interleaved with everything else, so a busy or stalled queue never
holds up the other queues or the control socket. Used-buffer notifications are
non-blocking eventfd writes.

Shutdown is clean on :meth:`VhostUserServer.stop`, SIGINT or SIGTERM (when
``handle_signals`` is set): the connection is closed, every descriptor released, the
socket file removed if this server created it.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import select
import selectors
import signal
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from pyvirtio.core.device import VirtioDevice
from pyvirtio.errors import ConfigurationError
from pyvirtio.transport._events import HostEventWatch, HostFd
from pyvirtio.transport._unix import close_fds, connect_unix, fds_from_ancdata
from pyvirtio.transport.vhost_user.backend import (
    Action,
    Disconnect,
    Reply,
    SendBackend,
    Signal,
    UnwatchKick,
    VhostUserBackend,
    WatchKick,
)
from pyvirtio.transport.vhost_user.spec import NATIVE_LITTLE_ENDIAN, VHOST_USER_MAX_FDS

__all__ = ["HISTORY", "RECV_SIZE", "SEND_TIMEOUT", "ConnectionStats", "VhostUserServer"]

_log = logging.getLogger("pyvirtio.vhost_user.server")

#: Bytes asked of one ``recvmsg`` (a message is at most 12 + 4096 bytes).
RECV_SIZE = 64 * 1024
#: Finished connections whose stats :attr:`VhostUserServer.history` keeps.
HISTORY = 64
#: Seconds a reply may wait for room in the socket before the connection is dropped.
SEND_TIMEOUT = 10.0
_ANC_SIZE = socket.CMSG_SPACE(VHOST_USER_MAX_FDS * array.array("i").itemsize)
_ONE = (1).to_bytes(8, "little")
_POLL_INTERVAL = 0.001
#: Reads of the connection per loop turn (then kicks and other rings get their turn).
_READS_PER_TURN = 32

_WAKE = "wake"
_LISTEN = "listen"
_CONN = "conn"


class ConnectionStats:
    """What one connection did: requests by name and chains per ring."""

    def __init__(self, backend: VhostUserBackend) -> None:
        m = backend.metrics
        self.requests = dict(m.requests)
        self.rejected = m.rejected
        self.calls = m.calls
        self.resubmitted = m.resubmitted
        self.config_changes = m.config_changes
        self.dirty_pages = backend.dirty_pages
        self.served = [backend.served(i) for i in range(backend.device.num_queues)]

    def summary(self) -> str:
        """One line for the log."""
        rings = " ".join(f"q{i}={f}/{c}" for i, (f, c) in enumerate(self.served))
        return (
            f"{sum(self.requests.values())} requests ({self.rejected} refused), "
            f"chains fetched/completed {rings}, {self.calls} calls, "
            f"{self.resubmitted} resubmitted, {self.config_changes} config changes, "
            f"{self.dirty_pages} dirty pages logged"
        )


class VhostUserServer:
    """Serves ``device`` over vhost-user (see the module docs for the roles).

    Exactly one of ``socket_path`` and ``fd`` is given. ``connect`` selects the
    connecting role for ``socket_path`` (waiting up to ``connect_timeout`` seconds
    for the front-end's socket). ``backend_options`` are passed to every
    :class:`~.backend.VhostUserBackend`. ``handle_signals`` installs SIGINT/SIGTERM
    handlers for the duration of :meth:`serve` (main thread only).
    """

    def __init__(
        self,
        device: VirtioDevice,
        *,
        socket_path: str | os.PathLike[str] | None = None,
        fd: int | None = None,
        connect: bool = False,
        connect_timeout: float = 30.0,
        backend_options: dict[str, Any] | None = None,
        handle_signals: bool = False,
        on_connection_end: Callable[[ConnectionStats], None] | None = None,
    ) -> None:
        if (socket_path is None) == (fd is None):
            raise ConfigurationError("give exactly one of a socket path and a descriptor")
        if not NATIVE_LITTLE_ENDIAN:
            raise ConfigurationError("vhost-user back-ends need a little-endian host")
        self.device = device
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self.fd = fd
        self.connect = connect
        self.connect_timeout = connect_timeout
        self.backend_options = dict(backend_options or {})
        self.handle_signals = handle_signals
        self.on_connection_end = on_connection_end
        #: set once the server listens (or is connected): the front-end may come
        self.ready = threading.Event()
        #: connections served so far
        self.connections = 0
        #: the stats of the last :data:`HISTORY` finished connections (bounded: a
        #: server may see any number of connections)
        self.history: deque[ConnectionStats] = deque(maxlen=HISTORY)
        self.backend: VhostUserBackend | None = None
        self._sel: selectors.BaseSelector | None = None
        self._listen: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._kicks: dict[int, int] = {}
        self._stop = False
        self._stop_reason = ""
        self._created_path = False
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._loop_thread = 0
        self._host: HostEventWatch | None = None

    # -- control ------------------------------------------------------------------

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

    # -- setup ----------------------------------------------------------------------

    def _open(self) -> None:
        sel = selectors.DefaultSelector()
        self._sel = sel
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._host = HostEventWatch(sel, self.device)
        if self.fd is not None:
            sock = socket.socket(fileno=self.fd)
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                sock.detach()
                raise ConfigurationError(f"descriptor {self.fd} is not a unix stream socket")
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                self._listen = sock
            else:
                self._attach(sock)
                self.connect = True
        elif self.connect:
            self._attach(self._connect_to(self._path()))
        else:
            self._listen = self._bind(self._path())
        if self._listen is not None:
            self._listen.setblocking(False)
            sel.register(self._listen, selectors.EVENT_READ, _LISTEN)
            _log.info("listening on %s", self.socket_path or f"fd {self.fd}")
        self.ready.set()

    def _path(self) -> Path:
        assert self.socket_path is not None
        return self.socket_path

    def _bind(self, path: Path) -> socket.socket:
        try:
            st = path.lstat()
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise ConfigurationError(f"{path} exists and is not a socket")
            path.unlink()  # a stale socket of an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # bind a temporary name and rename it into place once listening: a front-end
        # that connects as soon as the path appears (QEMU, a script) is never refused
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

    def _connect_to(self, path: Path) -> socket.socket:
        return connect_unix(
            path, self.connect_timeout, name=str(path), retry_every=0.1, stop=lambda: self._stop
        )

    def _attach(self, conn: socket.socket) -> None:
        assert self._sel is not None
        conn.setblocking(False)
        self._conn = conn
        self.backend = VhostUserBackend(self.device, **self.backend_options)
        self.backend.wakeup = self._wake_for_device
        self._sel.register(conn, selectors.EVENT_READ, _CONN)
        self.connections += 1
        _log.info("front-end connected (connection %d)", self.connections)

    # -- the loop -----------------------------------------------------------------------

    def serve(self) -> None:
        """Serve until :meth:`stop`, a signal, or (connecting role) the end of the
        connection. Releases everything before returning."""
        old_handlers: dict[signal.Signals, Any] = {}
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self._open()
            self._loop()
        finally:
            self._shutdown()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)

    def _wake_for_device(self) -> None:
        """The back-end queued actions for the device outside this loop's thread:
        wake the loop so they go out now, not at the next event."""
        if threading.get_ident() == self._loop_thread:
            return
        wake = self._wake_w
        if wake is not None:
            with contextlib.suppress(OSError):
                wake.send(b"d")

    def _loop(self) -> None:
        self._loop_thread = threading.get_ident()
        sel = self._sel
        host = self._host
        assert sel is not None and host is not None
        while not self._stop:
            backend = self.backend
            if backend is not None and backend.pending:
                timeout: float | None = 0.0
            elif backend is not None and backend.polling:
                timeout = _POLL_INTERVAL
            else:
                timeout = None
            host.sync()
            kicks: list[tuple[int, int]] = []
            ready = sel.select(host.timeout(timeout))
            if host.run_timers():
                self._device_actions()
            for key, _mask in ready:
                tag = key.data
                if isinstance(tag, HostFd):
                    tag.watch.dispatch(key.fd)
                    self._device_actions()
                elif tag == _WAKE:
                    with contextlib.suppress(OSError):
                        key.fileobj.recv(4096)  # type: ignore[union-attr]
                    # the device called its host from another thread (a link change,
                    # a resize, a new balloon target): carry out what it asked
                    self._device_actions()
                elif tag == _LISTEN:
                    self._accept()
                elif tag == _CONN:
                    self._read()
                elif isinstance(tag, int):
                    kicks.append((tag, key.fd))
            # Kicks after the control socket: a message the front-end sent before the
            # guest could kick (a new call eventfd, say) must be in force first.
            for ring, fd in kicks:
                if self._stop or fd not in self._kicks:
                    break
                self._kick(ring, fd)
            backend = self.backend
            if not self._stop and backend is not None and (backend.pending or backend.polling):
                self._execute(backend.run_pending())
            if self.connect and self._conn is None:
                break
        if self._stop:
            _log.info("stopping: %s", self._stop_reason)

    def _device_actions(self) -> None:
        """Carry out what the device did on its own (a host event, a timer)."""
        backend = self.backend
        if backend is not None:
            self._execute(backend.take_actions())

    def _accept(self) -> None:
        assert self._listen is not None
        try:
            conn, _ = self._listen.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            _log.warning("accept failed: %s", e)
            return
        if self._conn is not None:
            _log.warning("a second front-end tried to connect: refused")
            conn.close()
            return
        self._attach(conn)

    def _read(self) -> None:
        for _ in range(_READS_PER_TURN):
            conn = self._conn
            backend = self.backend
            if conn is None or backend is None:
                return
            try:
                data, anc, flags, _addr = conn.recvmsg(
                    RECV_SIZE, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._disconnect(f"receive failed: {e}")
                return
            fds = fds_from_ancdata(anc)
            if flags & socket.MSG_CTRUNC:
                close_fds(fds)
                self._disconnect("descriptors truncated (more than the protocol allows)")
                return
            if not data and not fds:
                self._disconnect("front-end hung up")
                return
            self._execute(backend.receive(data, fds))

    def _kick(self, index: int, fd: int) -> None:
        try:
            data = os.read(fd, 8)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError as e:
            _log.warning("queue %d: kick read failed: %s", index, e)
            self._unwatch(fd)
            return
        if data == b"":
            # end of file (a pipe whose writer is gone): readable for ever, which would
            # spin this loop; the front-end's kicks can never come through it again
            _log.warning("queue %d: kick descriptor at end of file: no longer watched", index)
            self._unwatch(fd)
            return
        backend = self.backend
        if backend is not None:
            self._execute(backend.kick(index))

    # -- actions ----------------------------------------------------------------------

    def _execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Signal):
                try:
                    os.write(action.fd, _ONE)
                except (BlockingIOError, InterruptedError):
                    pass  # the counter is saturated: the peer is notified anyway
                except OSError as e:
                    _log.debug("eventfd %d write failed: %s", action.fd, e)
            elif isinstance(action, Reply):
                if not self._send(action.data, action.fds):
                    return
            elif isinstance(action, WatchKick):
                self._watch(action.fd, action.ring)
            elif isinstance(action, UnwatchKick):
                self._unwatch(action.fd)
            elif isinstance(action, SendBackend):
                self._send_backend(action.fd, action.data)
            elif isinstance(action, Disconnect):
                self._disconnect(action.reason)
                return

    def _watch(self, fd: int, ring: int) -> None:
        assert self._sel is not None
        self._unwatch(fd)
        try:
            self._sel.register(fd, selectors.EVENT_READ, ring)
        except (OSError, ValueError) as e:
            _log.warning("queue %d: cannot watch kick descriptor %d: %s", ring, fd, e)
            return
        self._kicks[fd] = ring

    def _unwatch(self, fd: int) -> None:
        if self._kicks.pop(fd, None) is not None and self._sel is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(fd)

    def _send(self, data: bytes, fds: tuple[int, ...]) -> bool:
        conn = self._conn
        if conn is None:
            return False
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        view = memoryview(data)
        deadline = time.monotonic() + SEND_TIMEOUT
        while view:
            try:
                sent = conn.sendmsg([view], anc)
            except (BlockingIOError, InterruptedError):
                left = deadline - time.monotonic()
                if left <= 0:
                    self._disconnect("front-end does not read its replies")
                    return False
                select.select([], [conn], [], left)
                continue
            except OSError as e:
                self._disconnect(f"send failed: {e}")
                return False
            view = view[sent:]
            anc = []
        return True

    def _send_backend(self, fd: int, data: bytes) -> None:
        try:
            sent = os.write(fd, data)
            if sent != len(data):
                # a message cut in two would desynchronize the channel: stop using it
                _log.warning("back-end channel full (%d of %d bytes sent)", sent, len(data))
                if self.backend is not None:
                    self.backend.drop_backend_channel()
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EAGAIN):
                _log.warning("back-end channel write failed: %s", e)
            else:
                _log.debug("back-end channel write failed: %s", e)

    # -- teardown ---------------------------------------------------------------------------

    def _disconnect(self, reason: str) -> None:
        conn = self._conn
        if conn is None:
            return
        _log.info("connection closed: %s", reason)
        for fd in list(self._kicks):
            self._unwatch(fd)
        if self._sel is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(conn)
        conn.close()
        self._conn = None
        backend = self.backend
        self.backend = None
        if backend is not None:
            stats = ConnectionStats(backend)
            backend.close()
            self.history.append(stats)
            _log.info("connection %d: %s", self.connections, stats.summary())
            if self.on_connection_end is not None:
                self.on_connection_end(stats)

    def _shutdown(self) -> None:
        self._disconnect(self._stop_reason or "server stopping")
        if self._listen is not None:
            if self._sel is not None:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._sel.unregister(self._listen)
            self._listen.close()
            self._listen = None
        if self._created_path and self.socket_path is not None:
            with contextlib.suppress(OSError):
                self.socket_path.unlink()
            self._created_path = False
        if self._host is not None:
            self._host.close()
            self._host = None
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        for wake in (self._wake_r, self._wake_w):
            if wake is not None:
                wake.close()
        self._wake_r = self._wake_w = None
        self.ready.clear()
