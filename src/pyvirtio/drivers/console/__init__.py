"""The virtio console driver (virtio-v1.2 §5.3 "Console Device")."""

from __future__ import annotations

from pyvirtio.drivers.console.driver import ConsoleDriver, DriverPort, PortEvent

__all__ = ["ConsoleDriver", "DriverPort", "PortEvent"]
