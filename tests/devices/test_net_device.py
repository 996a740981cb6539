"""NetDevice (virtio-v1.2 §5.1 "Network Device"), device side, on rings in test
memory (:class:`~pyvirtio.testing.DeviceHarness`).

The device sits on a port of a :class:`~pyvirtio.devices.net.Switch` whose second
port is the "wire" the test reads and writes, or on :class:`FakeVnetBackend` (a
back-end carrying the 12-byte header like a TAP with IFF_VNET_HDR). Every writable
buffer has 64 guard bytes after it; :meth:`Rig.close` checks that none was touched.
Negative tests are named after the rule they check.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pyvirtio.devices.net import NetDevice, Switch, SwitchPort
from pyvirtio.devices.net.backend import MAX_FRAME, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6
from pyvirtio.devices.net.device import FEATURE_REQUIRES, MAX_TX_FRAME
from pyvirtio.devices.net.filter import MAC_TABLE_ENTRIES
from pyvirtio.errors import ConfigurationError, DriverError
from pyvirtio.spec.features import Feature
from pyvirtio.spec.ids import DeviceId
from pyvirtio.spec.net import (
    VIRTIO_NET_CONFIG,
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
)
from pyvirtio.testing import DeviceHarness, FakeHost
from pyvirtio.virtqueue import make_device_queue
from tests.devices._net_support import (
    BCAST,
    MAC,
    PEER,
    FakeVnetBackend,
    eth,
    hdr,
    unhdr,
    vlan_frame,
)

F = NetFeature
RING = [pytest.param(False, id="split"), pytest.param(True, id="packed")]
OK, ERR = VIRTIO_NET_OK, VIRTIO_NET_ERR
CTRL = (
    F.MAC.mask
    | F.STATUS.mask
    | F.CTRL_VQ.mask
    | F.CTRL_RX.mask
    | F.CTRL_RX_EXTRA.mask
    | F.CTRL_VLAN.mask
    | F.CTRL_MAC_ADDR.mask
    | F.GUEST_ANNOUNCE.mask
)
GUARD = b"\xee" * 64
OTHER = bytes.fromhex("5254009999aa")
MULTI = bytes.fromhex("01005e000001")
NEEDS_CSUM, DATA_VALID = int(NetHdrFlags.NEEDS_CSUM), int(NetHdrFlags.DATA_VALID)


class RecordingHost(FakeHost):
    """A FakeHost that snapshots the device's configuration space at every used
    buffer notification: what the driver could read when the answer appeared."""

    def __init__(self, device: NetDevice) -> None:
        super().__init__()
        self.device = device
        self.config_at_used: list[tuple[int, bytes]] = []

    def notify_used(self, queue_index: int) -> None:
        super().notify_used(queue_index)
        self.config_at_used.append((queue_index, self.device.config_bytes()))


class Rig:
    """A NetDevice in a DeviceHarness, the wire port of its switch, and guard checks."""

    def __init__(
        self,
        *,
        packed: bool = False,
        features: int = CTRL,
        backend: Any = None,
        legacy: bool = False,
        queue_size: int = 16,
        backlog: int = 256,
        **dev_kw: Any,
    ) -> None:
        self.switch = Switch()
        self.port: SwitchPort | None = None
        self.wire: SwitchPort | None = None
        if backend is None:
            self.port = self.switch.port("dev", backlog=backlog)
            self.wire = self.switch.port("wire")
            backend = self.port
        self.backend = backend
        self.dev = NetDevice(backend, mac=MAC, **dev_kw)
        self.h = DeviceHarness(
            self.dev, packed=packed, features=features, queue_size=queue_size, mem_size=4 << 20
        )
        self.host = RecordingHost(self.dev)
        self.h.host = self.host
        self.dev.host = self.host
        self.segs: list[tuple[int, int]] = []
        if legacy:
            self._relegacy(features, queue_size)

    def _relegacy(self, features: int, size: int) -> None:
        """Activate again with the same rings but without VIRTIO_F_VERSION_1 (the
        legacy interface: 10-byte header without MRG_RXBUF, §5.1.6.1)."""
        dev, h = self.dev, self.h
        dev.guarded("reset", dev.reset)
        f = (h.features & ~Feature.VERSION_1.mask) | features
        assert dev.validate_features(f)
        dev.features = f
        qs = [
            make_device_queue(h.mem, min(size, dev.queue_max_size), q.addrs, f, index=i)
            for i, q in enumerate(h.queues)
        ]
        dev.guarded("activate", dev.activate, f, qs)
        h.features = f

    # -- queues
    @property
    def ctrl_index(self) -> int:
        return self.dev.num_queues - 1

    def tx(self, *parts: bytes, queue: int = 1, writable: tuple[int, ...] = ()) -> int:
        """Send one chain on ``queue``; returns its used length."""
        segs = self.h.add(queue, list(parts), list(writable), token="tx")
        self.segs += segs
        self.h.kick(queue)
        used = self.h.used(queue)
        assert [t for t, _ in used] == ["tx"], used
        return used[0][1]

    def post(self, *sizes: int, queue: int = 0, token: Any = None) -> list[tuple[int, int]]:
        """Post one receive buffer of ``sizes`` (one descriptor each), not kicked."""
        segs = self.h.add(queue, [], list(sizes), token=token if token is not None else sizes)
        self.segs += segs
        return segs

    def ctrl(self, cls: int, cmd: int, *data: bytes, ack: tuple[int, ...] = (1,)) -> int | None:
        """One control command (class+command, then each ``data`` part a descriptor);
        returns the ack byte (None if there is no writable part)."""
        parts = [bytes([cls, cmd]), *[d for d in data]] if data else [bytes([cls, cmd])]
        segs = self.h.add(self.ctrl_index, parts, list(ack), token="ctrl")
        self.segs += segs
        self.h.kick(self.ctrl_index)
        used = self.h.used(self.ctrl_index)
        assert [t for t, _ in used] == ["ctrl"], used
        if not segs or segs[0][1] == 0:
            return None
        assert used[0][1] == 1
        return self.h.read(segs[0])[0]

    # -- the wire
    def inject(self, *frames: bytes) -> None:
        """Frames from the wire into the switch (they reach the device's port)."""
        for f in frames:
            if self.wire is not None:
                self.wire.send(0, [f])
            else:
                self.backend.push(f)

    def pump(self) -> None:
        """Serve the device's host event sources until nothing is ready."""
        for _ in range(200):
            if not self.h.poll(0):
                return
        raise AssertionError("the device's host events never settle")

    def wire_frames(self) -> list[bytes]:
        assert self.wire is not None
        out = []
        buf = memoryview(bytearray(MAX_FRAME))
        while (n := self.wire.recv_into(0, buf)) is not None:
            out.append(bytes(buf[:n]))
        return out

    def rx_used(self, queue: int = 0) -> list[tuple[Any, int]]:
        return self.h.used(queue)

    def read(self, seg: tuple[int, int], n: int | None = None) -> bytes:
        return self.h.mem.read(seg[0], seg[1] if n is None else n)

    def check_guards(self) -> None:
        for addr, n in self.segs:
            assert self.h.mem.read(addr + max(1, n), 64) == GUARD, "write past a buffer"
            if n == 0:
                assert self.h.mem.read(addr, 1) == b"\xee", "write into a 0-byte buffer"

    def close(self) -> None:
        try:
            self.check_guards()
        finally:
            self.h.close()
            self.dev.close()
            if self.wire is not None:
                self.wire.close()


@pytest.fixture
def rig() -> Iterator[Any]:
    made: list[Rig] = []

    def make(**kw: Any) -> Rig:
        r = Rig(**kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def frame_of(n: int, dst: bytes = MAC, seed: int = 0) -> bytes:
    body = bytes((seed + i) & 0xFF for i in range(n - 14))
    return eth(dst, PEER, body)


# ---------------------------------------------------------------------------------------
# identity, configuration, features
# ---------------------------------------------------------------------------------------


def test_identity_and_queue_count() -> None:
    sw = Switch()
    d = NetDevice(sw.port(), mac=MAC)
    assert d.device_id == DeviceId.NET == 1
    assert d.num_queues == 3
    assert NetDevice(sw.port(), queue_pairs=4).num_queues == 9
    assert NetDevice(sw.port(), ctrl_vq=False, queue_pairs=2).num_queues == 4


@pytest.mark.parametrize(
    "kw",
    [
        {"queue_pairs": 0},
        {"queue_pairs": 0x8001},
        {"mtu": 67},
        {"mtu": 65536},
        {"mac": b"\x01\x00\x00\x00\x00\x01"},
        {"mac": b"\x02\x00"},
        {"speed": 0x80000000},
        {"duplex": 2},
    ],
)
def test_bad_arguments_are_configuration_errors(kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        NetDevice(Switch().port(), **kw)


def test_config_layout_bytes() -> None:
    d = NetDevice(
        Switch().port(), mac=MAC, queue_pairs=3, mtu=1400, speed=10000, duplex=1, link_up=True
    )
    raw = d.config_bytes()
    # mac[6] status le16 max_virtqueue_pairs le16 mtu le16 speed le32 duplex u8
    assert (
        raw
        == MAC
        + b"\x01\x00"
        + b"\x03\x00"
        + (1400).to_bytes(2, "little")
        + (10000).to_bytes(4, "little")
        + b"\x01"
    )
    assert len(raw) == VIRTIO_NET_CONFIG.offset_of("rss_max_key_size") == 17
    d2 = NetDevice(Switch().port(), mac=MAC, link_up=False)
    raw2 = d2.config_bytes()
    assert raw2[6:8] == b"\x00\x00"
    # without an mtu the field holds Ethernet's 1500 (read only with VIRTIO_NET_F_MTU,
    # which a vhost-user back-end offers before the front-end's NET_SET_MTU)
    assert raw2[10:12] == (1500).to_bytes(2, "little")
    assert raw2[12:16] == b"\xff\xff\xff\xff" and raw2[16] == 0xFF  # unknown speed/duplex


def test_random_mac_is_locally_administered_unicast() -> None:
    for _ in range(20):
        m = NetDevice(Switch().port()).mac
        assert len(m) == 6 and m[0] & 3 == 2


def offered(dev: NetDevice) -> int:
    return dev.device_features()


OFFLOAD_BITS = [F.CSUM, F.GUEST_CSUM, F.HOST_TSO4, F.HOST_TSO6, F.HOST_ECN, F.GUEST_TSO4]


def test_feature_offer_without_a_vnet_backend_has_no_offload_bits() -> None:
    f = offered(NetDevice(Switch().port(), mtu=1500))
    for b in [*OFFLOAD_BITS, F.GUEST_TSO6, F.GUEST_ECN, F.CTRL_GUEST_OFFLOADS, F.GUEST_UFO]:
        assert not f & b.mask, b.name
    for b in [F.MAC, F.STATUS, F.MTU, F.MRG_RXBUF, F.SPEED_DUPLEX, *[F(x) for x in range(17, 22)]]:
        assert f & b.mask, b.name
    assert f & F.CTRL_MAC_ADDR.mask
    assert f & Feature.ANY_LAYOUT.mask
    assert not f & F.MQ.mask  # one pair
    assert not f & (F.HOST_UFO.mask | F.GUEST_UFO.mask | F.RSS.mask | F.HASH_REPORT.mask)


def test_feature_offer_on_a_vnet_backend_has_offloads_and_ctrl_guest_offloads() -> None:
    be = FakeVnetBackend()
    f = offered(NetDevice(be, queue_pairs=2))
    for b in [*OFFLOAD_BITS, F.GUEST_TSO6, F.GUEST_ECN, F.CTRL_GUEST_OFFLOADS, F.MQ]:
        assert f & b.mask, b.name
    assert not f & (F.HOST_UFO.mask | F.GUEST_UFO.mask)
    # without the control queue (a vhost-user back-end): no CTRL_*, offloads stay;
    # MQ and GUEST_ANNOUNCE are offered, as QEMU keeps them only if the back-end does
    f2 = offered(NetDevice(be, ctrl_vq=False, queue_pairs=2))
    assert f2 & F.CSUM.mask
    assert not f2 & (F.CTRL_GUEST_OFFLOADS.mask | F.CTRL_VQ.mask | F.CTRL_RX.mask)
    assert f2 & F.MQ.mask and f2 & F.GUEST_ANNOUNCE.mask
    assert not offered(NetDevice(be, ctrl_vq=False)) & F.MQ.mask  # one pair: no MQ
    f3 = offered(NetDevice(be, offloads=False, mrg_rxbuf=False))
    assert not f3 & (F.CSUM.mask | F.GUEST_CSUM.mask | F.CTRL_GUEST_OFFLOADS.mask)
    assert not f3 & F.MRG_RXBUF.mask
    assert not f3 & F.MTU.mask  # no mtu given
    be.close()


@pytest.mark.parametrize(
    "feature,needs", [pytest.param(k, v, id=F(k).name) for k, v in FEATURE_REQUIRES.items()]
)
def test_validate_features_refuses_a_set_that_breaks_5_1_3_1(
    feature: int, needs: tuple[int, ...]
) -> None:
    d = NetDevice(FakeVnetBackend(), queue_pairs=2)
    base = Feature.VERSION_1.mask
    assert not d.validate_features(base | (1 << feature))
    for n in needs:
        # with one of the required features (and what that needs) it is accepted
        with_need = base | (1 << feature) | (1 << n)
        for k, v in FEATURE_REQUIRES.items():
            if with_need >> k & 1:
                with_need |= 1 << v[0]
        for k, v in FEATURE_REQUIRES.items():
            if with_need >> k & 1:
                with_need |= 1 << v[0]
        assert d.validate_features(with_need), F(n).name


# ---------------------------------------------------------------------------------------
# transmit (§5.1.6.2)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", RING)
def test_tx_frames_reach_the_backend_byte_exact_in_order(rig: Any, packed: bool) -> None:
    r = rig(packed=packed)
    frames = [frame_of(n, OTHER, seed=n) for n in (14, 60, 61, 1514, 9000)]
    h = hdr()
    assert r.tx(h + frames[0]) == 0  # header and data in one descriptor
    assert r.tx(h, frames[1]) == 0  # header, then data
    assert r.tx(h[:3], h[3:] + frames[2][:7], frames[2][7:20], frames[2][20:]) == 0  # cut anyhow
    assert r.tx(h, frames[3][:1000], frames[3][1000:]) == 0
    assert r.tx(h + frames[4][:1], frames[4][1:]) == 0
    assert r.wire_frames() == frames
    assert r.dev.tx_frames == 5
    assert r.dev.metrics.bytes_read == sum(map(len, frames))


def test_tx_several_chains_in_one_kick_go_out_in_order(rig: Any) -> None:
    r = rig()
    frames = [frame_of(60 + i, OTHER, seed=i) for i in range(12)]
    for i, f in enumerate(frames):
        r.h.add(1, [hdr(), f], [], token=i)
    r.h.kick(1)
    assert r.h.used(1) == [(i, 0) for i in range(12)]
    assert r.wire_frames() == frames


@pytest.mark.parametrize("mrg", [False, True], ids=["no-mrg", "mrg"])
def test_tx_legacy_header_is_10_bytes_without_version_1_or_mrg_rxbuf(rig: Any, mrg: bool) -> None:
    feats = CTRL | (F.MRG_RXBUF.mask if mrg else 0)
    r = rig(features=feats, legacy=True)
    assert r.dev.hdr_len == (12 if mrg else 10)
    f = frame_of(100, OTHER)
    r.tx(hdr()[: r.dev.hdr_len], f)
    r.tx(hdr()[: r.dev.hdr_len] + f)
    assert r.wire_frames() == [f, f]


def test_legacy_driver_may_write_mac_in_config_modern_may_not(rig: Any) -> None:
    r = rig(legacy=True)
    r.dev.write_config(3, b"\xaa\xbb\xcc")
    assert r.dev.config_bytes()[:6] == MAC[:3] + b"\xaa\xbb\xcc"
    assert r.dev.filter.mac == r.dev.mac
    m = rig()
    m.dev.write_config(0, b"\x02" * 6)
    assert m.dev.config_bytes()[:6] == MAC


def test_tx_chain_shorter_than_the_header_is_returned_unsent_and_counted(rig: Any) -> None:
    r = rig()
    assert r.tx(hdr()[:11]) == 0
    assert r.tx(b"\x00") == 0
    assert r.dev.metrics.errors["tx_short"] == 2
    assert r.wire_frames() == []
    # the queue keeps working
    f = frame_of(60, OTHER)
    r.tx(hdr(), f)
    assert r.wire_frames() == [f]
    assert not r.h.needs_reset


def test_tx_frame_shorter_than_an_ethernet_header_is_dropped(rig: Any) -> None:
    r = rig()
    r.tx(hdr(), b"\x02" * 13)
    assert r.dev.metrics.errors["tx_runt"] == 1
    assert r.wire_frames() == []


def test_tx_frame_larger_than_64k_plus_header_is_dropped(rig: Any) -> None:
    r = rig()
    big = frame_of(MAX_TX_FRAME + 1, OTHER)
    r.tx(hdr(), big[:40000], big[40000:])
    assert r.dev.metrics.errors["tx_oversize"] == 1
    assert r.wire_frames() == []
    ok = frame_of(MAX_TX_FRAME, OTHER)
    r.tx(hdr(), ok)
    assert r.wire_frames() == [ok]


def test_tx_chain_with_device_writable_part_is_returned_unsent_and_not_written(rig: Any) -> None:
    r = rig()
    assert r.tx(hdr(), frame_of(60, OTHER), writable=(32,)) == 0
    assert r.dev.metrics.errors["tx_writable"] == 1
    assert r.read(r.segs[-1]) == b"\xee" * 32
    assert r.wire_frames() == []


def test_tx_device_MUST_ignore_flag_bits_that_it_does_not_recognize(rig: Any) -> None:
    r = rig()
    f = frame_of(80, OTHER)
    r.tx(hdr(flags=0xFE), f)  # DATA_VALID, RSC_INFO and unknown bits, no NEEDS_CSUM
    assert r.wire_frames() == [f]


def test_tx_needs_csum_without_VIRTIO_NET_F_CSUM_is_dropped(rig: Any) -> None:
    r = rig()
    r.tx(hdr(flags=NEEDS_CSUM, csum_start=34, csum_offset=16), frame_of(80, OTHER))
    assert r.dev.metrics.errors["tx_bad_csum"] == 1
    assert r.wire_frames() == []
    # same on a vnet back-end that offers CSUM when the driver did not take it
    be = FakeVnetBackend()
    v = rig(backend=be)
    v.tx(hdr(flags=NEEDS_CSUM, csum_start=34, csum_offset=16), frame_of(80, OTHER))
    assert be.sent == []
    assert v.dev.metrics.errors["tx_bad_csum"] == 1


def vnet_rig(rig: Any, extra: int = 0, **kw: Any) -> tuple[Any, FakeVnetBackend]:
    be = FakeVnetBackend(kw.pop("channels", 1))
    return rig(backend=be, features=CTRL | extra, **kw), be


def test_tx_csum_offset_outside_the_frame_is_dropped(rig: Any) -> None:
    r, be = vnet_rig(rig, F.CSUM.mask)
    f = frame_of(80, OTHER)
    r.tx(hdr(flags=NEEDS_CSUM, csum_start=70, csum_offset=9), f)  # 70+9+2 > 80
    r.tx(hdr(flags=NEEDS_CSUM, csum_start=0xFFFF, csum_offset=0xFFFF), f)
    assert r.dev.metrics.errors["tx_bad_csum"] == 2
    assert be.sent == []
    r.tx(hdr(flags=NEEDS_CSUM, csum_start=70, csum_offset=8), f)  # last two bytes: fine
    assert len(be.sent) == 1
    assert unhdr(be.sent[0][1])[:6] == (NEEDS_CSUM, 0, 0, 0, 70, 8)
    assert be.sent[0][1][12:] == f


def test_tx_csum_fields_are_not_used_without_NEEDS_CSUM(rig: Any) -> None:
    r, be = vnet_rig(rig, F.CSUM.mask)
    f = frame_of(80, OTHER)
    r.tx(hdr(flags=DATA_VALID, csum_start=0xFFFF, csum_offset=0xFFFF), f)
    assert unhdr(be.sent[0][1]) == (0, 0, 0, 0, 0, 0, 0)


@pytest.mark.parametrize(
    "gso,extra,why",
    [
        (NetGsoType.TCPV4, 0, "no HOST_TSO4"),
        (NetGsoType.TCPV6, F.HOST_TSO4.mask, "no HOST_TSO6"),
        (NetGsoType.UDP, F.HOST_TSO4.mask, "UFO never offered"),
        (NetGsoType.TCPV4 | NetGsoType.ECN, F.HOST_TSO4.mask, "no HOST_ECN"),
        (NetGsoType.ECN, F.HOST_TSO4.mask | F.HOST_ECN.mask, "ECN alone"),
        (2, F.HOST_TSO4.mask, "unknown type"),
        (0x7F, F.HOST_TSO4.mask, "unknown type"),
    ],
)
def test_tx_gso_type_not_negotiated_is_dropped(rig: Any, gso: int, extra: int, why: str) -> None:
    r, be = vnet_rig(rig, F.CSUM.mask | extra)
    r.tx(hdr(NEEDS_CSUM, gso, 54, 1448, 34, 16), frame_of(3000, OTHER))
    assert be.sent == [], why
    assert r.dev.metrics.errors["tx_bad_gso"] == 1


def test_tx_gso_without_needs_csum_or_with_gso_size_0_is_dropped(rig: Any) -> None:
    r, be = vnet_rig(rig, F.CSUM.mask | F.HOST_TSO4.mask)
    r.tx(hdr(0, NetGsoType.TCPV4, 54, 1448, 34, 16), frame_of(3000, OTHER))
    r.tx(hdr(NEEDS_CSUM, NetGsoType.TCPV4, 54, 0, 34, 16), frame_of(3000, OTHER))
    assert be.sent == []
    assert r.dev.metrics.errors["tx_bad_gso"] == 2
    r.tx(hdr(NEEDS_CSUM, NetGsoType.TCPV4, 54, 1448, 34, 16), frame_of(3000, OTHER))
    assert unhdr(be.sent[0][1]) == (NEEDS_CSUM, NetGsoType.TCPV4, 54, 1448, 34, 16, 0)


def test_tx_header_length_is_never_taken_from_the_chain(rig: Any) -> None:
    """hdr_len (or any header field) claiming 0xffff changes nothing of where the
    frame starts: the header is net_hdr_size(features) bytes (CVE-2023-6693)."""
    r = rig()
    f = frame_of(64, OTHER)
    r.tx(hdr(hdr_len=0xFFFF, gso_size=0xFFFF, num_buffers=0xFFFF), f)
    assert r.wire_frames() == [f]
    r2, be = vnet_rig(rig, F.CSUM.mask)
    r2.tx(hdr(hdr_len=0xFFFF, num_buffers=0xFFFF) + f)
    assert be.sent[0][1][12:] == f
    assert len(be.sent[0][1]) == 12 + len(f)
    assert unhdr(be.sent[0][1])[6] == 0  # num_buffers not passed on


def test_tx_over_mtu_plus_18_is_dropped_up_to_it_is_forwarded(rig: Any) -> None:
    r = rig(features=CTRL | F.MTU.mask, mtu=100)
    r.tx(hdr(), frame_of(119, OTHER))
    assert r.dev.metrics.errors["tx_over_mtu"] == 1
    ok = frame_of(118, OTHER)
    r.tx(hdr(), ok)
    assert r.wire_frames() == [ok]


def test_tx_backend_that_cannot_take_the_frame_is_counted(rig: Any) -> None:
    r = rig()
    assert r.wire is not None
    r.wire.close()  # the device's port is alone on the switch: the frame goes nowhere
    r.wire = None
    r.tx(hdr(), frame_of(60, OTHER))
    assert r.dev.metrics.errors["tx_backend_full"] == 1
    assert not r.h.needs_reset


# ---------------------------------------------------------------------------------------
# receive (§5.1.6.3, §5.1.6.4)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", RING)
def test_rx_buffers_are_held_until_a_frame_arrives(rig: Any, packed: bool) -> None:
    r = rig(packed=packed, features=CTRL)
    seg = r.post(1600, token="b0")[0]
    r.h.kick(0)
    r.pump()
    assert r.rx_used() == []  # held
    f = frame_of(200)
    r.inject(f)
    r.pump()
    assert r.rx_used() == [("b0", 12 + 200)]
    raw = r.read(seg, 212)
    assert unhdr(raw) == (0, 0, 0, 0, 0, 0, 1)  # num_buffers = 1 without MRG_RXBUF
    assert raw[12:] == f
    assert r.read((seg[0] + 212, 1600 - 212)) == b"\xee" * (1600 - 212)
    assert r.dev.rx_frames == 1
    assert 0 in r.host.used


@pytest.mark.parametrize("packed", RING)
def test_rx_one_buffer_of_several_descriptors_without_mrg_rxbuf(rig: Any, packed: bool) -> None:
    r = rig(packed=packed)
    segs = r.post(12, 100, 2000, token="b")
    r.h.kick(0)
    f = frame_of(500, seed=3)
    r.inject(f)
    r.pump()
    assert r.rx_used() == [("b", 512)]
    got = r.read(segs[0]) + r.read(segs[1]) + r.read(segs[2], 400)
    assert unhdr(got)[6] == 1
    assert got[12:] == f


def test_rx_frame_larger_than_the_buffer_without_mrg_rxbuf_is_dropped_buffer_kept(
    rig: Any,
) -> None:
    r = rig()
    r.post(100, token="small")
    r.h.kick(0)
    r.inject(frame_of(200))
    r.pump()
    assert r.rx_used() == []
    assert r.dev.metrics.errors["rx_too_big"] == 1
    small = frame_of(60)
    r.inject(small)
    r.pump()
    assert r.rx_used() == [("small", 72)]


@pytest.mark.parametrize("packed", RING)
@pytest.mark.parametrize("size", [12, 13, 64, 100, 1000])
def test_rx_mrg_spreads_a_frame_over_buffers_all_but_the_last_full(
    rig: Any, packed: bool, size: int
) -> None:
    r = rig(packed=packed, features=CTRL | F.MRG_RXBUF.mask, queue_size=256)
    n = 1 + (12 + 3000 + size - 1) // size + 2
    segs = [r.post(size, token=i)[0] for i in range(n)]
    r.h.kick(0)
    f = frame_of(3000, seed=size)
    r.inject(f)
    r.pump()
    used = r.rx_used()
    need = (12 + 3000 + size - 1) // size
    assert [t for t, _ in used] == list(range(need))
    assert all(n == size for _, n in used[:-1])  # every buffer but the last filled
    assert sum(n for _, n in used) == 3012
    data = b"".join(r.read(segs[i], used[i][1]) for i in range(need))
    assert unhdr(data)[6] == need  # num_buffers
    assert data[12:] == f
    # the rest stay posted and take the next frame
    r.inject(frame_of(14))
    r.pump()
    nxt = r.rx_used()
    assert [t for t, _ in nxt] == list(range(need, need + (26 + size - 1) // size))


def test_rx_mrg_one_buffer_num_buffers_is_1(rig: Any) -> None:
    r = rig(features=CTRL | F.MRG_RXBUF.mask)
    seg = r.post(2048, token="a")[0]
    r.h.kick(0)
    r.inject(frame_of(100))
    r.pump()
    assert r.rx_used() == [("a", 112)]
    assert unhdr(r.read(seg))[6] == 1


@pytest.mark.parametrize("mrg", [False, True], ids=["no-mrg", "mrg"])
def test_rx_legacy_header(rig: Any, mrg: bool) -> None:
    r = rig(features=CTRL | (F.MRG_RXBUF.mask if mrg else 0), legacy=True)
    seg = r.post(1600, token="a")[0]
    r.h.kick(0)
    f = frame_of(70)
    r.inject(f)
    r.pump()
    hl = 12 if mrg else 10
    assert r.rx_used() == [("a", hl + 70)]
    raw = r.read(seg, hl + 70)
    assert raw[:10] == bytes(10)
    if mrg:
        assert raw[10:12] == b"\x01\x00"
    assert raw[hl:] == f


@pytest.mark.parametrize("mrg", [False, True], ids=["no-mrg", "mrg"])
def test_rx_frame_waits_for_buffers_then_is_delivered_nothing_lost(rig: Any, mrg: bool) -> None:
    r = rig(features=CTRL | (F.MRG_RXBUF.mask if mrg else 0), queue_size=64)
    frames = [frame_of(300 + i, seed=i) for i in range(5)]
    r.inject(*frames)
    r.pump()
    assert r.dev.rx_frames == 0
    assert r.dev.metrics.errors["rx_no_buffer"] >= 1
    # at most one frame taken off the channel and held
    assert len(r.dev._waiting) == 1
    assert r.port is not None and len(r.port._frames) == 4
    got: list[bytes] = []
    for i in range(5):
        seg = r.post(1600, token=i)[0]
        r.h.kick(0)  # the driver posts one buffer and kicks
        r.pump()
        used = r.rx_used()
        assert used == [(i, 12 + len(frames[i]))]
        got.append(r.read(seg, used[0][1])[12:])
    assert got == frames
    assert r.dev._waiting == {}


def test_rx_mrg_frame_needing_more_buffers_than_posted_waits_nothing_used(rig: Any) -> None:
    r = rig(features=CTRL | F.MRG_RXBUF.mask, queue_size=64)
    segs = [r.post(256, token=i)[0] for i in range(3)]
    r.h.kick(0)
    f = frame_of(1500, seed=9)
    r.inject(f)
    r.pump()
    assert r.rx_used() == []  # 3 x 256 < 1512: nothing used, nothing lost
    segs += [r.post(256, token=i)[0] for i in range(3, 6)]
    r.h.kick(0)
    r.pump()
    used = r.rx_used()
    assert [t for t, _ in used] == [0, 1, 2, 3, 4, 5]
    data = b"".join(r.read(segs[i], n) for i, (_, n) in enumerate(used))
    assert unhdr(data)[6] == 6 and data[12:] == f


def test_rx_bounded_host_queue_drops_beyond_the_backlog_and_counts(rig: Any) -> None:
    r = rig(backlog=4)
    assert r.port is not None
    r.inject(*[frame_of(60, seed=i) for i in range(4)])
    r.pump()  # the device takes one and holds it; the port keeps 3
    assert len(r.dev._waiting) == 1
    r.inject(*[frame_of(60, seed=10 + i) for i in range(5)])
    assert len(r.port._frames) == 4
    assert r.port.dropped == 4
    assert r.port.received == 5  # 4, then 1 more after the device took one
    segs = [r.post(100, token=i)[0] for i in range(10)]
    r.h.kick(0)
    r.pump()
    used = r.rx_used()
    assert [t for t, _ in used] == [0, 1, 2, 3, 4]
    seeds = [r.read(segs[i], n)[12 + 14] for i, (_, n) in enumerate(used)]
    assert seeds == [0, 1, 2, 3, 10]


def test_rx_buffer_with_readable_part_is_a_driver_error(rig: Any) -> None:
    r = rig()
    segs = r.h.add(0, [b"\x00" * 16], [1600], token="bad")
    r.segs += segs
    r.h.kick(0)
    r.inject(frame_of(100))
    r.pump()
    assert r.h.needs_reset
    assert isinstance(r.host.resets[0], DriverError)
    assert "5.1.6.3.1" in str(r.host.resets[0])
    assert r.read(segs[0]) == b"\xee" * 1600  # nothing written
    assert r.host.status & 0x40  # DEVICE_NEEDS_RESET
    # the queue is stopped: a good buffer posted later is not used either
    r.post(1600, token="good")
    r.h.kick(0)
    r.inject(frame_of(100))
    r.pump()
    assert r.rx_used() == []


def test_mrg_rx_buffer_smaller_than_the_header_is_a_driver_error(rig: Any) -> None:
    r = rig(features=CTRL | F.MRG_RXBUF.mask)
    r.post(11, token="tiny")
    r.h.kick(0)
    r.inject(frame_of(60))
    r.pump()
    assert r.h.needs_reset
    assert isinstance(r.host.resets[0], DriverError)
    assert r.rx_used() == []


def test_rx_over_mtu_is_dropped(rig: Any) -> None:
    r = rig(features=CTRL | F.MTU.mask, mtu=100)
    r.post(1600, token=0)
    r.post(1600, token=1)
    r.h.kick(0)
    r.inject(frame_of(119), frame_of(118))
    r.pump()
    assert r.rx_used() == [(0, 12 + 118)]
    assert r.dev.metrics.errors["rx_over_mtu"] == 1


def test_rx_runt_from_the_backend_is_dropped(rig: Any) -> None:
    r = rig()
    r.post(1600, token=0)
    r.h.kick(0)
    assert r.port is not None
    r.port._deliver(b"\x00" * 13)  # shorter than an Ethernet header
    r.inject(frame_of(60))
    r.pump()
    assert r.rx_used() == [(0, 72)]


def test_rx_before_driver_ok_nothing_is_read(rig: Any) -> None:
    """Before activation the device does not watch the back-end at all."""
    sw = Switch()
    port, wire = sw.port(), sw.port()
    d = NetDevice(port, mac=MAC)
    assert d.events.readers() == {}
    wire.send(0, [frame_of(60)])
    assert len(port._frames) == 1
    d.close()
    wire.close()


# -- the header on receive from a vnet back-end (§5.1.6.4.1)


def post_and_push(r: Any, be: FakeVnetBackend, header: bytes, frame: bytes) -> bytes | None:
    seg = r.post(70000 if len(frame) > 1600 else 1600, token="x")[0]
    r.h.kick(0)
    be.push(header + frame)
    r.pump()
    used = r.rx_used()
    if not used:
        return None
    assert used == [("x", 12 + len(frame))]
    return r.read(seg, used[0][1])


def test_device_MUST_set_flags_to_zero_without_GUEST_CSUM(rig: Any) -> None:
    r, be = vnet_rig(rig)
    f = frame_of(100)
    raw = post_and_push(r, be, hdr(NEEDS_CSUM | DATA_VALID | 4, 0, 54, 0, 34, 16), f)
    assert raw is not None
    assert unhdr(raw) == (0, 0, 54, 0, 0, 0, 1)
    assert raw[12:] == f


def test_rx_flags_pass_with_GUEST_CSUM_but_never_RSC_INFO(rig: Any) -> None:
    r, be = vnet_rig(rig, F.GUEST_CSUM.mask)
    raw = post_and_push(
        r, be, hdr(NEEDS_CSUM | DATA_VALID | 4 | 0x80, 0, 54, 0, 34, 16), frame_of(100)
    )
    assert raw is not None and unhdr(raw)[:6] == (NEEDS_CSUM | DATA_VALID, 0, 54, 0, 34, 16)
    raw = post_and_push(r, be, hdr(DATA_VALID, 0, 0, 0, 34, 16), frame_of(100))
    assert raw is not None and unhdr(raw)[:6] == (DATA_VALID, 0, 0, 0, 0, 0)


@pytest.mark.parametrize(
    "gso,extra,why",
    [
        (NetGsoType.TCPV4, 0, "no GUEST_TSO4"),
        (NetGsoType.TCPV4, F.GUEST_TSO6.mask, "no GUEST_TSO4"),
        (NetGsoType.TCPV6, F.GUEST_TSO4.mask, "no GUEST_TSO6"),
        (NetGsoType.UDP, F.GUEST_TSO4.mask | F.GUEST_TSO6.mask, "no GUEST_UFO"),
        (NetGsoType.TCPV4 | NetGsoType.ECN, F.GUEST_TSO4.mask, "no GUEST_ECN"),
        (2, F.GUEST_TSO4.mask, "unknown"),
    ],
)
def test_rx_gso_types_not_negotiated_are_dropped(rig: Any, gso: int, extra: int, why: str) -> None:
    r, be = vnet_rig(rig, F.GUEST_CSUM.mask | extra)
    assert post_and_push(r, be, hdr(NEEDS_CSUM, gso, 54, 1448, 34, 16), frame_of(3000)) is None, why
    assert r.dev.metrics.errors["rx_bad_gso"] == 1
    # the buffer is still there for the next frame
    be.push(hdr() + frame_of(60))
    r.pump()
    assert r.rx_used() == [("x", 72)]


def test_rx_gso_without_needs_csum_is_dropped_and_with_it_delivered(rig: Any) -> None:
    feats = F.GUEST_CSUM.mask | F.GUEST_TSO4.mask | F.GUEST_ECN.mask | F.MRG_RXBUF.mask
    r, be = vnet_rig(rig, feats)
    assert post_and_push(r, be, hdr(0, NetGsoType.TCPV4, 54, 1448, 34, 16), frame_of(3000)) is None
    be.push(hdr(NEEDS_CSUM, NetGsoType.TCPV4 | NetGsoType.ECN, 54, 1448, 34, 16) + frame_of(3000))
    r.pump()
    used = r.rx_used()
    assert used == [("x", 3012)]
    # GSO frames are not held to the mtu; guest offloads reached the TAP flags
    assert be.offloads[-1] == TUN_F_CSUM | TUN_F_TSO4 | 0x08


def test_rx_gso_frames_are_exempt_from_the_mtu(rig: Any) -> None:
    r, be = vnet_rig(rig, F.GUEST_CSUM.mask | F.GUEST_TSO4.mask | F.MTU.mask, mtu=1500)
    raw = post_and_push(r, be, hdr(NEEDS_CSUM, NetGsoType.TCPV4, 54, 1448, 34, 16), frame_of(5000))
    assert raw is not None
    assert post_and_push(r, be, hdr(), frame_of(1519)) is None
    assert r.dev.metrics.errors["rx_over_mtu"] == 1


# ---------------------------------------------------------------------------------------
# receive filter (§5.1.6.5.1-3)
# ---------------------------------------------------------------------------------------


def deliveries(r: Any, frames: list[bytes]) -> list[bool]:
    """Which of ``frames`` reached the driver (one buffer each posted)."""
    for i in range(len(frames)):
        r.post(1600, token=i)
    r.h.kick(0)
    out = []
    for f in frames:
        before = r.dev.rx_frames
        r.inject(f)
        r.pump()
        out.append(r.dev.rx_frames > before)
    # return unused buffers' count to the test's eyes
    r.rx_used()
    return out


ALL = [eth(MAC), eth(OTHER), eth(BCAST), eth(MULTI)]


def test_promisc_is_on_by_default(rig: Any) -> None:
    r = rig()
    assert deliveries(r, ALL) == [True, True, True, True]


def test_promisc_off_only_own_mac_table_and_broadcast(rig: Any) -> None:
    r = rig()
    assert r.ctrl(NetCtrlClass.RX, NetCtrlRx.PROMISC, b"\x00") == OK
    assert deliveries(r, ALL) == [True, False, True, False]
    uni = bytes.fromhex("52540000aaaa")
    tables = (1).to_bytes(4, "little") + uni, (1).to_bytes(4, "little") + MULTI
    assert r.ctrl(NetCtrlClass.MAC, NetCtrlMac.TABLE_SET, *tables) == OK
    assert deliveries(
        r, [eth(uni), eth(MULTI), eth(OTHER), eth(bytes.fromhex("01005e000002"))]
    ) == [
        True,
        True,
        False,
        False,
    ]


@pytest.mark.parametrize(
    "cmd,want",
    [
        (NetCtrlRx.ALLMULTI, [True, False, True, True]),
        (NetCtrlRx.ALLUNI, [True, True, True, False]),
        (NetCtrlRx.NOMULTI, [True, False, True, False]),
        (NetCtrlRx.NOUNI, [False, False, True, False]),
        (NetCtrlRx.NOBCAST, [True, False, False, False]),
    ],
)
def test_rx_modes(rig: Any, cmd: int, want: list[bool]) -> None:
    r = rig()
    assert r.ctrl(NetCtrlClass.RX, NetCtrlRx.PROMISC, b"\x00") == OK
    assert r.ctrl(NetCtrlClass.RX, cmd, b"\x01") == OK
    assert deliveries(r, ALL) == want
    assert r.ctrl(NetCtrlClass.RX, cmd, b"\x00") == OK
    assert deliveries(r, ALL) == [True, False, True, False]


def test_nomulti_beats_the_multicast_table_nobcast_beats_allmulti(rig: Any) -> None:
    r = rig()
    r.ctrl(NetCtrlClass.RX, NetCtrlRx.PROMISC, b"\x00")
    tables = (0).to_bytes(4, "little"), (1).to_bytes(4, "little") + MULTI
    r.ctrl(NetCtrlClass.MAC, NetCtrlMac.TABLE_SET, *tables)
    r.ctrl(NetCtrlClass.RX, NetCtrlRx.NOMULTI, b"\x01")
    r.ctrl(NetCtrlClass.RX, NetCtrlRx.ALLMULTI, b"\x01")
    r.ctrl(NetCtrlClass.RX, NetCtrlRx.NOBCAST, b"\x01")
    assert deliveries(r, [eth(MULTI), eth(BCAST)]) == [False, False]
    r.ctrl(NetCtrlClass.RX, NetCtrlRx.NOMULTI, b"\x00")
    # promiscuous mode takes effect even with NOBCAST
    r.ctrl(NetCtrlClass.RX, NetCtrlRx.PROMISC, b"\x01")
    assert deliveries(r, [eth(MULTI), eth(BCAST)]) == [True, True]


def test_mac_table_longer_than_the_device_keeps_accepts_that_class(rig: Any) -> None:
    r = rig()
    r.ctrl(NetCtrlClass.RX, NetCtrlRx.PROMISC, b"\x00")
    n = MAC_TABLE_ENTRIES + 1
    uni = b"".join(bytes([2, 0, 0, 0, i >> 8, i & 0xFF]) for i in range(n))
    tables = n.to_bytes(4, "little") + uni, (0).to_bytes(4, "little")
    assert r.ctrl(NetCtrlClass.MAC, NetCtrlMac.TABLE_SET, *tables) == OK
    assert deliveries(r, [eth(OTHER), eth(MULTI)]) == [True, False]


def test_vlan_filter_with_CTRL_VLAN(rig: Any) -> None:
    r = rig()
    r.ctrl(NetCtrlClass.RX, NetCtrlRx.PROMISC, b"\x00")
    frames = [vlan_frame(5), vlan_frame(6), eth(MAC)]
    assert deliveries(r, frames) == [False, False, True]  # no VLAN added: tagged dropped
    assert r.ctrl(NetCtrlClass.VLAN, NetCtrlVlan.ADD, (5).to_bytes(2, "little")) == OK
    assert deliveries(r, frames) == [True, False, True]
    assert r.ctrl(NetCtrlClass.VLAN, NetCtrlVlan.DEL, (5).to_bytes(2, "little")) == OK
    assert deliveries(r, frames) == [False, False, True]
    assert r.ctrl(NetCtrlClass.VLAN, NetCtrlVlan.ADD, (4096).to_bytes(2, "little")) == ERR
    assert r.ctrl(NetCtrlClass.VLAN, 2, (5).to_bytes(2, "little")) == ERR
    assert r.ctrl(NetCtrlClass.VLAN, NetCtrlVlan.ADD, b"\x05") == ERR


def test_without_CTRL_VLAN_tagged_frames_are_not_filtered(rig: Any) -> None:
    r = rig(features=CTRL & ~F.CTRL_VLAN.mask)
    r.ctrl(NetCtrlClass.RX, NetCtrlRx.PROMISC, b"\x00")
    assert deliveries(r, [vlan_frame(5)]) == [True]
    assert r.ctrl(NetCtrlClass.VLAN, NetCtrlVlan.ADD, (5).to_bytes(2, "little")) == ERR


# ---------------------------------------------------------------------------------------
# control queue (§5.1.6.5)
# ---------------------------------------------------------------------------------------


def test_mac_addr_set_updates_config_mac_before_the_ack(rig: Any) -> None:
    r = rig()
    new = bytes.fromhex("525400fedcba")
    assert r.ctrl(NetCtrlClass.MAC, NetCtrlMac.ADDR_SET, new) == OK
    ci = r.ctrl_index
    snap = [c for q, c in r.host.config_at_used if q == ci]
    assert snap and snap[-1][:6] == new  # already there when the answer was published
    assert r.dev.mac == new
    r.ctrl(NetCtrlClass.RX, NetCtrlRx.PROMISC, b"\x00")
    assert deliveries(r, [eth(new), eth(MAC)]) == [True, False]


def test_mac_table_set_updates_the_filter_before_the_ack(rig: Any) -> None:
    r = rig()
    uni = bytes.fromhex("52540000aaaa")
    seen: list[set[bytes]] = []
    orig = r.host.notify_used

    def spy(q: int) -> None:
        seen.append(set(r.dev.filter.unicast))
        orig(q)

    r.host.notify_used = spy  # type: ignore[method-assign]
    data = (1).to_bytes(4, "little") + uni + (0).to_bytes(4, "little")
    assert r.ctrl(NetCtrlClass.MAC, NetCtrlMac.TABLE_SET, data) == OK  # one descriptor
    assert seen[-1] == {uni}


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param((0).to_bytes(4, "little"), id="one-table"),
        pytest.param(
            (1).to_bytes(4, "little") + b"\x02" * 5 + (0).to_bytes(4, "little"), id="short-entry"
        ),
        pytest.param(
            (2).to_bytes(4, "little") + b"\x02" * 6 + (0).to_bytes(4, "little"), id="count-too-big"
        ),
        pytest.param(
            (0xFFFFFFFF).to_bytes(4, "little") + (0).to_bytes(4, "little"), id="count-huge"
        ),
        pytest.param((0).to_bytes(4, "little") * 2 + b"\x00", id="trailing-byte"),
        pytest.param((0).to_bytes(4, "little") + (1).to_bytes(4, "little"), id="multi-missing"),
    ],
)
def test_mac_table_set_malformed_answers_ERR_and_changes_nothing(rig: Any, data: bytes) -> None:
    r = rig()
    uni = bytes.fromhex("52540000aaaa")
    good = (1).to_bytes(4, "little") + uni, (0).to_bytes(4, "little")
    assert r.ctrl(NetCtrlClass.MAC, NetCtrlMac.TABLE_SET, *good) == OK
    assert r.ctrl(NetCtrlClass.MAC, NetCtrlMac.TABLE_SET, data) == ERR
    assert r.dev.filter.unicast == {uni}


def test_mac_table_set_empty_tables_ok(rig: Any) -> None:
    r = rig()
    z = (0).to_bytes(4, "little")
    assert r.ctrl(NetCtrlClass.MAC, NetCtrlMac.TABLE_SET, z, z) == OK
    assert r.dev.filter.unicast == set() and r.dev.filter.multicast == set()


def test_announce_sets_the_status_bit_and_ack_clears_it_before_the_buffer_is_used(
    rig: Any,
) -> None:
    r = rig()
    cfg = r.host.config
    assert r.dev.announce() is True
    assert r.host.config == cfg + 1
    assert r.dev.config_bytes()[6] & NetStatus.ANNOUNCE
    assert r.ctrl(NetCtrlClass.ANNOUNCE, NetCtrlAnnounce.ACK) == OK
    snap = [c for q, c in r.host.config_at_used if q == r.ctrl_index]
    assert not snap[-1][6] & NetStatus.ANNOUNCE
    assert snap[-1][6] & NetStatus.LINK_UP
    assert r.ctrl(NetCtrlClass.ANNOUNCE, NetCtrlAnnounce.ACK, b"\x00") == ERR  # no data
    assert r.ctrl(NetCtrlClass.ANNOUNCE, 1) == ERR


def test_announce_without_GUEST_ANNOUNCE_sends_a_rarp_itself(rig: Any) -> None:
    r = rig(features=CTRL & ~F.GUEST_ANNOUNCE.mask)
    cfg = r.host.config
    assert r.dev.announce() is False
    assert r.host.config == cfg
    (frame,) = r.wire_frames()
    assert frame[:6] == BCAST and frame[6:12] == MAC and frame[12:14] == b"\x80\x35"
    assert frame[22:28] == MAC and frame[32:38] == MAC
    assert r.ctrl(NetCtrlClass.ANNOUNCE, NetCtrlAnnounce.ACK) == ERR


def test_link_status_change_notifies_and_sets_the_status_bit(rig: Any) -> None:
    r = rig()
    cfg = r.host.config
    r.dev.set_link(False)
    assert r.host.config == cfg + 1
    assert r.dev.config_bytes()[6:8] == b"\x00\x00"
    r.dev.set_link(False)  # no change, no notification
    assert r.host.config == cfg + 1
    r.dev.set_link(True)
    assert r.host.config == cfg + 2
    assert r.dev.config_bytes()[6] & NetStatus.LINK_UP


def test_link_change_without_STATUS_sends_no_notification(rig: Any) -> None:
    r = rig(features=CTRL & ~F.STATUS.mask & ~F.GUEST_ANNOUNCE.mask)
    r.dev.set_link(False)
    assert r.host.config == 0


def test_ctrl_class_not_negotiated_answers_VIRTIO_NET_ERR(rig: Any) -> None:
    r = rig(features=F.MAC.mask | F.CTRL_VQ.mask)
    cases = [
        (NetCtrlClass.RX, NetCtrlRx.PROMISC, b"\x00"),
        (NetCtrlClass.MAC, NetCtrlMac.TABLE_SET, bytes(8)),
        (NetCtrlClass.MAC, NetCtrlMac.ADDR_SET, OTHER),
        (NetCtrlClass.VLAN, NetCtrlVlan.ADD, b"\x05\x00"),
        (NetCtrlClass.ANNOUNCE, NetCtrlAnnounce.ACK, b""),
        (NetCtrlClass.MQ, NetCtrlMq.VQ_PAIRS_SET, b"\x01\x00"),
        (NetCtrlClass.GUEST_OFFLOADS, 0, bytes(8)),
    ]
    for cls, cmd, data in cases:
        assert (r.ctrl(cls, cmd, data) if data else r.ctrl(cls, cmd)) == ERR, (cls, cmd)
    assert r.dev.mac == MAC and r.dev.filter.promisc
    assert r.dev.metrics.errors["ctrl_err"] == len(cases)


def test_ctrl_rx_extra_commands_need_CTRL_RX_EXTRA(rig: Any) -> None:
    r = rig(features=CTRL & ~F.CTRL_RX_EXTRA.mask)
    for cmd in (NetCtrlRx.ALLUNI, NetCtrlRx.NOMULTI, NetCtrlRx.NOUNI, NetCtrlRx.NOBCAST):
        assert r.ctrl(NetCtrlClass.RX, cmd, b"\x01") == ERR
    assert r.ctrl(NetCtrlClass.RX, NetCtrlRx.ALLMULTI, b"\x01") == OK
    f = r.dev.filter
    assert not (f.alluni or f.nomulti or f.nouni or f.nobcast)


def test_ctrl_unknown_command_answers_ERR(rig: Any) -> None:
    r = rig()
    assert r.ctrl(NetCtrlClass.RX, 6, b"\x01") == ERR
    assert r.ctrl(NetCtrlClass.RX, 0xFF, b"\x01") == ERR
    assert r.ctrl(NetCtrlClass.MAC, 2, OTHER) == ERR
    assert r.ctrl(NetCtrlClass.NOTF_COAL, 0, bytes(8)) == ERR
    assert r.ctrl(0xFF, 0xFF, b"\x00") == ERR


def test_ctrl_wrong_data_length_answers_ERR(rig: Any) -> None:
    r = rig()
    assert r.ctrl(NetCtrlClass.RX, NetCtrlRx.PROMISC) == ERR  # no data
    assert r.ctrl(NetCtrlClass.RX, NetCtrlRx.PROMISC, b"\x00\x00") == ERR
    assert r.ctrl(NetCtrlClass.RX, NetCtrlRx.PROMISC, b"\x02") == ERR  # not 0/1
    assert r.ctrl(NetCtrlClass.MAC, NetCtrlMac.ADDR_SET, OTHER[:5]) == ERR
    assert r.ctrl(NetCtrlClass.MAC, NetCtrlMac.ADDR_SET, OTHER + b"\x00") == ERR
    assert r.dev.filter.promisc and r.dev.mac == MAC


def test_ctrl_command_shorter_than_class_and_command_answers_ERR(rig: Any) -> None:
    r = rig()
    segs = r.h.add(r.ctrl_index, [b"\x00"], [1], token="c")
    r.segs += segs
    r.h.kick(r.ctrl_index)
    assert r.h.used(r.ctrl_index) == [("c", 1)]
    assert r.read(segs[0]) == bytes([ERR])


def test_ctrl_command_split_over_descriptors_is_read_whole(rig: Any) -> None:
    r = rig()
    new = bytes.fromhex("525400fedcba")
    segs = r.h.add(r.ctrl_index, [b"\x01", b"\x01" + new[:2], new[2:]], [1], token="c")
    r.segs += segs
    r.h.kick(r.ctrl_index)
    assert r.read(segs[0]) == bytes([OK])
    assert r.dev.mac == new


def test_ctrl_longer_than_the_largest_mac_table_answers_ERR(rig: Any) -> None:
    r = rig()
    big = b"\x00" * (2 * (4 + 6 * 4096) + 1)
    assert r.ctrl(NetCtrlClass.MAC, NetCtrlMac.TABLE_SET, big) == ERR


def test_ctrl_without_writable_ack_is_counted_not_crashed(rig: Any) -> None:
    r = rig()
    assert r.ctrl(NetCtrlClass.RX, NetCtrlRx.PROMISC, b"\x00", ack=()) is None
    assert r.dev.metrics.errors["ctrl_no_ack"] == 1
    assert r.dev.filter.promisc  # not carried out
    assert not r.h.needs_reset
    assert r.ctrl(NetCtrlClass.RX, NetCtrlRx.PROMISC, b"\x00") == OK


def test_ctrl_ack_is_written_to_the_first_writable_byte_only(rig: Any) -> None:
    r = rig()
    segs = r.h.add(r.ctrl_index, [b"\x00\x00\x00"], [4, 4], token="c")
    r.segs += segs
    r.h.kick(r.ctrl_index)
    assert r.h.used(r.ctrl_index) == [("c", 1)]
    assert r.read(segs[0]) == bytes([OK]) + b"\xee" * 3
    assert r.read(segs[1]) == b"\xee" * 4


def test_ctrl_zero_length_writable_descriptor_is_not_written(rig: Any) -> None:
    r = rig()
    segs = r.h.add(r.ctrl_index, [b"\x00\x00\x00"], [0], token="c")
    r.segs += segs
    r.h.kick(r.ctrl_index)
    r.h.used(r.ctrl_index)
    assert r.read((segs[0][0], 1)) == b"\xee"  # a 0-byte buffer holds no ack


def test_guest_offloads_set(rig: Any) -> None:
    feats = F.GUEST_CSUM.mask | F.GUEST_TSO4.mask | F.GUEST_TSO6.mask | F.CTRL_GUEST_OFFLOADS.mask
    r, be = vnet_rig(rig, feats)
    assert be.offloads[-1] == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6  # as negotiated
    le64 = lambda v: v.to_bytes(8, "little")  # noqa: E731
    assert r.ctrl(NetCtrlClass.GUEST_OFFLOADS, 0, le64(F.GUEST_CSUM.mask)) == OK
    assert be.offloads[-1] == TUN_F_CSUM
    assert r.ctrl(NetCtrlClass.GUEST_OFFLOADS, 0, le64(0)) == OK
    assert be.offloads[-1] == 0
    # with GUEST_CSUM off, flags from the back-end are cleared again
    raw = post_and_push(r, be, hdr(DATA_VALID), frame_of(80))
    assert raw is not None and raw[0] == 0
    n = len(be.offloads)
    assert r.ctrl(NetCtrlClass.GUEST_OFFLOADS, 0, le64(F.GUEST_ECN.mask | F.GUEST_CSUM.mask)) == ERR
    assert r.ctrl(NetCtrlClass.GUEST_OFFLOADS, 0, le64(F.GUEST_TSO4.mask)) == ERR  # needs CSUM
    assert r.ctrl(NetCtrlClass.GUEST_OFFLOADS, 0, le64(1 << 40)) == ERR
    assert r.ctrl(NetCtrlClass.GUEST_OFFLOADS, 1, le64(0)) == ERR
    assert r.ctrl(NetCtrlClass.GUEST_OFFLOADS, 0, b"\x00" * 7) == ERR
    assert len(be.offloads) == n


# -- multiqueue (§5.1.6.5.5)


MQ = CTRL | F.MQ.mask


def test_vq_pairs_set_0_or_above_max_answers_ERR(rig: Any) -> None:
    r = rig(features=MQ, queue_pairs=3)
    for n in (0, 4, 0x8000, 0xFFFF):
        assert r.ctrl(NetCtrlClass.MQ, NetCtrlMq.VQ_PAIRS_SET, n.to_bytes(2, "little")) == ERR
    assert r.dev.curr_pairs == 1
    assert r.ctrl(NetCtrlClass.MQ, NetCtrlMq.VQ_PAIRS_SET, b"\x03") == ERR  # 1 byte
    assert r.ctrl(NetCtrlClass.MQ, NetCtrlMq.RSS_CONFIG, b"\x01\x00") == ERR
    assert r.ctrl(NetCtrlClass.MQ, NetCtrlMq.VQ_PAIRS_SET, (3).to_bytes(2, "little")) == OK
    assert r.dev.curr_pairs == 3


def test_receive_goes_to_receiveq1_only_after_reset_then_to_1_to_n(rig: Any) -> None:
    r, be = vnet_rig(rig, F.MQ.mask, queue_pairs=2, channels=2)
    assert r.ctrl_index == 4
    for q in (0, 2):
        for i in range(4):
            r.post(1600, queue=q, token=(q, i))
        r.h.kick(q)
    be.push(hdr() + frame_of(60), channel=1)  # the TAP's second queue
    r.pump()
    assert r.rx_used(0) == [((0, 0), 72)] and r.rx_used(2) == []
    assert be.active[-1] == 1
    assert r.ctrl(NetCtrlClass.MQ, NetCtrlMq.VQ_PAIRS_SET, (2).to_bytes(2, "little")) == OK
    assert be.active[-1] == 2
    be.push(hdr() + frame_of(60), channel=1)
    be.push(hdr() + frame_of(60), channel=0)
    r.pump()
    assert r.rx_used(2) == [((2, 0), 72)]
    assert r.rx_used(0) == [((0, 1), 72)]
    assert r.ctrl(NetCtrlClass.MQ, NetCtrlMq.VQ_PAIRS_SET, (1).to_bytes(2, "little")) == OK
    be.push(hdr() + frame_of(60), channel=1)
    r.pump()
    assert r.rx_used(2) == [] and r.rx_used(0) == [((0, 2), 72)]
    # transmit on pair 2 goes to the second channel
    r.tx(hdr(), frame_of(60, OTHER), queue=3)
    assert be.sent[-1][0] == 1


def ip_frame(src_ip: bytes, dst_ip: bytes, sport: int, dport: int, dst: bytes = MAC) -> bytes:
    ip = bytes([0x45, 0, 0, 40, 0, 0, 0, 0, 64, 17, 0, 0]) + src_ip + dst_ip
    udp = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + b"\x00\x08\x00\x00"
    return eth(dst, PEER, ip + udp + b"\x00" * 6)


def test_one_channel_steers_a_flow_to_the_receiveq_of_its_transmitq(rig: Any) -> None:
    r = rig(features=MQ, queue_pairs=2)
    assert r.ctrl(NetCtrlClass.MQ, NetCtrlMq.VQ_PAIRS_SET, (2).to_bytes(2, "little")) == OK
    a, b = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    for flow_q in (3, 1):  # pair 2, then pair 1
        r.tx(hdr(), ip_frame(a, b, 1000, 2000, dst=OTHER), queue=flow_q)
        for q in (0, 2):
            r.post(1600, queue=q, token=q)
            r.h.kick(q)
        r.inject(ip_frame(b, a, 2000, 1000))  # the reply
        r.pump()
        want = flow_q - 1
        assert [t for t, _ in r.rx_used(want)] == [want]
        assert r.rx_used(2 - want) == []
        # a frame that is not IP goes to receiveq1: the other buffer out of the way
        r.inject(eth(MAC, etype=0x88B5))
        r.pump()
        r.rx_used(0)
        r.rx_used(2)
    assert not r.h.needs_reset, r.host.resets


# -- reset


def test_reset_clears_filters_mac_announce_and_pairs(rig: Any) -> None:
    r = rig(features=MQ, queue_pairs=2)
    new = bytes.fromhex("525400fedcba")
    r.ctrl(NetCtrlClass.MAC, NetCtrlMac.ADDR_SET, new)
    r.ctrl(NetCtrlClass.RX, NetCtrlRx.PROMISC, b"\x00")
    r.ctrl(NetCtrlClass.RX, NetCtrlRx.NOBCAST, b"\x01")
    r.ctrl(NetCtrlClass.MAC, NetCtrlMac.TABLE_SET, (1).to_bytes(4, "little") + OTHER, bytes(4))
    r.ctrl(NetCtrlClass.VLAN, NetCtrlVlan.ADD, b"\x05\x00")
    r.ctrl(NetCtrlClass.MQ, NetCtrlMq.VQ_PAIRS_SET, b"\x02\x00")
    r.dev.announce()
    r.inject(eth(new))  # a frame waiting for buffers
    r.pump()
    assert r.dev._waiting
    r.dev.guarded("reset", r.dev.reset)
    d = r.dev
    assert d.mac == MAC and d.config_bytes()[:6] == MAC
    assert not d.config_bytes()[6] & NetStatus.ANNOUNCE
    f = d.filter
    assert f.promisc and not f.nobcast and f.unicast == set() and f.vlans == set()
    assert f.mac == MAC
    assert d.curr_pairs == 1
    assert d._waiting == {} and d.events.readers() == {}


# -- hand-written descriptors (raw rings) and buffers outside guest RAM


def test_ctrl_zero_length_ack_descriptor_is_not_written_raw_ring() -> None:
    from pyvirtio.spec.ring import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

    d = NetDevice(Switch().port(), mac=MAC)
    with DeviceHarness(d, raw=True, features=CTRL) as h:
        ring = h.raw[2]
        cmd, ack = h.put(b"\x00\x00\x00"), h.buf(1)
        ring.desc(0, cmd, 3, VIRTQ_DESC_F_NEXT, 1)
        ring.desc(1, ack, 0, VIRTQ_DESC_F_WRITE)
        ring.offer(0)
        d.queue_notified(2)
        assert ring.used() == [(0, 0)]
        assert h.mem.read(ack, 65) == b"\xee" * 65
        assert d.metrics.errors["ctrl_no_ack"] == 1 and d.filter.promisc
        assert not h.needs_reset
    d.close()


@pytest.mark.parametrize("queue", [0, 1, 2], ids=["rx", "tx", "ctrl"])
def test_buffer_outside_guest_ram_is_a_driver_error_not_a_crash(rig: Any, queue: int) -> None:
    r = rig()
    end = 4 << 20
    outside = (end - 8, 100)  # starts in RAM, ends past it
    if queue == 0:
        r.h.add(0, [], [outside], token="x")
        r.h.kick(0)
        r.inject(frame_of(60))
        r.pump()
    elif queue == 1:
        r.h.add(1, [hdr(), outside], [], token="x")
        r.h.kick(1)
    else:
        r.h.add(2, [b"\x00\x00\x00"], [outside], token="x")
        r.h.kick(2)
    assert r.h.needs_reset
    assert all(isinstance(e, DriverError) for e in r.host.resets), r.host.resets


def test_frame_waiting_for_a_receiveq_dropped_by_vq_pairs_set_is_delivered_on_receiveq1(
    rig: Any,
) -> None:
    """A frame steered to receiveq2 waits there (receiveq2 has no buffers); the
    driver then goes back to one pair. The frame must go to receiveq1, whose
    buffers were posted long before (no new kick will come), and the channel
    must not stay stopped."""
    r = rig(features=MQ, queue_pairs=2)
    assert r.ctrl(NetCtrlClass.MQ, NetCtrlMq.VQ_PAIRS_SET, (2).to_bytes(2, "little")) == OK
    a, b = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    r.tx(hdr(), ip_frame(a, b, 1000, 2000, dst=OTHER), queue=3)  # the flow is on pair 2
    for i in range(3):
        r.post(1600, queue=0, token=i)
    r.h.kick(0)
    reply = ip_frame(b, a, 2000, 1000)
    r.inject(reply)
    r.pump()
    assert r.rx_used(0) == [] and r.dev._waiting  # waits for receiveq2
    assert r.ctrl(NetCtrlClass.MQ, NetCtrlMq.VQ_PAIRS_SET, (1).to_bytes(2, "little")) == OK
    r.pump()
    assert r.rx_used(0) == [(0, 12 + len(reply))]
    r.inject(eth(MAC, etype=0x88B5))  # and the channel is read again
    r.pump()
    assert r.rx_used(0) == [(1, 12 + 60)]


def test_frame_waiting_for_receiveq1_while_receiveq2_has_buffers_waits_without_failing(
    rig: Any,
) -> None:
    r = rig(features=MQ, queue_pairs=2)
    assert r.ctrl(NetCtrlClass.MQ, NetCtrlMq.VQ_PAIRS_SET, (2).to_bytes(2, "little")) == OK
    r.post(1600, queue=2, token="q2")
    r.h.kick(2)
    f = eth(MAC, etype=0x88B5)  # not IP: steered to receiveq1, which has no buffer
    r.inject(f)
    r.pump()
    assert not r.h.needs_reset, r.host.resets
    assert r.rx_used(2) == [] and r.dev._waiting
    r.post(1600, queue=0, token="q1")
    r.h.kick(0)
    r.pump()
    assert r.rx_used(0) == [("q1", 12 + len(f))]
    assert not r.h.needs_reset
