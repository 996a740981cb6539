"""``pyvirtio demo``: see both sides of virtio at work, no VM needed.

``pyvirtio demo loopback`` serves a block device (over a raw image file) in a device
process and drives it with the pyvirtio block driver in this process, over shared
memfd guest memory with eventfd notifications (the two-process loopback transport).
Each side prints what it did: the device a line per request it served, the driver
what it asked for and what came back.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from typing import Any

from pyvirtio.devices.blk.backend import FileBackend
from pyvirtio.devices.blk.device import BlkDevice
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.blk import BlkReqType, BlkStatus
from pyvirtio.spec.features import feature_names
from pyvirtio.virtqueue.common import DescriptorChain


class TracingBlkDevice(BlkDevice):
    """A :class:`BlkDevice` that prints one line per request it serves (to stderr)."""

    def _execute(
        self, mem: GuestMemory, chain: DescriptorChain, wlen: int
    ) -> tuple[BlkStatus, int]:
        status, written = super()._execute(mem, chain, wlen)
        rtype, sector = self._header(mem, chain) if chain.readable_len >= 16 else (-1, 0)
        try:
            name = BlkReqType(rtype).name
        except ValueError:
            name = f"type {rtype}"
        data = chain.readable_len - 16 if rtype == BlkReqType.OUT else max(written - 1, 0)
        print(
            f"  [device pid {os.getpid()}] {name:<12} sector {sector:<6} "
            f"{data:>7} bytes -> {status.name}",
            file=sys.stderr,
            flush=True,
        )
        return status, written


def tracing_device(path: str, **kwargs: Any) -> TracingBlkDevice:
    """Device-process factory: a tracing block device over the image at ``path``."""
    return TracingBlkDevice(FileBackend(path), **kwargs)


def run_loopback(image: str | None, size_mib: int, packed: bool) -> int:
    """Run the two-process block demo; returns the exit status."""
    from pyvirtio.drivers.blk import BlkDriver
    from pyvirtio.transport.loopback_mp.driver_side import connect

    own = image is None
    if image is None:
        fd, image = tempfile.mkstemp(prefix="pyvirtio-demo-", suffix=".img")
        os.ftruncate(fd, size_mib << 20)
        os.close(fd)
    try:
        print(f"pyvirtio demo: block device over {image} in a device process,")
        print(f"driven by the pyvirtio block driver in this process (pid {os.getpid()})")
        drv = connect(
            BlkDriver,
            "pyvirtio.cli.demo:tracing_device",
            mem_size=16 << 20,
            factory_kwargs={"path": image, "num_queues": 2},
            packed=packed,
        )
        try:
            t = drv.transport
            print(
                f"[driver] device type {t.device_id()}, {drv.capacity} sectors "
                f"({drv.capacity * 512 >> 20} MiB), {drv.num_request_queues} queue(s)"
            )
            print(f"[driver] negotiated: {', '.join(feature_names(drv.features, _BLK_NAMES))}")
            print(f"[driver] device id string: {drv.get_id().rstrip(bytes(1)).decode()!r}")
            pattern = hashlib.sha256(b"pyvirtio").digest() * 128  # 4 KiB
            print("[driver] write 4 KiB at sectors 0, 64, 128 (three requests in flight)")
            reqs = [drv.submit_write(s, pattern) for s in (0, 64, 128)]
            drv.complete(reqs)
            print("[driver] flush")
            drv.flush()
            back = drv.read(64, 4096)
            print(f"[driver] read back sector 64: {'matches' if back == pattern else 'DIFFERS'}")
            if drv.has_feature(14):
                drv.write_zeroes(128, 8)
                print(
                    f"[driver] write-zeroes sector 128: reads back zero = "
                    f"{drv.read(128, 4096) == bytes(4096)}"
                )
            with open(image, "rb") as f:
                f.seek(64 * 512)
                on_disk = f.read(4096)
            print(f"[host] image file at sector 64 holds the pattern: {on_disk == pattern}")
            ok = back == pattern and on_disk == pattern
        finally:
            drv.close()
            drv.transport.close()
        print("pyvirtio demo: OK" if ok else "pyvirtio demo: FAILED")
        return 0 if ok else 1
    finally:
        if own:
            os.unlink(image)


_BLK_NAMES = {
    1: "VIRTIO_BLK_F_SIZE_MAX",
    2: "VIRTIO_BLK_F_SEG_MAX",
    4: "VIRTIO_BLK_F_GEOMETRY",
    5: "VIRTIO_BLK_F_RO",
    6: "VIRTIO_BLK_F_BLK_SIZE",
    9: "VIRTIO_BLK_F_FLUSH",
    10: "VIRTIO_BLK_F_TOPOLOGY",
    11: "VIRTIO_BLK_F_CONFIG_WCE",
    12: "VIRTIO_BLK_F_MQ",
    13: "VIRTIO_BLK_F_DISCARD",
    14: "VIRTIO_BLK_F_WRITE_ZEROES",
}


def _run(args: argparse.Namespace) -> int:
    return run_loopback(args.image, args.size, args.packed)


def register(sub: Any) -> None:
    """Add the ``demo`` sub-command."""
    p = sub.add_parser("demo", help="run a block device and its driver in two processes")
    p.add_argument(
        "mode",
        nargs="?",
        default="loopback",
        choices=["loopback"],
        help="loopback: device and driver in two processes (default)",
    )
    p.add_argument("--image", help="raw image file to serve (default: a temporary one)")
    p.add_argument("--size", type=int, default=64, help="size of the temporary image in MiB")
    p.add_argument("--packed", action="store_true", help="use the packed ring")
    p.set_defaults(func=_run)
