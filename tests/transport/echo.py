"""The kit's echo device and driver (:mod:`pyvirtio.testing.echo`), plus a test-only
variant whose configuration flaps while the driver reads it.

This module must stay importable by path (``tests.transport.echo``): the two-process
tests spawn the device from it.
"""

from __future__ import annotations

from typing import Any

from pyvirtio.testing.echo import BUMP, CRASH, ECHO_F_UPPER, EchoDevice, EchoDriver

__all__ = [
    "BUMP",
    "CRASH",
    "ECHO_F_UPPER",
    "EchoDevice",
    "EchoDriver",
    "FlappingEchoDevice",
    "packed_available",
]


def packed_available() -> bool:
    """True once the packed ring implementation imports (it is developed in parallel)."""
    try:
        from pyvirtio.virtqueue.packed.device import PackedDeviceQueue  # noqa: F401
        from pyvirtio.virtqueue.packed.driver import PackedDriverQueue  # noqa: F401
    except ImportError:
        return False
    return True


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
