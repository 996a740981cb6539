"""Unix-socket helpers for the transports' socket adapters (vhost-user, two-process
loopback): connecting to a peer that may not listen yet, and the file descriptors
passed with ``SCM_RIGHTS`` (taking them out of ``recvmsg`` ancillary data, closing them).
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import time
from collections.abc import Callable, Sequence

from pyvirtio.errors import ConfigurationError

__all__ = ["close_fds", "connect_unix", "fds_from_ancdata"]


def connect_unix(
    path: str | os.PathLike[str],
    timeout: float,
    *,
    name: str,
    retry_every: float,
    stop: Callable[[], bool] = lambda: False,
) -> socket.socket:
    """Connect a stream socket to ``path``, retrying every ``retry_every`` seconds
    while the socket is missing or refuses, for up to ``timeout`` seconds (or until
    ``stop()`` says to give up).

    Any failure raises :class:`~pyvirtio.errors.ConfigurationError` ("cannot connect
    to ``name``: reason").
    """
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.fspath(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            if stop() or time.monotonic() >= deadline:
                raise ConfigurationError(f"cannot connect to {name}: {e.strerror or e}") from None
            time.sleep(retry_every)
        except OSError as e:
            sock.close()
            raise ConfigurationError(f"cannot connect to {name}: {e.strerror or e}") from None


def fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors carried by the ``SCM_RIGHTS`` items of ``recvmsg`` ancillary
    data, in order (a truncated trailing partial descriptor is dropped)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def close_fds(fds: Sequence[int]) -> None:
    """Close every descriptor of ``fds``, ignoring the ones already gone."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
