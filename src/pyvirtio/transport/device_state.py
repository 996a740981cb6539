"""The :class:`~pyvirtio.core.device_state.DeviceState` that the PCI and MMIO
device-side models share: transport feature bits and the notification-write log.

Both :class:`~pyvirtio.transport.pci.device.VirtioPciFunction` and
:class:`~pyvirtio.transport.mmio.device.VirtioMmioDevice` delegate every virtio
semantic to a :class:`TransportDeviceState`: a
:class:`~pyvirtio.core.device_state.DeviceState` that also offers the feature bits
the transport implements (VIRTIO_F_RING_RESET, VIRTIO_F_NOTIFICATION_DATA; virtio-v1.2
§6 "Reserved Feature Bits") and keeps the most recent driver notification writes
(:class:`NotifyWrite`) as received.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pyvirtio.core.device import VirtioDevice
from pyvirtio.core.device_state import DeviceState
from pyvirtio.errors import DriverError
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.features import Feature, has

__all__ = [
    "NOTIFY_LOG",
    "NotifyWrite",
    "TransportDeviceState",
]

#: Notification writes kept in :attr:`TransportDeviceState.notify_writes`.
NOTIFY_LOG = 64


@dataclass(frozen=True)
class NotifyWrite:
    """One driver write to a Queue Notify address (PCI: ``offset`` inside the
    notification structure) or to the QueueNotify register (MMIO: its offset), as
    received: ``width`` in bytes and the raw ``value``."""

    offset: int
    width: int
    value: int


class TransportDeviceState(DeviceState):
    """A :class:`DeviceState` whose transport adds transport feature bits.

    ``transport_features`` (e.g. VIRTIO_F_RING_RESET, which the PCI and MMIO
    transports implement with their ``queue_reset`` registers) are offered on top of
    the device's own bits, never through the legacy interface.
    """

    def __init__(
        self, device: VirtioDevice, mem: GuestMemory | None = None, *, legacy: bool = False
    ) -> None:
        super().__init__(device, mem, legacy=legacy)
        #: feature bits the transport implements and offers (modern only)
        self.transport_features = 0
        #: the most recent notification writes (bounded), newest last
        self.notify_writes: deque[NotifyWrite] = deque(maxlen=NOTIFY_LOG)

    @property
    def notification_data(self) -> bool:
        """True if VIRTIO_F_NOTIFICATION_DATA is negotiated (never for legacy)."""
        return not self.legacy and has(self.negotiated_features, Feature.NOTIFICATION_DATA)

    @property
    def device_features(self) -> int:
        """Every feature bit offered: the device's and the transport's."""
        offered = self.device.device_features()
        if self.legacy:
            return offered & 0xFFFFFFFF
        return offered | self.transport_features

    def violation(self, message: str, clause: str) -> DriverError:
        """Log a driver violation found by the transport (see ``violations``)."""
        return self._violation(message, clause)
