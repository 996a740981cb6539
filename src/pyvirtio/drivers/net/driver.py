"""The network driver. virtio-v1.2 §5.1 "Network Device", the driver's side.

:class:`NetDriver` negotiates the network features, reads ``struct
virtio_net_config``, keeps the receive queues populated with buffers, sends frames on
the transmit queues and issues control commands on the control queue. It offers a
blocking API (:meth:`NetDriver.send`, :meth:`~NetDriver.recv`, ...) built on
non-blocking steps (:meth:`~NetDriver.try_send`, :meth:`~NetDriver.try_recv`,
:meth:`~NetDriver.service`) that :class:`~pyvirtio.drivers.net.aio.AsyncNetDriver`
shares.

Queues (virtio-v1.2 §5.1.2 "Virtqueues"): receiveq(i) is queue ``2 i``, transmitq(i)
is ``2 i + 1``, and controlq follows the last pair the device has (index ``2 N``,
N = ``max_virtqueue_pairs`` with VIRTIO_NET_F_MQ, else 1). Every queue the device has
up to controlq is set up, as Linux does; only the pairs in use get receive buffers.

Memory: each receive buffer is one allocation of guest memory, made when its queue
is first populated and kept until :meth:`NetDriver.close`; each transmitted frame
(header + data) and each control command (header, data, ``ack``) is one allocation,
freed when the device returns it.

The device is not trusted (ARCHITECTURE.md convention 4): a used length shorter than
the header, a ``num_buffers`` of 0 or larger than the buffers the device holds, a
merged buffer that is not the last and not full, or a control command completed
without its ``ack`` written, is a :class:`~pyvirtio.errors.DeviceError` and breaks
the queue concerned (later use raises :class:`~pyvirtio.errors.QueueBrokenError`).
Every wait has a deadline (:class:`NetTimeoutError`) and re-checks the device
status, so a silent device never hangs the caller.

Byte order: the legacy interface formats the header, ``status``, the MAC table's
``entries``, VLAN ids and ``offloads`` "according to the native endian of the guest"
(virtio-v1.2 §5.1.6.1, §5.1.4.2, §5.1.6.5.2.2 ...). The guests pyvirtio drives (x86
under QEMU, loopback on the host) are little-endian, so the little-endian layouts of
:mod:`pyvirtio.spec.net` serve both interfaces.

The driver is not thread-safe: use it from one thread (or through
:class:`~pyvirtio.drivers.net.aio.AsyncNetDriver` from one event loop).
"""

from __future__ import annotations

import os
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pyvirtio.core.driver import DriverTransport, RingOptions, VirtioDriver
from pyvirtio.errors import (
    ConfigurationError,
    DeviceError,
    GuestMemoryError,
    QueueBrokenError,
    QueueFullError,
    VirtioError,
)
from pyvirtio.spec.features import Feature, bit, has
from pyvirtio.spec.ids import DeviceId
from pyvirtio.spec.net import (
    ETH_ALEN,
    FEATURE_REQUIREMENTS,
    VIRTIO_NET_CONFIG,
    VIRTIO_NET_CTRL_HDR,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN,
    VIRTIO_NET_ERR,
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_LEGACY,
    VIRTIO_NET_OK,
    NetCtrlAnnounce,
    NetCtrlClass,
    NetCtrlMac,
    NetCtrlMq,
    NetCtrlRx,
    NetCtrlVlan,
    NetFeature,
    NetGsoType,
    NetHdrFlags,
    NetStatus,
    VirtioNetHdr,
    net_hdr_size,
)
from pyvirtio.virtqueue.common import DriverVirtqueue, Segment

__all__ = [
    "DEFAULT_FEATURES",
    "OFFLOAD_FEATURES",
    "NetControlError",
    "NetDriver",
    "NetDriverStats",
    "NetTimeoutError",
    "NetUnsupportedError",
    "feature_closure",
    "format_mac",
    "rx_queue",
    "tx_queue",
]

CLAUSE_FEATURE_REQ = 'virtio-v1.2 §5.1.3.1 "Feature bit requirements"'
CLAUSE_CONFIG = 'virtio-v1.2 §5.1.4.1 "Device Requirements: Device configuration layout"'
CLAUSE_TX = 'virtio-v1.2 §5.1.6.2.1 "Driver Requirements: Packet Transmission"'
CLAUSE_RX_BUFFERS = 'virtio-v1.2 §5.1.6.3.2 "Device Requirements: Setting Up Receive Buffers"'
CLAUSE_RX_DEVICE = 'virtio-v1.2 §5.1.6.4.1 "Device Requirements: Processing of Incoming Packets"'
CLAUSE_CTRL = 'virtio-v1.2 §5.1.6.5 "Control Virtqueue"'
CLAUSE_MQ = 'virtio-v1.2 §5.1.6.5.5 "Device operation in multiqueue mode"'

#: Ethernet header, VLAN tag, and the largest untagged payload without VIRTIO_NET_F_MTU.
ETH_HLEN = 14
VLAN_HLEN = 4
ETH_DATA_LEN = 1500
#: Largest frame with GUEST_TSO4/TSO6/UFO: "65550 bytes long (the maximum size of a TCP
#: or UDP packet, plus the 14 byte ethernet header)" (virtio-v1.2 §5.1.6.3).
MAX_GSO_FRAME = 65550
#: Receive buffer size with VIRTIO_NET_F_MRG_RXBUF unless told otherwise.
DEFAULT_MRG_BUFFER_SIZE = 2048
#: Default deadlines (seconds) for a blocking send / receive and a control command.
DEFAULT_TIMEOUT = 10.0
DEFAULT_CTRL_TIMEOUT = 10.0
#: While waiting, the device status is re-checked at least this often (seconds).
POLL_SLICE = 0.25
#: Frames received and not yet handed out are capped: past it the driver stops
#: taking used buffers, so the device runs out of buffers and drops (back-pressure).
MAX_READY_FRAMES = 4096

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_UNWRITTEN_ACK = 0xFF

#: The device-type features this driver accepts by default when offered.
DEFAULT_FEATURES = (
    bit(NetFeature.MAC)
    | bit(NetFeature.STATUS)
    | bit(NetFeature.MTU)
    | bit(NetFeature.CTRL_VQ)
    | bit(NetFeature.CTRL_RX)
    | bit(NetFeature.CTRL_RX_EXTRA)
    | bit(NetFeature.CTRL_VLAN)
    | bit(NetFeature.CTRL_MAC_ADDR)
    | bit(NetFeature.GUEST_ANNOUNCE)
    | bit(NetFeature.MQ)
    | bit(NetFeature.SPEED_DUPLEX)
)

#: The offload features, accepted only when asked for (``offloads=``).
OFFLOAD_FEATURES = (
    bit(NetFeature.CSUM)
    | bit(NetFeature.GUEST_CSUM)
    | bit(NetFeature.CTRL_GUEST_OFFLOADS)
    | bit(NetFeature.GUEST_TSO4)
    | bit(NetFeature.GUEST_TSO6)
    | bit(NetFeature.GUEST_ECN)
    | bit(NetFeature.GUEST_UFO)
    | bit(NetFeature.HOST_TSO4)
    | bit(NetFeature.HOST_TSO6)
    | bit(NetFeature.HOST_ECN)
    | bit(NetFeature.HOST_UFO)
)

#: Offloads ``VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET`` can switch (virtio-v1.2 §5.1.6.5.6.1).
GUEST_OFFLOADS = (
    bit(NetFeature.GUEST_CSUM)
    | bit(NetFeature.GUEST_TSO4)
    | bit(NetFeature.GUEST_TSO6)
    | bit(NetFeature.GUEST_ECN)
    | bit(NetFeature.GUEST_UFO)
)
#: gso_type -> the feature that allows the driver to set it (§5.1.6.2.1)
_GSO_FEATURE: dict[int, int] = {
    NetGsoType.TCPV4: NetFeature.HOST_TSO4,
    NetGsoType.TCPV6: NetFeature.HOST_TSO6,
    NetGsoType.UDP: NetFeature.HOST_UFO,
}
_GUEST_GSO = bit(NetFeature.GUEST_TSO4) | bit(NetFeature.GUEST_TSO6) | bit(NetFeature.GUEST_UFO)


def feature_closure(features: int) -> int:
    """Drop from ``features`` every network feature whose requirement is missing,
    until none is left (virtio-v1.2 §5.1.3.1 "Feature bit requirements"; §2.2.1: "The
    driver MUST NOT accept a feature which requires another feature which was not
    accepted"). CTRL_RX_EXTRA is tied to CTRL_RX, as Linux does (its commands are RX
    class commands)."""
    while True:
        drop = 0
        for feat, needs in FEATURE_REQUIREMENTS.items():
            if has(features, feat) and not any(has(features, n) for n in needs):
                drop |= bit(feat)
        if not drop:
            return features
        features &= ~drop


def rx_queue(pair: int) -> int:
    """Index of receiveq(pair + 1) (virtio-v1.2 §5.1.2)."""
    return 2 * pair


def tx_queue(pair: int) -> int:
    """Index of transmitq(pair + 1) (virtio-v1.2 §5.1.2)."""
    return 2 * pair + 1


def _mac_bytes(addr: bytes | str) -> bytes:
    """A MAC address as 6 bytes, from bytes or ``"52:54:00:12:34:56"``."""
    if isinstance(addr, str):
        parts = addr.replace("-", ":").split(":")
        try:
            raw = bytes(int(p, 16) for p in parts)
        except ValueError:
            raise ValueError(f"bad MAC address {addr!r}") from None
    else:
        raw = bytes(addr)
    if len(raw) != ETH_ALEN:
        raise ValueError(f"a MAC address has {ETH_ALEN} bytes, not {len(raw)}")
    return raw


def format_mac(mac: bytes) -> str:
    """``b"RT\\x00\\x124V"`` -> ``"52:54:00:12:34:56"``."""
    return ":".join(f"{b:02x}" for b in mac)


class NetControlError(VirtioError):
    """The device answered a control command with VIRTIO_NET_ERR."""

    def __init__(self, message: str, class_: int, command: int, ack: int) -> None:
        super().__init__(message, CLAUSE_CTRL)
        #: the command's class and command
        self.class_ = class_
        self.command = command
        #: the ``ack`` byte the device wrote
        self.ack = ack


class NetUnsupportedError(ConfigurationError):
    """The operation needs a feature that was not negotiated (the driver MUST NOT
    issue that command)."""


class NetTimeoutError(VirtioError, TimeoutError):
    """Nothing arrived (or no room came free) before the deadline. The driver stays
    usable: buffers in flight stay in flight."""


@dataclass
class NetDriverStats:
    """What the driver did (convention 10: a small counters object)."""

    tx_packets: int = 0
    tx_bytes: int = 0
    tx_completed: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    #: used receive buffers (with MRG_RXBUF several per packet)
    rx_buffers: int = 0
    ctrl_commands: int = 0
    ctrl_errors: int = 0
    config_changes: int = 0
    #: device violations seen (each broke a queue)
    device_errors: int = 0


class _Ctrl:
    """One control command in flight."""

    __slots__ = ("ack", "ack_addr", "addr", "class_", "command", "done", "error")

    def __init__(self, class_: int, command: int) -> None:
        self.class_ = class_
        self.command = command
        #: guest address of the command's allocation and of its ``ack`` byte
        self.addr = 0
        self.ack_addr = 0
        self.ack = _UNWRITTEN_ACK
        self.done = False
        self.error: VirtioError | None = None


@dataclass
class _RxQueue:
    """Receive buffer bookkeeping of one receiveq."""

    index: int
    #: guest addresses of the buffers that are not posted
    free: list[int]
    #: every buffer allocated for this queue
    all: list[int]
    #: buffers the device owns
    posted: set[int]
    #: used buffers taken from the ring, not yet assembled into a packet
    used: deque[tuple[int, int]]


class NetDriver(VirtioDriver):
    """A virtio network driver (virtio-v1.2 §5.1) over any :class:`DriverTransport`.

    Feature choices (each accepted only if the device offers it, then reduced by the
    requirements of virtio-v1.2 §5.1.3.1 with :func:`feature_closure`):

    - the control features, MAC, STATUS, MTU, MQ, SPEED_DUPLEX and GUEST_ANNOUNCE
      (:data:`DEFAULT_FEATURES`) are on; ``ctrl_vq=False`` turns the control queue
      (and everything that needs it) off;
    - ``mrg_rxbuf`` (default True): VIRTIO_NET_F_MRG_RXBUF, receive buffers of
      ``rx_buffer_size`` bytes (default 2048) a packet may span;
    - ``offloads``: the offload bits of :data:`OFFLOAD_FEATURES` to accept (feature
      bit numbers or a mask; default none);
    - ``queue_pairs``: how many queue pairs to use (VIRTIO_NET_F_MQ; capped by
      ``max_virtqueue_pairs``; default 1, raise it later with :meth:`set_queue_pairs`);
    - ``extra_features``: further device-type bits to accept as is (tests, new bits).

    ``rx_buffers`` caps the receive buffers kept posted per receiveq (default: as many
    as fit the queue, at most 256, or 16 buffers of 65562 bytes with GUEST_TSO/UFO and
    no MRG_RXBUF). ``timeout`` is the default deadline of :meth:`send` /
    :meth:`recv`, ``ctrl_timeout`` that of control commands.
    """

    device_id = DeviceId.NET

    def __init__(
        self,
        transport: DriverTransport,
        *,
        mrg_rxbuf: bool = True,
        ctrl_vq: bool = True,
        offloads: int | Iterable[int] = 0,
        queue_pairs: int = 1,
        extra_features: int = 0,
        rx_buffer_size: int | None = None,
        rx_buffers: int | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        ctrl_timeout: float = DEFAULT_CTRL_TIMEOUT,
        ring: RingOptions = RingOptions(),
    ) -> None:
        super().__init__(transport, ring=ring)
        mask = offloads if isinstance(offloads, int) else sum(bit(int(b)) for b in set(offloads))
        if mask & ~OFFLOAD_FEATURES:
            raise ConfigurationError(
                f"offloads {mask & ~OFFLOAD_FEATURES:#x} are not offload feature bits"
            )
        if queue_pairs < 1:
            raise ConfigurationError("queue_pairs must be at least 1")
        if rx_buffers is not None and rx_buffers < 1:
            raise ConfigurationError("rx_buffers must be at least 1")
        if ctrl_timeout <= 0:
            raise ConfigurationError("ctrl_timeout must be positive")
        self.mrg_rxbuf = mrg_rxbuf
        self.ctrl_vq = ctrl_vq
        self.offloads = mask
        self.extra_features = extra_features
        self.wanted_queue_pairs = queue_pairs
        self.timeout = timeout
        self.ctrl_timeout = ctrl_timeout
        self._rx_buffer_size_arg = rx_buffer_size
        self._rx_buffers_arg = rx_buffers
        #: the header length for the negotiated features (virtio-v1.2 §5.1.6)
        self.hdr_size = VIRTIO_NET_HDR.size
        #: the size of each receive buffer
        self.rx_buffer_size = 0
        self.stats = NetDriverStats()
        #: the device's ``max_virtqueue_pairs`` (1 without VIRTIO_NET_F_MQ)
        self.max_queue_pairs = 1
        #: the queue pairs in use
        self.queue_pairs = 1
        #: True while the device asks for an announcement (VIRTIO_NET_S_ANNOUNCE)
        self.announce_pending = False
        #: called after each configuration change notification was processed
        self.on_config: Callable[[NetDriver], None] | None = None
        self._status = NetStatus.LINK_UP
        self._mtu: int | None = None
        self._speed: int | None = None
        self._duplex: int | None = None
        self._mac = b""
        self._ctrl_index = -1
        self._rx: list[_RxQueue] = []
        #: per transmit queue: token (allocation address) -> frame length
        self._tx: dict[int, dict[int, int]] = {}
        self._ctrl_inflight: dict[int, _Ctrl] = {}
        self._ready: deque[tuple[VirtioNetHdr, bytes]] = deque()
        self._rx_errors: deque[VirtioError] = deque()
        self._dirty: set[int] = set()
        #: control allocations the device may still write (timed out): freed on close
        self._orphans: list[int] = []

    # -- negotiation (virtio-v1.2 §5.1.3, §5.1.5) -----------------------------------

    def specific_features(self, offered: int) -> int:
        """The network features to accept out of ``offered`` (see the class docs).

        virtio-v1.2 §5.1.4.2: "A driver SHOULD negotiate VIRTIO_NET_F_MAC if the
        device offers it", "SHOULD negotiate VIRTIO_NET_F_MTU if the device offers it".
        """
        want = DEFAULT_FEATURES | self.offloads | self.extra_features
        if self.mrg_rxbuf:
            want |= bit(NetFeature.MRG_RXBUF)
        if not self.ctrl_vq:
            want &= ~bit(NetFeature.CTRL_VQ)
        return feature_closure(offered & want)

    def _net_config_field(self, name: str) -> int | bytes:
        st = VIRTIO_NET_CONFIG.field_struct(name)
        raw = self.read_config(VIRTIO_NET_CONFIG.offset_of(name), st.size)
        value: int | bytes = st.unpack(raw)[0]
        return value

    def _read_status(self) -> None:
        if self.has_feature(NetFeature.STATUS):
            self._status = NetStatus(int(self._net_config_field("status")) & 0x3)
        else:
            # §5.1.4.2: without VIRTIO_NET_F_STATUS the driver "SHOULD assume the
            # link is active"
            self._status = NetStatus.LINK_UP
        self.announce_pending = bool(
            self._status & NetStatus.ANNOUNCE and self.has_feature(NetFeature.GUEST_ANNOUNCE)
        )

    def _read_speed_duplex(self) -> None:
        if not self.has_feature(NetFeature.SPEED_DUPLEX):
            return
        # §5.1.4.2: "the driver MUST treat any value of speed above 0x7fffffff as well
        # as any value of duplex not matching 0x00 or 0x01 as an unknown value"
        speed = int(self._net_config_field("speed"))
        duplex = int(self._net_config_field("duplex"))
        self._speed = speed if speed <= 0x7FFFFFFF else None
        self._duplex = duplex if duplex in (0, 1) else None

    def setup(self) -> None:
        """Read ``struct virtio_net_config`` (virtio-v1.2 §5.1.4), only the fields the
        negotiated features make exist, and size the receive buffers."""
        f = self.features
        self.hdr_size = net_hdr_size(f)
        if has(f, NetFeature.MAC):
            # §5.1.4.2: "If the driver negotiates the VIRTIO_NET_F_MAC feature, the
            # driver MUST set the physical address of the NIC to mac."
            self._mac = bytes(self._net_config_field("mac"))
        else:
            # "Otherwise, it SHOULD use a locally-administered MAC address"
            self._mac = bytes([(os.urandom(1)[0] & 0xFC) | 0x02]) + os.urandom(5)
        self._read_status()
        self.max_queue_pairs = 1
        if has(f, NetFeature.MQ):
            pairs = int(self._net_config_field("max_virtqueue_pairs"))
            # §5.1.4.1: "The device MUST set max_virtqueue_pairs to between 1 and
            # 0x8000 inclusive, if it offers VIRTIO_NET_F_MQ."
            if not VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN <= pairs <= VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX:
                raise DeviceError(f"max_virtqueue_pairs is {pairs}", CLAUSE_CONFIG)
            self.max_queue_pairs = pairs
        self._mtu = None
        if has(f, NetFeature.MTU):
            mtu = int(self._net_config_field("mtu"))
            # §5.1.4.1: "The device MUST set mtu to between 68 and 65535 inclusive"
            if mtu < 68:
                raise DeviceError(f"mtu is {mtu}", CLAUSE_CONFIG)
            self._mtu = mtu
        self._read_speed_duplex()
        self.rx_buffer_size = self._choose_rx_buffer_size()

    def _choose_rx_buffer_size(self) -> int:
        """virtio-v1.2 §5.1.6.3.1 "Driver Requirements: Setting Up Receive Buffers"."""
        hdr = self.hdr_size
        if self.has_feature(NetFeature.MRG_RXBUF):
            size = self._rx_buffer_size_arg or DEFAULT_MRG_BUFFER_SIZE
            # "If VIRTIO_NET_F_MRG_RXBUF is negotiated, each buffer MUST be at least
            # the size of the struct virtio_net_hdr."
            if size < hdr:
                raise ConfigurationError(
                    f"rx_buffer_size {size} is smaller than the {hdr}-byte header"
                )
            return size
        if self.features & _GUEST_GSO:
            # "If VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6 or
            # VIRTIO_NET_F_GUEST_UFO are negotiated, the driver SHOULD populate the
            # receive queue(s) with buffers of at least 65562 bytes."
            need = hdr + MAX_GSO_FRAME
        else:
            # "Otherwise ... buffers of at least 1526 bytes"; a VLAN tag on top, and
            # with VIRTIO_NET_F_MTU "enough receive buffers to receive at least one
            # receive packet of size mtu (plus low level ethernet header length)"
            need = hdr + ETH_HLEN + VLAN_HLEN + max(ETH_DATA_LEN, self._mtu or 0)
        size = self._rx_buffer_size_arg or need
        if size < need:
            raise ConfigurationError(
                f"rx_buffer_size {size} cannot hold a full packet without MRG_RXBUF ({need})"
            )
        return size

    def queue_count(self) -> int:
        """Every queue up to controlq: ``2 N`` (+1 with VIRTIO_NET_F_CTRL_VQ), N =
        ``max_virtqueue_pairs`` with VIRTIO_NET_F_MQ, else 1 (virtio-v1.2 §5.1.2)."""
        n = 2 * self.max_queue_pairs
        return n + 1 if self.has_feature(NetFeature.CTRL_VQ) else n

    def initialize(self) -> None:
        """Bring the device up (virtio-v1.2 §5.1.5 "Device Initialization"): queues,
        receive buffers for the pairs in use, then VQ_PAIRS_SET if more than one."""
        super().initialize()
        try:
            self._ctrl_index = (
                2 * self.max_queue_pairs if self.has_feature(NetFeature.CTRL_VQ) else -1
            )
            self._tx = {tx_queue(p): {} for p in range(self.max_queue_pairs)}
            self._rx = [
                _RxQueue(rx_queue(p), [], [], set(), deque()) for p in range(self.max_queue_pairs)
            ]
            self.queue_pairs = 1
            self._populate(0)
            # publish and notify the receive buffers now: a vhost-user back-end
            # starts a ring at its first kick and has nowhere to put frames before
            self.kick_pending()
            pairs = min(self.wanted_queue_pairs, self.max_queue_pairs)
            if pairs > 1:
                self.set_queue_pairs(pairs)
        except BaseException:
            self._fail()
            raise

    def on_config_change(self) -> None:
        """Re-read ``status`` (link, announce) and, with VIRTIO_NET_F_SPEED_DUPLEX,
        ``speed`` and ``duplex`` (§5.1.4.2: the driver "SHOULD re-read speed and
        duplex after a configuration change notification")."""
        self.stats.config_changes += 1
        self._read_status()
        self._read_speed_duplex()
        if self.has_feature(NetFeature.MAC) and not self.has_feature(NetFeature.CTRL_MAC_ADDR):
            self._mac = bytes(self._net_config_field("mac"))
        cb = self.on_config
        if cb is not None:
            cb(self)

    # -- properties -------------------------------------------------------------------

    @property
    def mac(self) -> bytes:
        """The MAC address in use (the device's ``mac`` with VIRTIO_NET_F_MAC)."""
        return self._mac

    @property
    def link_up(self) -> bool:
        """VIRTIO_NET_S_LINK_UP as last read (re-read on each configuration change
        notification; always True without VIRTIO_NET_F_STATUS)."""
        return bool(self._status & NetStatus.LINK_UP)

    @property
    def status(self) -> NetStatus:
        """``status`` as last read."""
        return self._status

    @property
    def mtu(self) -> int | None:
        """The device's ``mtu`` (VIRTIO_NET_F_MTU), or None."""
        return self._mtu

    @property
    def speed(self) -> int | None:
        """Link speed in Mbit/s (VIRTIO_NET_F_SPEED_DUPLEX), None if unknown."""
        return self._speed

    @property
    def duplex(self) -> int | None:
        """0 half, 1 full duplex (VIRTIO_NET_F_SPEED_DUPLEX), None if unknown."""
        return self._duplex

    @property
    def max_frame(self) -> int:
        """The longest frame :meth:`send` accepts without segmentation offload."""
        if self._mtu is not None:
            # §5.1.4.2: "MUST NOT transmit packets of size exceeding the value of mtu
            # (plus low level ethernet header length) with gso_type NONE or ECN"
            return self._mtu + ETH_HLEN
        return MAX_GSO_FRAME

    @property
    def tx_in_flight(self) -> int:
        """Transmitted frames the device has not returned yet."""
        return sum(len(t) for t in self._tx.values())

    # -- the receive side (virtio-v1.2 §5.1.6.3, §5.1.6.4) ------------------------------

    def _rx_split_header(self) -> bool:
        # §5.1.6.6 "Legacy Interface: Framing Requirements": without ANY_LAYOUT "use a
        # single descriptor for the struct virtio_net_hdr on both transmit and receive"
        return self.transport.legacy and not self.has_feature(Feature.ANY_LAYOUT)

    def _rx_segments(self, addr: int) -> tuple[Segment, ...]:
        if self._rx_split_header() and not self.has_feature(NetFeature.MRG_RXBUF):
            h = self.hdr_size
            return ((addr, h), (addr + h, self.rx_buffer_size - h))
        return ((addr, self.rx_buffer_size),)

    def _rx_target(self, q: DriverVirtqueue[Any]) -> int:
        if self._rx_buffers_arg is not None:
            return min(self._rx_buffers_arg, q.size)
        per = len(self._rx_segments(0))
        fit = q.size if self.has_feature(Feature.INDIRECT_DESC) or per == 1 else q.size // per
        big = not self.has_feature(NetFeature.MRG_RXBUF) and self.features & _GUEST_GSO
        return max(1, min(fit, 16 if big else 256))

    def _populate(self, pair: int) -> None:
        """Make every free buffer of receiveq(pair + 1) available (virtio-v1.2
        §5.1.6.3: "keep the receive virtqueue as fully populated as possible")."""
        rx = self._rx[pair]
        q = self.queues[rx.index]
        if q.broken:
            return
        if not rx.all:
            alloc = self.transport.allocator
            for _ in range(self._rx_target(q)):
                addr = alloc.alloc(self.rx_buffer_size, 64)
                rx.all.append(addr)
                rx.free.append(addr)
        added = False
        while rx.free:
            addr = rx.free[-1]
            try:
                q.add((), self._rx_segments(addr), addr)
            except (QueueFullError, GuestMemoryError):
                break
            rx.free.pop()
            rx.posted.add(addr)
            added = True
        if added:
            self._dirty.add(rx.index)

    def _rx_fail(self, q: DriverVirtqueue[Any], err: VirtioError) -> None:
        q.broken_reason = q.broken_reason or err
        self.stats.device_errors += 1
        self._rx_errors.append(err)

    def _drain_rx(self, pair: int) -> int:
        """Take used buffers of receiveq(pair + 1), assemble packets; returns how many."""
        rx = self._rx[pair]
        q = self.queues[rx.index]
        if q.broken:
            return 0
        got = 0
        try:
            while len(self._ready) < MAX_READY_FRAMES:
                item = q.get_used()
                if item is not None:
                    addr, length = item
                    if addr not in rx.posted:
                        raise DeviceError(f"used receive buffer {addr:#x} was not posted")
                    rx.posted.discard(addr)
                    rx.used.append((addr, length))
                    self.stats.rx_buffers += 1
                if not self._assemble(rx):
                    if item is None:
                        break
                    continue
                got += 1
        except VirtioError as e:
            self._rx_fail(q, e)
        self._populate(pair)
        return got

    def _assemble(self, rx: _RxQueue) -> bool:
        """Make one packet out of the used buffers at the front of ``rx.used``, if
        they are all there (virtio-v1.2 §5.1.6.4 "Processing of Incoming Packets")."""
        if not rx.used:
            return False
        mem = self.transport.mem
        hdr_size = self.hdr_size
        addr, length = rx.used[0]
        if length < hdr_size:
            raise DeviceError(
                f"used length {length} of a receive buffer is shorter than the "
                f"{hdr_size}-byte header",
                CLAUSE_RX_DEVICE,
            )
        raw = mem.read(addr, hdr_size)
        if hdr_size == VIRTIO_NET_HDR_LEGACY.size:
            hdr = VIRTIO_NET_HDR_LEGACY.unpack(raw)
        else:
            hdr = VIRTIO_NET_HDR.unpack(raw[: VIRTIO_NET_HDR.size])
        if not self.has_feature(NetFeature.MRG_RXBUF):
            # "The device MUST use only a single descriptor if VIRTIO_NET_F_MRG_RXBUF
            # was not negotiated": the packet is this buffer, whatever num_buffers
            # says (Linux ignores it too; QEMU leaves it 0 there).
            rx.used.popleft()
            data = mem.read(addr + hdr_size, length - hdr_size)
            rx.free.append(addr)
            self._deliver(hdr, data)
            return True
        n = hdr.num_buffers
        # §5.1.6.3.2 "The device MUST set num_buffers to the number of descriptors used
        # to hold the incoming packet": at least 1, and no more than it holds
        holding = len(rx.used) + len(rx.posted)
        if n == 0 or n > holding:
            raise DeviceError(
                f"num_buffers is {n} but the device holds {holding} receive buffers",
                CLAUSE_RX_BUFFERS,
            )
        if len(rx.used) < n:
            return False  # the rest of the packet is not used yet
        parts = [rx.used.popleft() for _ in range(n)]
        chunks = [mem.read(addr + hdr_size, length - hdr_size)]
        for i, (a, ln) in enumerate(parts):
            if i < n - 1 and ln != self.rx_buffer_size:
                # §5.1.6.4.1: "the device MUST use all buffers but the last (i.e. the
                # first num_buffers - 1 buffers) completely up to the full length of
                # each buffer supplied by the driver"
                for b, _ in parts:
                    rx.free.append(b)
                raise DeviceError(
                    f"buffer {i + 1} of {n} of a merged packet holds {ln} of "
                    f"{self.rx_buffer_size} bytes",
                    CLAUSE_RX_DEVICE,
                )
            if i:
                chunks.append(mem.read(a, ln))
        for a, _ in parts:
            rx.free.append(a)
        self._deliver(hdr, b"".join(chunks))
        return True

    def _deliver(self, hdr: VirtioNetHdr, data: bytes) -> None:
        self.stats.rx_packets += 1
        self.stats.rx_bytes += len(data)
        self._ready.append((hdr, data))

    def _check_rx(self) -> None:
        if self._rx_errors:
            raise self._rx_errors.popleft()
        active = [self.queues[self._rx[p].index] for p in range(self.queue_pairs)]
        if active and all(q.broken for q in active):
            raise QueueBrokenError(f"every receive queue is broken: {active[0].broken_reason}")

    def try_recv(self) -> tuple[VirtioNetHdr, bytes] | None:
        """A received frame and its header if one is ready (no waiting); raises the
        first device violation found on a receive queue."""
        self._check_usable()
        if not self._ready:
            self.service()
        if self._ready:
            return self._ready.popleft()
        self._check_rx()
        return None

    def recv_with_header(self, timeout: float | None = None) -> tuple[VirtioNetHdr, bytes]:
        """Wait for a frame from any receive queue in use; return its header and data.

        Raises :class:`NetTimeoutError` after ``timeout`` seconds (default: the
        driver's ``timeout``).
        """
        got: list[tuple[VirtioNetHdr, bytes]] = []

        def ready() -> bool:
            item = self.try_recv()
            if item is not None:
                got.append(item)
            return bool(got)

        self._wait_until(ready, timeout, "no frame was received")
        return got[0]

    def recv(self, timeout: float | None = None) -> bytes:
        """Wait for a frame (Ethernet header onwards) from any receive queue in use."""
        return self.recv_with_header(timeout)[1]

    # -- the transmit side (virtio-v1.2 §5.1.6.2) --------------------------------------------

    def check_tx_header(self, hdr: VirtioNetHdr, length: int) -> VirtioNetHdr:
        """Check ``hdr`` against virtio-v1.2 §5.1.6.2.1 "Driver Requirements: Packet
        Transmission" for a frame of ``length`` bytes; returns it with ``num_buffers``
        0 ("The driver MUST set num_buffers to zero"). A header that breaks a MUST is
        the caller's mistake: :class:`ValueError`."""
        f = self.features
        if hdr.flags & (NetHdrFlags.DATA_VALID | NetHdrFlags.RSC_INFO):
            raise ValueError(
                "the driver MUST NOT set VIRTIO_NET_HDR_F_DATA_VALID and "
                f"VIRTIO_NET_HDR_F_RSC_INFO bits in flags [{CLAUSE_TX}]"
            )
        if not has(f, NetFeature.CSUM) and hdr.flags:
            raise ValueError(
                f"VIRTIO_NET_F_CSUM is not negotiated: the driver MUST set flags to zero "
                f"[{CLAUSE_TX}]"
            )
        gso = hdr.gso_type & ~NetGsoType.ECN
        if gso != NetGsoType.NONE:
            need = _GSO_FEATURE.get(gso)
            if need is None or not has(f, need):
                raise ValueError(f"gso_type {hdr.gso_type} is not negotiated [{CLAUSE_TX}]")
            if not hdr.flags & NetHdrFlags.NEEDS_CSUM or not hdr.gso_size:
                raise ValueError(
                    "with a gso_type the driver MUST also set VIRTIO_NET_HDR_F_NEEDS_CSUM "
                    f"and gso_size [{CLAUSE_TX}]"
                )
        elif length > self.max_frame:
            raise ValueError(f"frame of {length} bytes exceeds {self.max_frame} bytes")
        if hdr.gso_type & NetGsoType.ECN and not has(f, NetFeature.HOST_ECN):
            raise ValueError(f"VIRTIO_NET_F_HOST_ECN is not negotiated [{CLAUSE_TX}]")
        return hdr._replace(num_buffers=0)

    def _pack_hdr(self, hdr: VirtioNetHdr) -> bytes:
        if self.hdr_size == VIRTIO_NET_HDR_LEGACY.size:
            return VIRTIO_NET_HDR_LEGACY.pack_values(*hdr[:6])
        raw = VIRTIO_NET_HDR.pack(hdr)
        return raw + bytes(self.hdr_size - len(raw))

    def _reap_tx(self, index: int) -> int:
        """Free the transmitted frames the device returned on ``index``."""
        q = self.queues[index]
        inflight = self._tx[index]
        if q.broken or not inflight:
            return 0
        done = 0
        while True:
            try:
                item = q.get_used()
            except VirtioError:
                self.stats.device_errors += 1
                raise
            if item is None:
                return done
            addr = item[0]
            # §5.1.6.1 legacy: "the driver SHOULD ignore the used length for the
            # transmit queues": only the buffer matters
            if inflight.pop(addr, None) is None:
                err = DeviceError(f"used transmit buffer {addr:#x} is not in flight")
                q.broken_reason = q.broken_reason or err
                raise err
            self.transport.allocator.free(addr)
            self.stats.tx_completed += 1
            done += 1

    def _tx_index(self, queue: int) -> int:
        if not 0 <= queue < self.queue_pairs:
            raise ValueError(
                f"transmit queue {queue} is not in use (queue_pairs={self.queue_pairs})"
            )
        return tx_queue(queue)

    def try_send(
        self, frame: bytes | bytearray | memoryview, hdr: VirtioNetHdr | None = None, queue: int = 0
    ) -> bool:
        """Place ``frame`` on transmitq(queue + 1) and notify the device, without
        waiting; False if there is no room now (ring or guest memory held by frames in
        flight). Raises if the queue is broken."""
        self._check_usable()
        index = self._tx_index(queue)
        data = memoryview(frame).cast("B")
        h = self.check_tx_header(hdr or VirtioNetHdr(0, 0, 0, 0, 0, 0, 0), data.nbytes)
        q = self.queues[index]
        if q.broken:
            raise QueueBrokenError(f"transmitq{queue + 1} is broken: {q.broken_reason}")
        self._reap_tx(index)
        hs = self.hdr_size
        try:
            addr = self.transport.allocator.alloc(hs + max(1, data.nbytes), 64)
        except GuestMemoryError:
            if not self._tx[index]:
                raise
            return False
        try:
            mem = self.transport.mem
            mem.write(addr, self._pack_hdr(h))
            mem.write(addr + hs, data)
            # §5.1.6.6: the header in a descriptor of its own, the data after it
            out: list[Segment] = [(addr, hs)]
            if data.nbytes:
                out.append((addr + hs, data.nbytes))
            q.add(out, (), addr)
        except QueueFullError:
            self.transport.allocator.free(addr)
            if not self._tx[index]:
                raise
            return False
        except BaseException:
            self.transport.allocator.free(addr)
            raise
        self._tx[index][addr] = data.nbytes
        self.stats.tx_packets += 1
        self.stats.tx_bytes += data.nbytes
        self.kick(index)
        return True

    def send(
        self,
        frame: bytes | bytearray | memoryview,
        hdr: VirtioNetHdr | None = None,
        queue: int = 0,
        *,
        timeout: float | None = None,
    ) -> None:
        """Transmit ``frame`` (Ethernet header onwards) with ``hdr`` (default: all
        zero, "VIRTIO_NET_HDR_GSO_NONE") on transmitq(queue + 1).

        Does not wait for the device to consume it; when the ring is full, waits for
        completions up to ``timeout`` (:class:`NetTimeoutError`).
        """
        self._wait_until(lambda: self.try_send(frame, hdr, queue), timeout, "no room to send")

    def flush_tx(self, timeout: float | None = None) -> None:
        """Wait until the device has returned every transmitted frame."""
        self._wait_until(lambda: not self.tx_in_flight, timeout, "frames still in flight")

    # -- the control queue (virtio-v1.2 §5.1.6.5) -----------------------------------------

    def _need(self, feature: int, what: str) -> None:
        if not self.has_feature(feature):
            raise NetUnsupportedError(
                f"{what} needs {NetFeature(feature).name}, which was not negotiated"
            )

    def control_start(self, class_: int, command: int, *data: bytes) -> _Ctrl:
        """Place a control command (no feature checks; low level) and notify.

        Layout as virtio-v1.2 §5.1.6.6 "Legacy Interface: Framing Requirements" asks
        (valid with any layout): ``class`` and ``command`` in one 2-byte descriptor,
        each ``data`` part in a descriptor of its own, the 1-byte ``ack`` last and
        device-writable.
        """
        self._check_usable()
        if self._ctrl_index < 0:
            raise NetUnsupportedError("VIRTIO_NET_F_CTRL_VQ was not negotiated")
        q = self.queues[self._ctrl_index]
        if q.broken:
            raise QueueBrokenError(f"controlq is broken: {q.broken_reason}")
        self._reap_ctrl()
        cmd = _Ctrl(class_, command)
        head = VIRTIO_NET_CTRL_HDR.pack_values(class_, command)
        body = b"".join(data)
        size = len(head) + len(body) + 1
        alloc = self.transport.allocator
        addr = alloc.alloc(size, 16)
        try:
            mem = self.transport.mem
            mem.write(addr, head + body + bytes([_UNWRITTEN_ACK]))
            out: list[Segment] = [(addr, len(head))]
            pos = addr + len(head)
            for part in data:
                if part:
                    out.append((pos, len(part)))
                    pos += len(part)
            q.add(out, ((pos, 1),), addr)
        except BaseException:
            alloc.free(addr)
            raise
        cmd.addr = addr
        cmd.ack_addr = pos
        self._ctrl_inflight[addr] = cmd
        self.stats.ctrl_commands += 1
        self.kick(self._ctrl_index)
        return cmd

    def _reap_ctrl(self) -> None:
        if self._ctrl_index < 0 or not self._ctrl_inflight:
            return
        q = self.queues[self._ctrl_index]
        if q.broken:
            return
        alloc = self.transport.allocator
        while True:
            try:
                item = q.get_used()
            except VirtioError as e:
                self.stats.device_errors += 1
                self._fail_ctrl(e)
                return
            if item is None:
                return
            addr = item[0]
            cmd = self._ctrl_inflight.pop(addr, None)
            if cmd is None:
                if addr in self._orphans:  # a command that timed out came back
                    self._orphans.remove(addr)
                    alloc.free(addr)
                    continue
                err = DeviceError(f"used control buffer {addr:#x} is not in flight")
                q.broken_reason = q.broken_reason or err
                self._fail_ctrl(err)
                return
            # the used length is ignored (§5.1.6.1 legacy: "SHOULD ignore the used
            # length for ... the controlq queue"); the ack byte tells
            cmd.ack = self.transport.mem.read(cmd.ack_addr, 1)[0]
            alloc.free(addr)
            self._finish_ctrl(cmd)

    def _finish_ctrl(self, cmd: _Ctrl, error: VirtioError | None = None) -> None:
        cmd.done = True
        if error is None:
            if cmd.ack == VIRTIO_NET_OK:
                pass
            elif cmd.ack == VIRTIO_NET_ERR:
                self.stats.ctrl_errors += 1
                error = NetControlError(
                    f"device answered VIRTIO_NET_ERR to class {cmd.class_} command {cmd.command}",
                    cmd.class_,
                    cmd.command,
                    cmd.ack,
                )
            elif cmd.ack == _UNWRITTEN_ACK:
                error = DeviceError(
                    f"device returned control command {cmd.class_}/{cmd.command} without "
                    "writing ack",
                    CLAUSE_CTRL,
                )
            else:
                error = DeviceError(f"control command ack is {cmd.ack}", CLAUSE_CTRL)
        cmd.error = error

    def _fail_ctrl(self, err: VirtioError) -> None:
        """The control queue broke: every command in flight fails; the device may
        still write their buffers, so they are freed only on close."""
        for addr, cmd in list(self._ctrl_inflight.items()):
            del self._ctrl_inflight[addr]
            self._orphans.append(addr)
            self._finish_ctrl(cmd, err)

    def control_result(self, cmd: _Ctrl) -> None:
        """Raise the outcome of a completed command (NetControlError on
        VIRTIO_NET_ERR, DeviceError on a broken answer)."""
        if cmd.error is not None:
            raise cmd.error

    def control(
        self, class_: int, command: int, *data: bytes, timeout: float | None = None
    ) -> None:
        """Issue any control command and wait for its ``ack`` (low level, no feature
        checks): returns on VIRTIO_NET_OK, raises :class:`NetControlError` on
        VIRTIO_NET_ERR and :class:`NetTimeoutError` after ``timeout`` seconds
        (default ``ctrl_timeout``; the command stays with the device)."""
        cmd = self.control_start(class_, command, *data)
        t = self.ctrl_timeout if timeout is None else timeout
        try:
            self._wait_until(lambda: cmd.done, t, f"control command {class_}/{command}")
        except NetTimeoutError:
            if self._ctrl_inflight.pop(cmd.addr, None) is not None:
                self._orphans.append(cmd.addr)
            raise
        self.control_result(cmd)

    def set_rx_mode(
        self,
        *,
        promisc: bool | None = None,
        allmulti: bool | None = None,
        alluni: bool | None = None,
        nomulti: bool | None = None,
        nouni: bool | None = None,
        nobcast: bool | None = None,
    ) -> None:
        """Send the VIRTIO_NET_CTRL_RX commands for each mode given (virtio-v1.2
        §5.1.6.5.1 "Packet Receive Filtering").

        §5.1.6.5.1.2: "If the VIRTIO_NET_F_CTRL_RX feature has not been negotiated,
        the driver MUST NOT issue commands VIRTIO_NET_CTRL_RX_PROMISC or
        VIRTIO_NET_CTRL_RX_ALLMULTI"; the other four need VIRTIO_NET_F_CTRL_RX_EXTRA.
        """
        for c in self.rx_mode_commands(
            promisc=promisc,
            allmulti=allmulti,
            alluni=alluni,
            nomulti=nomulti,
            nouni=nouni,
            nobcast=nobcast,
        ):
            self.control(*c)

    def rx_mode_commands(self, **modes: bool | None) -> list[tuple[int, int, bytes]]:
        """The ``(class, command, data)`` of :meth:`set_rx_mode` for ``modes``, each
        checked against the negotiated features (shared with the asyncio driver)."""
        table = {
            "promisc": (NetCtrlRx.PROMISC, NetFeature.CTRL_RX),
            "allmulti": (NetCtrlRx.ALLMULTI, NetFeature.CTRL_RX),
            "alluni": (NetCtrlRx.ALLUNI, NetFeature.CTRL_RX_EXTRA),
            "nomulti": (NetCtrlRx.NOMULTI, NetFeature.CTRL_RX_EXTRA),
            "nouni": (NetCtrlRx.NOUNI, NetFeature.CTRL_RX_EXTRA),
            "nobcast": (NetCtrlRx.NOBCAST, NetFeature.CTRL_RX_EXTRA),
        }
        out: list[tuple[int, int, bytes]] = []
        for name, value in modes.items():
            if value is None:
                continue
            cmd, feature = table[name]
            self._need(feature, f"VIRTIO_NET_CTRL_RX command {cmd.name}")
            out.append((NetCtrlClass.RX, cmd, bytes([1 if value else 0])))
        return out

    @staticmethod
    def mac_table_data(
        unicast: Sequence[bytes | str], multicast: Sequence[bytes | str]
    ) -> tuple[bytes, bytes]:
        """The two ``struct virtio_net_ctrl_mac`` tables of VIRTIO_NET_CTRL_MAC_TABLE_SET.

        §5.1.6.5.2.2: "The driver MUST follow the VIRTIO_NET_CTRL_MAC_TABLE_SET command
        by a le32 number, followed by that number of non-multicast MAC addresses,
        followed by another le32 number, followed by that number of multicast
        addresses."
        """
        uni = [_mac_bytes(m) for m in unicast]
        multi = [_mac_bytes(m) for m in multicast]
        for m in uni:
            if m[0] & 1:
                raise ValueError(f"{format_mac(m)} is a multicast address")
        for m in multi:
            if not m[0] & 1:
                raise ValueError(f"{format_mac(m)} is not a multicast address")
        return _U32.pack(len(uni)) + b"".join(uni), _U32.pack(len(multi)) + b"".join(multi)

    def set_mac_table(
        self, unicast: Sequence[bytes | str] = (), multicast: Sequence[bytes | str] = ()
    ) -> None:
        """VIRTIO_NET_CTRL_MAC_TABLE_SET (virtio-v1.2 §5.1.6.5.2): the addresses
        accepted besides :attr:`mac`. "If VIRTIO_NET_F_CTRL_RX has not been
        negotiated, the driver MUST NOT issue VIRTIO_NET_CTRL_MAC class commands.\""""
        self._need(NetFeature.CTRL_RX, "VIRTIO_NET_CTRL_MAC_TABLE_SET")
        uni, multi = self.mac_table_data(unicast, multicast)
        # legacy framing: exactly two descriptors, one per table
        self.control(NetCtrlClass.MAC, NetCtrlMac.TABLE_SET, uni, multi)

    def set_mac(self, addr: bytes | str) -> None:
        """Change the MAC address the device filters on.

        With VIRTIO_NET_F_CTRL_MAC_ADDR: VIRTIO_NET_CTRL_MAC_ADDR_SET (virtio-v1.2
        §5.1.6.5.2; the device "MUST update mac in config space before it consumes"
        it, which is read back and checked). Through a legacy interface without it:
        write ``mac`` in configuration space (§5.1.4.3: "When using the legacy
        interface, mac is driver-writable"), first to last byte.
        """
        mac = self.check_mac(addr)
        if self.has_feature(NetFeature.CTRL_MAC_ADDR) and self.has_feature(NetFeature.CTRL_RX):
            self.control(NetCtrlClass.MAC, NetCtrlMac.ADDR_SET, mac)
            self.mac_set_done(mac)
        elif self.transport.legacy:
            off = VIRTIO_NET_CONFIG.offset_of("mac")
            for i, b in enumerate(mac):
                self.transport.write_config(off + i, bytes([b]))
            self._mac = mac
        else:
            raise NetUnsupportedError(
                "changing the MAC needs VIRTIO_NET_F_CTRL_MAC_ADDR (or a legacy interface)"
            )

    @staticmethod
    def check_mac(addr: bytes | str) -> bytes:
        """``addr`` as 6 bytes; a multicast address is refused (:class:`ValueError`)."""
        mac = _mac_bytes(addr)
        if mac[0] & 1:
            raise ValueError(f"{format_mac(mac)} is a multicast address")
        return mac

    def mac_set_done(self, mac: bytes) -> None:
        """After MAC_ADDR_SET was acknowledged: check ``mac`` in configuration space
        (the device "MUST update mac in config space before it consumes the
        VIRTIO_NET_CTRL_MAC_ADDR_SET command, if VIRTIO_NET_F_MAC has been
        negotiated") and use the new address."""
        if self.has_feature(NetFeature.MAC):
            now = self.read_config(VIRTIO_NET_CONFIG.offset_of("mac"), ETH_ALEN)
            if now != mac:
                raise DeviceError(
                    f"mac reads {format_mac(now)} after MAC_ADDR_SET {format_mac(mac)}",
                    'virtio-v1.2 §5.1.6.5.2.1 "Device Requirements: Setting MAC Address Filtering"',
                )
        self._mac = mac

    def vlan_command(self, command: int, vid: int) -> tuple[int, int, bytes]:
        """The ``(class, command, data)`` of a VLAN filter command, checked."""
        self._need(NetFeature.CTRL_VLAN, "VLAN filtering")
        if not 0 <= vid < 4096:
            raise ValueError(f"VLAN id {vid} outside 0..4095")
        return (NetCtrlClass.VLAN, command, _U16.pack(vid))

    def vlan_add(self, vid: int) -> None:
        """VIRTIO_NET_CTRL_VLAN_ADD (virtio-v1.2 §5.1.6.5.3 "VLAN Filtering")."""
        self.control(*self.vlan_command(NetCtrlVlan.ADD, vid))

    def vlan_del(self, vid: int) -> None:
        """VIRTIO_NET_CTRL_VLAN_DEL (virtio-v1.2 §5.1.6.5.3 "VLAN Filtering")."""
        self.control(*self.vlan_command(NetCtrlVlan.DEL, vid))

    def announce_ack(self) -> None:
        """VIRTIO_NET_CTRL_ANNOUNCE_ACK (virtio-v1.2 §5.1.6.5.4 "Gratuitous Packet
        Sending"): after announcing ourselves, "The driver MUST send a command on the
        command queue with class VIRTIO_NET_CTRL_ANNOUNCE and command
        VIRTIO_NET_CTRL_ANNOUNCE_ACK"; ``status`` is read again afterwards."""
        self._need(NetFeature.GUEST_ANNOUNCE, "VIRTIO_NET_CTRL_ANNOUNCE_ACK")
        self.control(NetCtrlClass.ANNOUNCE, NetCtrlAnnounce.ACK)
        self._read_status()

    def set_queue_pairs(self, n: int) -> None:
        """VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (virtio-v1.2 §5.1.6.5.5): use ``n`` pairs.

        §5.1.6.5.5.1: "The driver MUST configure the virtqueues before enabling them
        with the VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET command" (receive buffers are posted
        first) and "MUST NOT request a virtqueue_pairs of 0 or greater than
        max_virtqueue_pairs".
        """
        self.control(*self.queue_pairs_command(n))
        self.queue_pairs = n

    def queue_pairs_command(self, n: int) -> tuple[int, int, bytes]:
        """Check ``n``, post receive buffers on the pairs it enables, and return the
        ``(class, command, data)`` of VQ_PAIRS_SET."""
        self._need(NetFeature.MQ, "VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET")
        if not 1 <= n <= self.max_queue_pairs:
            raise ValueError(f"queue pairs {n} outside 1..{self.max_queue_pairs}")
        for p in range(n):
            self._populate(p)
        self.kick_pending()
        return (NetCtrlClass.MQ, NetCtrlMq.VQ_PAIRS_SET, _U16.pack(n))

    def set_guest_offloads(self, offloads: int) -> None:
        """VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET (virtio-v1.2 §5.1.6.5.6.1) with the mask
        ``offloads`` (feature bit positions). "A driver MUST NOT enable an offload for
        which the appropriate feature has not been negotiated." """
        self.control(*self.guest_offloads_command(offloads))

    def guest_offloads_command(self, offloads: int) -> tuple[int, int, bytes]:
        """The checked ``(class, command, data)`` of GUEST_OFFLOADS_SET."""
        self._need(NetFeature.CTRL_GUEST_OFFLOADS, "VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET")
        bad = offloads & ~(self.features & GUEST_OFFLOADS)
        if bad:
            raise ValueError(f"offloads {bad:#x} were not negotiated")
        return (NetCtrlClass.GUEST_OFFLOADS, 0, _U64.pack(offloads))

    # -- servicing and waiting ---------------------------------------------------------------

    def _check_usable(self) -> None:
        if not self.queues:
            raise QueueBrokenError("driver is not initialized (or was closed)")

    def kick_pending(self) -> None:
        """Notify the device of every queue given buffers since the last kick."""
        dirty, self._dirty = self._dirty, set()
        for qi in sorted(dirty):
            if not self.queues[qi].broken:
                self.kick(qi)

    def service(self) -> int:
        """Take everything the device returned without waiting: free transmitted
        frames, complete control commands, assemble received frames and re-post
        their buffers. Returns how many frames were received. Transmit queue
        violations raise; receive queue violations are raised by :meth:`try_recv`."""
        got = 0
        for p in range(self.queue_pairs):
            got += self._drain_rx(p)
        for index in self._tx:
            self._reap_tx(index)
        self._reap_ctrl()
        self.kick_pending()
        return got

    def _arm(self) -> bool:
        """Re-enable used buffer notifications on every live queue; True if used
        buffers arrived meanwhile."""
        pending = False
        for q in self.queues:
            if not q.broken and q.enable_interrupts():
                pending = True
        return pending

    def _wait_until(self, cond: Callable[[], bool], timeout: float | None, what: str) -> None:
        self._check_usable()
        t = self.timeout if timeout is None else timeout
        deadline = None if t is None else time.monotonic() + t
        while True:
            if cond():
                return
            if self._arm():
                self.service()
                continue
            wait = POLL_SLICE
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    # a device that gave up (DEVICE_NEEDS_RESET) rather than a timeout
                    self.check_status()
                    raise NetTimeoutError(f"{what} within {t:g} s")
            self.wait(wait)
            self.service()
            self.check_status()

    def poll(self, timeout: float = 0.0) -> None:
        """Wait up to ``timeout`` seconds for a notification, then service the
        queues (a configuration change is processed: :attr:`link_up` ... re-read)."""
        self._check_usable()
        self._arm()
        self.wait(timeout)
        self.service()

    def wait_config_change(self, timeout: float | None = None) -> None:
        """Wait for the next configuration change notification (link, announce)."""
        seen = self.stats.config_changes

        def changed() -> bool:
            self.service()
            return self.stats.config_changes != seen

        self._wait_until(changed, timeout, "no configuration change")

    # -- teardown ---------------------------------------------------------------------------

    def close(self) -> list[Any]:
        """Reset the device, free the rings, every buffer and every frame in flight.

        A device that is already gone (the reset fails) is no error here."""
        tokens: list[Any] = []
        try:
            tokens = super().close()
        except VirtioError:
            pass
        finally:
            alloc = self.transport.allocator
            for rx in self._rx:
                for addr in rx.all:
                    alloc.free(addr)
            for inflight in self._tx.values():
                for addr in inflight:
                    alloc.free(addr)
            err = QueueBrokenError("device was reset")
            for addr, cmd in self._ctrl_inflight.items():
                alloc.free(addr)
                self._finish_ctrl(cmd, err)
            for addr in self._orphans:
                alloc.free(addr)
            self._rx = []
            self._tx = {}
            self._ctrl_inflight = {}
            self._orphans = []
            self._ready.clear()
            self._dirty = set()
        return tokens

    def __enter__(self) -> NetDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
