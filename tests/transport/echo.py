"""A test-only echo device and driver, used by the core and transport tests.

EchoDevice (device type 0, test only) has ``num_queues`` queues; each request's
device-readable bytes are copied back into its device-writable part (upper-cased
when ECHO_F_UPPER is negotiated). Its configuration space is one le64 ``counter``
followed by one le32 ``queues``; :meth:`EchoDevice.bump` (or a request of exactly
:data:`BUMP`) changes the counter and sends a configuration change notification; a
request of exactly :data:`CRASH` makes the device model raise.

This module must stay importable by path (``tests.transport.echo``): the two-process
tests spawn the device from it.
"""

from __future__ import annotations

import struct
from typing import Any

from pyvirtio.core.device import VirtioDevice
from pyvirtio.core.driver import VirtioDriver
from pyvirtio.errors import QueueFullError
from pyvirtio.spec.features import Feature
from pyvirtio.spec.ids import DeviceId
from pyvirtio.virtqueue.common import DescriptorChain


def packed_available() -> bool:
    """True once the packed ring implementation imports (it is developed in parallel)."""
    try:
        from pyvirtio.virtqueue.packed.device import PackedDeviceQueue  # noqa: F401
        from pyvirtio.virtqueue.packed.driver import PackedDriverQueue  # noqa: F401
    except ImportError:
        return False
    return True


#: device-specific feature bit 0: upper-case the echo
ECHO_F_UPPER = 0
_CONFIG = struct.Struct("<QI")
#: a request with exactly these bytes makes the device change its configuration
BUMP = b"!bump"
#: a request with exactly these bytes makes the device model raise (a device bug)
CRASH = b"!crash"


class EchoDevice(VirtioDevice):
    """Echo every request back (test device)."""

    device_id = DeviceId.RESERVED

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

    def handle_queue(self, index: int) -> None:
        """Serve queue ``index``."""
        vq = self.queues[index]
        if vq is None:
            return
        mem = vq.mem
        upper = self.negotiated(ECHO_F_UPPER)

        def echo(chain: DescriptorChain) -> int:
            data = chain.read_all(mem, chain.writable_len)
            if data == BUMP:
                self.bump()
            elif data == CRASH:
                raise RuntimeError("device model bug (test)")
            return chain.write_all(mem, data.upper() if upper else data)

        self.run_queue(index, echo)


class FlappingEchoDevice(EchoDevice):
    """An echo device whose configuration changes while the driver reads it: each of
    the first ``flaps`` reads of the configuration space changes it."""

    def __init__(self, flaps: int = 3, **kw: Any) -> None:
        super().__init__(**kw)
        self.flaps = flaps
        self.config_reads = 0

    def config_bytes(self) -> bytes:
        """Change the configuration on the first ``flaps`` reads."""
        self.config_reads += 1
        data = super().config_bytes()
        if self.flaps > 0:
            self.flaps -= 1
            self.bump()
        return data


class EchoDriver(VirtioDriver):
    """Driver of :class:`EchoDevice`: ``echo(data)`` and a batch API."""

    device_id = DeviceId.RESERVED

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
        """Every completed request of ``queue``: (token, echoed bytes)."""
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
