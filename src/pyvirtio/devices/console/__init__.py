"""The virtio console device (virtio-v1.2 §5.3 "Console Device") and its port back-ends."""

from pyvirtio.devices.console.backend import (
    ConsoleBackend,
    FdBackend,
    FileBackend,
    PtyBackend,
    SocketBackend,
    StdioBackend,
)
from pyvirtio.devices.console.control import ConsoleControl, console_command
from pyvirtio.devices.console.device import (
    MAX_CONTROL_BACKLOG,
    MAX_TX_CHAIN,
    ConsoleDevice,
    ConsolePort,
)
from pyvirtio.devices.console.entry import DEVICE_TYPE

__all__ = [
    "DEVICE_TYPE",
    "MAX_CONTROL_BACKLOG",
    "MAX_TX_CHAIN",
    "ConsoleBackend",
    "ConsoleControl",
    "ConsoleDevice",
    "ConsolePort",
    "FdBackend",
    "FileBackend",
    "PtyBackend",
    "SocketBackend",
    "StdioBackend",
    "console_command",
]
