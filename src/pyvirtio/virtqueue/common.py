"""What split and packed virtqueues share: the API both ring formats implement.

Split (virtio-v1.2 §2.7) and packed (§2.8) rings expose the same method names on
each side, as Linux's ``virtqueue_*`` API does over its ``*_split``/``*_packed``
families:

- device side, :class:`DeviceVirtqueue`: ``pop`` an available chain, ``push`` its used
  element, ``flush`` to publish a batch (answering whether to send a used buffer
  notification), ``set_notification``/``enable_notification`` for available buffer
  notification suppression.
- driver side, :class:`DriverVirtqueue`: ``add`` a chain with a token, ``kick_prepare``
  (should the device be notified?), ``get_used``, ``enable_interrupts`` /
  ``disable_interrupts``, ``detach_unused``.

Both sides treat the peer as untrusted: a violation marks the queue broken and raises
(:class:`~pyvirtio.errors.DriverError` on the device side, which the device answers
with ``DEVICE_NEEDS_RESET``; :class:`~pyvirtio.errors.DeviceError` on the driver side,
which the caller sees as an I/O error). A broken queue refuses further use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pyvirtio.errors import DeviceError, DriverError, QueueBrokenError, VirtioError
from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.features import Feature, has

T = TypeVar("T")

#: A buffer as the ring sees it: (guest-physical address, length in bytes).
Segment = tuple[int, int]

#: Upper bound on the entries of one indirect table a device will walk. The table's
#: own length bounds it too; this keeps a hostile driver from making us walk 2^28
#: entries. Linux never builds tables larger than the queue size it negotiated.
MAX_INDIRECT_ENTRIES = 32768


def check_segments(segs: Sequence[Segment]) -> int:
    """Total length of a driver's ``segs``, each checked to fit one descriptor.

    A descriptor holds a 64-bit address and a 32-bit length (virtio-v1.2 §2.7.5, §2.8.13);
    a segment that does not fit is the caller's mistake: :class:`ValueError`.
    """
    total = 0
    for addr, n in segs:
        if not 0 <= n <= 0xFFFFFFFF or addr < 0:
            raise ValueError(f"segment {addr:#x}+{n:#x} does not fit a descriptor")
        total += n
    return total


#: The largest length a used element can carry: ``virtq_used_elem.len`` and the packed
#: Element Length are le32. A chain may be 2^32 bytes long ("Drivers MUST NOT add a
#: descriptor chain longer than 2^32 bytes in total"), so a device can never report
#: having written all of such a chain; ``push`` refuses a larger ``written``.
USED_LEN_MAX = 0xFFFFFFFF


@dataclass(frozen=True)
class QueueAddresses:
    """Guest-physical addresses of the three areas of a virtqueue (virtio-v1.2 §2.6).

    Split ring: Descriptor Table, Available Ring, Used Ring. Packed ring: Descriptor
    Ring, Driver Event Suppression, Device Event Suppression.
    """

    desc: int
    driver: int
    device: int


@dataclass(frozen=True)
class RingFeatures:
    """The negotiated ring features a virtqueue honours."""

    indirect: bool = False
    event_idx: bool = False
    in_order: bool = False

    @classmethod
    def from_features(cls, features: int) -> RingFeatures:
        """Pick VIRTIO_F_INDIRECT_DESC, VIRTIO_F_EVENT_IDX and VIRTIO_F_IN_ORDER."""
        return cls(
            indirect=has(features, Feature.INDIRECT_DESC),
            event_idx=has(features, Feature.EVENT_IDX),
            in_order=has(features, Feature.IN_ORDER),
        )


@dataclass(frozen=True)
class QueueState:
    """Ring position needed to stop and resume a queue (vhost-user ``SET_VRING_BASE``).

    Split: ``avail_idx`` is the next available-ring index to read and ``used_idx`` the
    next used-ring index to write; wrap counters are unused. Packed: indexes are ring
    positions (0..size-1) and the wrap counters are those of virtio-v1.2 §2.8.1.
    """

    avail_idx: int = 0
    used_idx: int = 0
    avail_wrap: bool = True
    used_wrap: bool = True


@dataclass
class DescriptorChain:
    """One available buffer as the device sees it, after validation.

    ``id`` is the split-ring head index or the packed-ring Buffer ID; it is what goes
    into the used element. ``readable`` are the device-readable segments in order,
    ``writable`` the device-writable ones. ``ndescs`` is how many ring slots the chain
    occupies (a packed ring advances by it; an indirect chain counts the slots in the
    ring, not the table).
    """

    id: int
    readable: list[Segment] = field(default_factory=list)
    writable: list[Segment] = field(default_factory=list)
    ndescs: int = 1

    @property
    def readable_len(self) -> int:
        """Total bytes of the device-readable part."""
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        """Total bytes of the device-writable part."""
        return sum(n for _, n in self.writable)

    def read_all(self, mem: GuestMemory, limit: int | None = None) -> bytes:
        """Gather the device-readable part (at most ``limit`` bytes) into bytes."""
        out = bytearray()
        for addr, n in self.readable:
            if limit is not None:
                n = min(n, limit - len(out))
                if n <= 0:
                    break
            out += mem.read(addr, n)
        return bytes(out)

    def write_all(self, mem: GuestMemory, data: bytes | bytearray | memoryview) -> int:
        """Scatter ``data`` over the device-writable part; returns bytes written.

        Never writes outside the writable segments: extra data is dropped.
        """
        src = memoryview(data).cast("B")
        pos = 0
        for addr, n in self.writable:
            if pos >= len(src):
                break
            take = min(n, len(src) - pos)
            mem.write(addr, src[pos : pos + take])
            pos += take
        return pos


class DeviceVirtqueue(ABC):
    """The device's side of one virtqueue.

    Construction checks that the ring areas lie in guest RAM (raising
    :class:`~pyvirtio.errors.DriverError` if not), then the queue is live.
    """

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        addrs: QueueAddresses,
        features: RingFeatures = RingFeatures(),
        *,
        index: int = 0,
        state: QueueState | None = None,
    ) -> None:
        self.mem = mem
        self.size = size
        self.addrs = addrs
        self.features = features
        self.index = index
        #: why the queue is broken (None while healthy)
        self.broken_reason: VirtioError | None = None

    @property
    def broken(self) -> bool:
        """True once a driver violation stopped the queue."""
        return self.broken_reason is not None

    def _check_not_broken(self) -> None:
        if self.broken_reason is not None:
            raise QueueBrokenError(f"queue {self.index} is broken: {self.broken_reason}")

    def _fail(self, message: str, clause: str) -> DriverError:
        """Mark the queue broken by a driver violation; returns the error to raise."""
        err = DriverError(f"queue {self.index}: {message}", clause)
        self.broken_reason = err
        return err

    @abstractmethod
    def pop(self) -> DescriptorChain | None:
        """Take the next available chain, validated; ``None`` if there is none.

        Raises :class:`~pyvirtio.errors.DriverError` (and marks the queue broken) when
        the driver broke a rule of the ring.
        """

    @abstractmethod
    def push(self, chain: DescriptorChain, written: int) -> None:
        """Return ``chain`` to the driver with ``written`` bytes written to it.

        The used element is not visible to the driver until :meth:`flush`.
        """

    @abstractmethod
    def flush(self) -> bool:
        """Publish the pushed used elements; True if the driver wants a notification."""

    @abstractmethod
    def has_available(self) -> bool:
        """True if the driver has made a buffer available that :meth:`pop` would return."""

    @abstractmethod
    def set_notification(self, enable: bool) -> None:
        """Ask the driver to send (or not to send) available buffer notifications."""

    def enable_notification(self) -> bool:
        """Re-enable notifications; True if buffers arrived meanwhile (poll again)."""
        self.set_notification(True)
        return self.has_available()

    def adopt(self, chain: DescriptorChain) -> None:
        """Treat ``chain`` as popped and not yet pushed (resubmission after a restart).

        For a back-end that recovers the chains in flight from elsewhere (vhost-user
        inflight I/O tracking): the chain is then pushed like a popped one. With
        VIRTIO_F_IN_ORDER adopted chains come before anything popped later. Raises
        :class:`~pyvirtio.errors.DriverError` if its id is out of range or already in
        flight (the queue is not marked broken: the caller decides). The default
        raises :class:`NotImplementedError`: a ring that cannot take over chains.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot adopt chains")

    def driver_notified(self, next_off: int, next_wrap: int) -> DriverError | None:
        """The driver's VIRTIO_F_NOTIFICATION_DATA statement of how far it has
        published, from an available buffer notification (virtio-v1.2 §2.9 "Driver
        Notifications": ``next_off`` in bits 16-30, ``next_wrap`` bit 31).

        A ring records it and checks it against what the ring shows (the spec names
        this data a debugging aid: the device can tell "the amount of available data
        in the queue without accessing the virtqueue in memory"). An inconsistent
        statement is returned as a :class:`~pyvirtio.errors.DriverError` for the
        transport to log; the queue is not marked broken and keeps serving what the
        ring shows. The default (a ring that keeps no such record) accepts anything.
        """
        return None

    @abstractmethod
    def get_state(self) -> QueueState:
        """Ring position for a later resume (``GET_VRING_BASE``)."""

    @property
    @abstractmethod
    def in_flight(self) -> int:
        """Chains popped and not yet pushed."""


class DriverVirtqueue(ABC, Generic[T]):
    """The driver's side of one virtqueue, owning its ring memory.

    The constructor allocates the ring areas (and later indirect tables) from
    ``allocator``, zeroed, with the spec's alignments.

    ``add`` places a buffer (a list of device-readable and device-writable segments)
    with a caller's token; ``get_used`` returns ``(token, written_len)`` pairs.
    """

    def __init__(
        self,
        mem: GuestMemory,
        allocator: GuestAllocator,
        size: int,
        features: RingFeatures = RingFeatures(),
    ) -> None:
        self.mem = mem
        self.allocator = allocator
        self.size = size
        self.features = features
        self.broken_reason: VirtioError | None = None

    @property
    def broken(self) -> bool:
        """True once a device violation stopped the queue."""
        return self.broken_reason is not None

    def _check_not_broken(self) -> None:
        if self.broken_reason is not None:
            raise QueueBrokenError(f"virtqueue is broken: {self.broken_reason}")

    def _fail(self, message: str, clause: str) -> DeviceError:
        """Mark the queue broken by a device violation; returns the error to raise."""
        err = DeviceError(message, clause)
        self.broken_reason = err
        return err

    @property
    @abstractmethod
    def addrs(self) -> QueueAddresses:
        """Where the ring areas are, to be told to the device by the transport."""

    @property
    @abstractmethod
    def num_free(self) -> int:
        """Free descriptors (how many more segments ``add`` can place directly)."""

    @abstractmethod
    def add(self, out: Sequence[Segment], in_: Sequence[Segment], token: T) -> None:
        """Make a buffer available: ``out`` device-readable, ``in_`` device-writable.

        Raises :class:`~pyvirtio.errors.QueueFullError` when there is no room.
        """

    @abstractmethod
    def kick_prepare(self) -> bool:
        """Publish what was added; True if the device must be notified."""

    @abstractmethod
    def notification_data(self) -> int:
        """The 16 bits a VIRTIO_F_NOTIFICATION_DATA notification carries above the
        queue index, for the ring as published now (virtio-v1.2 §2.9 "Driver
        Notifications"): ``next_off`` in bits 0-14 and ``next_wrap`` in bit 15.

        Split ring: the available ``idx`` (its 15 low bits are ``next_off``, bit 15 is
        ``next_wrap``). Packed ring: the ring position of the next descriptor to be
        made available, with the Driver Ring Wrap Counter in bit 15.
        """

    @abstractmethod
    def get_used(self) -> tuple[T, int] | None:
        """Next used buffer as ``(token, written_len)``; ``None`` if none.

        Raises :class:`~pyvirtio.errors.DeviceError` (and marks the queue broken) on a
        device violation.
        """

    @abstractmethod
    def disable_interrupts(self) -> None:
        """Ask the device not to send used buffer notifications."""

    @abstractmethod
    def enable_interrupts(self) -> bool:
        """Ask for used buffer notifications again; True if used buffers are pending."""

    @abstractmethod
    def detach_unused(self) -> list[T]:
        """After a device reset: take back every in-flight token."""

    @abstractmethod
    def close(self) -> None:
        """Free the ring memory (the device must no longer use the queue)."""
