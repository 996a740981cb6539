"""The network device's registry entry: ``serve net``, ``probe`` support, demo part.

``pyvirtio serve net --socket S`` plus one host back-end:

- ``--tap NAME``: a Linux TAP (created if missing; ``--queues N`` opens it
  multiqueue), with the virtio_net_hdr passed through so checksum and TSO offloads
  work end to end;
- ``--socket-peer SPEC``: frames over a unix socket to another process:
  ``PATH`` or ``dgram:PATH[,REMOTE]`` (datagrams; QEMU ``-netdev dgram``),
  ``connect:PATH`` (a stream with 4-byte lengths; QEMU ``-netdev stream,server=on``)
  or ``listen:PATH`` (wait for such a peer);
- ``--switch``: an in-process learning switch; each ``--switch-port PATH`` serves
  one more network device on it over its own vhost-user socket, so several guests
  talk to each other with no host networking.

A vhost-user front-end (QEMU's ``vhost-user`` netdev, DPDK's ``net_virtio_user``)
runs the control queue and the configuration space itself, so the back-end serves
``2 x --queues`` rings and offers the data-path features only.
"""

from __future__ import annotations

import argparse
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pyvirtio.core.device import VirtioDevice
from pyvirtio.devices.registry import DeviceType, int_range
from pyvirtio.errors import ConfigurationError
from pyvirtio.spec.ids import DeviceId
from pyvirtio.spec.net import VIRTIO_NET_CONFIG, NetFeature

if TYPE_CHECKING:
    from pyvirtio.core.driver import DriverTransport, VirtioDriver
    from pyvirtio.devices.net.backend import NetBackend
    from pyvirtio.devices.net.switch import Switch
    from pyvirtio.vm.qemu import GuestResult

__all__ = ["DEVICE_TYPE", "FEATURE_NAMES", "parse_mac"]

FEATURE_NAMES = {int(f): f"VIRTIO_NET_F_{f.name}" for f in NetFeature}

#: Feature bits only a network device has among the registered types (the block
#: device's end at 17): CTRL_RX .. CTRL_MAC_ADDR and 53 .. 63.
_NET_MARKERS = sum(1 << b for b in (*range(18, 24), *range(53, 64)))


def parse_mac(text: str) -> bytes:
    """``52:54:00:12:34:56`` -> 6 bytes (an argparse ``type``); unicast only."""
    parts = text.replace("-", ":").split(":")
    try:
        raw = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid MAC address {text!r}") from None
    if len(raw) != 6 or any(len(p) not in (1, 2) for p in parts):
        raise argparse.ArgumentTypeError(f"invalid MAC address {text!r}")
    if raw[0] & 1:
        raise argparse.ArgumentTypeError(f"{text} is a multicast address")
    return raw


def _add_arguments(p: argparse.ArgumentParser) -> None:
    host = p.add_argument_group("host side (give one)")
    host.add_argument("--tap", metavar="NAME", help="a Linux TAP interface (created if missing)")
    host.add_argument(
        "--socket-peer",
        metavar="SPEC",
        help="frames over a unix socket: PATH or dgram:PATH[,REMOTE] (datagrams), "
        "connect:PATH or listen:PATH (4-byte length-prefixed stream, QEMU -netdev stream)",
    )
    host.add_argument(
        "--switch",
        action="store_true",
        help="an in-process learning switch; --switch-port adds devices on it",
    )
    p.add_argument(
        "--switch-port",
        action="append",
        default=[],
        metavar="PATH",
        help="with --switch: serve one more network device on the switch at this "
        "vhost-user socket (repeatable)",
    )
    p.add_argument(
        "--queues",
        type=int_range(1, 128),
        default=1,
        metavar="N",
        help="queue pairs (default 1; QEMU's -netdev vhost-user,queues=N must not exceed it)",
    )
    p.add_argument("--mac", type=parse_mac, help="the device's MAC address (default: random)")
    p.add_argument(
        "--mtu",
        type=int_range(68, 65535),
        help="largest frame payload passed to the guest (QEMU's host_mtu also sets it)",
    )
    p.add_argument(
        "--no-mrg-rxbuf", action="store_true", help="do not offer VIRTIO_NET_F_MRG_RXBUF"
    )
    p.add_argument(
        "--no-offloads",
        action="store_true",
        help="do not offer checksum and TSO offloads (a TAP offers them by default)",
    )
    p.add_argument(
        "--queue-size",
        type=int_range(1, 32768),
        default=1024,
        metavar="N",
        help="largest ring accepted (default 1024)",
    )


def _socket_backend(spec: str) -> NetBackend:
    from pyvirtio.devices.net.backend import SocketBackend

    kind, _, rest = spec.partition(":")
    if kind not in ("dgram", "connect", "listen") or not rest:
        kind, rest = "dgram", spec
    if kind == "dgram":
        local, _, remote = rest.partition(",")
        return SocketBackend.dgram(local, remote or None)
    if kind == "listen":
        return SocketBackend.listen(rest)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(rest)
    except OSError as e:
        s.close()
        raise ConfigurationError(f"cannot connect to {rest}: {e.strerror}") from e
    return SocketBackend.stream(s)


def _switch(args: argparse.Namespace) -> Switch:
    from pyvirtio.devices.net.switch import Switch

    sw: Switch | None = getattr(args, "_pyvirtio_switch", None)
    if sw is None:
        sw = Switch()
        args._pyvirtio_switch = sw
    return sw


def _device(args: argparse.Namespace, backend: NetBackend) -> VirtioDevice:
    from pyvirtio.devices.net.device import NetDevice

    return NetDevice(
        backend,
        mac=args.mac,
        queue_pairs=args.queues,
        # a vhost-user front-end keeps the control queue; over vfio-user the PCI
        # function is the whole device, so it has its own
        ctrl_vq=getattr(args, "vfio_user", None) is not None,
        mtu=args.mtu,
        mrg_rxbuf=not args.no_mrg_rxbuf,
        offloads=not args.no_offloads,
        queue_max_size=args.queue_size,
    )


def _create(args: argparse.Namespace) -> VirtioDevice:
    chosen = [x for x in (args.tap, args.socket_peer, args.switch or None) if x]
    if len(chosen) != 1:
        raise ConfigurationError("give one of --tap NAME, --socket-peer SPEC and --switch")
    if args.switch_port and not args.switch:
        raise ConfigurationError("--switch-port needs --switch")
    backend: NetBackend
    if args.tap:
        from pyvirtio.devices.net.backend import TapBackend

        backend = TapBackend(args.tap, queues=args.queues, vnet_hdr=True)
    elif args.socket_peer:
        backend = _socket_backend(args.socket_peer)
    else:
        backend = _switch(args).port("socket")
    return _device(args, backend)


def _companions(args: argparse.Namespace) -> list[tuple[str, VirtioDevice]]:
    """``--switch-port PATH``: one more device on the same switch per path."""
    if not args.switch:
        return []
    sw = _switch(args)
    out: list[tuple[str, VirtioDevice]] = []
    for i, path in enumerate(args.switch_port):
        mac = None
        if args.mac is not None:
            # distinct addresses: the last byte counts up from --mac
            mac = args.mac[:5] + bytes([(args.mac[5] + i + 1) & 0xFF])
        dev_args = argparse.Namespace(**{**vars(args), "mac": mac})
        out.append((path, _device(dev_args, sw.port(path))))
    return out


def _driver() -> type[VirtioDriver]:
    from pyvirtio.drivers.net import NetDriver

    return NetDriver


def _exercise(t: DriverTransport) -> dict[str, Any]:
    """Bring the driver up, send one broadcast frame and wait briefly for anything
    to come back (a forwarding back-end such as testpmd's macswap echoes it).
    Over a vhost-user back-end without a configuration space the front-end keeps
    one, as QEMU does: a random MAC, link up, the back-end's queue pairs."""
    from pyvirtio.devices.net.device import random_mac
    from pyvirtio.drivers.net import NetDriver
    from pyvirtio.drivers.net.driver import NetTimeoutError
    from pyvirtio.spec.features import Feature
    from pyvirtio.spec.net import VirtioNetConfig
    from pyvirtio.transport.vhost_user.frontend import VhostUserFrontend

    if isinstance(t, VhostUserFrontend) and not t.has_config:
        pairs = max(1, t.num_queues() // 2)
        t.keep_config(
            VIRTIO_NET_CONFIG.pack(
                VirtioNetConfig(
                    random_mac(), 1, min(pairs, 0x8000), 1500, 0xFFFFFFFF, 0xFF, 0, 0, 0
                )
            )
        )
    drv = NetDriver(t, timeout=10.0)
    drv.initialize()
    try:
        frame = b"\xff" * 6 + drv.mac + b"\x88\xb5" + b"pyvirtio probe".ljust(46, b"\0")
        t0 = time.perf_counter()
        drv.send(frame)
        drv.flush_tx(timeout=10.0)
        us = (time.perf_counter() - t0) * 1e6
        try:
            echoed = len(drv.recv(timeout=0.5))
        except NetTimeoutError:
            echoed = 0
        return {
            "ring": "packed" if drv.has_feature(Feature.RING_PACKED) else "split",
            "mac": ":".join(f"{b:02x}" for b in drv.mac),
            "link_up": drv.link_up,
            "header_bytes": drv.hdr_size,
            "mrg_rxbuf": drv.has_feature(NetFeature.MRG_RXBUF),
            "queue_pairs": drv.max_queue_pairs,
            "sent_bytes": len(frame),
            "microseconds": round(us),
            "received_bytes": echoed,
        }
    finally:
        drv.close()


def _describe(ex: dict[str, Any]) -> list[str]:
    back = f", {ex['received_bytes']} bytes came back" if ex["received_bytes"] else ""
    return [
        f"    mac {ex['mac']}, link {'up' if ex['link_up'] else 'down'}, "
        f"{ex['header_bytes']}-byte header, MRG_RXBUF {ex['mrg_rxbuf']}, "
        f"{ex['queue_pairs']} queue pair(s)",
        f"    sent a {ex['sent_bytes']}-byte broadcast frame in {ex['microseconds']} us{back}",
    ]


def _guess(specific: int, config: bytes | None, num_queues: int | None) -> bool:
    """A feature bit only network devices have (CTRL_RX .. CTRL_MAC_ADDR, or one of
    53 .. 63 such as SPEED_DUPLEX, virtio-v1.2 §5.1.3) and, if the back-end says,
    at least one receiveq/transmitq pair (§5.1.2)."""
    return bool(specific & _NET_MARKERS) and (num_queues is None or num_queues >= 2)


def _config_note(name: str, value: int) -> str:
    if name == "status":
        return "  (link up)" if value & 1 else "  (link down)"
    return ""


_DEMO_TAP = "pvdemo0"
_DEMO_HOST = "10.99.0.1"
_DEMO_GUEST = "10.99.0.2"

_GUEST_SCRIPT = f"""
echo "== guest: network device"
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 400 ]; do usleep 50000; n=$((n + 1)); done
ip link set eth0 up
ip addr add {_DEMO_GUEST}/24 dev eth0
echo "  eth0: $(cat /sys/class/net/eth0/address), carrier $(cat /sys/class/net/eth0/carrier), \
$(ls /sys/class/net/eth0/queues | wc -l) queues"
if ping -c 3 -W 5 {_DEMO_HOST} > /tmp/ping.txt; then
  echo "  $(tail -1 /tmp/ping.txt)"
  echo "GUEST-PING ok"
else
  echo "GUEST-PING failed"
fi
"""


class _NetDemo:
    """The network part of the guest demo: the guest pings the host side, a TAP the
    back-end makes inside a network namespace made for the run (10.99.0.1; nothing
    else is reachable)."""

    qemu_device: str = "virtio-net-pci"
    modules: tuple[str, ...] = ("virtio_net",)
    script: str = _GUEST_SCRIPT
    netdev: bool = True

    def __init__(self, workdir: str, args: argparse.Namespace) -> None:
        from pyvirtio.vm.netns import NetNamespace

        self.files: Mapping[str, bytes] = {}
        self.ns = NetNamespace("pvdemo")
        # QEMU 7.2 under TCG crashes in vhost_net_start with MSI-X and the control
        # queue on a vhost-user netdev (11.1 does not): INTx avoids it there
        old_qemu = getattr(args, "peer_generation", "qemu7.2").startswith("qemu7.")
        self.qemu_options = ",mac=52:54:00:99:00:02" + (",vectors=0" if old_qemu else "")

    def serve_prefix(self) -> list[str]:
        return self.ns.exec_argv([])

    def serve_args(self) -> list[str]:
        return ["--tap", _DEMO_TAP]

    def backend_ready(self) -> None:
        self.ns.up(_DEMO_TAP, f"{_DEMO_HOST}/24")

    def check(self, result: GuestResult) -> dict[str, bool]:
        ping = result.marker_value("GUEST-PING") if result.marker_lines("GUEST-PING") else ""
        return {f"guest pinged the host side ({_DEMO_HOST}, a TAP in a namespace)": ping == "ok"}

    def close(self) -> None:
        self.ns.close()


_CAPABILITIES: dict[str, Any] = {"type": "net", "features": []}

#: The network device (virtio-v1.2 §5.1 "Network Device").
DEVICE_TYPE = DeviceType(
    name="net",
    device_id=int(DeviceId.NET),
    summary="virtio network device on a TAP, a unix socket or an in-process switch",
    feature_names=FEATURE_NAMES,
    config_layout=VIRTIO_NET_CONFIG,
    fixed_queues=2,
    add_arguments=_add_arguments,
    create=_create,
    capabilities=_CAPABILITIES,
    driver=_driver,
    exercise=_exercise,
    describe_exercise=_describe,
    guess=_guess,
    config_note=_config_note,
    companions=_companions,
    demo=_NetDemo,
)
