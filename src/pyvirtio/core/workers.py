"""Blocking host I/O off the event loop: a small thread pool with eventfd completion.

A device whose backend may block (``fdatasync`` on a slow disk, a read from a file
on a network filesystem) submits each request's host I/O to a :class:`WorkerPool`
and returns the chain as held. A worker thread runs the job; its result is queued
and the pool's eventfd (:attr:`WorkerPool.fd`) becomes readable. The device watches
that descriptor in its :class:`~pyvirtio.core.events.HostEvents`, so the transport's
own event loop calls :meth:`WorkerPool.collect` on the device's thread, which runs
each job's completion callback there: guest-visible state (status bytes, used
elements, notifications) is only ever touched by the device's thread.

Why threads and an eventfd rather than asyncio or io_uring: the standard library has
no io_uring, the transports' loops are plain ``selectors`` loops (vhost-user server,
two-process loopback) or driver-thread calls (in-process), and ``os.preadv`` /
``os.pwritev`` / ``os.fdatasync`` release the GIL, so a few threads overlap real
disk I/O. The eventfd is the one descriptor every kind of loop can watch.

Jobs run in any order and complete in any order; a device that needs an order (a
FLUSH after the writes it covers) gets it from when it submits, not from the pool.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["DEFAULT_THREADS", "WorkerPool"]

#: Worker threads per pool unless told otherwise.
DEFAULT_THREADS = 4

#: A completion callback: ``done(result, error)``, exactly one of them meaningful.
Done = Callable[[Any, "BaseException | None"], None]


class WorkerPool:
    """``threads`` daemon threads running submitted jobs (see the module docs).

    :meth:`submit` and :meth:`collect` are called from the device's thread only.
    """

    def __init__(self, threads: int = DEFAULT_THREADS, *, name: str = "pyvirtio-io") -> None:
        if threads < 1:
            raise ValueError("a worker pool needs at least one thread")
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Done] | None] = queue.SimpleQueue()
        self._done: deque[tuple[Done, Any, BaseException | None]] = deque()
        #: readable while completions wait for :meth:`collect`
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        #: jobs submitted and not yet collected
        self.in_flight = 0
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        jobs = self._jobs
        done = self._done
        fd = self.fd
        while True:
            item = jobs.get()
            if item is None:
                return
            job, callback = item
            try:
                result, error = job(), None
            except BaseException as e:
                result, error = None, e
            done.append((callback, result, error))
            try:
                os.eventfd_write(fd, 1)
            except OSError:  # pragma: no cover - closed under us at shutdown
                return

    def submit(self, job: Callable[[], Any], done: Done) -> None:
        """Run ``job()`` on a worker; ``done(result, error)`` runs later in
        :meth:`collect`, on the caller's thread."""
        if self._closed:
            raise RuntimeError("the worker pool is closed")
        self.in_flight += 1
        self._jobs.put((job, done))

    def collect(self) -> int:
        """Run the completion callbacks of the jobs finished so far; returns how many.

        A callback that raises does not stop the others: the first exception is
        raised after all of them ran.
        """
        with contextlib.suppress(BlockingIOError, OSError):
            os.eventfd_read(self.fd)
        first: BaseException | None = None
        n = 0
        done = self._done
        while done:
            callback, result, error = done.popleft()
            self.in_flight -= 1
            n += 1
            try:
                callback(result, error)
            except Exception as e:
                if first is None:
                    first = e
        if first is not None:
            raise first
        return n

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job finished and its callback ran (up to
        ``timeout`` seconds; None: as long as it takes). True if nothing is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.in_flight:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            select.select([self.fd], [], [], left)
            self.collect()
        return True

    def close(self) -> None:
        """Finish every job (running their callbacks), stop the threads, close the fd."""
        if self._closed:
            return
        try:
            self.drain()
        finally:
            self._closed = True
            for _ in self._threads:
                self._jobs.put(None)
            for t in self._threads:
                t.join()
            os.close(self.fd)
