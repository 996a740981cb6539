"""``pyvirtio.testing``: the kit device and driver authors test with.

- :class:`DeviceHarness`: a device on rings in test memory, no transport: well-formed
  requests laid out any way (driver queues) or hand-written descriptors for malformed
  chains (:class:`RawSplitRing`, :class:`RawPackedRing`), used elements read back;
- :class:`FakeHost`: a :class:`~pyvirtio.core.device.DeviceHost` that records
  notifications and DEVICE_NEEDS_RESET;
- :class:`EchoDevice`, :class:`HeldEchoDevice` and :class:`EchoDriver`: the smallest
  device types, one answering at once, one holding its buffers until its host side
  says so;
- :func:`open_driver` and :data:`TRANSPORTS`: run a device under its driver over
  every transport in one loop.

Like vm-virtio's exported ``MockSplitQueue``, this is part of the library: the
project's own tests use it, and so can anyone writing a device (``docs/new-device.md``).
"""

from pyvirtio.testing.echo import (
    BUMP,
    CRASH,
    ECHO_F_UPPER,
    EchoDevice,
    EchoDriver,
    HeldEchoDevice,
)
from pyvirtio.testing.harness import (
    DeviceHarness,
    FakeHost,
    RawPackedRing,
    RawSplitRing,
    place_buffers,
)
from pyvirtio.testing.transports import TRANSPORTS, Opened, open_driver

__all__ = [
    "BUMP",
    "CRASH",
    "ECHO_F_UPPER",
    "TRANSPORTS",
    "DeviceHarness",
    "EchoDevice",
    "EchoDriver",
    "FakeHost",
    "HeldEchoDevice",
    "Opened",
    "RawPackedRing",
    "RawSplitRing",
    "open_driver",
    "place_buffers",
]
