"""The entropy device's registry entry: ``serve rng``, ``probe --exercise``, demo part."""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pyvirtio.core.device import VirtioDevice
from pyvirtio.devices.registry import DeviceType
from pyvirtio.errors import VirtioError
from pyvirtio.spec.features import Feature
from pyvirtio.spec.ids import DeviceId

if TYPE_CHECKING:
    from pyvirtio.core.driver import DriverTransport, VirtioDriver
    from pyvirtio.vm.qemu import GuestResult

__all__ = ["DEVICE_TYPE"]


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source",
        metavar="FILE",
        help="read entropy from FILE (default: the kernel's CSPRNG, os.urandom)",
    )


def _create(args: argparse.Namespace) -> VirtioDevice:
    from pyvirtio.devices.rng import FileSource, RngDevice

    if args.source is not None:
        return RngDevice(FileSource(args.source), owns_source=True)
    return RngDevice()


def _driver() -> type[VirtioDriver]:
    from pyvirtio.drivers.rng import RngDriver

    return RngDriver


def _exercise(t: DriverTransport) -> dict[str, Any]:
    """Ask for 64 random bytes; refuse 64 identical ones."""
    from pyvirtio.drivers.rng import RngDriver

    drv = RngDriver(t, timeout=10.0)
    drv.initialize()
    try:
        t0 = time.perf_counter()
        data = drv.read(64)
        us = (time.perf_counter() - t0) * 1e6
        if len(set(data)) < 2:
            raise VirtioError("the entropy device returned 64 identical bytes")
        return {
            "ring": "packed" if drv.has_feature(Feature.RING_PACKED) else "split",
            "bytes": len(data),
            "sample": data[:16].hex(),
            "distinct_byte_values": len(set(data)),
            "microseconds": round(us),
        }
    finally:
        drv.close()


def _describe(ex: dict[str, Any]) -> list[str]:
    return [
        f"    {ex['bytes']} random bytes in {ex['microseconds']} us "
        f"({ex['distinct_byte_values']} distinct values), first 16: {ex['sample']}"
    ]


def _guess(specific: int, config: bytes | None, num_queues: int | None) -> bool:
    """No device-specific feature bit ("None currently defined", virtio-v1.2 §5.4.3),
    no configuration space (§5.4.4: no config access, a refusal, or only zeros, as
    reads past a config's end give) and a single queue (§5.4.2)."""
    no_config = config is None or not any(config)
    return not specific and no_config and num_queues in (None, 1)


_GUEST_SCRIPT = r"""
echo "== guest: entropy device"
echo "  rng_current: $(cat /sys/class/misc/hw_random/rng_current)"
echo "GUEST-HWRNG $(head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \n')"
"""


class _RngDemo:
    """The entropy part of the guest demo: the guest reads ``/dev/hwrng``."""

    qemu_device: str = "vhost-user-rng-pci"
    qemu_options: str = ""
    modules: tuple[str, ...] = ("virtio-rng",)
    script: str = _GUEST_SCRIPT

    def __init__(self, workdir: str, args: argparse.Namespace) -> None:
        self.files: Mapping[str, bytes] = {}

    def serve_args(self) -> list[str]:
        return []

    def check(self, result: GuestResult) -> dict[str, bool]:
        rng = result.marker_value("GUEST-HWRNG") if result.marker_lines("GUEST-HWRNG") else ""
        return {"guest got 32 bytes from /dev/hwrng": len(rng) == 64}


#: The entropy device (virtio-v1.2 §5.4 "Entropy Device").
DEVICE_TYPE = DeviceType(
    name="rng",
    device_id=int(DeviceId.ENTROPY),
    summary="virtio entropy device",
    fixed_queues=1,
    add_arguments=_add_arguments,
    create=_create,
    capabilities={"type": "rng", "features": []},
    driver=_driver,
    exercise=_exercise,
    describe_exercise=_describe,
    guess=_guess,
    demo=_RngDemo,
)
