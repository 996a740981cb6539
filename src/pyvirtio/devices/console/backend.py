"""Host sides of console ports (the device's host-side resources).

virtio-v1.2 §5.3 "Console Device" says nothing about where a port's characters go on
the host; pyvirtio puts each port's host side behind the small
:class:`ConsoleBackend` protocol:

- :class:`PtyBackend`: a pseudo-terminal (``os.openpty``); the device keeps the
  master, a host program opens :attr:`PtyBackend.path` (the slave, in raw mode);
- :class:`SocketBackend`: a listening unix stream socket, one peer at a time (a
  second connection waits in the listen backlog until the first hangs up); the port
  is open on the host side while a peer is connected;
- :class:`FdBackend` / :class:`StdioBackend`: a pair of descriptors (the process's
  stdin and stdout);
- :class:`FileBackend`: a log file, output only.

All descriptors are non-blocking: the device reads a back-end only when the driver
has posted a receive buffer (back-pressure: nothing is buffered on the device), and
a write takes what the host side accepts now.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import tty
from typing import Protocol, runtime_checkable

from pyvirtio.errors import ConfigurationError

__all__ = [
    "ConsoleBackend",
    "FdBackend",
    "FileBackend",
    "PtyBackend",
    "SocketBackend",
    "StdioBackend",
]


@runtime_checkable
class ConsoleBackend(Protocol):
    """The host side of one console port."""

    def fileno(self) -> int | None:
        """The descriptor the device watches: readable when :meth:`read` has data
        or the connection state may change (a listening socket); None for an
        output-only back-end. May change when :attr:`connected` changes."""

    @property
    def connected(self) -> bool:
        """True while the host side is open (a peer is there to read and write)."""

    def read(self, n: int) -> bytes | None:
        """Up to ``n`` bytes of host input; None if none now (a connection may have
        come or gone: check :attr:`connected`)."""

    def write(self, data: bytes) -> int:
        """Give ``data`` to the host side; returns the bytes accepted now (0 if it
        would block). Data written while not :attr:`connected` is dropped (returns
        ``len(data)``)."""

    def close(self) -> None:
        """Release the back-end's descriptors."""


def _nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


class FdBackend:
    """Input from ``read_fd`` (None: output only), output to ``write_fd``. The
    descriptors are made non-blocking; ``owns`` closes them in :meth:`close`."""

    def __init__(self, read_fd: int | None, write_fd: int | None, *, owns: bool = False) -> None:
        self._rfd = read_fd
        self._wfd = write_fd
        self._owns = owns
        self._eof = False
        for fd in {read_fd, write_fd} - {None}:
            assert fd is not None
            _nonblocking(fd)

    def fileno(self) -> int | None:
        """The input descriptor (None once it reached end of file)."""
        return None if self._eof else self._rfd

    @property
    def connected(self) -> bool:
        """True until the input reaches end of file."""
        return not self._eof

    def read(self, n: int) -> bytes | None:
        """Up to ``n`` bytes; end of file closes the host side."""
        if self._rfd is None or self._eof:
            return None
        try:
            data = os.read(self._rfd, n)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno != errno.EIO:  # a pty without slave reads EIO: a hang-up
                raise
            data = b""
        if not data:
            self._eof = True
            return None
        return data

    def write(self, data: bytes) -> int:
        """Write what the descriptor takes now."""
        if self._wfd is None:
            return len(data)
        try:
            return os.write(self._wfd, data)
        except BlockingIOError:
            return 0
        except BrokenPipeError:
            return len(data)

    def close(self) -> None:
        """Close the descriptors if owned."""
        if self._owns:
            for fd in {self._rfd, self._wfd} - {None}:
                assert fd is not None
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._rfd = self._wfd = None
        self._eof = True


class StdioBackend(FdBackend):
    """The process's standard input and output (not closed by :meth:`close`)."""

    def __init__(self) -> None:
        super().__init__(0, 1)


class PtyBackend(FdBackend):
    """A pseudo-terminal: the device keeps the master, host programs open
    :attr:`path`. The device also keeps the slave open (in raw mode), so the port
    stays usable while no host program has it open (a master whose slave is closed
    reads EIO)."""

    def __init__(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        #: the slave's path (``/dev/pts/N``)
        self.path = os.ttyname(slave)
        self._slave = slave
        super().__init__(master, master, owns=True)

    def close(self) -> None:
        """Close master and slave."""
        super().close()
        with contextlib.suppress(OSError):
            os.close(self._slave)


class SocketBackend:
    """A listening unix stream socket at ``path``: one peer at a time; the host side
    is open while it is connected. The listener is not read while a peer is
    connected: a second connection waits in its backlog until the first hangs up."""

    def __init__(self, path: str) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(path)
        except OSError as e:
            self._listener.close()
            raise ConfigurationError(f"cannot listen on {path}: {e}") from e
        self._listener.listen(1)
        self._listener.setblocking(False)
        self._peer: socket.socket | None = None

    def fileno(self) -> int | None:
        """The peer's descriptor, or the listener's while none is connected."""
        return self._peer.fileno() if self._peer is not None else self._listener.fileno()

    @property
    def connected(self) -> bool:
        """True while a peer is connected."""
        return self._peer is not None

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        self._peer = sock

    def read(self, n: int) -> bytes | None:
        """Accept a waiting peer, or read up to ``n`` bytes from the peer (its
        hang-up closes the host side)."""
        if self._peer is None:
            self._accept()
            return None
        try:
            data = self._peer.recv(n)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            self._hang_up()
            return None
        return data

    def _hang_up(self) -> None:
        if self._peer is not None:
            self._peer.close()
            self._peer = None

    def write(self, data: bytes) -> int:
        """Send what the peer's socket takes now (dropped without a peer)."""
        if self._peer is None:
            return len(data)
        try:
            return self._peer.send(data)
        except BlockingIOError:
            return 0
        except OSError:
            self._hang_up()
            return len(data)

    def close(self) -> None:
        """Close the peer and the listener; remove the socket file."""
        self._hang_up()
        self._listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class FileBackend:
    """Output appended to the file at ``path`` (a log); no input."""

    def __init__(self, path: str) -> None:
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigurationError(f"cannot open console log {path}: {e}") from e
        self.path = path

    def fileno(self) -> int | None:
        """None: a log has no input."""
        return None

    @property
    def connected(self) -> bool:
        """Always open."""
        return self._fd >= 0

    def read(self, n: int) -> bytes | None:
        """No input."""
        return None

    def write(self, data: bytes) -> int:
        """Append ``data`` (a regular file takes it all)."""
        if self._fd < 0:
            return len(data)
        return os.write(self._fd, data)

    def close(self) -> None:
        """Close the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
