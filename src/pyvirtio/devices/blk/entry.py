"""The block device's registry entry: ``serve blk``, ``probe --exercise``, demo part."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pyvirtio.core.device import VirtioDevice
from pyvirtio.devices.registry import DeviceType, int_range, parse_size
from pyvirtio.errors import ConfigurationError
from pyvirtio.spec.blk import SECTOR_SIZE, VIRTIO_BLK_CONFIG, BlkFeature, BlkReqType, BlkStatus
from pyvirtio.spec.features import Feature, feature_names
from pyvirtio.spec.ids import DeviceId

if TYPE_CHECKING:
    from pyvirtio.core.driver import DriverTransport, VirtioDriver
    from pyvirtio.memory.guest_memory import GuestMemory
    from pyvirtio.virtqueue.common import DescriptorChain
    from pyvirtio.vm.qemu import GuestResult

__all__ = ["DEVICE_TYPE", "FEATURE_NAMES", "tracing_device"]

#: Largest queue size a user may configure (virtio-v1.2 §2.7: at most 32768).
_MAX_QUEUE_SIZE = 32768
#: Bytes read by ``--exercise`` at each end of the device.
_EXERCISE_BYTES = 4096

FEATURE_NAMES = {int(f): f"VIRTIO_BLK_F_{f.name}" for f in BlkFeature}


def _add_arguments(p: argparse.ArgumentParser) -> None:
    backing = p.add_argument_group("backing (give one)")
    backing.add_argument(
        "--image", "--blk-file", dest="image", metavar="FILE", help="raw image file or block device"
    )
    backing.add_argument(
        "--null",
        type=parse_size,
        metavar="SIZE",
        help="no storage: reads return zeros, writes are dropped (e.g. 1G, 512M)",
    )
    p.add_argument(
        "--readonly", "--read-only", dest="readonly", action="store_true", help="refuse writes"
    )
    p.add_argument(
        "--num-queues",
        type=int_range(1, 256),
        default=1,
        metavar="N",
        help="request queues (default 1; QEMU's num-queues must not exceed it)",
    )
    p.add_argument(
        "--queue-size",
        type=int_range(1, _MAX_QUEUE_SIZE),
        default=1024,
        metavar="N",
        help="largest ring size accepted (default 1024; QEMU's queue-size must not exceed it)",
    )
    p.add_argument(
        "--seg-max",
        type=int_range(1, 0xFFFFFFFF),
        default=None,
        metavar="N",
        help="segments per request offered in seg_max (default: 126, at most queue-size - 2;"
        " without indirect descriptors it must not exceed the front-end's queue size - 2)",
    )
    p.add_argument("--serial", default="pyvirtio", help="device ID string (at most 20 bytes)")
    p.add_argument(
        "--writethrough",
        action="store_true",
        help="start in writethrough mode (every write made stable before it completes)",
    )
    p.add_argument(
        "--io-threads",
        type=int_range(0, 256),
        default=None,
        metavar="N",
        help="threads running the backend's I/O (default: 4 for an image, 0 for --null; "
        "0 runs it on the event loop)",
    )


def _create(args: argparse.Namespace) -> VirtioDevice:
    from pyvirtio.devices.blk.backend import BlkBackend, FileBackend, NullBackend
    from pyvirtio.devices.blk.device import BlkDevice

    if (args.image is None) == (args.null is None):
        raise ConfigurationError("give exactly one of --image FILE and --null SIZE")
    serial = args.serial.encode()
    if len(serial) > 20:
        raise ConfigurationError("--serial is at most 20 bytes")
    backend: BlkBackend
    if args.image is not None:
        fb = FileBackend(args.image, readonly=args.readonly)
        if fb.size < SECTOR_SIZE:
            fb.close()
            raise ConfigurationError(f"image {args.image!r} is smaller than one sector")
        backend = fb
    else:
        backend = NullBackend(args.null, readonly=args.readonly)
    return BlkDevice(
        backend,
        num_queues=args.num_queues,
        queue_max_size=args.queue_size,
        serial=serial,
        writeback=not args.writethrough,
        io_threads=args.io_threads,
        seg_max=args.seg_max,
    )


def _driver() -> type[VirtioDriver]:
    from pyvirtio.drivers.blk import BlkDriver

    return BlkDriver


def _exercise(t: DriverTransport) -> dict[str, Any]:
    """Read the first and last 4 KiB and the device ID string (non-destructive)."""
    from pyvirtio.drivers.blk import BlkDriver, BlkUnsupportedError

    drv = BlkDriver(t, timeout=10.0)
    drv.initialize()
    try:
        out: dict[str, Any] = {
            "ring": "packed" if drv.has_feature(Feature.RING_PACKED) else "split",
            "features": feature_names(drv.features, FEATURE_NAMES),
            "capacity_sectors": drv.capacity,
            "reads": [],
        }
        n = min(_EXERCISE_BYTES, drv.size - drv.size % SECTOR_SIZE)
        sectors = sorted({0, max(0, drv.capacity - n // SECTOR_SIZE)}) if n else []
        for sector in sectors:
            t0 = time.perf_counter()
            data = drv.read(sector, n)
            us = (time.perf_counter() - t0) * 1e6
            out["reads"].append(
                {
                    "sector": sector,
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest()[:16],
                    "microseconds": round(us),
                }
            )
        try:
            out["device_id_string"] = drv.get_id().decode("ascii", "replace")
        except BlkUnsupportedError:
            out["device_id_string"] = None
        return out
    finally:
        drv.close()


def _describe(ex: dict[str, Any]) -> list[str]:
    lines = [
        f"    read {r['bytes']} bytes at sector {r['sector']}: "
        f"sha256 {r['sha256']}... in {r['microseconds']} us"
        for r in ex["reads"]
    ]
    ident = ex.get("device_id_string")
    lines.append(f"    device ID: {ident!r}" if ident is not None else "    device ID: unsupported")
    lines.append("    negotiated: " + " ".join(ex["features"]))
    return lines


_BLK_BITS = sum(1 << int(f) for f in BlkFeature)


def _guess(specific: int, config: bytes | None, num_queues: int | None) -> bool:
    """A config of at least 24 bytes (capacity, size_max, seg_max, geometry, blk_size)
    with a non-zero capacity, and no device feature outside the block bits 0-17
    (virtio-v1.2 §5.2.3, §5.2.4)."""
    if config is None or len(config) < 24 or specific & ~_BLK_BITS:
        return False
    return int.from_bytes(config[:8], "little") != 0


def _config_note(name: str, value: int) -> str:
    return f"  ({value * SECTOR_SIZE / (1 << 20):.1f} MiB)" if name == "capacity" else ""


_GUEST_SCRIPT = r"""
echo "== guest: block device"
echo "  /dev/vda: $(cat /sys/block/vda/size) sectors, $(ls /sys/block/vda/mq | wc -l) queue(s)"
echo "GUEST-MD5 $(md5sum /dev/vda | cut -d' ' -f1)"
dd if=/pyvirtio/pattern of=/dev/vda bs=4096 seek=1024 oflag=direct conv=fsync 2>/dev/null
echo "  wrote 64 KiB at 4 MiB (O_DIRECT, fsync)"
back=$(dd if=/dev/vda bs=4096 skip=1024 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo "GUEST-PATTERN-READBACK $back"
"""


class _BlkDemo:
    """The block part of the guest demo: a disk image the guest reads and writes."""

    qemu_device: str = "vhost-user-blk-pci"
    modules: tuple[str, ...] = ("virtio_blk",)
    script: str = _GUEST_SCRIPT

    def __init__(self, workdir: str, args: argparse.Namespace) -> None:
        image: str | None = getattr(args, "image", None)
        if image is None:
            image = os.path.join(workdir, "disk.img")
            with open(image, "wb") as f:
                for i in range(getattr(args, "size", 64)):
                    f.write(hashlib.sha256(i.to_bytes(4, "little")).digest() * 32768)
        self.image = image
        self.pattern = os.urandom(64 << 10)
        self.files: Mapping[str, bytes] = {"/pyvirtio/pattern": self.pattern}
        self.qemu_options: str = ""
        with open(image, "rb") as f:
            self.host_md5 = hashlib.md5(f.read()).hexdigest()

    def serve_args(self) -> list[str]:
        return ["--image", self.image]

    def check(self, result: GuestResult) -> dict[str, bool]:
        def marker(name: str) -> str:
            return result.marker_value(name) if result.marker_lines(name) else ""

        with open(self.image, "rb") as f:
            f.seek(1024 * 4096)
            on_disk = f.read(len(self.pattern))
        return {
            "guest read the whole disk; md5 matches the host's": marker("GUEST-MD5")
            == self.host_md5,
            "guest read back its pattern": marker("GUEST-PATTERN-READBACK")
            == hashlib.md5(self.pattern).hexdigest(),
            "host sees the guest's pattern in the image file": on_disk == self.pattern,
        }


def _trace(mem: GuestMemory, chain: DescriptorChain, status: BlkStatus, written: int) -> None:
    """Print one line per request a block device served (to stderr)."""
    rtype, sector = (-1, 0)
    if chain.readable_len >= 16:
        from pyvirtio.devices.blk.device import BlkDevice

        rtype, sector = BlkDevice.header(mem, chain)
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


def tracing_device(path: str, **kwargs: Any) -> VirtioDevice:
    """Device-process factory: a tracing block device over the image at ``path``."""
    from pyvirtio.devices.blk.backend import FileBackend
    from pyvirtio.devices.blk.device import BlkDevice

    device = BlkDevice(FileBackend(path), **kwargs)
    device.tracer = _trace
    return device


def _loopback_demo(args: argparse.Namespace) -> int:
    """``pyvirtio demo loopback``: the block device in a device process, driven by the
    block driver in this one; returns the exit status."""
    image: str | None = args.image
    size_mib: int = args.size
    packed: bool = args.packed
    from pyvirtio.core.driver import RingOptions
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
            "pyvirtio.devices.blk.entry:tracing_device",
            mem_size=16 << 20,
            factory_kwargs={"path": image, "num_queues": 2},
            ring=RingOptions(packed=packed),
        )
        try:
            t = drv.transport
            print(
                f"[driver] device type {t.device_id()}, {drv.capacity} sectors "
                f"({drv.capacity * 512 >> 20} MiB), {drv.num_request_queues} queue(s)"
            )
            print(f"[driver] negotiated: {', '.join(feature_names(drv.features, FEATURE_NAMES))}")
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


#: The block device (virtio-v1.2 §5.2 "Block Device").
DEVICE_TYPE = DeviceType(
    name="blk",
    device_id=int(DeviceId.BLOCK),
    summary="virtio block device backed by an image file (or --null)",
    feature_names=FEATURE_NAMES,
    config_layout=VIRTIO_BLK_CONFIG,
    fixed_queues=1,
    add_arguments=_add_arguments,
    create=_create,
    capabilities={"type": "block", "features": ["read-only", "blk-file"]},
    driver=_driver,
    exercise=_exercise,
    describe_exercise=_describe,
    guess=_guess,
    config_note=_config_note,
    demo=_BlkDemo,
    loopback_demo=_loopback_demo,
)
