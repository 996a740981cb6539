"""The entropy device (virtio-rng), device side. virtio-v1.2 §5.4 "Entropy Device".

Device ID 4, one virtqueue (0, ``requestq``), no feature bits, no configuration
space (virtio-v1.2 §5.4.1-§5.4.4). The driver makes device-writable buffers
available; the device fills them with random bytes from its
:class:`~pyvirtio.devices.rng.backend.EntropySource` and returns them
(virtio-v1.2 §5.4.6 "Device Operation": "It will be completely filled by random data
by the device").

Rules enforced here:

- virtio-v1.2 §5.4.6.1 "Driver Requirements: Device Operation": the driver MUST NOT
  place device-readable buffers in the queue. A chain with a device-readable part (or
  with no device-writable byte at all) is a driver error: the queue is marked broken
  and the device sets DEVICE_NEEDS_RESET.
- virtio-v1.2 §5.4.6.2 "Device Requirements: Device Operation": the device MUST place
  one or more random bytes into the buffer (it MAY use less than the whole length).
  pyvirtio fills every buffer completely, in chunks of at most :data:`CHUNK_SIZE`
  bytes (the only host allocation, whatever size the guest asks for). If the source
  has nothing at all to give, the request is kept waiting (never answered with zero
  bytes) and served at the next :meth:`RngDevice.handle_queue` or
  :meth:`RngDevice.retry`.
"""

from __future__ import annotations

from pyvirtio.core.device import UNPOP, VirtioDevice
from pyvirtio.devices.rng.backend import EntropySource, OsRandomSource
from pyvirtio.errors import ConfigurationError, DriverError, GuestMemoryError
from pyvirtio.spec.ids import DeviceId
from pyvirtio.virtqueue.common import DescriptorChain, DeviceVirtqueue

__all__ = ["CHUNK_SIZE", "REQUESTQ", "RngDevice"]

#: Index of the only virtqueue, ``requestq`` (virtio-v1.2 §5.4.2 "Virtqueues").
REQUESTQ = 0

#: Largest piece asked of the entropy source at once: the cap on host memory used per
#: request, however large the guest's buffer is.
CHUNK_SIZE = 64 * 1024

#: Largest used length a used element can carry (``len`` is le32).
_MAX_USED_LEN = 0xFFFF_FFFF

_CLAUSE_DRIVER = 'virtio-v1.2 §5.4.6.1 "Driver Requirements: Device Operation"'


class RngDevice(VirtioDevice):
    """A virtio entropy device serving ``requestq`` from an :class:`EntropySource`.

    ``source`` defaults to :class:`~pyvirtio.devices.rng.backend.OsRandomSource`.
    ``owns_source`` makes :meth:`close` close the source. ``max_request_bytes``
    (optional) caps how many bytes one buffer receives (the spec
    lets the device "use less than the entire buffer length"); ``None`` fills each
    buffer completely. ``chunk_size`` caps each read from the source.

    Metrics (:attr:`metrics`): ``requests`` buffers answered, ``bytes_written`` random
    bytes placed in guest memory, ``errors`` by kind: ``readable_buffer``,
    ``empty_buffer``, ``bad_buffer`` (outside guest RAM), ``ring`` (a ring rule
    broken), ``source_dry`` (the source had nothing), ``source_error`` (it raised
    :class:`OSError`), ``bad_queue`` (a notification for a queue that does not exist).
    """

    device_id = DeviceId.ENTROPY

    def __init__(
        self,
        source: EntropySource | None = None,
        *,
        queue_max_size: int = 256,
        max_request_bytes: int | None = None,
        chunk_size: int = CHUNK_SIZE,
        owns_source: bool = False,
    ) -> None:
        super().__init__(num_queues=1, queue_max_size=queue_max_size)
        if chunk_size <= 0:
            raise ConfigurationError("chunk_size must be positive")
        if max_request_bytes is not None and max_request_bytes <= 0:
            raise ConfigurationError("max_request_bytes must be positive (or None)")
        self.source: EntropySource = source if source is not None else OsRandomSource()
        self.max_request_bytes = max_request_bytes
        self.chunk_size = chunk_size
        self._owns_source = owns_source

    # -- VirtioDevice hooks -----------------------------------------------------

    def specific_features(self) -> int:
        """No device-specific feature bits (virtio-v1.2 §5.4.3 "Feature bits")."""
        return 0

    def config_bytes(self) -> bytes:
        """Empty: "None currently defined" (virtio-v1.2 §5.4.4)."""
        return b""

    def close(self) -> None:
        """Close the entropy source if the device owns it (``owns_source``)."""
        close = getattr(self.source, "close", None)
        if self._owns_source and close is not None:
            close()

    def handle_queue(self, index: int) -> None:
        """An available buffer notification: fill every available buffer."""
        if index != REQUESTQ:
            self.metrics.error("bad_queue")
            return
        self._serve()

    # -- operation ----------------------------------------------------------------

    @property
    def waiting(self) -> bool:
        """True if a request is waiting for the source to produce bytes."""
        return bool(self._deferred.get(REQUESTQ))

    def retry(self) -> int:
        """Serve again after the source ran dry (e.g. new entropy arrived).

        Returns how many buffers were answered.
        """
        return self.guarded("retry", self._serve) or 0

    def _serve(self) -> int:
        return self.run_queue(REQUESTQ, self._answer)

    def _answer(self, chain: DescriptorChain) -> int:
        """Fill one request; :data:`~pyvirtio.core.device.UNPOP` if the source is dry."""
        vq = self.queues[REQUESTQ]
        assert vq is not None  # run_queue serves live queues only
        if chain.readable:
            self.metrics.error("readable_buffer")
            raise DriverError(
                f"requestq buffer {chain.id} has a device-readable part "
                f"({chain.readable_len} bytes): the driver MUST NOT place "
                "device-readable buffers into the queue",
                _CLAUSE_DRIVER,
            )
        if chain.writable_len == 0:
            self.metrics.error("empty_buffer")
            raise DriverError(
                f"requestq buffer {chain.id} has no device-writable byte, so the device "
                "cannot place the one or more random bytes it must",
                'virtio-v1.2 §5.4.6.2 "Device Requirements: Device Operation"',
            )
        written = self._fill(vq, chain)
        if written == 0:
            # "MUST place one or more random bytes": keep it waiting (the next pop of
            # requestq hands it out again; a kick or retry() serves it)
            return UNPOP
        self.metrics.bytes_written += written
        return written

    def _fill(self, vq: DeviceVirtqueue, chain: DescriptorChain) -> int:
        """Write random bytes over the chain's writable segments; return the count.

        virtio-v1.2 §5.4.6.2: "The device MUST place one or more random bytes into the
        buffer"; the buffer is filled completely unless the source runs dry or
        ``max_request_bytes`` stops it. Returns 0 only if no byte could be produced.
        """
        # the used length is a le32: a chain of exactly 2^32 writable bytes (allowed,
        # virtio-v1.2 §2.7.5.2) gets one byte less, which "MAY use less" permits
        limit = min(chain.writable_len, _MAX_USED_LEN)
        if self.max_request_bytes is not None:
            limit = min(limit, self.max_request_bytes)
        mem = vq.mem
        total = 0
        try:
            for addr, length in chain.writable:
                off = 0
                while off < length and total < limit:
                    want = min(self.chunk_size, length - off, limit - total)
                    data = self._read_source(want)
                    if not data:
                        return total
                    mem.write(addr + off, data)
                    off += len(data)
                    total += len(data)
                if total >= limit:
                    break
        except GuestMemoryError as e:
            self.metrics.error("bad_buffer")
            raise DriverError(
                f"requestq buffer {chain.id} lies outside guest RAM: {e.message}",
                'virtio-v1.2 §2.7.5 "The Virtqueue Descriptor Table"',
            ) from e
        return total

    def _read_source(self, n: int) -> bytes:
        try:
            data = self.source.read(n)
        except OSError:
            self.metrics.error("source_error")
            return b""
        if not data:
            self.metrics.error("source_dry")
            return b""
        return data[:n] if len(data) > n else data
