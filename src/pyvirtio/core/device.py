"""The device model base class: what every pyvirtio device implements.

A :class:`VirtioDevice` is transport-neutral and does no I/O of its own: a transport
(loopback, PCI, MMIO, vhost-user) owns the device status, feature selection and queue
registers, creates the :class:`~pyvirtio.virtqueue.common.DeviceVirtqueue` objects
and calls :meth:`VirtioDevice.activate` and :meth:`VirtioDevice.handle_queue`; the
device talks back through the :class:`DeviceHost` the transport attached.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from pyvirtio.errors import DeviceError, DriverError, VirtioError
from pyvirtio.spec.features import Feature
from pyvirtio.spec.ids import DeviceId
from pyvirtio.virtqueue.common import DescriptorChain, DeviceVirtqueue

#: Ring and transport features every pyvirtio device implements end to end
#: (virtio-v1.2 §6): both ring formats, indirect descriptors, event idx, in-order.
RING_FEATURES = (
    Feature.VERSION_1.mask
    | Feature.INDIRECT_DESC.mask
    | Feature.EVENT_IDX.mask
    | Feature.RING_PACKED.mask
    | Feature.IN_ORDER.mask
)


class DeviceHost(Protocol):
    """What a transport offers the device it carries."""

    def notify_used(self, queue_index: int) -> None:
        """Send a used buffer notification for queue ``queue_index`` (an interrupt)."""

    def notify_config(self) -> None:
        """Send a configuration change notification."""

    def needs_reset(self, reason: VirtioError) -> None:
        """Set DEVICE_NEEDS_RESET (virtio-v1.2 §2.1.2) and notify the driver."""


@dataclass
class DeviceMetrics:
    """Counters a user can read to see what a device did (Firecracker-style)."""

    requests: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    notifications: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        """Count one error of ``kind``."""
        self.errors[kind] = self.errors.get(kind, 0) + 1


class VirtioDevice(ABC):
    """Base of every device model (the device's point of view).

    Subclasses set :attr:`device_id`, offer their device-specific feature bits in
    :meth:`specific_features`, lay out their configuration space in
    :meth:`config_bytes` and serve requests in :meth:`handle_queue` (usually via
    :meth:`run_queue`).
    """

    device_id: ClassVar[DeviceId]

    def __init__(self, num_queues: int, queue_max_size: int = 256) -> None:
        self.num_queues = num_queues
        self.queue_max_size = queue_max_size
        self.host: DeviceHost | None = None
        #: features the driver accepted (valid once FEATURES_OK was set)
        self.features = 0
        self.queues: list[DeviceVirtqueue | None] = [None] * num_queues
        self.metrics = DeviceMetrics()

    # -- feature negotiation (virtio-v1.2 §2.2) ------------------------------

    def device_features(self) -> int:
        """Every feature bit offered: ring features plus the device's own."""
        return RING_FEATURES | self.specific_features()

    @abstractmethod
    def specific_features(self) -> int:
        """Device-type feature bits this model offers (implemented end to end)."""

    def validate_features(self, features: int) -> bool:
        """Accept or refuse the driver's feature set at FEATURES_OK time.

        The transport already checked ``features`` is a subset of what was offered.
        """
        return True

    def negotiated(self, bit: int) -> bool:
        """True if feature bit number ``bit`` was negotiated."""
        return bool(self.features >> bit & 1)

    # -- device configuration space (virtio-v1.2 §2.5) -----------------------

    @abstractmethod
    def config_bytes(self) -> bytes:
        """The device configuration space as it reads now."""

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to the configuration space; read-only fields ignore it."""

    def config_changed(self) -> None:
        """Tell the driver the configuration changed (the transport bumps the
        configuration generation and sends a configuration change notification)."""
        if self.host is not None:
            self.host.notify_config()

    # -- lifecycle -------------------------------------------------------------

    def activate(self, features: int, queues: Sequence[DeviceVirtqueue | None]) -> None:
        """DRIVER_OK: the driver accepted ``features`` and set up ``queues``."""
        self.features = features
        self.queues = list(queues)

    def reset(self) -> None:
        """Device reset (virtio-v1.2 §2.4): forget features, queues and requests."""
        self.features = 0
        self.queues = [None] * self.num_queues

    @abstractmethod
    def handle_queue(self, index: int) -> None:
        """An available buffer notification arrived for queue ``index``."""

    # -- helpers for subclasses -------------------------------------------------

    def run_queue(
        self, index: int, handler: Callable[[DescriptorChain], int], budget: int = 1 << 30
    ) -> int:
        """Serve queue ``index``: pop each chain, ``handler`` returns bytes written,
        push it; flush used elements in batches and notify when the driver wants.

        Notification suppression follows the usual pattern: disable available buffer
        notifications while draining, re-enable, and re-check so no buffer is missed.
        A driver violation marks the device DEVICE_NEEDS_RESET instead of raising.
        Returns how many chains were served.
        """
        vq = self.queues[index] if 0 <= index < len(self.queues) else None
        if vq is None or vq.broken:
            return 0
        served = 0
        try:
            while True:
                vq.set_notification(False)
                while served < budget:
                    chain = vq.pop()
                    if chain is None:
                        break
                    written = handler(chain)
                    vq.push(chain, written)
                    served += 1
                    self.metrics.requests += 1
                if vq.flush() and self.host is not None:
                    self.metrics.notifications += 1
                    self.host.notify_used(index)
                if served >= budget or not vq.enable_notification():
                    break
        except DriverError as e:
            self.metrics.error("driver_error")
            if self.host is not None:
                self.host.needs_reset(e)
        except Exception as e:
            # The device broke its own contract (e.g. pushed more than the chain holds):
            # stop the queue and ask for a reset rather than crash the process that
            # serves it (virtio-v1.2 §2.1.2: DEVICE_NEEDS_RESET "indicates that the
            # device has experienced an error from which it can't recover").
            self.metrics.error("device_error")
            err = DeviceError(f"device model failed on queue {index}: {e!r}")
            vq.broken_reason = vq.broken_reason or err
            if self.host is not None:
                self.host.needs_reset(err)
        return served
