"""The virtio block driver (virtio-v1.2 §5.2 "Block Device"): blocking and asyncio APIs."""

from pyvirtio.drivers.blk.aio import AsyncBlkDriver
from pyvirtio.drivers.blk.driver import (
    BlkDriver,
    BlkError,
    BlkIOError,
    BlkRequest,
    BlkTimeoutError,
    BlkUnsupportedError,
    pack_segments,
)

__all__ = [
    "AsyncBlkDriver",
    "BlkDriver",
    "BlkError",
    "BlkIOError",
    "BlkRequest",
    "BlkTimeoutError",
    "BlkUnsupportedError",
    "pack_segments",
]
