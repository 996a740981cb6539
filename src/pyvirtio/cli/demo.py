"""``pyvirtio demo``: see pyvirtio devices at work.

``pyvirtio demo guest`` (the main job) starts pyvirtio devices (block and entropy) as
vhost-user back-ends, boots a Linux guest under QEMU (TCG) with them attached, and
prints the guest's own view: its virtio devices, the checksum of what it read from the
disk (compared with the host's), a pattern it wrote (checked in the image file on the
host afterwards), and bytes from ``/dev/hwrng``.

``pyvirtio demo loopback`` serves a device (the block device over a raw image file
by default, ``--device TYPE``) in a device process and drives it with its pyvirtio
driver in this process, over shared memfd guest memory with eventfd notifications
(the two-process loopback transport). Each side prints what it did: the device a line
per request it served, the driver what it asked for and what came back.

Both modes take their device-specific parts from the device registry
(:mod:`pyvirtio.devices.registry`): each type's ``demo`` and ``loopback_demo``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING, Any

from pyvirtio.errors import ConfigurationError

if TYPE_CHECKING:
    from pyvirtio.devices.registry import DeviceType, GuestDemoPart

GUEST_SCRIPT = r"""
echo "== guest: virtio devices (from /sys/bus/virtio/devices)"
for d in /sys/bus/virtio/devices/*; do
  drv=$(basename "$(readlink "$d/driver")")
  echo "  $(basename "$d"): device id $(cat "$d/device"), vendor $(cat "$d/vendor"), driver $drv"
done
"""


def run_guest(args: argparse.Namespace) -> int:
    """Boot a Linux guest whose devices are pyvirtio back-ends: one per registered
    device type with a guest demo part (block and entropy today), each served by
    ``pyvirtio serve <type>`` and attached with its QEMU vhost-user front-end."""
    import socket as socketmod
    import subprocess
    import time

    from pyvirtio.devices.registry import device_types
    from pyvirtio.vm import (
        SYSTEM_GENERATION,
        TRIXIE_GENERATION,
        GuestVM,
        build_initramfs,
        peer_generation,
    )

    work = tempfile.mkdtemp(prefix="pyvirtio-guest-")
    procs: list[subprocess.Popen[bytes]] = []
    parts: list[tuple[DeviceType, GuestDemoPart]] = []
    try:
        # the newest peers the set-up installed: QEMU 11.1 + Linux 7.3 (its generic
        # vhost-user front-end carries the console and the balloon), else QEMU 7.2 +
        # Linux 6.1
        try:
            peers = peer_generation(TRIXIE_GENERATION)
        except ConfigurationError as exc:
            print(f"[host] {TRIXIE_GENERATION} peers not set up ({exc}); using the system's")
            print("[host] fetching the Debian guest kernel (cached after the first time)...")
            peers = peer_generation(SYSTEM_GENERATION)
        args.peer_generation = peers.name
        kernel = peers.kernel
        print(f"[host] peers {peers.name}: guest kernel {kernel.version}")
        for e in device_types():
            if e.demo is None:
                continue
            try:
                part = e.demo(work, args)
            except ConfigurationError as exc:
                print(f"[host] no {e.name} device in this run: {exc}")
                continue
            needs = getattr(part, "peer_generation", None)
            if needs is not None and needs != peers.name:
                print(f"[host] no {e.name} device in this run: its front-end needs {needs}")
                close = getattr(part, "close", None)
                if close is not None:
                    close()
                continue
            parts.append((e, part))
        print("[host] building a busybox initramfs")
        files: dict[str, bytes] = {}
        modules: list[str] = []
        script = GUEST_SCRIPT
        for _, part in parts:
            files.update(part.files)
            modules.extend(part.modules)
            script += part.script
        initrd = build_initramfs(
            os.path.join(work, "initrd.gz"), kernel, script, modules=modules, files=files
        )
        serve = [sys.executable, "-m", "pyvirtio", "serve"]
        socks: dict[str, str] = {}
        for entry, part in parts:
            path = os.path.join(work, f"{entry.name}.sock")
            socks[entry.name] = path
            cmd = [*serve, entry.name, "--socket", path, *part.serve_args(), "-v"]
            procs.append(subprocess.Popen([*getattr(part, "serve_prefix", list)(), *cmd]))
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
        for _, part in parts:
            ready = getattr(part, "backend_ready", None)
            if ready is not None:
                ready()
        print(
            "[host] pyvirtio back-ends: "
            + ", ".join(
                f"{name} (pid {p.pid}) on {path}"
                for (name, path), p in zip(socks.items(), procs, strict=True)
            )
        )
        vm = GuestVM(
            kernel.boot_image, initrd.path, memory_mib=256, shared_memory=True, peer=peers.qemu
        )
        for entry, part in parts:
            vm.chardev(f"socket,id={entry.name}0,path={socks[entry.name]}")
            opts = part.qemu_options + (",packed=on" if args.packed else "")
            if getattr(part, "netdev", False):
                # a network back-end: QEMU's vhost-user netdev in front of the device
                vm.netdev(f"vhost-user,id={entry.name}n0,chardev={entry.name}0")
                vm.device(f"{part.qemu_device},netdev={entry.name}n0{opts}")
            else:
                vm.device(f"{part.qemu_device},chardev={entry.name}0{opts}")
        print("[host] booting the guest under QEMU (TCG)...")
        result = vm.run(timeout=args.timeout)
        for line in result.lines():
            if line.startswith(("==", "  ")) or line.startswith("GUEST-"):
                print(line)
        checks: dict[str, bool] = {}
        for _, part in parts:
            checks.update(part.check(result))
        checks["guest shut down cleanly"] = result.guest_rc == 0 and not result.timed_out
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
        for _, part in parts:
            close = getattr(part, "close", None)
            if close is not None:
                close()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)


def run_loopback(args: argparse.Namespace) -> int:
    """The two-process demo of the device type named by ``--device``."""
    from pyvirtio.devices.registry import by_name, device_types

    if args.device is None:
        entry = next((e for e in device_types() if e.loopback_demo is not None), None)
        if entry is None:  # pragma: no cover - blk has one
            raise ConfigurationError("no device type has a loopback demo")
    else:
        entry = by_name(args.device)
    if entry.loopback_demo is None:
        raise ConfigurationError(f"{entry.name} devices have no loopback demo")
    return entry.loopback_demo(args)


def _run(args: argparse.Namespace) -> int:
    if args.mode == "guest":
        return run_guest(args)
    return run_loopback(args)


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
    p.add_argument(
        "--device",
        metavar="TYPE",
        help="loopback: the device type to show (default: the first with a loopback demo)",
    )
    p.set_defaults(func=_run)
