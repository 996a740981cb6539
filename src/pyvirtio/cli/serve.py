"""``pyvirtio serve``: serve a pyvirtio device to a VM as a vhost-user back-end.

::

    pyvirtio serve blk --socket /tmp/blk.sock --image disk.img [--readonly] [--num-queues 2]
    pyvirtio serve blk --socket /tmp/blk.sock --null 1G          # no disk cost: benchmarks
    pyvirtio serve rng --socket /tmp/rng.sock
    pyvirtio serve blk --vfio-user /tmp/blk.sock --image disk.img [--pci-mode transitional]

    qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on \\
        -numa node,memdev=mem -chardev socket,id=c0,path=/tmp/blk.sock \\
        -device vhost-user-blk-pci,chardev=c0

Every device type of the registry (:mod:`pyvirtio.devices.registry`) is a
sub-command, with its own arguments from its entry. Options follow vhost-user.rst
"Backend program conventions" (and the other vhost-user back-ends):
``--socket-path``/``--socket`` or ``--fd`` (an inherited socket, listening or
connected), ``--print-capabilities``, and for block devices ``--blk-file`` (alias of
``--image``) and ``--read-only``. By default the back-end listens and serves one
front-end after another (QEMU's ``reconnect=N`` finds it again after a restart);
``--connect`` connects to a front-end that listens (``-chardev socket,server=on``) and
ends with that connection. Ctrl-C or SIGTERM stops cleanly.

``--vfio-user PATH`` serves the same device as a virtio-pci function instead
(:mod:`pyvirtio.transport.vfio_user`): QEMU 10.1+ attaches it with
``-device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"PATH"}}'`` (guest
RAM shared by fd, as for vhost-user) and the guest's own virtio_pci driver drives it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from functools import partial
from typing import Any, NoReturn

from pyvirtio.core.device import VirtioDevice
from pyvirtio.devices.registry import DeviceType, device_types, int_range, parse_size
from pyvirtio.errors import ConfigurationError
from pyvirtio.transport.vhost_user.backend import DEFAULT_BATCH
from pyvirtio.transport.vhost_user.server import ConnectionStats, VhostUserServer

__all__ = ["parse_size", "register", "run"]


def _one_line_error(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` report bad arguments on one line (no usage dump)."""

    def error(message: str) -> NoReturn:
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    parser.error = error  # type: ignore[method-assign]


def _common(p: argparse.ArgumentParser) -> None:
    where = p.add_argument_group("connection (give one of --socket, --fd and --vfio-user)")
    where.add_argument(
        "--socket",
        "--socket-path",
        dest="socket",
        metavar="PATH",
        help="unix socket path (listened on, or connected to with --connect)",
    )
    where.add_argument(
        "--fd", type=int_range(0, 1 << 20), metavar="N", help="inherited socket descriptor"
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
    where.add_argument(
        "--vfio-user",
        dest="vfio_user",
        metavar="PATH",
        help="serve the device as a virtio-pci function over vfio-user on this unix "
        "socket (QEMU -device vfio-user-pci) instead of vhost-user",
    )
    where.add_argument(
        "--pci-mode",
        choices=("modern", "transitional", "legacy"),
        default=None,
        help="with --vfio-user: the virtio-pci interface offered (default modern)",
    )
    p.add_argument(
        "--batch",
        type=int_range(1, 1 << 16),
        default=DEFAULT_BATCH,
        metavar="N",
        help=f"requests one queue serves before the others get a turn (default {DEFAULT_BATCH})",
    )
    p.add_argument(
        "--trust-frontend",
        action="store_true",
        help="accept guest memory that cannot be sealed against shrinking (file-backed "
        "memory such as memory-backend-file); an untrusted front-end could then crash "
        "the back-end by truncating it",
    )
    p.add_argument(
        "--print-capabilities",
        action="store_true",
        help="print the back-end capabilities as JSON (vhost-user.json) and exit",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log connections and totals")
    p.add_argument("--trace", action="store_true", help="log every vhost-user message")


def register(subparsers: Any) -> None:
    """Add the ``serve`` sub-command with one sub-command per registered device type."""
    p = subparsers.add_parser(
        "serve",
        help="serve a device to a VM over vhost-user (a vhost-user back-end)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    _one_line_error(p)
    p.set_defaults(func=lambda args: _missing_device(p))
    devices = p.add_subparsers(dest="device", metavar="DEVICE")
    for entry in device_types():
        if entry.create is None:
            continue
        sub = devices.add_parser(
            entry.name,
            help=entry.summary,
            description=f"Serve a {entry.summary} over vhost-user.",
        )
        _one_line_error(sub)
        _common(sub)
        entry.add_arguments(sub)
        sub.set_defaults(func=partial(run, entry))


def _missing_device(parser: argparse.ArgumentParser) -> int:
    parser.print_usage(sys.stderr)
    names = " or ".join(e.name for e in device_types() if e.create is not None)
    print(f"{parser.prog}: error: name a device: {names}", file=sys.stderr)
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
    given = [x for x in (args.socket, args.fd, args.vfio_user) if x is not None]
    if len(given) != 1:
        raise ConfigurationError("give exactly one of --socket PATH, --fd N and --vfio-user PATH")
    if args.vfio_user is not None and args.connect:
        raise ConfigurationError("--connect is for vhost-user (--socket)")
    if args.vfio_user is None and args.pci_mode is not None:
        raise ConfigurationError("--pci-mode needs --vfio-user")
    if args.connect and args.socket is None:
        raise ConfigurationError("--connect needs --socket PATH")


def _serve(
    device: VirtioDevice,
    args: argparse.Namespace,
    companions: list[tuple[str, VirtioDevice]] = [],  # noqa: B006 - never mutated
) -> int:
    _setup_logging(args)

    def report(stats: ConnectionStats) -> None:
        if args.verbose or args.trace:
            print(f"pyvirtio: connection ended: {stats.summary()}", file=sys.stderr, flush=True)

    options = {"batch": args.batch, "trust_frontend": args.trust_frontend}
    server = VhostUserServer(
        device,
        socket_path=args.socket,
        fd=args.fd,
        connect=args.connect,
        connect_timeout=args.connect_timeout,
        backend_options=options,
        handle_signals=True,
        on_connection_end=report,
    )
    # devices served beside the main one (each its own socket and thread); they stop
    # when the main server does
    others = [
        VhostUserServer(dev, socket_path=path, backend_options=options, on_connection_end=report)
        for path, dev in companions
    ]
    threads = [
        threading.Thread(target=o.serve, name=f"pyvirtio-serve-{i}", daemon=True)
        for i, o in enumerate(others)
    ]
    for t in threads:
        t.start()
    try:
        server.serve()
    finally:
        for o in others:
            o.stop()
        for t in threads:
            t.join(timeout=5)
    return 0


def _serve_vfio_user(device: VirtioDevice, args: argparse.Namespace) -> int:
    """Serve ``device`` as a virtio-pci function over vfio-user until Ctrl-C."""
    from pyvirtio.transport.vfio_user.server import VfioUserServer

    _setup_logging(args)

    def report(metrics: Any) -> None:
        if args.verbose or args.trace:
            print(f"pyvirtio: connection ended: {metrics.summary()}", file=sys.stderr, flush=True)

    server = VfioUserServer(
        device,
        args.vfio_user,
        pci_mode=args.pci_mode or "modern",
        trust_client=args.trust_frontend,
        handle_signals=True,
        on_connection_end=report,
    )
    server.trace = args.trace
    server.serve()
    return 0


def run(entry: DeviceType, args: argparse.Namespace) -> int:
    """``pyvirtio serve <entry.name>``: build the device from ``args`` and serve it."""
    if args.print_capabilities:
        print(json.dumps(dict(entry.capabilities)))
        return 0
    _check_connection(args)
    assert entry.create is not None  # only such entries get a sub-command
    device = entry.create(args)
    if args.vfio_user is not None:
        try:
            return _serve_vfio_user(device, args)
        finally:
            device.close()
    companions: list[tuple[str, VirtioDevice]] = []
    try:
        companions = entry.companions(args)
        return _serve(device, args, companions)
    finally:
        for _, dev in companions:
            dev.close()
        device.close()
