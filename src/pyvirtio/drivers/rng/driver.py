"""The entropy driver (virtio-rng), driver side. virtio-v1.2 §5.4 "Entropy Device".

:class:`RngDriver` keeps several device-writable buffers in flight on ``requestq``
(virtio-v1.2 §5.4.2 "Virtqueues") and hands out the random bytes the device wrote,
in the order the buffers were made available.

Rules followed and checked here (virtio-v1.2 §5.4.6.1 "Driver Requirements: Device
Operation"):

- "The driver MUST NOT place device-readable buffers into the queue": every buffer is a
  single device-writable segment.
- "The driver MUST examine the length written by the device to determine how many
  random bytes were received": only ``len`` bytes of each used buffer are taken. A
  used length of 0 breaks virtio-v1.2 §5.4.6.2 ("The device MUST place one or more
  random bytes into the buffer") and marks the queue broken (:class:`DeviceError`).

A read never hangs: it gives up after its timeout (:class:`RngTimeoutError`) and a
device that set DEVICE_NEEDS_RESET, or a broken queue, raises
:class:`~pyvirtio.errors.QueueBrokenError`.
"""

from __future__ import annotations

import time
from collections import deque

from pyvirtio.core.driver import DriverTransport, RingOptions, VirtioDriver
from pyvirtio.errors import (
    ConfigurationError,
    DeviceError,
    QueueBrokenError,
    QueueFullError,
)
from pyvirtio.spec.ids import DeviceId
from pyvirtio.virtqueue.common import DriverVirtqueue

__all__ = ["REQUESTQ", "RngDriver", "RngTimeoutError"]

#: Index of the only virtqueue, ``requestq`` (virtio-v1.2 §5.4.2 "Virtqueues").
REQUESTQ = 0

_CLAUSE_DEVICE = 'virtio-v1.2 §5.4.6.2 "Device Requirements: Device Operation"'


class RngTimeoutError(DeviceError):
    """The entropy device did not return enough random bytes in time.

    The queue stays usable: the buffers remain in flight and a later read may succeed.
    """


class RngDriver(VirtioDriver):
    """A virtio entropy driver over any :class:`~pyvirtio.core.driver.DriverTransport`.

    ``buffers`` device-writable buffers of ``buffer_size`` bytes each (at most the
    queue size) are kept in flight; ``timeout`` is the default for :meth:`read`.
    ``ring`` (:class:`~pyvirtio.core.driver.RingOptions`) picks the ring features
    asked for and the queue size, as for every
    :class:`~pyvirtio.core.driver.VirtioDriver`.

    Typical use::

        drv = RngDriver(transport)
        drv.initialize()
        data = drv.read(32)
        drv.close()
    """

    device_id = DeviceId.ENTROPY

    def __init__(
        self,
        transport: DriverTransport,
        *,
        buffer_size: int = 4096,
        buffers: int = 4,
        timeout: float = 5.0,
        ring: RingOptions = RingOptions(),
    ) -> None:
        super().__init__(transport, ring=ring)
        if buffer_size <= 0 or buffer_size > 1 << 31:
            raise ConfigurationError("buffer_size must be between 1 and 2^31 bytes")
        if buffers <= 0:
            raise ConfigurationError("buffers must be positive")
        if timeout <= 0:
            raise ConfigurationError("timeout must be positive")
        self.buffer_size = buffer_size
        self.buffers = buffers
        self.timeout = timeout
        # guest addresses of the buffers, by slot (the token given to the ring)
        self._slots: list[int] = []
        self._free: deque[int] = deque()
        # slots in flight, in the order they were made available
        self._order: deque[int] = deque()
        # used slots not yet consumed (waiting for an earlier slot): slot -> length
        self._done: dict[int, int] = {}
        # random bytes received and not yet handed out
        self._ready = bytearray()
        #: random bytes received from the device in total
        self.bytes_received = 0

    # -- VirtioDriver hooks ----------------------------------------------------------

    def specific_features(self, offered: int) -> int:
        """No device-specific feature bits exist (virtio-v1.2 §5.4.3 "Feature bits")."""
        return 0

    def queue_count(self) -> int:
        """One queue: ``requestq``."""
        return 1

    def initialize(self) -> None:
        """Initialize the device (virtio-v1.2 §3.1.1), then allocate the buffers."""
        super().initialize()
        q = self.queues[REQUESTQ]
        count = min(self.buffers, q.size)
        alloc = self.transport.allocator
        try:
            for _ in range(count):
                self._slots.append(alloc.alloc(self.buffer_size, 64))
        except BaseException:
            self._free_buffers()
            self._fail()
            raise
        self._free = deque(range(count))

    # -- operation ---------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Buffers currently owned by the device (or used and not yet consumed)."""
        return len(self._order)

    @property
    def buffered(self) -> int:
        """Random bytes received and not yet returned by :meth:`read`."""
        return len(self._ready)

    def read(self, n: int, timeout: float | None = None) -> bytes:
        """Return exactly ``n`` random bytes from the device.

        Waits at most ``timeout`` seconds (default: the driver's ``timeout``) and
        raises :class:`RngTimeoutError` if the device was too slow,
        :class:`~pyvirtio.errors.QueueBrokenError` if the queue is broken or the
        device needs a reset, :class:`~pyvirtio.errors.DeviceError` if the device
        broke a rule (the queue is then broken).
        """
        if n < 0:
            raise ValueError("n must not be negative")
        if not self.queues or not self._slots:
            raise ConfigurationError("RngDriver.read() before initialize()")
        q = self.queues[REQUESTQ]
        if q.broken:
            raise QueueBrokenError(f"requestq is broken: {q.broken_reason}")
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while len(self._ready) < n:
            self._reap(q)
            if len(self._ready) >= n:
                break
            # every free buffer goes back to the device before we wait
            self._post(q)
            if q.enable_interrupts():
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # report a device that gave up (DEVICE_NEEDS_RESET) rather than a timeout
                self.check_status()
                raise RngTimeoutError(
                    f"entropy device returned {len(self._ready)} of {n} bytes within {limit:g} s"
                )
            self.wait(remaining)
            if q.broken:
                raise QueueBrokenError(f"requestq is broken: {q.broken_reason}")
        out = bytes(self._ready[:n])
        del self._ready[:n]
        # keep the device busy for the next read
        self._post(q)
        return out

    def _post(self, q: DriverVirtqueue[int]) -> None:
        """Make every free buffer available (device-writable only) and kick."""
        added = False
        while self._free:
            slot = self._free[0]
            try:
                # §5.4.6.1: "MUST NOT place device-readable buffers into the queue"
                q.add((), ((self._slots[slot], self.buffer_size),), slot)
            except QueueFullError:
                break
            self._free.popleft()
            self._order.append(slot)
            added = True
        if added:
            self.kick(REQUESTQ)

    def _reap(self, q: DriverVirtqueue[int]) -> None:
        """Collect used buffers; move their bytes to the ready buffer in ring order."""
        while True:
            used = q.get_used()
            if used is None:
                break
            slot, length = used
            if slot not in self._order or slot in self._done:
                err = DeviceError(f"used buffer {slot!r} is not in flight")
                q.broken_reason = q.broken_reason or err
                raise err
            if length == 0 or length > self.buffer_size:
                # §5.4.6.1: "MUST examine the length written by the device"
                err = DeviceError(
                    f"entropy device returned {length} bytes for a {self.buffer_size}-byte "
                    "buffer: it MUST place one or more random bytes into the buffer",
                    _CLAUSE_DEVICE,
                )
                q.broken_reason = q.broken_reason or err
                raise err
            self._done[slot] = length
        mem = self.transport.mem
        while self._order and self._order[0] in self._done:
            slot = self._order.popleft()
            length = self._done.pop(slot)
            self._ready += mem.read(self._slots[slot], length)
            self.bytes_received += length
            self._free.append(slot)

    # -- teardown ------------------------------------------------------------------------

    def _free_buffers(self) -> None:
        alloc = self.transport.allocator
        for addr in self._slots:
            alloc.free(addr)
        self._slots = []
        self._free.clear()
        self._order.clear()
        self._done.clear()

    def close(self) -> list[object]:
        """Reset the device, free the rings and the buffers."""
        try:
            tokens: list[object] = super().close()
        finally:
            self._free_buffers()
            self._ready.clear()
        return tokens
