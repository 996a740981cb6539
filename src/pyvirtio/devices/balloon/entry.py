"""The balloon's registry entry: ``pyvirtio serve balloon``.

::

    pyvirtio serve balloon --socket /tmp/balloon.sock [--target PAGES] \\
        [--stats-interval SECONDS] [--control /tmp/balloon.ctl] [--no-discard] \\
        [--features MUST_TELL_HOST,STATS_VQ,...]

``--target`` is the initial ``num_pages`` (4 KiB pages, or a size: ``128M``);
``--control PATH`` opens the control socket (:mod:`pyvirtio.devices.balloon.control`)
on which ``target N``, ``info``, ``stats`` and ``hint start|stop|done`` change or
read the balloon while it is served (``echo 'target 64M' | socat - UNIX-CONNECT:PATH``).
With ``-v`` every change of ``actual`` and every statistics report is logged. QEMU has
no vhost-user balloon front-end of its own; its generic one attaches it
(``-device vhost-user-test-device-pci,chardev=c0,virtio-id=5,num_vqs=3,config_size=16``
on QEMU 9.1 and later).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pyvirtio.core.device import VirtioDevice
from pyvirtio.devices.registry import DeviceType
from pyvirtio.spec.balloon import BALLOON_CONFIG, BalloonFeature
from pyvirtio.spec.ids import DeviceId

if TYPE_CHECKING:
    from pyvirtio.core.driver import VirtioDriver
    from pyvirtio.devices.balloon.device import BalloonDevice
    from pyvirtio.vm.qemu import GuestResult

__all__ = ["DEVICE_TYPE", "FEATURE_NAMES", "parse_features"]

_log = logging.getLogger("pyvirtio.devices.balloon")

FEATURE_NAMES = {
    int(f): "VIRTIO_BALLOON_F_" + ("REPORTING" if f is BalloonFeature.PAGE_REPORTING else f.name)
    for f in BalloonFeature
}


def parse_features(text: str) -> int:
    """``STATS_VQ,MUST_TELL_HOST`` (names with or without ``VIRTIO_BALLOON_F_``) -> mask."""
    mask = 0
    for word in filter(None, (w.strip().upper() for w in text.split(","))):
        name = word.removeprefix("VIRTIO_BALLOON_F_")
        name = "PAGE_REPORTING" if name == "REPORTING" else name
        try:
            mask |= BalloonFeature[name].mask
        except KeyError:
            known = ", ".join(f.name for f in BalloonFeature)
            raise argparse.ArgumentTypeError(f"unknown feature {word!r} (known: {known})") from None
    return mask


def _pages(text: str) -> int:
    from pyvirtio.devices.balloon.control import parse_pages

    try:
        n = parse_pages(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid page count or size {text!r}") from None
    if not 0 <= n <= 0xFFFF_FFFF:
        raise argparse.ArgumentTypeError(f"{text} pages is not a le32")
    return n


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        type=_pages,
        default=0,
        metavar="PAGES",
        help="initial num_pages: 4 KiB pages the guest should give up, or a size (128M)",
    )
    p.add_argument(
        "--stats-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="ask the guest for memory statistics every SECONDS (default: only on request)",
    )
    p.add_argument(
        "--control",
        metavar="PATH",
        help="control socket: one line per connection: 'target N', 'info', 'stats', "
        "'hint start|stop|done'; answered with a JSON line",
    )
    p.add_argument(
        "--no-discard",
        action="store_true",
        help="do not give inflated/reported pages back to the host (only count them)",
    )
    p.add_argument(
        "--features",
        type=parse_features,
        default=None,
        metavar="LIST",
        help="offer only these balloon features (comma-separated; default: all)",
    )


def _log_change(dev: BalloonDevice, what: str) -> None:
    if what == "actual":
        # every step at -v would be one line per 256 pages: -v shows where it settles
        _log.log(
            logging.INFO if dev.actual == dev.num_pages else logging.DEBUG,
            "balloon: actual %d pages (target %d, %d inflated)",
            dev.actual,
            dev.num_pages,
            dev.inflated_pages,
        )
    elif what == "stats":
        shown = " ".join(f"{t.name.lower()}={v}" for t, v in sorted(dev.stats.items()))
        _log.info("balloon: stats #%d %s", dev.counters.stats_reports, shown)


def _create(args: argparse.Namespace) -> VirtioDevice:
    from pyvirtio.devices.balloon.control import BalloonControl
    from pyvirtio.devices.balloon.device import ALL_FEATURES, BalloonDevice

    dev = BalloonDevice(
        args.target,
        features=ALL_FEATURES if args.features is None else args.features,
        stats_interval=args.stats_interval,
        discard=not args.no_discard,
        on_change=_log_change,
    )
    if args.control:
        BalloonControl(dev, args.control)
    return dev


def _driver() -> type[VirtioDriver]:
    from pyvirtio.drivers.balloon import BalloonDriver

    return BalloonDriver


#: The traditional memory balloon (virtio-v1.2 §5.5).
_DEMO_TARGET = 8192  # pages: 32 MiB
_BALLOON_SCRIPT = f"""
echo "== guest: memory balloon"
n=0
inflated() {{ sed -n 's/^balloon_inflate //p' /proc/vmstat; }}
while [ "$(inflated)" -lt {_DEMO_TARGET} ] 2>/dev/null && [ $n -lt 100 ]; do
  usleep 100000; n=$((n + 1))
done
echo "  $(grep MemTotal /proc/meminfo) after the host asked for 32 MiB back"
echo "GUEST-BALLOON-INFLATED $(inflated)"
"""


class _BalloonDemo:
    """The balloon part of the guest demo: the host asks for 32 MiB back (8192
    pages) and the guest inflates its balloon; stats come every second
    (QEMU 11.1's generic vhost-user front-end)."""

    qemu_device: str = "vhost-user-test-device-pci"
    qemu_options: str = ",virtio-id=5,num_vqs=3,config_size=16"
    modules: tuple[str, ...] = ("virtio_balloon",)
    script: str = _BALLOON_SCRIPT
    #: QEMU 7.2 has no generic vhost-user front-end
    peer_generation: str = "qemu11.1-linux7.3"

    def __init__(self, workdir: str, args: argparse.Namespace) -> None:
        import os

        self.files: Mapping[str, bytes] = {}
        self.control = os.path.join(workdir, "balloon.ctl")
        self.info: dict[str, object] = {}

    def serve_args(self) -> list[str]:
        return [
            "--features",
            "MUST_TELL_HOST,STATS_VQ",
            "--target",
            str(_DEMO_TARGET),
            "--stats-interval",
            "1",
            "--control",
            self.control,
        ]

    def check(self, result: GuestResult) -> dict[str, bool]:
        from pyvirtio.devices.balloon.control import balloon_command

        try:
            self.info = balloon_command(self.control, "info")
        except (OSError, ValueError):
            self.info = {}
        inflated = result.marker_values("GUEST-BALLOON-INFLATED")
        return {
            "guest inflated its balloon to the host's target (8192 pages, 32 MiB)": inflated
            == [str(_DEMO_TARGET)],
            "guest reported memory statistics": bool(self.info.get("stats_reports")),
        }


DEVICE_TYPE = DeviceType(
    name="balloon",
    device_id=int(DeviceId.BALLOON_TRADITIONAL),
    summary="virtio memory balloon (traditional)",
    feature_names=FEATURE_NAMES,
    config_layout=BALLOON_CONFIG,
    fixed_queues=2,
    add_arguments=_add_arguments,
    create=_create,
    capabilities={"type": "balloon", "features": []},
    driver=_driver,
    demo=_BalloonDemo,
)
