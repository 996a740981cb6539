"""Host-side event sources a device waits on: file descriptors and timers.

A device model does no I/O loop of its own. What it waits for on the host side (a
TAP device's frames, a pty's input, a socket, the eventfd its I/O workers signal on
completion, a stats polling period) it declares in its :class:`HostEvents`; the
transport that runs the device (the vhost-user server, the two-process loopback, the
in-process loopback, the in-process bus) watches those descriptors and deadlines in
its own event loop and calls the device back through
:meth:`~pyvirtio.core.device.VirtioDevice.host_event` and
:meth:`~pyvirtio.core.device.VirtioDevice.run_timers`, inside the device's one
failure path. This module is bookkeeping only: no ``select``, no ``read``.

Contract:

- sources are added and removed from the thread that runs the device (construction,
  ``activate``, a queue or host-event callback); worker threads do not touch them,
  they signal a descriptor the device watches instead;
- a callback is level-triggered: it is called while its descriptor is readable and
  must consume what made it readable (or remove the source), otherwise it is called
  again on the next loop turn;
- every change bumps :attr:`HostEvents.version` and calls the listener the transport
  installed (:attr:`HostEvents.listener`), so a loop blocked in ``select`` in another
  thread wakes up and re-reads the set.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["HostEvents", "Timer"]


@dataclass(order=True)
class Timer:
    """A pending :meth:`HostEvents.call_later` callback; :meth:`cancel` drops it."""

    deadline: float
    seq: int
    callback: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        """Do not run the callback (harmless if it already ran)."""
        self.cancelled = True


class HostEvents:
    """The descriptors and timers of one device (see the module docs)."""

    def __init__(self) -> None:
        self._readers: dict[int, Callable[[], None]] = {}
        self._timers: list[Timer] = []
        self._seq = itertools.count()
        #: bumped on every change of the descriptor set or the timers
        self.version = 0
        #: called after every change (the transport's wake-up), or None
        self.listener: Callable[[], None] | None = None

    def _changed(self) -> None:
        self.version += 1
        listener = self.listener
        if listener is not None:
            listener()

    # -- descriptors ---------------------------------------------------------------

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever ``fd`` is readable (replaces an earlier one)."""
        if fd < 0:
            raise ValueError(f"cannot watch descriptor {fd}")
        self._readers[fd] = callback
        self._changed()

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd`` (no error if it was not watched)."""
        if self._readers.pop(fd, None) is not None:
            self._changed()

    def readers(self) -> dict[int, Callable[[], None]]:
        """The watched descriptors and their callbacks (a copy)."""
        return dict(self._readers)

    def reader(self, fd: int) -> Callable[[], None] | None:
        """The callback of ``fd``, or None if it is no longer watched."""
        return self._readers.get(fd)

    # -- timers ----------------------------------------------------------------------

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Call ``callback()`` once, ``delay`` seconds from now (monotonic clock)."""
        timer = Timer(time.monotonic() + max(0.0, delay), next(self._seq), callback)
        heapq.heappush(self._timers, timer)
        self._changed()
        return timer

    def next_deadline(self) -> float | None:
        """Monotonic time of the earliest pending timer, or None."""
        timers = self._timers
        while timers and timers[0].cancelled:
            heapq.heappop(timers)
        return timers[0].deadline if timers else None

    def timeout(self, now: float | None = None, default: float | None = None) -> float | None:
        """Seconds a loop may sleep before the next timer (``default`` if none)."""
        deadline = self.next_deadline()
        if deadline is None:
            return default
        left = max(0.0, deadline - (time.monotonic() if now is None else now))
        return left if default is None else min(left, default)

    def pop_due(self, now: float | None = None) -> list[Callable[[], None]]:
        """Remove and return the callbacks of every timer due at ``now``."""
        now = time.monotonic() if now is None else now
        timers = self._timers
        due: list[Callable[[], None]] = []
        while timers and (timers[0].cancelled or timers[0].deadline <= now):
            timer = heapq.heappop(timers)
            if not timer.cancelled:
                timer.cancelled = True
                due.append(timer.callback)
        return due

    def clear(self) -> None:
        """Forget every descriptor and timer."""
        if self._readers or self._timers:
            self._readers.clear()
            self._timers.clear()
            self._changed()

    def __bool__(self) -> bool:
        return bool(self._readers) or self.next_deadline() is not None
