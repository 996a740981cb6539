"""The network device (virtio-net), device side. virtio-v1.2 §5.1 "Network Device".

Device ID 1. Virtqueues (§5.1.2): receiveq1, transmitq1, ... receiveqN, transmitqN,
then controlq (index 2N, where N is ``max_virtqueue_pairs`` if VIRTIO_NET_F_MQ was
negotiated and 1 otherwise). Frames go to and come from a host
:class:`~pyvirtio.devices.net.backend.NetBackend` (a TAP, a unix socket, an
in-process switch port); the device watches the back-end's descriptors as host event
sources, so it needs no thread of its own.

**Receive** (§5.1.6.3, §5.1.6.4). Receive buffers are held until a frame arrives.
A frame passes the receive filter (:mod:`.filter`), gets a virtio_net_hdr and is
written into one buffer - or, with VIRTIO_NET_F_MRG_RXBUF, spread over as many as
it needs ("MUST use all buffers but the last ... completely up to the full length",
``num_buffers`` set to the count). When the driver has posted too little, the frame
waits (one frame per host channel) and the device stops reading that channel until
the driver adds buffers; the host queue behind it (the TAP's, a switch port's, the
socket's) is bounded and drops beyond that, so nothing grows without bound.
Dropped frames are counted by cause in :attr:`NetDevice.metrics`.

**Transmit** (§5.1.6.2). Each transmitq is served in order and each frame handed to
the back-end in order. The header length follows from the negotiated features alone
(:func:`~pyvirtio.spec.net.net_hdr_size`), never from anything in the chain (the
CVE-2023-6693 class). A chain shorter than the header, with device-writable parts,
longer than :data:`MAX_TX_FRAME` plus the header, or whose header asks for an
offload that was not negotiated (or points its checksum outside the frame) is
returned unsent (used length 0) and counted: the transmit queue keeps working.

**Control queue** (§5.1.6.5): RX modes, MAC table and MAC_ADDR_SET, VLAN filter,
ANNOUNCE_ACK, MQ_VQ_PAIRS_SET, GUEST_OFFLOADS_SET. A command whose class needs a
feature that was not negotiated, an unknown command, or data of the wrong size
answers VIRTIO_NET_ERR and changes nothing.

**Offloads.** Checksum and segmentation offload bits are offered only when the
back-end carries the header end to end (a TAP with ``IFF_VNET_HDR``); the guest's
receive offloads are switched on the TAP (``TUNSETOFFLOAD``) as negotiated or as
GUEST_OFFLOADS_SET asks. UFO is not offered: Linux no longer produces UFO frames.

**Legacy interface.** Without VIRTIO_F_VERSION_1 the header is 10 bytes (12 with
MRG_RXBUF, §5.1.6.1), ``mac`` is driver-writable (§5.1.4.2) and VIRTIO_F_ANY_LAYOUT
is offered (any framing is accepted anyway). Native endian is little-endian on the
hosts pyvirtio runs on.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

from pyvirtio.core.device import VirtioDevice
from pyvirtio.devices.net.backend import (
    MAX_FRAME,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    VNET_HDR_LEN,
    NetBackend,
)
from pyvirtio.devices.net.filter import VLAN_IDS, RxFilter
from pyvirtio.errors import ConfigurationError, DriverError, GuestMemoryError
from pyvirtio.spec.features import Feature, has
from pyvirtio.spec.ids import DeviceId
from pyvirtio.spec.net import (
    FEATURE_REQUIREMENTS,
    VIRTIO_NET_CONFIG,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN,
    VIRTIO_NET_ERR,
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
    VirtioNetConfig,
    net_hdr_size,
)
from pyvirtio.virtqueue.common import DescriptorChain, DeviceVirtqueue

__all__ = [
    "FEATURE_REQUIRES",
    "MAX_TX_FRAME",
    "NetDevice",
    "random_mac",
]

_log = logging.getLogger(__name__)

F = NetFeature
#: Largest frame (without the virtio_net_hdr) a transmit chain may carry: a 64 KiB
#: IP packet with its Ethernet and VLAN headers.
MAX_TX_FRAME = MAX_FRAME
#: Largest control command (class, command and data) the device reads: a MAC table
#: of 2 x 4096 addresses. Longer ones answer VIRTIO_NET_ERR.
_MAX_CTRL = 2 + 2 * (4 + 6 * 4096)
#: Frames taken from one host channel per event before others get a turn.
_RX_BUDGET = 64
#: Flows remembered for receive steering (transmitq X -> receiveq X).
_FLOWS = 4096

#: virtio-v1.2 §5.1.3.1 "Feature bit requirements" (the spec table).
FEATURE_REQUIRES = FEATURE_REQUIREMENTS

#: Receive offloads the driver can switch with GUEST_OFFLOADS_SET (§5.1.6.5.6).
_GUEST_OFFLOAD_BITS = (F.GUEST_CSUM, F.GUEST_TSO4, F.GUEST_TSO6, F.GUEST_ECN, F.GUEST_UFO)
_GUEST_OFFLOAD_MASK = sum(1 << b for b in _GUEST_OFFLOAD_BITS)
_HOST_OFFLOADS = (F.CSUM, F.HOST_TSO4, F.HOST_TSO6, F.HOST_ECN)
_CTRL_FEATURES = (
    F.CTRL_VQ,
    F.CTRL_RX,
    F.CTRL_RX_EXTRA,
    F.CTRL_VLAN,
    F.CTRL_MAC_ADDR,
    F.GUEST_ANNOUNCE,
)

_HDR = struct.Struct("<BBHHHHH")  # virtio_net_hdr, VERSION_1 layout (12 bytes)
_LE16 = struct.Struct("<H")
_LE32 = struct.Struct("<I")
_LE64 = struct.Struct("<Q")
_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD
_ETH_P_RARP = 0x8035
_ETH_P_8021Q = 0x8100

_C_TX = 'virtio-v1.2 §5.1.6.2 "Packet Transmission"'
_C_RXBUF = 'virtio-v1.2 §5.1.6.3.1 "Driver Requirements: Setting Up Receive Buffers"'
_C_RX = 'virtio-v1.2 §5.1.6.4 "Processing of Incoming Packets"'


def _stop(vq: DeviceVirtqueue, err: DriverError) -> DriverError:
    """Stop ``vq`` for a driver violation found outside ``run_queue`` (receive runs
    from host events): the device uses the queue no more until reset."""
    vq.broken_reason = err
    return err


def random_mac() -> bytes:
    """A random locally administered unicast MAC address (IEEE 802 §9.2)."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return bytes(b)


def _tun_flags(offloads: int) -> int:
    """The TAP's TUNSETOFFLOAD bits for the guest receive offloads in ``offloads``."""
    if not has(offloads, F.GUEST_CSUM):
        return 0
    flags = TUN_F_CSUM
    if has(offloads, F.GUEST_TSO4):
        flags |= TUN_F_TSO4
    if has(offloads, F.GUEST_TSO6):
        flags |= TUN_F_TSO6
    if has(offloads, F.GUEST_ECN) and flags & (TUN_F_TSO4 | TUN_F_TSO6):
        flags |= TUN_F_TSO_ECN
    return flags


def _flow_key(frame: bytes | bytearray | memoryview) -> bytes | None:
    """Both directions of an IP flow map to one key (addresses and ports sorted)."""
    if len(frame) < 14:
        return None
    off = 12
    etype = frame[off] << 8 | frame[off + 1]
    if etype == _ETH_P_8021Q and len(frame) >= 18:
        off += 4
        etype = frame[off] << 8 | frame[off + 1]
    ip = off + 2
    if etype == _ETH_P_IP and len(frame) >= ip + 20:
        ihl = (frame[ip] & 0xF) * 4
        proto = frame[ip + 9]
        a, b = bytes(frame[ip + 12 : ip + 16]), bytes(frame[ip + 16 : ip + 20])
        l4 = ip + ihl
    elif etype == _ETH_P_IPV6 and len(frame) >= ip + 40:
        proto = frame[ip + 6]
        a, b = bytes(frame[ip + 8 : ip + 24]), bytes(frame[ip + 24 : ip + 40])
        l4 = ip + 40
    else:
        return None
    if proto in (6, 17) and len(frame) >= l4 + 4:
        a += bytes(frame[l4 : l4 + 2])
        b += bytes(frame[l4 + 2 : l4 + 4])
    lo, hi = (a, b) if a <= b else (b, a)
    return bytes([proto]) + lo + hi


class NetDevice(VirtioDevice):
    """A virtio network device carrying frames to and from ``backend``.

    - ``mac``: the address in the configuration space (VIRTIO_NET_F_MAC); a random
      locally administered one by default.
    - ``queue_pairs``: ``max_virtqueue_pairs``; more than one offers VIRTIO_NET_F_MQ
      (which needs the control queue). A multiqueue TAP gives each pair its own
      host channel; with one channel the device steers receive by flow (a flow's
      frames go to the receiveq of the transmitq it was last sent on, §5.1.6.5.5).
    - ``ctrl_vq``: offer the control queue and what needs it (CTRL_RX, CTRL_RX_EXTRA,
      CTRL_VLAN, CTRL_MAC_ADDR, GUEST_ANNOUNCE, MQ, CTRL_GUEST_OFFLOADS). A vhost-user
      back-end goes without: the front-end (QEMU, DPDK's virtio-user) runs the
      control queue and the configuration space itself.
    - ``mtu``: offer VIRTIO_NET_F_MTU with this ``mtu`` (68..65535); frames larger
      than ``mtu`` plus the Ethernet header are not passed to the driver.
    - ``mrg_rxbuf``, ``offloads``: offer VIRTIO_NET_F_MRG_RXBUF, and the checksum /
      TSO bits (only if the back-end carries the header).
    - ``speed`` (Mbit/s) and ``duplex`` (0 half, 1 full) for VIRTIO_NET_F_SPEED_DUPLEX;
      unknown by default.
    - ``link_up``: the initial link state (VIRTIO_NET_F_STATUS); :meth:`set_link`.

    Metrics: ``requests`` chains served; ``bytes_read`` transmitted bytes,
    ``bytes_written`` received bytes; :attr:`rx_frames` / :attr:`tx_frames`; errors
    by kind: ``rx_no_buffer`` (frame waited for buffers), ``rx_filtered``,
    ``rx_over_mtu``, ``rx_too_big`` (larger than the buffer without MRG_RXBUF),
    ``rx_bad_gso`` (a back-end header the driver did not negotiate), ``tx_short``,
    ``tx_oversize``, ``tx_runt``, ``tx_writable``, ``tx_bad_csum``, ``tx_bad_gso``,
    ``tx_over_mtu``, ``tx_backend_full``, ``tx_disabled``, ``ctrl_err``,
    ``ctrl_no_ack``, ``backend_gone``.
    """

    device_id = DeviceId.NET

    def __init__(
        self,
        backend: NetBackend,
        *,
        mac: bytes | None = None,
        queue_pairs: int = 1,
        ctrl_vq: bool = True,
        mtu: int | None = None,
        mrg_rxbuf: bool = True,
        offloads: bool = True,
        speed: int | None = None,
        duplex: int | None = None,
        link_up: bool = True,
        queue_max_size: int = 256,
        owns_backend: bool = True,
    ) -> None:
        if not VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN <= queue_pairs <= VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX:
            raise ConfigurationError("queue_pairs must be between 1 and 0x8000")
        if mtu is not None and not 68 <= mtu <= 65535:
            # §5.1.4.1: "The device MUST set mtu to between 68 and 65535 inclusive"
            raise ConfigurationError("mtu must be between 68 and 65535")
        if speed is not None and not 0 <= speed <= 0x7FFFFFFF:
            raise ConfigurationError("speed must be 0..0x7fffffff Mbit/s")
        if duplex is not None and duplex not in (0, 1):
            raise ConfigurationError("duplex must be 0 (half) or 1 (full)")
        if mac is not None and (len(mac) != 6 or mac[0] & 1):
            raise ConfigurationError("mac must be 6 bytes, a unicast address")
        super().__init__(
            num_queues=2 * queue_pairs + (1 if ctrl_vq else 0), queue_max_size=queue_max_size
        )
        self.backend = backend
        # without the control queue the front-end (QEMU's vhost-user netdev, DPDK's
        # virtio-user) keeps the configuration space itself
        self.config_over_vhost_user = ctrl_vq
        self.max_pairs = queue_pairs
        self.ctrl_vq = ctrl_vq
        self.mtu = mtu
        self.default_mac = bytes(mac) if mac is not None else random_mac()
        self.mac = self.default_mac
        self.speed = 0xFFFFFFFF if speed is None else speed
        # virtio-v1.2 §5.1.4: "0x01 for full duplex, 0x00 for half duplex and 0xff
        # for unknown duplex state"
        self.duplex = 0xFF if duplex is None else duplex
        self.link_up = link_up
        self._announce = False
        self._owns_backend = owns_backend
        self._offer = self._offered(mrg_rxbuf, offloads)
        self.filter = RxFilter(self.mac)
        #: queue pairs in use (MQ_VQ_PAIRS_SET); 1 after reset (§5.1.6.5.5)
        self.curr_pairs = 1
        self.hdr_len = 12
        self.rx_frames = 0
        self.tx_frames = 0
        self._pairs = 1
        self._ctrl_index: int | None = None
        self._mrg = False
        self._guest_offloads = 0
        self._accepted: int | None = None
        self._scratch = bytearray(VNET_HDR_LEN + MAX_FRAME)
        self._scratch_view = memoryview(self._scratch)
        #: a frame read from each host channel that waits for receive buffers
        self._waiting: dict[int, tuple[bytes, bytes, int]] = {}
        self._paused: set[int] = set()
        self._watched: dict[int, int] = {}
        self._flows: OrderedDict[bytes, int] = OrderedDict()
        self._flush_timer = False

    # -- features (virtio-v1.2 §5.1.3) ------------------------------------------

    def _offered(self, mrg_rxbuf: bool, offloads: bool) -> int:
        bits = F.MAC.mask | F.STATUS.mask | F.SPEED_DUPLEX.mask | Feature.ANY_LAYOUT.mask
        if self.mtu is not None or not self.ctrl_vq:
            # a vhost-user front-end sets the MTU (host_mtu, VHOST_USER_NET_SET_MTU)
            # and offers the feature only if the back-end does
            bits |= F.MTU.mask
        if mrg_rxbuf:
            bits |= F.MRG_RXBUF.mask
        if self.ctrl_vq:
            for f in _CTRL_FEATURES:
                bits |= f.mask
        else:
            # a vhost-user front-end runs the control queue, but keeps MQ and
            # GUEST_ANNOUNCE only if the back-end offers them (QEMU's vhost-user
            # feature list): the back-end serves every pair, the guest announces
            bits |= F.GUEST_ANNOUNCE.mask
        if self.max_pairs > 1:
            bits |= F.MQ.mask
        if offloads and self.backend.vnet_hdr:
            for f in _HOST_OFFLOADS:
                bits |= f.mask
            for f in (F.GUEST_CSUM, F.GUEST_TSO4, F.GUEST_TSO6, F.GUEST_ECN):
                bits |= f.mask
            if self.ctrl_vq:
                bits |= F.CTRL_GUEST_OFFLOADS.mask
        return bits

    def specific_features(self) -> int:
        """MAC, STATUS, SPEED_DUPLEX, MTU (if set), MRG_RXBUF, the control-queue
        features (with ``ctrl_vq``), MQ (more than one pair), the offloads (a TAP)."""
        return self._offer

    def validate_features(self, features: int) -> bool:
        """Refuse a set that breaks §5.1.3.1 "Feature bit requirements" (the driver
        "MUST NOT accept a feature which requires another feature which was not
        accepted", §2.2.1)."""
        for bit, needs in FEATURE_REQUIRES.items():
            if not self.ctrl_vq and F.CTRL_VQ in needs:
                # the front-end negotiated the control queue with the driver and
                # does not pass it on (it is not among the back-end's rings)
                continue
            if has(features, bit) and not any(has(features, n) for n in needs):
                _log.warning("net: refusing features: %s without %s", F(bit).name, needs)
                return False
        self._accepted = features
        return True

    # -- configuration space (virtio-v1.2 §5.1.4) ---------------------------------

    @property
    def status(self) -> int:
        """``status``: VIRTIO_NET_S_LINK_UP and VIRTIO_NET_S_ANNOUNCE."""
        return (NetStatus.LINK_UP if self.link_up else 0) | (
            NetStatus.ANNOUNCE if self._announce else 0
        )

    def config_bytes(self) -> bytes:
        """``struct virtio_net_config`` up to ``duplex`` (no RSS fields: RSS and
        HASH_REPORT are not offered)."""
        raw = VIRTIO_NET_CONFIG.pack(
            VirtioNetConfig(
                mac=self.mac,
                status=int(self.status),
                max_virtqueue_pairs=self.max_pairs,
                mtu=self.mtu or 1500,  # offered without a host_mtu yet: Ethernet's
                speed=self.speed,
                duplex=self.duplex,
                rss_max_key_size=0,
                rss_max_indirection_table_length=0,
                supported_hash_types=0,
            )
        )
        return raw[: VIRTIO_NET_CONFIG.offset_of("rss_max_key_size")]

    def write_config(self, offset: int, data: bytes) -> None:
        """``mac`` is driver-writable through the legacy interface only (§5.1.4.2
        "Legacy Interface: Device configuration layout"); everything else, and
        every write by a modern driver, is ignored."""
        f = self._accepted if self._accepted is not None else self.features
        if has(f, Feature.VERSION_1) or offset >= 6:
            return
        mac = bytearray(self.mac)
        n = min(len(data), 6 - offset)
        mac[offset : offset + n] = data[:n]
        self._set_mac(bytes(mac))

    def _set_mac(self, mac: bytes) -> None:
        self.mac = mac
        self.filter.mac = mac

    def set_link(self, up: bool) -> None:
        """Change the link state; with VIRTIO_NET_F_STATUS the driver gets a
        configuration change notification (§5.1.4: the driver reads ``status``)."""
        with self.lock:
            if up == self.link_up:
                return
            self.link_up = up
            if self.active and self.negotiated(F.STATUS):
                self.config_changed()

    def announce(self) -> bool:
        """Ask the driver to announce itself (after a migration, §5.1.6.5.4): sets
        VIRTIO_NET_S_ANNOUNCE and notifies, if VIRTIO_NET_F_GUEST_ANNOUNCE was
        negotiated; otherwise the device sends a RARP for :attr:`mac` itself.
        Returns True if the driver was asked."""
        with self.lock:
            if self.active and self.negotiated(F.GUEST_ANNOUNCE) and self.negotiated(F.STATUS):
                self._announce = True
                self.config_changed()
                return True
        self.send_rarp(self.mac)
        return False

    def send_rarp(self, mac: bytes) -> bool:
        """Broadcast a RARP request from ``mac`` on the back-end (what QEMU sends to
        announce a guest whose driver cannot: switches learn where it is now)."""
        if len(mac) != 6:
            return False
        frame = bytearray(60)
        frame[0:6] = b"\xff" * 6
        frame[6:12] = mac
        frame[12:14] = _ETH_P_RARP.to_bytes(2, "big")
        # hardware Ethernet, protocol IPv4, lengths 6 and 4, opcode 3 (reverse request)
        frame[14:22] = bytes([0, 1, 8, 0, 6, 4, 0, 3])
        frame[22:28] = mac
        frame[32:38] = mac
        parts: list[bytes | bytearray] = [bytes(frame)]
        if self.backend.vnet_hdr:
            parts.insert(0, bytes(VNET_HDR_LEN))
        with self.lock:
            return self.backend.send(0, parts)

    # -- lifecycle ---------------------------------------------------------------

    def activate(self, features: int, queues: Sequence[DeviceVirtqueue | None]) -> None:
        """DRIVER_OK (vhost-user: the first ring): header size, queue map, offloads,
        and the back-end's channels start being watched."""
        super().activate(features, queues)
        self._accepted = features
        self.hdr_len = net_hdr_size(features)
        self._mrg = has(features, F.MRG_RXBUF)
        self._pairs = self.max_pairs if has(features, F.MQ) or not self.ctrl_vq else 1
        self._ctrl_index = 2 * self._pairs if has(features, F.CTRL_VQ) else None
        # §5.1.6.5.5 "After initialization of reset, the device MUST queue packets
        # only on receiveq1" (a vhost-user front-end steers the pairs itself)
        self.curr_pairs = 1 if self.ctrl_vq else self._pairs
        self.filter.reset(self.mac)
        self.filter.vlan_filtering = has(features, F.CTRL_VLAN)
        self._guest_offloads = features & _GUEST_OFFLOAD_MASK
        self._apply_offloads()
        self.backend.set_active_channels(self.curr_pairs)
        self._waiting.clear()
        self._paused.clear()
        self._flows.clear()
        for ch in range(self.backend.channels):
            self._watch(ch)

    def _watch(self, ch: int) -> None:
        fd = self.backend.fileno(ch)
        self._watched[ch] = fd
        self.events.add_reader(fd, partial(self._rx_event, ch))

    def _unwatch(self, ch: int) -> None:
        fd = self._watched.pop(ch, None)
        if fd is not None:
            self.events.remove_reader(fd)

    def reset(self) -> None:
        """Device reset: stop watching the back-end, forget filters, waiting frames,
        the MAC set by the driver (§5.1.6.5.2: "an empty MAC filtering table on
        reset") and the announce request."""
        for ch in list(self._watched):
            self._unwatch(ch)
        self._waiting.clear()
        self._paused.clear()
        self._flows.clear()
        self._announce = False
        self._accepted = None
        self.mac = self.default_mac
        self.filter.reset(self.mac)
        self.curr_pairs = 1
        super().reset()

    def close(self) -> None:
        """Close the back-end (if the device owns it)."""
        for ch in list(self._watched):
            self._unwatch(ch)
        if self._owns_backend:
            self.backend.close()

    def _apply_offloads(self) -> None:
        if self.backend.vnet_hdr:
            self.backend.set_offloads(_tun_flags(self._guest_offloads))

    # -- vhost-user extras (VHOST_USER_PROTOCOL_F_MTU, _RARP) -----------------------

    def vhost_user_set_mtu(self, mtu: int) -> bool:
        """VHOST_USER_NET_SET_MTU: the front-end's ``host_mtu``; False if out of the
        68..65535 range. Frames larger than it are not passed to the driver."""
        if not 68 <= mtu <= 65535:
            return False
        with self.lock:
            self.mtu = mtu
        return True

    def vhost_user_send_rarp(self, mac: bytes) -> None:
        """VHOST_USER_SEND_RARP: broadcast a RARP for the guest's ``mac``."""
        self.send_rarp(mac)

    # -- queues ------------------------------------------------------------------

    def handle_queue(self, index: int) -> None:
        """transmitq: send what is there; receiveq: resume a waiting receive;
        controlq: answer the commands."""
        if index == self._ctrl_index:
            self.run_queue(index, self._control)
        elif index < 2 * self._pairs:
            if index & 1:
                self.run_queue(index, partial(self._transmit, index >> 1))
                self._flush_backend()
            elif self._paused:
                for ch in sorted(self._paused):
                    self._resume(ch)
        else:
            self.metrics.error("bad_queue")

    def queue_started(self, index: int) -> None:
        """A receiveq came (back): a waiting frame may fit now."""
        if not index & 1 and self._paused:
            for ch in sorted(self._paused):
                self._resume(ch)

    # -- transmit (virtio-v1.2 §5.1.6.2) -------------------------------------------

    def _transmit(self, pair: int, chain: DescriptorChain) -> int:
        """Send one transmit chain; always answered with used length 0 (the device
        writes nothing into a transmit buffer)."""
        if 2 * pair + 1 in self.disabled_queues:
            self.metrics.error("tx_disabled")
            return 0
        if chain.writable:
            # transmit buffers are device-readable (§5.1.6.2 "added as one output
            # descriptor"): a writable part is not sent into
            self.metrics.error("tx_writable")
            return 0
        hlen = self.hdr_len
        total = chain.readable_len
        if total < hlen + 14:
            self.metrics.error("tx_short" if total < hlen else "tx_runt")
            return 0
        if total - hlen > MAX_TX_FRAME:
            self.metrics.error("tx_oversize")
            return 0
        vq = self.queues[2 * pair + 1]
        assert vq is not None  # run_queue serves live queues only
        try:
            data = chain.read_all(vq.mem)
        except GuestMemoryError as e:
            raise DriverError(
                f"transmit buffer {chain.id} lies outside guest RAM: {e.message}",
                'virtio-v1.2 §2.7.5 "The Virtqueue Descriptor Table"',
            ) from e
        view = memoryview(data)
        frame = view[hlen:]
        hdr = self._tx_header(data, len(frame))
        if hdr is None:
            return 0
        if self.backend.vnet_hdr:
            parts: list[bytes | memoryview] = [hdr, frame]
        else:
            parts = [frame]
        ch = pair % self.backend.channels
        if self.backend.channels == 1 and self._pairs > 1:
            key = _flow_key(frame)
            if key is not None:
                self._flows[key] = pair
                self._flows.move_to_end(key)
                if len(self._flows) > _FLOWS:
                    self._flows.popitem(last=False)
        if not self.backend.send(ch, parts):
            self.metrics.error("tx_backend_full")
            return 0
        self.tx_frames += 1
        self.metrics.bytes_read += len(frame)
        return 0

    def _tx_header(self, data: bytes, frame_len: int) -> bytes | None:
        """Check the driver's header against what was negotiated; the back-end's
        12-byte form of it, or None (the frame is dropped and counted)."""
        flags, gso, hdr_len, gso_size, cstart, coff = struct.unpack_from("<BBHHHH", data)
        f = self.features
        # "The device MUST ignore flag bits that it does not recognize" (DATA_VALID
        # and RSC_INFO are the driver's to leave clear: not looked at)
        flags &= NetHdrFlags.NEEDS_CSUM
        if flags:
            if not has(f, F.CSUM):
                # §5.1.6.2.1: without VIRTIO_NET_F_CSUM the driver MUST leave it clear
                self.metrics.error("tx_bad_csum")
                return None
            if cstart + coff + 2 > frame_len:
                # the checksum would be stored outside the frame
                self.metrics.error("tx_bad_csum")
                return None
        else:
            # "If VIRTIO_NET_HDR_F_NEEDS_CSUM is not set, the device MUST NOT use
            # the csum_start and csum_offset"
            cstart = coff = 0
        base = gso & ~NetGsoType.ECN
        if base != NetGsoType.NONE:
            need = {
                NetGsoType.TCPV4: F.HOST_TSO4,
                NetGsoType.TCPV6: F.HOST_TSO6,
                NetGsoType.UDP: F.HOST_UFO,
            }.get(base)
            if (
                need is None
                or not has(f, need)
                or (gso & NetGsoType.ECN and not has(f, F.HOST_ECN))
                or not flags
                or gso_size == 0
            ):
                self.metrics.error("tx_bad_gso")
                return None
        elif gso & NetGsoType.ECN:
            self.metrics.error("tx_bad_gso")
            return None
        else:
            gso_size = 0
            # "MUST NOT transmit packets of size exceeding the value of mtu (plus low
            # level ethernet header length)" (§5.1.4.2)
            if self.mtu is not None and has(f, F.MTU) and frame_len > self.mtu + 18:
                self.metrics.error("tx_over_mtu")
                return None
        return _HDR.pack(flags, gso, hdr_len, gso_size, cstart, coff, 0)

    def _flush_backend(self) -> None:
        if self.backend.flush() or self._flush_timer:
            return
        self._flush_timer = True

        def again() -> None:
            self._flush_timer = False
            self._flush_backend()

        self.events.call_later(0.001, again)

    # -- receive (virtio-v1.2 §5.1.6.3, §5.1.6.4) -----------------------------------

    def _rx_event(self, ch: int) -> None:
        """A back-end channel is readable (or a frame waits on it): deliver what
        fits, at most :data:`_RX_BUDGET` frames before others get a turn."""
        if ch in self._paused:
            return
        for _ in range(_RX_BUDGET):
            item = self._waiting.pop(ch, None)
            if item is None:
                item = self._take(ch)
                if item is None:
                    return
            hdr, frame, pair = item
            if self._deliver(pair, hdr, frame):
                continue
            self._waiting[ch] = item
            if not self._stall(ch, pair):
                return
        if ch in self._waiting:
            # the budget ran out with a frame taken: come back for it (the
            # descriptor may not be readable again)
            self.events.call_later(0, partial(self._rx_event, ch))

    def _take(self, ch: int) -> tuple[bytes, bytes, int] | None:
        """One frame from channel ``ch`` that passes the filters, with the header
        the driver gets and the pair it goes to; None when nothing waits."""
        buf = self._scratch_view
        while True:
            try:
                n = self.backend.recv_into(ch, buf)
            except EOFError:
                self.metrics.error("backend_gone")
                self._unwatch(ch)
                return None
            if n is None:
                return None
            if self.backend.vnet_hdr:
                if n < VNET_HDR_LEN + 14:
                    continue
                hdr = self._rx_header(buf[:VNET_HDR_LEN])
                if hdr is None:
                    continue
                frame = bytes(buf[VNET_HDR_LEN:n])
            else:
                if n < 14:
                    continue
                hdr = bytes(self.hdr_len)
                frame = bytes(buf[:n])
            if not self.filter.accepts(frame):
                self.metrics.error("rx_filtered")
                continue
            if self.mtu is not None and hdr[1] == NetGsoType.NONE and len(frame) > self.mtu + 18:
                # §5.1.4.1: "MUST NOT pass received packets that exceed mtu (plus low
                # level ethernet header length) size with gso_type NONE or ECN"
                self.metrics.error("rx_over_mtu")
                continue
            return hdr, frame, self._steer(ch, frame)

    def _rx_header(self, raw: memoryview) -> bytes | None:
        """The back-end's header made fit for the driver (§5.1.6.4.1): flags only
        with GUEST_CSUM, a GSO type only if its receive offload is on; the
        driver's layout (10 or 12 bytes, ``num_buffers`` filled in later)."""
        flags, gso, hdr_len, gso_size, cstart, coff, _ = _HDR.unpack(raw)
        offl = self._guest_offloads
        if not has(offl, F.GUEST_CSUM):
            # "If VIRTIO_NET_F_GUEST_CSUM is not negotiated, the device MUST set
            # flags to zero"
            flags = 0
        flags &= NetHdrFlags.NEEDS_CSUM | NetHdrFlags.DATA_VALID
        if not flags & NetHdrFlags.NEEDS_CSUM:
            cstart = coff = 0
        base = gso & ~NetGsoType.ECN
        if base != NetGsoType.NONE:
            need = {NetGsoType.TCPV4: F.GUEST_TSO4, NetGsoType.TCPV6: F.GUEST_TSO6}.get(base)
            if need is None or not has(offl, need) or not flags & NetHdrFlags.NEEDS_CSUM:
                self.metrics.error("rx_bad_gso")
                return None
            if gso & NetGsoType.ECN and not has(offl, F.GUEST_ECN):
                self.metrics.error("rx_bad_gso")
                return None
        else:
            gso = NetGsoType.NONE
            gso_size = 0
        full = _HDR.pack(flags, gso, hdr_len, gso_size, cstart, coff, 0)
        return full[: self.hdr_len]

    def _steer(self, ch: int, frame: bytes) -> int:
        """The queue pair a received frame goes to (§5.1.6.5.5)."""
        n = self.curr_pairs
        if n == 1:
            return 0
        if self.backend.channels > 1:
            return ch % n
        key = _flow_key(frame)
        if key is None:
            return 0
        pair = self._flows.get(key)
        if pair is None or pair >= n:
            # "where no packets have been transmitted yet, the device MAY steer a
            # packet to a random queue"
            pair = hash(key) % n
        return pair

    def _deliver(self, pair: int, hdr: bytes, frame: bytes) -> bool:
        """Write one frame into receiveq ``pair``; False if the driver has not
        posted enough buffers (nothing was used: the chains popped go back)."""
        index = 2 * pair
        vq = self._live(index)
        if vq is None or index in self.disabled_queues:
            # no such queue (yet), or a front-end disabled it: the frame is dropped
            self.metrics.error("rx_no_queue")
            return True
        total = self.hdr_len + len(frame)
        chains: list[tuple[DescriptorChain, int]] = []
        room = 0
        while room < total:
            chain = self.pop(index)
            if chain is None:
                for c, _ in reversed(chains):
                    self.unpop(index, c)
                self.metrics.error("rx_no_buffer")
                return False
            if chain.readable:
                raise _stop(
                    vq,
                    DriverError(
                        f"receive buffer {chain.id} has a device-readable part: receive "
                        "buffers are device-writable",
                        _C_RXBUF,
                    ),
                )
            size = chain.writable_len
            if not self._mrg:
                if size < total:
                    # "MUST use only a single descriptor if VIRTIO_NET_F_MRG_RXBUF was
                    # not negotiated": the buffer is too small for this frame
                    self.unpop(index, chain)
                    self.metrics.error("rx_too_big")
                    return True
                chains.append((chain, total))
                room = total
                break
            if size < self.hdr_len:
                # "each buffer MUST be at least the size of the struct virtio_net_hdr"
                raise _stop(
                    vq,
                    DriverError(
                        f"receive buffer {chain.id} has {size} bytes, less than the "
                        f"{self.hdr_len}-byte header",
                        _C_RXBUF,
                    ),
                )
            take = min(size, total - room)
            chains.append((chain, take))
            room += take
        if len(chains) > 0xFFFF:  # pragma: no cover - rings hold at most 32768
            raise DriverError("frame spread over more than 65535 buffers", _C_RX)
        if self.hdr_len >= 12:
            # "MUST set num_buffers to the number of descriptors used to hold the
            # incoming packet" (1 without MRG_RXBUF, §5.1.6.4.1)
            hdr = hdr[:10] + _LE16.pack(len(chains)) + hdr[12:]
        data = memoryview(hdr + frame)
        mem = vq.mem
        pos = 0
        try:
            for chain, take in chains:
                left = take
                for addr, n in chain.writable:
                    if left <= 0:
                        break
                    k = min(n, left)
                    mem.write(addr, data[pos : pos + k])
                    pos += k
                    left -= k
        except GuestMemoryError as e:
            raise _stop(
                vq,
                DriverError(
                    f"receive buffer lies outside guest RAM: {e.message}",
                    'virtio-v1.2 §2.7.5 "The Virtqueue Descriptor Table"',
                ),
            ) from e
        for chain, take in chains:
            self.complete(vq, chain, take)
        self.rx_frames += 1
        self.metrics.requests += len(chains)
        self.metrics.bytes_written += len(frame)
        return True

    def _stall(self, ch: int, pair: int) -> bool:
        """No room for the frame waiting on ``ch``: turn receive notifications on
        and re-check (virtio-v1.2 §2.7.10's pattern). True if the driver added
        buffers meanwhile (try again); otherwise stop reading ``ch`` until a
        receive kick comes (:meth:`_resume`) and return False."""
        vq = self._live(2 * pair)
        if vq is not None and vq.enable_notification():
            return True
        self._paused.add(ch)
        fd = self._watched.get(ch)
        if fd is not None:
            self.events.remove_reader(fd)
        return False

    def _resume(self, ch: int) -> None:
        if ch not in self._paused:
            return
        self._paused.discard(ch)
        if ch in self._watched:
            self.events.add_reader(self._watched[ch], partial(self._rx_event, ch))
        self._rx_event(ch)

    # -- control queue (virtio-v1.2 §5.1.6.5) --------------------------------------

    def _control(self, chain: DescriptorChain) -> int:
        """One command: ``class``, ``command`` and data device-readable, then the
        device-writable ``ack`` byte."""
        if not chain.writable:
            self.metrics.error("ctrl_no_ack")
            return 0
        vq = self.queues[self._ctrl_index] if self._ctrl_index is not None else None
        assert vq is not None
        ack = VIRTIO_NET_ERR
        if 2 <= chain.readable_len <= _MAX_CTRL:
            try:
                data = chain.read_all(vq.mem)
            except GuestMemoryError as e:
                raise DriverError(
                    f"control command {chain.id} lies outside guest RAM: {e.message}",
                    'virtio-v1.2 §2.7.5 "The Virtqueue Descriptor Table"',
                ) from e
            ack = self._command(data[0], data[1], data[2:])
        if ack != VIRTIO_NET_OK:
            self.metrics.error("ctrl_err")
        addr, _ = chain.writable[0]
        try:
            vq.mem.write(addr, bytes([ack]))
        except GuestMemoryError as e:
            raise DriverError(
                f"control ack of command {chain.id} lies outside guest RAM: {e.message}",
                'virtio-v1.2 §2.7.5 "The Virtqueue Descriptor Table"',
            ) from e
        return 1

    def _command(self, cls: int, cmd: int, data: bytes) -> int:
        """Carry out one control command; VIRTIO_NET_OK or VIRTIO_NET_ERR."""
        f = self.features
        ok = False
        if cls == NetCtrlClass.RX:
            ok = self._ctrl_rx(cmd, data, f)
        elif cls == NetCtrlClass.MAC:
            ok = self._ctrl_mac(cmd, data, f)
        elif cls == NetCtrlClass.VLAN and has(f, F.CTRL_VLAN):
            if cmd in (NetCtrlVlan.ADD, NetCtrlVlan.DEL) and len(data) == 2:
                vid = _LE16.unpack(data)[0]
                if vid < VLAN_IDS:
                    if cmd == NetCtrlVlan.ADD:
                        self.filter.vlans.add(vid)
                    else:
                        self.filter.vlans.discard(vid)
                    ok = True
        elif cls == NetCtrlClass.ANNOUNCE and has(f, F.GUEST_ANNOUNCE):
            if cmd == NetCtrlAnnounce.ACK and not data:
                # "MUST clear the VIRTIO_NET_S_ANNOUNCE bit in status upon receipt of
                # a command buffer with class VIRTIO_NET_CTRL_ANNOUNCE and command
                # VIRTIO_NET_CTRL_ANNOUNCE_ACK before marking the buffer as used"
                self._announce = False
                ok = True
        elif cls == NetCtrlClass.MQ and has(f, F.MQ):
            if cmd == NetCtrlMq.VQ_PAIRS_SET and len(data) == 2:
                n = _LE16.unpack(data)[0]
                # the driver "MUST NOT request a virtqueue_pairs of 0 or greater than
                # max_virtqueue_pairs"
                if VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN <= n <= self.max_pairs:
                    self._set_pairs(n)
                    ok = True
        elif (
            cls == NetCtrlClass.GUEST_OFFLOADS
            and has(f, F.CTRL_GUEST_OFFLOADS)
            and cmd == 0
            and len(data) == 8
        ):
            bits = _LE64.unpack(data)[0]
            # "A driver MUST NOT enable an offload for which the appropriate feature
            # has not been negotiated"
            if not bits & ~(f & _GUEST_OFFLOAD_MASK) and self._offloads_consistent(bits):
                self._guest_offloads = bits
                self._apply_offloads()
                ok = True
        return VIRTIO_NET_OK if ok else VIRTIO_NET_ERR

    @staticmethod
    def _offloads_consistent(bits: int) -> bool:
        for bit in _GUEST_OFFLOAD_BITS:
            needs = FEATURE_REQUIRES.get(bit)
            if needs and has(bits, bit) and not any(has(bits, n) for n in needs):
                return False
        return True

    def _ctrl_rx(self, cmd: int, data: bytes, f: int) -> bool:
        if not has(f, F.CTRL_RX) or len(data) != 1 or data[0] > 1:
            return False
        on = data[0] == 1
        flt = self.filter
        if cmd == NetCtrlRx.PROMISC:
            flt.promisc = on
        elif cmd == NetCtrlRx.ALLMULTI:
            flt.allmulti = on
        elif not has(f, F.CTRL_RX_EXTRA):
            return False
        elif cmd == NetCtrlRx.ALLUNI:
            flt.alluni = on
        elif cmd == NetCtrlRx.NOMULTI:
            flt.nomulti = on
        elif cmd == NetCtrlRx.NOUNI:
            flt.nouni = on
        elif cmd == NetCtrlRx.NOBCAST:
            flt.nobcast = on
        else:
            return False
        return True

    def _ctrl_mac(self, cmd: int, data: bytes, f: int) -> bool:
        if cmd == NetCtrlMac.ADDR_SET:
            if not has(f, F.CTRL_MAC_ADDR) or len(data) != 6:
                return False
            # "MUST update mac in config space before it consumes the
            # VIRTIO_NET_CTRL_MAC_ADDR_SET command"
            self._set_mac(bytes(data))
            return True
        if cmd != NetCtrlMac.TABLE_SET or not has(f, F.CTRL_RX):
            # "If VIRTIO_NET_F_CTRL_RX has not been negotiated, the driver MUST NOT
            # issue VIRTIO_NET_CTRL_MAC class commands" (ADDR_SET has its own bit)
            return False
        tables: list[list[bytes]] = []
        pos = 0
        for _ in range(2):
            if pos + 4 > len(data):
                return False
            n = _LE32.unpack_from(data, pos)[0]
            pos += 4
            if n > (len(data) - pos) // 6:
                return False
            tables.append([bytes(data[pos + 6 * i : pos + 6 * i + 6]) for i in range(n)])
            pos += 6 * n
        if pos != len(data):
            return False
        # "MUST update the MAC filtering table before it consumes the
        # VIRTIO_NET_CTRL_MAC_TABLE_SET command"
        self.filter.set_tables(tables[0], tables[1])
        return True

    def _set_pairs(self, n: int) -> None:
        """VQ_PAIRS_SET: receive goes to receiveq1..n only from now on ("MUST NOT
        queue packets on receive queues greater than virtqueue_pairs once it has
        placed the ... command in a used buffer")."""
        self.curr_pairs = n
        self.backend.set_active_channels(n)
        for ch, (hdr, frame, pair) in list(self._waiting.items()):
            if pair >= n:
                self._waiting[ch] = (hdr, frame, pair % n)
                # its new receiveq may hold buffers already: no kick will come
                self._resume(ch)
