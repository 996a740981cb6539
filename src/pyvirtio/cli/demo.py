"""``pyvirtio demo``: see pyvirtio devices at work.

``pyvirtio demo guest`` (the main job) starts pyvirtio block and entropy devices as
vhost-user back-ends, boots a Linux guest under QEMU (TCG) with them attached, and
prints the guest's own view: its virtio devices, the checksum of what it read from the
disk (compared with the host's), a pattern it wrote (checked in the image file on the
host afterwards), and bytes from ``/dev/hwrng``.

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
import shutil
import sys
import tempfile
from typing import Any

from pyvirtio.core.driver import RingOptions
from pyvirtio.devices.blk.backend import FileBackend
from pyvirtio.devices.blk.device import BlkDevice
from pyvirtio.errors import ConfigurationError
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.blk import BlkReqType, BlkStatus
from pyvirtio.spec.features import feature_names
from pyvirtio.virtqueue.common import DescriptorChain


def _trace(mem: GuestMemory, chain: DescriptorChain, status: BlkStatus, written: int) -> None:
    """Print one line per request a block device served (to stderr)."""
    rtype, sector = (-1, 0)
    if chain.readable_len >= 16:
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


def tracing_device(path: str, **kwargs: Any) -> BlkDevice:
    """Device-process factory: a tracing block device over the image at ``path``."""
    device = BlkDevice(FileBackend(path), **kwargs)
    device.tracer = _trace
    return device


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
            ring=RingOptions(packed=packed),
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


GUEST_SCRIPT = r"""
echo "== guest: virtio devices (from /sys/bus/virtio/devices)"
for d in /sys/bus/virtio/devices/*; do
  drv=$(basename "$(readlink "$d/driver")")
  echo "  $(basename "$d"): device id $(cat "$d/device"), vendor $(cat "$d/vendor"), driver $drv"
done
echo "== guest: block device"
echo "  /dev/vda: $(cat /sys/block/vda/size) sectors, $(ls /sys/block/vda/mq | wc -l) queue(s)"
echo "GUEST-MD5 $(md5sum /dev/vda | cut -d' ' -f1)"
dd if=/pyvirtio/pattern of=/dev/vda bs=4096 seek=1024 oflag=direct conv=fsync 2>/dev/null
echo "  wrote 64 KiB at 4 MiB (O_DIRECT, fsync)"
back=$(dd if=/dev/vda bs=4096 skip=1024 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo "GUEST-PATTERN-READBACK $back"
echo "== guest: entropy device"
echo "  rng_current: $(cat /sys/class/misc/hw_random/rng_current)"
echo "GUEST-HWRNG $(head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \n')"
"""


def run_guest(image: str | None, size_mib: int, packed: bool, timeout: float) -> int:
    """Boot a Linux guest whose block and entropy devices are pyvirtio back-ends."""
    import socket as socketmod
    import subprocess
    import time

    from pyvirtio.vm import GuestVM, build_initramfs, fetch_kernel

    work = tempfile.mkdtemp(prefix="pyvirtio-guest-")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if image is None:
            image = os.path.join(work, "disk.img")
            with open(image, "wb") as f:
                for i in range(size_mib):
                    f.write(hashlib.sha256(i.to_bytes(4, "little")).digest() * 32768)
        pattern = os.urandom(64 << 10)
        print("[host] fetching the Debian guest kernel (cached after the first time)...")
        kernel = fetch_kernel()
        print(f"[host] kernel {kernel.version}; building a busybox initramfs")
        initrd = build_initramfs(
            os.path.join(work, "initrd.gz"),
            kernel,
            GUEST_SCRIPT,
            modules=["virtio_blk", "virtio-rng"],
            files={"/pyvirtio/pattern": pattern},
        )
        with open(image, "rb") as f:
            host_md5 = hashlib.md5(f.read()).hexdigest()
        socks = {"blk": os.path.join(work, "blk.sock"), "rng": os.path.join(work, "rng.sock")}
        serve = [sys.executable, "-m", "pyvirtio", "serve"]
        procs.append(
            subprocess.Popen([*serve, "blk", "--socket", socks["blk"], "--image", image, "-v"])
        )
        procs.append(subprocess.Popen([*serve, "rng", "--socket", socks["rng"], "-v"]))
        for path in socks.values():
            deadline = time.monotonic() + 15
            while True:
                try:
                    with socketmod.socket(socketmod.AF_UNIX) as s:
                        s.connect(path)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise ConfigurationError(f"back-end did not listen on {path}") from None
                    time.sleep(0.05)
        print(
            f"[host] pyvirtio back-ends: blk (pid {procs[0].pid}) on {socks['blk']}, "
            f"rng (pid {procs[1].pid}) on {socks['rng']}"
        )
        vm = GuestVM(kernel.boot_image, initrd.path, memory_mib=256, shared_memory=True)
        vm.chardev(f"socket,id=blk0,path={socks['blk']}")
        vm.device("vhost-user-blk-pci,chardev=blk0" + (",packed=on" if packed else ""))
        vm.chardev(f"socket,id=rng0,path={socks['rng']}")
        vm.device("vhost-user-rng-pci,chardev=rng0")
        print("[host] booting the guest under QEMU (TCG)...")
        result = vm.run(timeout=timeout)
        for line in result.lines():
            if line.startswith(("==", "  ")) or line.startswith("GUEST-"):
                print(line)
        guest_md5 = result.marker_value("GUEST-MD5") if result.marker_lines("GUEST-MD5") else ""
        readback = (
            result.marker_value("GUEST-PATTERN-READBACK")
            if result.marker_lines("GUEST-PATTERN-READBACK")
            else ""
        )
        rng = result.marker_value("GUEST-HWRNG") if result.marker_lines("GUEST-HWRNG") else ""
        with open(image, "rb") as f:
            f.seek(1024 * 4096)
            on_disk = f.read(len(pattern))
        checks = {
            "guest read the whole disk; md5 matches the host's": guest_md5 == host_md5,
            "guest read back its pattern": readback == hashlib.md5(pattern).hexdigest(),
            "host sees the guest's pattern in the image file": on_disk == pattern,
            "guest got 32 bytes from /dev/hwrng": len(rng) == 64,
            "guest shut down cleanly": result.guest_rc == 0 and not result.timed_out,
        }
        print(f"[host] guest ran {result.elapsed:.1f} s")
        for what, ok in checks.items():
            print(f"[host] {'ok  ' if ok else 'FAIL'} {what}")
        if not all(checks.values()):
            print(result.describe(), file=sys.stderr)
        print("pyvirtio demo guest: OK" if all(checks.values()) else "pyvirtio demo guest: FAILED")
        return 0 if all(checks.values()) else 1
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace) -> int:
    if args.mode == "guest":
        return run_guest(args.image, args.size, args.packed, args.timeout)
    return run_loopback(args.image, args.size, args.packed)


def register(sub: Any) -> None:
    """Add the ``demo`` sub-command."""
    p = sub.add_parser("demo", help="show pyvirtio devices at work (a Linux guest, or loopback)")
    p.add_argument(
        "mode",
        nargs="?",
        default="guest",
        choices=["guest", "loopback"],
        help="guest: boot Linux under QEMU with pyvirtio vhost-user devices (default); "
        "loopback: a block device and its driver in two processes",
    )
    p.add_argument("--timeout", type=float, default=180.0, help="guest run time limit (s)")
    p.add_argument("--image", help="raw image file to serve (default: a temporary one)")
    p.add_argument("--size", type=int, default=64, help="size of the temporary image in MiB")
    p.add_argument("--packed", action="store_true", help="use the packed ring")
    p.set_defaults(func=_run)
