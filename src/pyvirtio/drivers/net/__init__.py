"""The virtio network driver (virtio-v1.2 §5.1 "Network Device"): blocking and asyncio APIs."""

from pyvirtio.drivers.net.aio import AsyncNetDriver
from pyvirtio.drivers.net.driver import (
    DEFAULT_FEATURES,
    OFFLOAD_FEATURES,
    NetControlError,
    NetDriver,
    NetDriverStats,
    NetTimeoutError,
    NetUnsupportedError,
    feature_closure,
    format_mac,
    rx_queue,
    tx_queue,
)

__all__ = [
    "DEFAULT_FEATURES",
    "OFFLOAD_FEATURES",
    "AsyncNetDriver",
    "NetControlError",
    "NetDriver",
    "NetDriverStats",
    "NetTimeoutError",
    "NetUnsupportedError",
    "feature_closure",
    "format_mac",
    "rx_queue",
    "tx_queue",
]
