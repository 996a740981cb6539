"""The pyvirtio error tree.

Every error says what was wrong and, where a spec clause was broken, which one:

- :class:`VirtioError` is the root.
- :class:`DriverError`: the driver broke a MUST (seen from the device side, or a
  driver-side check of our own driver's use of the API).
- :class:`DeviceError`: the device broke a MUST (seen from the driver side).
- :class:`ProtocolError`: a vhost-user peer sent something malformed.
- :class:`ConfigurationError`: the user's mistake (bad argument, bad file); the
  message is meant to be shown as is.
- :class:`GuestMemoryError`: an access that leaves guest RAM.
"""

from __future__ import annotations


class VirtioError(Exception):
    """Root of every pyvirtio error.

    ``clause`` names the spec clause that was broken, e.g.
    ``'virtio-v1.2 §2.7.5.2 "Device Requirements: The Virtqueue Descriptor Table"'``.
    """

    def __init__(self, message: str, clause: str | None = None) -> None:
        super().__init__(message if clause is None else f"{message} [{clause}]")
        self.message = message
        self.clause = clause


class DriverError(VirtioError):
    """The driver broke a requirement of the spec (found by a device-side check)."""


class DeviceError(VirtioError):
    """The device broke a requirement of the spec (found by a driver-side check)."""


class ProtocolError(VirtioError):
    """A vhost-user peer sent a malformed or out-of-sequence message."""


class ConfigurationError(VirtioError):
    """The user asked for something impossible; the message says what and why."""


class GuestMemoryError(VirtioError):
    """A guest-physical access falls outside the mapped guest RAM, or wraps."""


class QueueBrokenError(VirtioError):
    """A virtqueue was marked broken after a violation; it refuses further use.

    On the device side this accompanies ``DEVICE_NEEDS_RESET``; on the driver side
    it is Linux's ``BAD_RING``: the caller gets an I/O error.
    """


class QueueFullError(VirtioError):
    """A driver tried to add a buffer while too few descriptors are free."""
