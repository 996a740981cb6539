"""The driver base class and the interface drivers use to reach any transport.

:class:`VirtioDriver` performs the driver's part of device initialization
(virtio-v1.2 §3.1.1 "Driver Requirements: Device Initialization") over any
:class:`DriverTransport`: loopback, PCI (modern or legacy), MMIO, or a vhost-user
front-end. Subclasses (``BlkDriver``, ``RngDriver`` ...) choose device-specific
features, read their configuration and issue requests on the queues.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, cast

from pyvirtio.errors import ConfigurationError, DeviceError, QueueBrokenError
from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.features import Feature, has
from pyvirtio.spec.ring import LEGACY_VRING_ALIGN
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.virtqueue import make_driver_queue
from pyvirtio.virtqueue.common import DriverVirtqueue, QueueAddresses

#: What :meth:`DriverTransport.poll_interrupts` reports for a configuration change
#: notification (queue interrupts are reported by queue index).
CONFIG_CHANGE = -1

#: Give up re-reading the configuration space after this many generation changes.
CONFIG_READ_RETRIES = 1000


class DriverTransport(Protocol):
    """How a driver reaches a device: the operations every transport provides.

    virtio-v1.2 §4 "Virtio Transport Options": each transport offers device status,
    feature bits, configuration space with a generation counter, virtqueue setup,
    driver notifications and used buffer / configuration change notifications.
    """

    #: the guest RAM the driver places rings and buffers in
    mem: GuestMemory
    #: the driver's allocator over that RAM
    allocator: GuestAllocator
    #: True when the device is driven through a legacy (0.9.5) interface
    legacy: bool

    def device_id(self) -> int:
        """The device type (0 if the transport cannot tell, e.g. vhost-user)."""
        ...

    def reset(self) -> None:
        """Reset the device and wait until the reset completed (status reads 0)."""
        ...

    def get_status(self) -> int:
        """Read the device status field."""
        ...

    def set_status(self, status: int) -> None:
        """Write the device status field."""
        ...

    def get_device_features(self) -> int:
        """Every feature bit the device offers."""
        ...

    def set_driver_features(self, features: int) -> None:
        """Write the feature bits the driver accepts."""
        ...

    def config_generation(self) -> int:
        """The configuration generation counter (0 where the transport has none)."""
        ...

    def read_config(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes of device configuration space at ``offset``."""
        ...

    def write_config(self, offset: int, data: bytes) -> None:
        """Write device configuration space."""
        ...

    def num_queues(self) -> int:
        """How many virtqueues the device has."""
        ...

    def queue_max_size(self, index: int) -> int:
        """The largest size queue ``index`` accepts (0: the queue does not exist)."""
        ...

    def setup_queue(self, index: int, size: int, addrs: QueueAddresses) -> None:
        """Tell the device the size and ring addresses of queue ``index``; enable it."""
        ...

    def notify(self, index: int) -> None:
        """Send an available buffer notification for queue ``index``."""
        ...

    def poll_interrupts(self, timeout: float | None) -> set[int]:
        """Wait up to ``timeout`` seconds (None: forever) for notifications from the
        device; return the queue indexes that had a used buffer notification, plus
        :data:`CONFIG_CHANGE` for a configuration change notification."""
        ...

    def interrupt_fds(self) -> list[int]:
        """File descriptors that become readable when :meth:`poll_interrupts` has
        something to report (for event loops); empty if interrupts are delivered
        synchronously inside :meth:`notify`."""
        ...

    def close(self) -> None:
        """Release the transport's resources."""
        ...


class NotificationDataTransport(DriverTransport, Protocol):
    """A transport that can carry VIRTIO_F_NOTIFICATION_DATA (virtio-v1.2 §2.9
    "Driver Notifications"): PCI modern (§4.1.5.2) and MMIO version 2 (§4.2.3.3).

    A transport says so with a true ``notification_data`` attribute; transports
    without the attribute (loopback, vhost-user, legacy interfaces) never have the
    feature accepted and only :meth:`DriverTransport.notify` is called on them.
    """

    #: True when :meth:`notify_data` can be used (the feature may be accepted)
    notification_data: bool

    def notify_data(self, index: int, data: int) -> None:
        """Send an available buffer notification for queue ``index`` carrying
        ``data`` (``next_off | next_wrap << 15``, from
        :meth:`~pyvirtio.virtqueue.common.DriverVirtqueue.notification_data`) above
        the queue index: the 32-bit ``index | data << 16``."""
        ...


def supports_notification_data(transport: DriverTransport) -> bool:
    """True if ``transport`` can send VIRTIO_F_NOTIFICATION_DATA notifications."""
    return not transport.legacy and bool(getattr(transport, "notification_data", False))


@dataclass(frozen=True)
class RingOptions:
    """Which virtqueue features a driver asks for, and how large its queues are.

    Each switch lets the driver accept one of the ring feature bits of virtio-v1.2
    §6 "Reserved Feature Bits" when the device offers it (a bit the device does not
    offer is never accepted):

    - ``packed``: VIRTIO_F_RING_PACKED (virtio-v1.2 §2.8 "Packed Virtqueues").
      ``None`` (the default): use the packed ring if offered, as Linux does;
      ``True``: require it (initialization fails with
      :class:`~pyvirtio.errors.ConfigurationError` if the device does not offer it);
      ``False``: always use the split ring. Never accepted through a legacy
      interface.
    - ``indirect``: VIRTIO_F_INDIRECT_DESC, indirect descriptor tables (virtio-v1.2
      §2.7.5.3 "Indirect Descriptors"; packed: §2.8.7 "Indirect Flag: Scatter-Gather
      Support").
    - ``event_idx``: VIRTIO_F_EVENT_IDX, notification suppression by ``used_event``
      and ``avail_event`` (virtio-v1.2 §2.7.7 "Used Buffer Notification
      Suppression", §2.7.10 "Available Buffer Notification Suppression"; packed:
      §2.8.10 "Driver and Device Event Suppression").
    - ``in_order``: VIRTIO_F_IN_ORDER, the device uses buffers in the order they were
      made available (virtio-v1.2 §2.7.9 "In-order use of descriptors"). Never
      accepted through a legacy interface.
    - ``queue_size``: the largest size each queue is set up with (``None``: the
      queue's maximum size as the device reports it); split rings round it down to
      a power of two.

    Pass one to a driver as ``ring=RingOptions(...)``.
    """

    packed: bool | None = None
    indirect: bool = True
    event_idx: bool = True
    in_order: bool = True
    queue_size: int | None = None


class VirtioDriver(ABC):
    """Base of every pyvirtio driver (the driver's point of view).

    Ring features are accepted when the device offers them, subject to ``ring``
    (:class:`RingOptions`: ``packed`` ``None`` means use the packed ring if offered,
    as Linux does). VIRTIO_F_NOTIFICATION_DATA is accepted when offered and the
    transport can send the data (:func:`supports_notification_data`); :meth:`kick`
    then sends it.
    """

    device_id: ClassVar[int]

    def __init__(self, transport: DriverTransport, *, ring: RingOptions = RingOptions()) -> None:
        self.transport = transport
        #: the ring features asked for and the queue size cap
        self.ring = ring
        #: the features both sides agreed on (valid after :meth:`initialize`)
        self.features = 0
        self.device_features = 0
        self.queues: list[DriverVirtqueue[Any]] = []
        self.config_changes = 0

    # -- hooks for subclasses ----------------------------------------------------

    @abstractmethod
    def specific_features(self, offered: int) -> int:
        """Pick the device-type feature bits to accept out of ``offered``."""

    def queue_count(self) -> int:
        """How many queues to set up (after features are negotiated)."""
        return self.transport.num_queues()

    def setup(self) -> None:
        """Read the configuration space after FEATURES_OK, before queues exist."""

    def on_config_change(self) -> None:
        """A configuration change notification arrived (configuration re-read here)."""

    # -- negotiation ------------------------------------------------------------

    def ring_features(self, offered: int) -> int:
        """The ring/transport feature bits this driver accepts out of ``offered``."""
        want = 0
        legacy = self.transport.legacy
        if has(offered, Feature.VERSION_1) and not legacy:
            # §6: "A driver MUST accept VIRTIO_F_VERSION_1 if it is offered."
            want |= Feature.VERSION_1.mask
        if self.ring.indirect:
            want |= Feature.INDIRECT_DESC.mask
        if self.ring.event_idx:
            want |= Feature.EVENT_IDX.mask
        if legacy:
            # §6.1: "if offered by the device transitional drivers MUST accept"
            # VIRTIO_F_ANY_LAYOUT (27)
            want |= Feature.ANY_LAYOUT.mask
        else:
            if self.ring.packed is not False:
                want |= Feature.RING_PACKED.mask
            if self.ring.in_order:
                want |= Feature.IN_ORDER.mask
            if supports_notification_data(self.transport):
                want |= Feature.NOTIFICATION_DATA.mask
        return offered & want

    def initialize(self) -> None:
        """Bring the device up: virtio-v1.2 §3.1.1 "Driver Requirements: Device
        Initialization" steps 1-8, in order.

        "The driver MUST follow this sequence to initialize a device": reset,
        ACKNOWLEDGE, DRIVER, read and write feature bits, FEATURES_OK and re-read it,
        device-specific setup (queues, configuration), DRIVER_OK.
        """
        t = self.transport
        did = t.device_id()
        if did and did != self.device_id:
            raise ConfigurationError(
                f"{type(self).__name__} drives device type {int(self.device_id)}, "
                f"the device is type {did}"
            )
        t.reset()  # 1
        status = DeviceStatus.ACKNOWLEDGE
        t.set_status(status)  # 2
        status |= DeviceStatus.DRIVER
        t.set_status(status)  # 3
        offered = t.get_device_features()  # 4
        self.device_features = offered
        if self.ring.packed and not has(offered, Feature.RING_PACKED):
            self._fail()
            raise ConfigurationError("packed ring requested but the device does not offer it")
        # §6.1 "Legacy Interface: Reserved Feature Bits": QEMU's legacy interface
        # offers bit 30 (UNUSED) to catch drivers that accept everything; it "SHOULD
        # NOT be negotiated" (never in ``want`` below), offering it is no error.
        features = self.ring_features(offered) | (self.specific_features(offered) & offered)
        t.set_driver_features(features)
        if not t.legacy:
            status |= DeviceStatus.FEATURES_OK
            t.set_status(status)  # 5
            # 6: "re-read device status to ensure the FEATURES_OK bit is still set:
            # otherwise, the device does not support our subset of features"
            if not t.get_status() & DeviceStatus.FEATURES_OK:
                self._fail()
                raise DeviceError(
                    "device did not accept our features (FEATURES_OK not set)",
                    'virtio-v1.2 §3.1.1 "Driver Requirements: Device Initialization"',
                )
        self.features = features
        try:
            self.setup()  # 7: device-specific setup
            self._setup_queues()
        except BaseException:
            self._fail()
            raise
        status |= DeviceStatus.DRIVER_OK
        t.set_status(status)  # 8

    def _setup_queues(self) -> None:
        t = self.transport
        n = self.queue_count()
        if n > t.num_queues():
            raise DeviceError(f"driver needs {n} queues, device has {t.num_queues()}")
        align = LEGACY_VRING_ALIGN if t.legacy else 0
        for i in range(n):
            qmax = t.queue_max_size(i)
            if qmax <= 0:
                raise DeviceError(f"queue {i} does not exist (size 0)")
            size = min(qmax, self.ring.queue_size or qmax)
            if not has(self.features, Feature.RING_PACKED):
                # split rings are a power of two: round down
                size = 1 << (size.bit_length() - 1)
            q = make_driver_queue(t.mem, t.allocator, size, self.features, legacy_align=align)
            self.queues.append(q)
            t.setup_queue(i, size, q.addrs)

    def _fail(self) -> None:
        # failing the device is best effort: the transport may be gone already
        with contextlib.suppress(Exception):
            self.transport.set_status(self.transport.get_status() | DeviceStatus.FAILED)

    # -- operation ---------------------------------------------------------------

    def has_feature(self, bit: int) -> bool:
        """True if feature bit number ``bit`` was negotiated."""
        return has(self.features, bit)

    def read_config(self, offset: int, size: int) -> bytes:
        """Read configuration space consistently (virtio-v1.2 §2.5.1 "Driver
        Requirements: Device Configuration Space": re-read until the configuration
        generation is the same before and after)."""
        t = self.transport
        for _ in range(CONFIG_READ_RETRIES):
            before = t.config_generation()
            data = t.read_config(offset, size)
            if t.config_generation() == before:
                return data
        raise DeviceError("configuration generation never settled")

    def kick(self, index: int) -> None:
        """Publish queue ``index`` and notify the device if it wants to be notified.

        With VIRTIO_F_NOTIFICATION_DATA negotiated the notification carries where
        the driver has published up to (virtio-v1.2 §2.9 "Driver Notifications").
        """
        q = self.queues[index]
        if q.kick_prepare():
            if has(self.features, Feature.NOTIFICATION_DATA):
                t = cast(NotificationDataTransport, self.transport)
                t.notify_data(index, q.notification_data())
            else:
                self.transport.notify(index)

    def wait(self, timeout: float | None = None) -> set[int]:
        """Wait for notifications; handle a configuration change; return queue indexes.

        Raises :class:`QueueBrokenError` if the device has set DEVICE_NEEDS_RESET.
        """
        fired = self.transport.poll_interrupts(timeout)
        if CONFIG_CHANGE in fired:
            fired.discard(CONFIG_CHANGE)
            self.config_changes += 1
            self.check_status()
            self.on_config_change()
        return fired

    def check_status(self) -> None:
        """Raise if the device signalled DEVICE_NEEDS_RESET (virtio-v1.2 §2.1.1)."""
        if self.transport.get_status() & DeviceStatus.DEVICE_NEEDS_RESET:
            err = DeviceError("device needs reset (DEVICE_NEEDS_RESET)")
            for q in self.queues:
                q.broken_reason = q.broken_reason or err
            raise QueueBrokenError(str(err))

    def close(self) -> list[Any]:
        """Reset the device, take back every in-flight token, free the rings."""
        try:
            self.transport.reset()
        finally:
            tokens: list[Any] = []
            for q in self.queues:
                tokens += q.detach_unused()
                q.close()
            self.queues = []
        return tokens
