"""Where an entropy device's random bytes come from (the device's host-side resource).

virtio-v1.2 §5.4 "Entropy Device" says nothing about the host's source of randomness;
pyvirtio puts it behind the small :class:`EntropySource` protocol so tests inject a
deterministic stream and users plug in a hardware RNG, a file or their own generator.

A source's :meth:`EntropySource.read` returns *up to* ``n`` bytes. Returning ``b""``
means "nothing right now": the device then keeps the request waiting instead of
answering it with zero bytes, which the spec forbids ("The device MUST place one or
more random bytes into the buffer").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO, Protocol, runtime_checkable

from pyvirtio.errors import ConfigurationError

__all__ = [
    "CallableSource",
    "EntropySource",
    "FileSource",
    "OsRandomSource",
]


@runtime_checkable
class EntropySource(Protocol):
    """A supplier of random bytes for :class:`~pyvirtio.devices.rng.RngDevice`."""

    def read(self, n: int) -> bytes:
        """Return between 1 and ``n`` random bytes, or ``b""`` if none are available now.

        ``n`` is always positive and never larger than the device's chunk cap. A
        source may raise :class:`OSError`; the device counts it and retries later.
        """
        ...


class OsRandomSource:
    """The kernel's CSPRNG via :func:`os.urandom` (the default source)."""

    def read(self, n: int) -> bytes:
        """``n`` bytes from :func:`os.urandom`."""
        return os.urandom(n)


class FileSource:
    """Random bytes read from a file or device node (``/dev/hwrng``, a seed file ...).

    ``file`` is a path (opened unbuffered, owned and closed by :meth:`close`) or an
    already open binary file object (not closed here). At end of file :meth:`read`
    returns ``b""``: the device then waits rather than answer with zero bytes.
    """

    def __init__(self, file: str | os.PathLike[str] | BinaryIO) -> None:
        if isinstance(file, (str, os.PathLike)):
            try:
                self._file: BinaryIO = open(file, "rb", buffering=0)  # noqa: SIM115
            except OSError as e:
                raise ConfigurationError(f"cannot open entropy source {file!s}: {e}") from e
            self._owned = True
        else:
            self._file = file
            self._owned = False

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes from the file (``b""`` at end of file)."""
        data = self._file.read(n)
        return data or b""

    def close(self) -> None:
        """Close the file if this source opened it."""
        if self._owned:
            self._file.close()

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CallableSource:
    """Random bytes from a function ``fn(n) -> bytes`` (e.g. ``random.Random(1).randbytes``).

    The result is truncated to ``n`` bytes; ``b""`` means nothing is available now.
    """

    def __init__(self, fn: Callable[[int], bytes]) -> None:
        if not callable(fn):
            raise ConfigurationError("CallableSource needs a callable fn(n) -> bytes")
        self._fn = fn

    def read(self, n: int) -> bytes:
        """Call ``fn(n)`` and return at most ``n`` bytes of its result."""
        data = self._fn(n)
        return bytes(data[:n])
