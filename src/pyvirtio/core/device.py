"""The device model base class: what every pyvirtio device implements.

A :class:`VirtioDevice` is transport-neutral and does no I/O of its own: a transport
(loopback, PCI, MMIO, vhost-user) owns the device status, feature selection and queue
registers, creates the :class:`~pyvirtio.virtqueue.common.DeviceVirtqueue` objects and
calls the device's entry points; the device talks back through the
:class:`DeviceHost` the transport attached.

The contract between a transport and a device (the same on every transport):

- **Entry points.** A transport calls the device only through :meth:`~VirtioDevice.
  queue_notified` (an available buffer notification), :meth:`~VirtioDevice.host_event`
  (a descriptor the device declared in :attr:`~VirtioDevice.events` is readable),
  :meth:`~VirtioDevice.run_timers`, and :meth:`~VirtioDevice.guarded` around the
  lifecycle hooks and configuration writes. Each takes :attr:`~VirtioDevice.lock`
  (transports that call from two threads, like the in-process ones, are serialized)
  and runs inside the one failure path (:meth:`~VirtioDevice.fail`).
- **Lifecycle.** :meth:`~VirtioDevice.activate` is called once per life of the device:
  at DRIVER_OK (PCI, MMIO, both loopbacks) or, on vhost-user, which has no DRIVER_OK
  unless VHOST_USER_PROTOCOL_F_STATUS is used, when the first ring of a feature set
  starts. The life ends with :meth:`~VirtioDevice.reset`. Within a life queues may
  come and go (a virtqueue reset, a vhost-user ring stopped and started again): the
  transport calls :meth:`~VirtioDevice.attach_queue` / :meth:`~VirtioDevice.
  detach_queue`, which call the :meth:`~VirtioDevice.queue_started` /
  :meth:`~VirtioDevice.queue_stopped` hooks. Before guest memory is replaced or a ring
  stops the transport calls :meth:`~VirtioDevice.quiesce`: host I/O still touching
  guest memory finishes first.
- **Held buffers.** A device may pop a chain and keep it (a receive buffer waiting for
  a frame, a request waiting for its I/O) and push it later with
  :meth:`~VirtioDevice.complete`, from any entry point; used elements are published
  (and the driver notified) once per entry point, and in order when VIRTIO_F_IN_ORDER
  was negotiated (the rings keep a reorder buffer). A chain it cannot use yet goes
  back with :meth:`~VirtioDevice.unpop` and is the next one popped from that queue.
- **Failure.** Any exception a device model raises becomes a logged traceback, a
  :class:`~pyvirtio.errors.DeviceError`, DEVICE_NEEDS_RESET and a configuration change
  notification where the transport can send one (virtio-v1.2 §2.1.2); a
  :class:`~pyvirtio.errors.DriverError` (the driver broke a rule) does the same
  without the traceback. Nothing escapes into the transport's loop.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Protocol, TypeVar

from pyvirtio.core.events import HostEvents
from pyvirtio.errors import DeviceError, DriverError, QueueBrokenError, VirtioError
from pyvirtio.spec.features import Feature
from pyvirtio.virtqueue.common import DescriptorChain, DeviceVirtqueue

__all__ = [
    "HOLD",
    "RING_FEATURES",
    "UNPOP",
    "DeviceHost",
    "DeviceMetrics",
    "VirtioDevice",
    "strip_traceback",
]

_log = logging.getLogger(__name__)

R = TypeVar("R")

#: Ring and transport features every pyvirtio device implements end to end
#: (virtio-v1.2 §6): both ring formats, indirect descriptors, event idx, in-order.
RING_FEATURES = (
    Feature.VERSION_1.mask
    | Feature.INDIRECT_DESC.mask
    | Feature.EVENT_IDX.mask
    | Feature.RING_PACKED.mask
    | Feature.IN_ORDER.mask
)

#: A :meth:`VirtioDevice.run_queue` handler's answer: the device keeps the chain and
#: completes it later with :meth:`VirtioDevice.complete`.
HOLD: Final = -1
#: A :meth:`VirtioDevice.run_queue` handler's answer: the chain cannot be used yet; it
#: goes back (:meth:`VirtioDevice.unpop`) and the round stops, notifications enabled.
UNPOP: Final = -2

_C_NEEDS_RESET = 'virtio-v1.2 §2.1.2 "Device Requirements: Device Status Field"'


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


def strip_traceback(err: BaseException) -> BaseException:
    """Drop the traceback and chained exceptions of ``err`` (returned as is).

    An error kept as a reason (DEVICE_NEEDS_RESET, a broken queue) must not keep the
    frames it was raised through alive: they reference queues whose views pin the
    guest RAM mapping and its file descriptor until the cyclic collector runs.
    """
    err.__traceback__ = None
    err.__cause__ = None
    err.__context__ = None
    return err


class VirtioDevice(ABC):
    """Base of every device model (the device's point of view).

    Subclasses set :attr:`device_id`, offer their device-specific feature bits in
    :meth:`specific_features`, lay out their configuration space in
    :meth:`config_bytes` and serve requests in :meth:`handle_queue` (usually via
    :meth:`run_queue`). See the module docs for the contract with transports.
    """

    device_id: ClassVar[int]
    #: a vhost-user back-end offers VHOST_USER_PROTOCOL_F_CONFIG for this device
    #: (False where the front-end emulates the configuration space itself)
    config_over_vhost_user: bool = True

    def __init__(self, num_queues: int, queue_max_size: int = 256) -> None:
        self.num_queues = num_queues
        self.queue_max_size = queue_max_size
        self.host: DeviceHost | None = None
        #: features the driver accepted (valid once FEATURES_OK was set)
        self.features = 0
        self.queues: list[DeviceVirtqueue | None] = [None] * num_queues
        self.metrics = DeviceMetrics()
        #: host-side descriptors and timers the transport watches for this device
        self.events = HostEvents()
        #: held by every entry point (transports may call from two threads)
        self.lock = threading.RLock()
        #: True between :meth:`activate` and :meth:`reset`
        self.active = False
        #: queues the transport started but disabled (a vhost-user front-end's
        #: SET_VRING_ENABLE 0): the device must use them "without causing any side
        #: effects" - a network device supplies no received frame to them
        self.disabled_queues: set[int] = set()
        self._deferred: dict[int, deque[DescriptorChain]] = {}
        self._dirty: set[int] = set()
        self._depth = 0

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
        """The device goes live with ``features`` and ``queues`` (once per life: see
        the module docs). Subclasses extend it and call ``super().activate``."""
        self.features = features
        self.queues = list(queues)
        self._deferred.clear()
        self._dirty.clear()
        self.active = True

    def reset(self) -> None:
        """Device reset (virtio-v1.2 §2.4): forget features, queues and requests.

        Subclasses extend it (finish host I/O first: after a reset the device "MUST
        NOT send notifications or interact with the queues") and call
        ``super().reset``.
        """
        self.features = 0
        self.queues = [None] * self.num_queues
        self._deferred.clear()
        self._dirty.clear()
        self.active = False

    def close(self) -> None:
        """Release the device's host resources (backend, threads); the device is not
        used afterwards. The default has none."""

    def quiesce(self) -> None:
        """Finish host I/O in flight that touches guest memory, pushing its results.

        Called by transports before guest memory is replaced or a ring stops. Held
        buffers that wait for host input (not for I/O already started) stay held.
        The default has nothing in flight.
        """

    def queue_started(self, index: int) -> None:
        """Hook: queue ``index`` went live after :meth:`activate` (re-enabled after a
        virtqueue reset, a vhost-user ring started again)."""

    def queue_stopped(self, index: int) -> None:
        """Hook: queue ``index`` stopped within a life; chains the device held for it
        are gone (a later :meth:`complete` of one is ignored)."""

    def attach_queue(self, index: int, vq: DeviceVirtqueue) -> None:
        """Transport: queue ``index`` is live as ``vq`` (calls :meth:`queue_started`
        when the device is already active)."""
        self.queues[index] = vq
        self._deferred.pop(index, None)
        if self.active:
            self.queue_started(index)

    def detach_queue(self, index: int) -> None:
        """Transport: queue ``index`` is gone (calls :meth:`queue_stopped`)."""
        if not 0 <= index < len(self.queues):
            return
        had = self.queues[index] is not None
        self.queues[index] = None
        self._deferred.pop(index, None)
        self._dirty.discard(index)
        if had and self.active:
            self.queue_stopped(index)

    @abstractmethod
    def handle_queue(self, index: int) -> None:
        """An available buffer notification arrived for queue ``index``."""

    # -- entry points (what transports call) ---------------------------------

    def guarded(self, what: str, fn: Callable[..., R], *args: Any) -> R | None:
        """Run ``fn(*args)`` as a device entry point: under :attr:`lock`, inside the
        failure path, publishing the used elements completed meanwhile. Returns what
        ``fn`` returned, or None if it failed (see :meth:`fail`)."""
        with self.lock:
            self._depth += 1
            try:
                return fn(*args)
            except Exception as e:
                self.fail(e, what)
                return None
            finally:
                self._depth -= 1
                if self._dirty and not self._depth:
                    self._flush_dirty()

    def queue_notified(self, index: int) -> None:
        """Transport: an available buffer notification for queue ``index``."""
        self.guarded(f"queue {index}", self.handle_queue, index)

    def host_event(self, fd: int) -> None:
        """Transport: host descriptor ``fd`` (declared in :attr:`events`) is readable."""
        callback = self.events.reader(fd)
        if callback is not None:
            self.guarded(f"host event on fd {fd}", callback)

    def run_timers(self, now: float | None = None) -> int:
        """Transport: run every timer of :attr:`events` that is due; returns how many."""
        due = self.events.pop_due(now)
        for callback in due:
            self.guarded("timer", callback)
        return len(due)

    def fail(self, exc: BaseException, what: str) -> None:
        """The one failure path: turn ``exc``, raised by the device model in ``what``,
        into DEVICE_NEEDS_RESET.

        A :class:`~pyvirtio.errors.DriverError` (the driver broke a rule; the queue
        concerned is already stopped) is the reason as is. Any other exception is a
        bug of the device model: its traceback is logged, every live queue stops and
        the reason is a :class:`~pyvirtio.errors.DeviceError` (virtio-v1.2 §2.1.2:
        DEVICE_NEEDS_RESET "indicates that the device has experienced an error from
        which it can't recover"). The host then sets DEVICE_NEEDS_RESET and sends a
        configuration change notification ("If DRIVER_OK is set, after it sets
        DEVICE_NEEDS_RESET, the device MUST send a device configuration change
        notification to the driver"). A :class:`~pyvirtio.errors.QueueBrokenError`
        (work for a queue that is already stopped) only counts.
        """
        if isinstance(exc, QueueBrokenError):
            self.metrics.error("broken_queue")
            strip_traceback(exc)
            return
        reason: VirtioError
        if isinstance(exc, DriverError):
            self.metrics.error("driver_error")
            reason = exc
        elif isinstance(exc, VirtioError):
            self.metrics.error("device_error")
            _log.warning("%s: %s failed: %s", type(self).__name__, what, exc)
            reason = exc
        else:
            self.metrics.error("device_error")
            _log.error("%s: device model failed in %s", type(self).__name__, what, exc_info=exc)
            reason = DeviceError(f"{type(self).__name__} failed in {what}: {exc!r}", _C_NEEDS_RESET)
        strip_traceback(exc)
        strip_traceback(reason)
        if not isinstance(exc, DriverError):
            for vq in self.queues:
                if vq is not None and vq.broken_reason is None:
                    vq.broken_reason = reason
        if self.host is not None:
            self.host.needs_reset(reason)

    # -- serving queues (helpers for subclasses) ------------------------------

    def _live(self, index: int) -> DeviceVirtqueue | None:
        vq = self.queues[index] if 0 <= index < len(self.queues) else None
        return None if vq is None or vq.broken else vq

    def pop(self, index: int) -> DescriptorChain | None:
        """Next chain of queue ``index``: one given back with :meth:`unpop` first,
        then the ring's (validated; a violation raises
        :class:`~pyvirtio.errors.DriverError`). None if there is none."""
        back = self._deferred.get(index)
        if back:
            return back.popleft()
        vq = self._live(index)
        return None if vq is None else vq.pop()

    def unpop(self, index: int, chain: DescriptorChain) -> None:
        """Give ``chain`` back: the next :meth:`pop` of queue ``index`` returns it
        (before any chain popped after it). The ring keeps counting it in flight, so
        the driver sees nothing; a vhost-user inflight area keeps it too."""
        self._deferred.setdefault(index, deque()).appendleft(chain)

    def complete(self, vq: DeviceVirtqueue, chain: DescriptorChain, written: int) -> bool:
        """Return a held ``chain`` of ``vq`` with ``written`` bytes written.

        Published at the end of the current entry point (or now, outside one). A
        completion for a queue that stopped, was reset or broke since the chain was
        popped is dropped and counted (``stale_completion``); returns False then.
        """
        index = vq.index
        if vq.broken or not 0 <= index < len(self.queues) or self.queues[index] is not vq:
            self.metrics.error("stale_completion")
            return False
        vq.push(chain, written)
        self._dirty.add(index)
        if not self._depth:
            self._flush_dirty()
        return True

    def flush_queue(self, index: int) -> None:
        """Publish the used elements pushed on queue ``index``; notify if wanted."""
        self._dirty.discard(index)
        vq = self._live(index)
        if vq is not None and vq.flush() and self.host is not None:
            self.metrics.notifications += 1
            self.host.notify_used(index)

    def _flush_dirty(self) -> None:
        dirty = self._dirty
        while dirty:
            index = dirty.pop()
            try:
                self.flush_queue(index)
            except VirtioError as e:  # pragma: no cover - a queue broken meanwhile
                self.fail(e, f"queue {index} flush")

    def run_queue(
        self, index: int, handler: Callable[[DescriptorChain], int], budget: int = 1 << 30
    ) -> int:
        """Serve queue ``index``: pop each chain and let ``handler`` answer it.

        ``handler`` returns the bytes written (the chain is pushed now), :data:`HOLD`
        (the device keeps it and calls :meth:`complete` later) or :data:`UNPOP` (it
        cannot be used yet: it goes back and the round stops with notifications
        enabled; the device serves the queue again when it can, e.g. from a host
        event). Used elements are published in one batch per round; notification
        suppression follows the usual pattern: disable available buffer notifications
        while draining, re-enable, and re-check so no buffer is missed.

        A driver violation (the ring's, or one the handler raises) publishes the
        answers already given on a ring that is still sound, stops the queue and sets
        DEVICE_NEEDS_RESET; any other exception goes to :meth:`fail`. Never raises.
        Returns how many chains were answered or held.
        """
        vq = self._live(index)
        if vq is None:
            return 0
        served = 0
        deferred = self._deferred
        pop = vq.pop
        push = vq.push
        try:
            while True:
                vq.set_notification(False)
                stalled = False
                while served < budget:
                    back = deferred.get(index) if deferred else None
                    chain = back.popleft() if back else pop()
                    if chain is None:
                        break
                    written = handler(chain)
                    if written == UNPOP:
                        self.unpop(index, chain)
                        stalled = True
                        break
                    if written != HOLD:
                        push(chain, written)
                    served += 1
                self.flush_queue(index)
                if stalled:
                    vq.set_notification(True)
                    break
                if served >= budget or not vq.enable_notification():
                    break
        except DriverError as e:
            if vq.broken_reason is not None:
                self.metrics.error("ring")  # the ring's own rules (it stopped itself)
            else:
                # a rule of the device type was broken (the ring is sound): publish the
                # answers already given, then stop the queue
                try:
                    self.flush_queue(index)
                finally:
                    vq.broken_reason = strip_traceback(e)  # type: ignore[assignment]
            self.fail(e, f"queue {index}")
        except Exception as e:
            self.fail(e, f"queue {index}")
        self.metrics.requests += served
        return served
