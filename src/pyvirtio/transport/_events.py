"""Watching devices' host event sources from a transport's event loop.

A device declares the host descriptors and timers it waits on in its
:class:`~pyvirtio.core.events.HostEvents`; every transport that runs devices watches
them in its own loop. :class:`HostEventWatch` keeps one ``selectors`` selector in step
with one device's sources (the vhost-user server and the two-process loopback add it
to their loops); :class:`HostEventThread` is the loop of the in-process transports,
whose device otherwise runs only inside the driver's calls: a thread that waits on
the sources of its devices and calls them back (the device's lock serializes it with
the driver's thread).

Registrations are rebuilt whenever the device's set changed: a descriptor closed and
its number reused for a new one (an I/O pool stopped at reset and started again at
the next DRIVER_OK) must be registered afresh, since epoll forgets closed files.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import threading
import time

from pyvirtio.core.device import VirtioDevice

__all__ = ["HostEventThread", "HostEventWatch", "HostFd"]


class HostFd:
    """The ``data`` of a selector key that belongs to a device's host event source."""

    __slots__ = ("watch",)

    def __init__(self, watch: HostEventWatch) -> None:
        self.watch = watch


class HostEventWatch:
    """Registers ``device``'s host descriptors in ``sel`` (see the module docs)."""

    def __init__(self, sel: selectors.BaseSelector, device: VirtioDevice) -> None:
        self.sel = sel
        self.device = device
        self._tag = HostFd(self)
        self._version = -1
        self._fds: list[int] = []

    def sync(self) -> None:
        """Bring the selector's registrations up to date (cheap when nothing changed)."""
        events = self.device.events
        if events.version == self._version:
            return
        self._version = events.version
        self._unregister()
        for fd in events.readers():
            try:
                self.sel.register(fd, selectors.EVENT_READ, self._tag)
            except (OSError, ValueError, KeyError):
                continue  # closed meanwhile: the device will remove or replace it
            self._fds.append(fd)

    def _unregister(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.sel.unregister(fd)
        self._fds = []

    def timeout(self, default: float | None) -> float | None:
        """How long the loop may sleep given the device's timers (``default`` bounds)."""
        return self.device.events.timeout(default=default)

    def dispatch(self, fd: int) -> None:
        """``fd`` was readable: call the device back."""
        self.device.host_event(fd)

    def run_timers(self) -> bool:
        """Run the device's due timers; True if some ran."""
        deadline = self.device.events.next_deadline()
        if deadline is None:
            return False
        now = time.monotonic()
        if deadline > now:
            return False
        self.device.run_timers(now)
        return True

    def close(self) -> None:
        """Forget every registration."""
        self._unregister()
        self._version = -1


class HostEventThread:
    """A thread serving the host event sources of in-process ``devices``.

    It starts when a device first declares a source (or at once if one already did)
    and stops in :meth:`close`. Device callbacks run under the device's lock.
    """

    def __init__(self, *devices: VirtioDevice, name: str = "pyvirtio-host-events") -> None:
        self._sel = selectors.DefaultSelector()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._sel.register(self._wake, selectors.EVENT_READ, None)
        self._watches: list[HostEventWatch] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._name = name
        for device in devices:
            self.add(device)

    def add(self, device: VirtioDevice) -> None:
        """Watch ``device``'s sources too."""
        with self._lock:
            self._watches.append(HostEventWatch(self._sel, device))
        device.events.listener = self._changed
        if device.events:
            self._changed()

    def _changed(self) -> None:
        with self._lock:
            if self._stop:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake, 1)

    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                watches = list(self._watches)
            timeout: float | None = None
            for w in watches:
                w.sync()
                timeout = w.timeout(timeout)
            ready = self._sel.select(timeout)
            for key, _mask in ready:
                if self._stop:
                    return
                if key.data is None:
                    with contextlib.suppress(OSError):
                        os.eventfd_read(self._wake)
                elif isinstance(key.data, HostFd):
                    key.data.watch.dispatch(key.fd)
            for w in watches:
                w.run_timers()

    def close(self) -> None:
        """Stop the thread and release the selector (idempotent)."""
        with self._lock:
            if self._stop:
                return
            self._stop = True
            thread = self._thread
            watches = list(self._watches)
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake, 1)
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        for w in watches:
            if w.device.events.listener == self._changed:
                w.device.events.listener = None
            w.close()
        self._sel.close()
        os.close(self._wake)
