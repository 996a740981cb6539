"""``pyvirtio serve``: serve a pyvirtio device to a VM as a vhost-user back-end.

::

    pyvirtio serve blk --socket /tmp/blk.sock --image disk.img [--readonly] [--num-queues 2]
    pyvirtio serve blk --socket /tmp/blk.sock --null 1G          # no disk cost: benchmarks
    pyvirtio serve rng --socket /tmp/rng.sock

    qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on \\
        -numa node,memdev=mem -chardev socket,id=c0,path=/tmp/blk.sock \\
        -device vhost-user-blk-pci,chardev=c0

Options follow vhost-user.rst "Backend program conventions" (and the other vhost-user
back-ends): ``--socket-path``/``--socket`` or ``--fd`` (an inherited socket, listening
or connected), ``--print-capabilities``, and for block devices ``--blk-file`` (alias of
``--image``) and ``--read-only``. By default the back-end listens and serves one
front-end after another (QEMU's ``reconnect=N`` finds it again after a restart);
``--connect`` connects to a front-end that listens (``-chardev socket,server=on``) and
ends with that connection. Ctrl-C or SIGTERM stops cleanly.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from typing import Any, NoReturn

from pyvirtio.core.device import VirtioDevice
from pyvirtio.errors import ConfigurationError
from pyvirtio.transport.vhost_user.backend import DEFAULT_BATCH
from pyvirtio.transport.vhost_user.server import ConnectionStats, VhostUserServer

__all__ = ["parse_size", "register", "run_blk", "run_rng"]

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50}
#: Largest queue size a user may configure (virtio-v1.2 §2.7: at most 32768).
_MAX_QUEUE_SIZE = 32768


def parse_size(text: str) -> int:
    """``1G`` / ``512M`` / ``64k`` / ``1GiB`` / ``4096`` -> bytes (binary units).

    Raises :class:`argparse.ArgumentTypeError` unless the size is a positive multiple
    of 512 (the sector size).
    """
    m = _SIZE_RE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 1G, 512M, 4096)")
    size = int(m.group(1)) << _UNITS[m.group(2).lower()]
    if size <= 0 or size % 512:
        raise argparse.ArgumentTypeError(f"size {text!r} must be a positive multiple of 512")
    return size


def _int_range(lo: int, hi: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is not between {lo} and {hi}")
        return value

    return parse


def _one_line_error(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` report bad arguments on one line (no usage dump)."""

    def error(message: str) -> NoReturn:
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    parser.error = error  # type: ignore[method-assign]


def _common(p: argparse.ArgumentParser) -> None:
    where = p.add_argument_group("connection (give one of --socket and --fd)")
    where.add_argument(
        "--socket",
        "--socket-path",
        dest="socket",
        metavar="PATH",
        help="unix socket path (listened on, or connected to with --connect)",
    )
    where.add_argument(
        "--fd", type=_int_range(0, 1 << 20), metavar="N", help="inherited socket descriptor"
    )
    where.add_argument(
        "--connect",
        action="store_true",
        help="connect to a front-end listening on --socket (QEMU server=on) instead of "
        "listening; end with that connection",
    )
    where.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="with --connect: how long to wait for the socket (default 30)",
    )
    p.add_argument(
        "--batch",
        type=_int_range(1, 1 << 16),
        default=DEFAULT_BATCH,
        metavar="N",
        help=f"requests one queue serves before the others get a turn (default {DEFAULT_BATCH})",
    )
    p.add_argument(
        "--print-capabilities",
        action="store_true",
        help="print the back-end capabilities as JSON (vhost-user.json) and exit",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log connections and totals")
    p.add_argument("--trace", action="store_true", help="log every vhost-user message")


def register(subparsers: Any) -> None:
    """Add the ``serve`` sub-command with its ``blk`` and ``rng`` devices."""
    p = subparsers.add_parser(
        "serve",
        help="serve a device to a VM over vhost-user (a vhost-user back-end)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    _one_line_error(p)
    p.set_defaults(func=lambda args: _missing_device(p))
    devices = p.add_subparsers(dest="device", metavar="DEVICE")

    blk = devices.add_parser(
        "blk",
        help="virtio block device backed by an image file (or --null)",
        description="Serve a virtio block device (vhost-user-blk).",
    )
    _one_line_error(blk)
    _common(blk)
    backing = blk.add_argument_group("backing (give one)")
    backing.add_argument(
        "--image", "--blk-file", dest="image", metavar="FILE", help="raw image file or block device"
    )
    backing.add_argument(
        "--null",
        type=parse_size,
        metavar="SIZE",
        help="no storage: reads return zeros, writes are dropped (e.g. 1G, 512M)",
    )
    blk.add_argument(
        "--readonly", "--read-only", dest="readonly", action="store_true", help="refuse writes"
    )
    blk.add_argument(
        "--num-queues",
        type=_int_range(1, 256),
        default=1,
        metavar="N",
        help="request queues (default 1; QEMU's num-queues must not exceed it)",
    )
    blk.add_argument(
        "--queue-size",
        type=_int_range(1, _MAX_QUEUE_SIZE),
        default=1024,
        metavar="N",
        help="largest ring size accepted (default 1024; QEMU's queue-size must not exceed it)",
    )
    blk.add_argument("--serial", default="pyvirtio", help="device ID string (at most 20 bytes)")
    blk.add_argument(
        "--writethrough",
        action="store_true",
        help="start in writethrough mode (every write made stable before it completes)",
    )
    blk.set_defaults(func=run_blk)

    rng = devices.add_parser(
        "rng",
        help="virtio entropy device",
        description="Serve a virtio entropy device (vhost-user-rng).",
    )
    _one_line_error(rng)
    _common(rng)
    rng.add_argument(
        "--source",
        metavar="FILE",
        help="read entropy from FILE (default: the kernel's CSPRNG, os.urandom)",
    )
    rng.set_defaults(func=run_rng)


def _missing_device(parser: argparse.ArgumentParser) -> int:
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: name a device: blk or rng", file=sys.stderr)
    return 2


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.trace else logging.INFO if args.verbose else logging.WARNING
    logger = logging.getLogger("pyvirtio")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pyvirtio: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def _check_connection(args: argparse.Namespace) -> None:
    if (args.socket is None) == (args.fd is None):
        raise ConfigurationError("give exactly one of --socket PATH and --fd N")
    if args.connect and args.socket is None:
        raise ConfigurationError("--connect needs --socket PATH")


def _serve(device: VirtioDevice, args: argparse.Namespace) -> int:
    _setup_logging(args)

    def report(stats: ConnectionStats) -> None:
        if args.verbose or args.trace:
            print(f"pyvirtio: connection ended: {stats.summary()}", file=sys.stderr, flush=True)

    server = VhostUserServer(
        device,
        socket_path=args.socket,
        fd=args.fd,
        connect=args.connect,
        connect_timeout=args.connect_timeout,
        backend_options={"batch": args.batch},
        handle_signals=True,
        on_connection_end=report,
    )
    server.serve()
    return 0


def run_blk(args: argparse.Namespace) -> int:
    """``pyvirtio serve blk``."""
    if args.print_capabilities:
        print(json.dumps({"type": "block", "features": ["read-only", "blk-file"]}))
        return 0
    _check_connection(args)
    from pyvirtio.devices.blk import BlkDevice, FileBackend, NullBackend

    if (args.image is None) == (args.null is None):
        raise ConfigurationError("give exactly one of --image FILE and --null SIZE")
    serial = args.serial.encode()
    if len(serial) > 20:
        raise ConfigurationError("--serial is at most 20 bytes")
    backend: Any
    if args.image is not None:
        backend = FileBackend(args.image, readonly=args.readonly)
        if backend.size < 512:
            backend.close()
            raise ConfigurationError(f"image {args.image!r} is smaller than one sector")
    else:
        backend = NullBackend(args.null, readonly=args.readonly)
    device = BlkDevice(
        backend,
        num_queues=args.num_queues,
        queue_max_size=args.queue_size,
        serial=serial,
        writeback=not args.writethrough,
    )
    try:
        return _serve(device, args)
    finally:
        device.close()


def run_rng(args: argparse.Namespace) -> int:
    """``pyvirtio serve rng``."""
    if args.print_capabilities:
        print(json.dumps({"type": "rng", "features": []}))
        return 0
    _check_connection(args)
    from pyvirtio.devices.rng import FileSource, RngDevice

    source = FileSource(args.source) if args.source is not None else None
    device = RngDevice(source)
    try:
        return _serve(device, args)
    finally:
        if source is not None:
            source.close()
