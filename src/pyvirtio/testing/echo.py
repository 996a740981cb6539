"""Test devices and their driver: an echo device, and one that holds its buffers.

:class:`EchoDevice` (device type :data:`TEST_DEVICE_ID`: no real device) copies each
request's device-readable bytes back into its device-writable part (upper-cased when
:data:`ECHO_F_UPPER` is negotiated). Its configuration space is one le64 ``counter``
and one le32 ``queues``; :meth:`EchoDevice.bump` (or a request of exactly
:data:`BUMP`) changes the counter with a configuration change notification; a request
of exactly :data:`CRASH` makes the device model raise (its failure path is tested so).

:class:`HeldEchoDevice` answers nothing at once: it holds every request
(:data:`~pyvirtio.core.device.HOLD`) until its host side - a pipe or FIFO it declares
as a host event source - delivers a byte: ``o`` answers the oldest held request,
``n`` the newest, ``a`` all oldest first, ``r`` all newest first. It is the smallest
device that needs the framework's held buffers, host event sources and out-of-order
completion, and it runs on every transport.

:class:`EchoDriver` drives either.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from typing import Any

from pyvirtio.core.device import HOLD, VirtioDevice
from pyvirtio.core.driver import VirtioDriver
from pyvirtio.errors import QueueFullError
from pyvirtio.spec.features import Feature
from pyvirtio.virtqueue.common import DescriptorChain, DeviceVirtqueue

__all__ = [
    "BUMP",
    "CRASH",
    "ECHO_F_UPPER",
    "TEST_DEVICE_ID",
    "EchoDevice",
    "EchoDriver",
    "HeldEchoDevice",
]

#: The test devices' device id: 63 is unassigned in virtio-v1.2 (§5 "Device Types")
#: and the largest a modern virtio-pci device ID (0x1040 + id) can carry. Not 0:
#: a virtio-mmio DeviceID of 0 is a placeholder that "The driver MUST ignore"
#: (virtio-v1.2 §4.2.3.1.1 "Driver Requirements: Device Initialization"). Never show
#: it to a guest.
TEST_DEVICE_ID = 63

#: device-specific feature bit 0: upper-case the echo
ECHO_F_UPPER = 0
_CONFIG = struct.Struct("<QI")
#: a request with exactly these bytes makes the device change its configuration
BUMP = b"!bump"
#: a request with exactly these bytes makes the device model raise (a device bug)
CRASH = b"!crash"


class EchoDevice(VirtioDevice):
    """Echo every request back at once (see the module docs)."""

    device_id = TEST_DEVICE_ID

    def __init__(
        self,
        num_queues: int = 1,
        queue_max_size: int = 256,
        *,
        ring_reset: bool = False,
        extra_features: int = 0,
    ) -> None:
        super().__init__(num_queues, queue_max_size)
        self.counter = 0
        self.ring_reset = ring_reset
        self.extra_features = extra_features
        self.refuse_features = 0

    def specific_features(self) -> int:
        """ECHO_F_UPPER, VIRTIO_F_RING_RESET if asked, plus ``extra_features``."""
        f = 1 << ECHO_F_UPPER | self.extra_features
        if self.ring_reset:
            f |= Feature.RING_RESET.mask
        return f

    def validate_features(self, features: int) -> bool:
        """Refuse any feature set containing a bit of ``refuse_features``."""
        return not features & self.refuse_features

    def config_bytes(self) -> bytes:
        """le64 counter, le32 number of queues."""
        return _CONFIG.pack(self.counter, self.num_queues)

    def bump(self) -> None:
        """Change the configuration and tell the driver."""
        self.counter += 1
        self.config_changed()

    def answer(self, vq: DeviceVirtqueue, chain: DescriptorChain) -> int:
        """The echo of ``chain`` written into it; returns the bytes written."""
        mem = vq.mem
        data = chain.read_all(mem, chain.writable_len)
        if data == BUMP:
            self.bump()
        elif data == CRASH:
            raise RuntimeError("device model bug (test)")
        return chain.write_all(mem, data.upper() if self.negotiated(ECHO_F_UPPER) else data)

    def handle_queue(self, index: int) -> None:
        """Serve queue ``index``."""
        vq = self.queues[index]
        if vq is None:
            return
        self.run_queue(index, lambda chain: self.answer(vq, chain))


class HeldEchoDevice(EchoDevice):
    """An echo device that answers only when its host side says so (module docs).

    ``control`` is the path of a FIFO to read commands from (opened read-write, so
    it never reads end-of-file; for a device in another process); without it the
    device makes a pipe and :attr:`control_fd` is its write end. ``on_command``
    (test hook) runs before each command byte is obeyed.
    """

    def __init__(self, num_queues: int = 1, *, control: str | None = None, **kw: Any) -> None:
        super().__init__(num_queues, **kw)
        #: (queue, chain) in the order they were taken
        self.held: list[tuple[DeviceVirtqueue, DescriptorChain]] = []
        if control is not None:
            self._rfd = os.open(control, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            self.control_fd = -1
        else:
            self._rfd, self.control_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.events.add_reader(self._rfd, self._command)

    def command(self, what: bytes) -> None:
        """Send command bytes through the pipe (in-process use)."""
        os.write(self.control_fd, what)

    def handle_queue(self, index: int) -> None:
        """Take every available request and hold it."""
        vq = self.queues[index]
        if vq is None:
            return

        def hold(chain: DescriptorChain) -> int:
            self.held.append((vq, chain))
            return HOLD

        self.run_queue(index, hold)

    def _command(self) -> None:
        try:
            data = os.read(self._rfd, 4096)
        except BlockingIOError:
            return
        for c in data:
            if c == ord("o") and self.held:
                self._answer(self.held.pop(0))
            elif c == ord("n") and self.held:
                self._answer(self.held.pop())
            elif c == ord("a"):
                while self.held:
                    self._answer(self.held.pop(0))
            elif c == ord("r"):
                while self.held:
                    self._answer(self.held.pop())
            elif c == ord("!"):
                raise RuntimeError("device model bug in a host event callback (test)")

    def _answer(self, item: tuple[DeviceVirtqueue, DescriptorChain]) -> None:
        vq, chain = item
        if vq.broken or self.queues[vq.index] is not vq:
            return  # the queue went away: the chain is not ours any more
        self.complete(vq, chain, self.answer(vq, chain))

    def queue_stopped(self, index: int) -> None:
        """Forget the requests held for queue ``index``."""
        self.held = [(vq, c) for vq, c in self.held if vq.index != index]

    def reset(self) -> None:
        """Forget every held request."""
        self.held = []
        super().reset()

    def close(self) -> None:
        """Close the pipe or FIFO."""
        self.events.remove_reader(self._rfd)
        for fd in (self._rfd, self.control_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._rfd = self.control_fd = -1


class EchoDriver(VirtioDriver):
    """Driver of :class:`EchoDevice` and :class:`HeldEchoDevice`: ``echo(data)`` and
    a batch API (:meth:`submit`, :meth:`reap`, :meth:`echo_many`)."""

    device_id = TEST_DEVICE_ID

    def __init__(
        self, transport: Any, *, upper: bool = False, ring_reset: bool = False, **kw: Any
    ) -> None:
        super().__init__(transport, **kw)
        self.upper = upper
        self.ring_reset = ring_reset

    def specific_features(self, offered: int) -> int:
        """Accept ECHO_F_UPPER and VIRTIO_F_RING_RESET if asked to."""
        want = (1 << ECHO_F_UPPER if self.upper else 0) | (
            Feature.RING_RESET.mask if self.ring_reset else 0
        )
        return offered & want

    def counter(self) -> int:
        """The configuration ``counter`` (read until stable)."""
        return int(_CONFIG.unpack(self.read_config(0, _CONFIG.size))[0])

    def submit(self, data: bytes, token: int, queue: int = 0) -> tuple[int, int]:
        """Add one request (no kick); returns its (out, in) buffer addresses."""
        alloc = self.transport.allocator
        out = alloc.alloc(max(1, len(data)))
        inb = alloc.alloc(max(1, len(data)))
        self.transport.mem.write(out, data)
        try:
            self.queues[queue].add([(out, len(data))], [(inb, len(data))], (token, out, inb))
        except QueueFullError:
            alloc.free(out)
            alloc.free(inb)
            raise
        return out, inb

    def reap(self, queue: int = 0) -> list[tuple[int, bytes]]:
        """Every completed request of ``queue``: (token, echoed bytes), in the order
        the device used them."""
        done: list[tuple[int, bytes]] = []
        q = self.queues[queue]
        alloc = self.transport.allocator
        while True:
            got = q.get_used()
            if got is None:
                return done
            (token, out, inb), written = got
            done.append((token, self.transport.mem.read(inb, written)))
            alloc.free(out)
            alloc.free(inb)

    def wait_reaped(
        self, count: int, queue: int = 0, timeout: float = 10.0
    ) -> list[tuple[int, bytes]]:
        """Wait until ``count`` requests of ``queue`` completed; returns them in the
        order the device used them. Raises :class:`TimeoutError`."""
        done: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + timeout
        q = self.queues[queue]
        while len(done) < count:
            done.extend(self.reap(queue))
            if len(done) >= count or q.enable_interrupts():
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{count - len(done)} requests did not complete")
            self.wait(min(left, 0.5))
        return done

    def echo_many(
        self, payloads: list[bytes], queue: int = 0, timeout: float = 10.0
    ) -> dict[int, bytes]:
        """Send every payload (as many in flight as fit), wait for all echoes."""
        results: dict[int, bytes] = {}
        nxt = 0
        q = self.queues[queue]
        while len(results) < len(payloads):
            progressed = False
            while nxt < len(payloads):
                try:
                    self.submit(payloads[nxt], nxt, queue)
                except QueueFullError:
                    break
                nxt += 1
                progressed = True
            self.kick(queue)
            for token, data in self.reap(queue):
                results[token] = data
                progressed = True
            if progressed or q.enable_interrupts():
                continue
            # nothing to do until the device uses a buffer: wait for its notification
            fired = self.wait(timeout)
            done = self.reap(queue)
            for token, data in done:
                results[token] = data
            if not fired and not done:
                raise TimeoutError("no used buffer notification")
        return results

    def echo(self, data: bytes, queue: int = 0) -> bytes:
        """Echo one buffer."""
        return self.echo_many([data], queue)[0]
