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
from typing import TYPE_CHECKING

from pyvirtio.core.device import VirtioDevice
from pyvirtio.devices.registry import DeviceType
from pyvirtio.spec.balloon import BALLOON_CONFIG, BalloonFeature
from pyvirtio.spec.ids import DeviceId

if TYPE_CHECKING:
    from pyvirtio.core.driver import VirtioDriver
    from pyvirtio.devices.balloon.device import BalloonDevice

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
        _log.info(
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
)
