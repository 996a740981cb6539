"""NetDriver against a small scripted fake device: negotiation, layouts, and a
device that lies (virtio-v1.2 §5.1.6.3.2, §5.1.6.4.1, §5.1.6.5) - each lie is a
DeviceError and a broken queue, never a crash or a hang."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from pyvirtio.core.driver import CONFIG_CHANGE, RingOptions
from pyvirtio.drivers.net import (
    AsyncNetDriver,
    NetControlError,
    NetDriver,
    NetTimeoutError,
    NetUnsupportedError,
    feature_closure,
)
from pyvirtio.errors import DeviceError, QueueBrokenError
from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.features import Feature, bit
from pyvirtio.spec.net import (
    VIRTIO_NET_CONFIG,
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_LEGACY,
    NetCtrlClass,
    NetCtrlMac,
    NetCtrlRx,
    NetFeature,
    NetGsoType,
    NetHdrFlags,
    VirtioNetConfig,
    VirtioNetHdr,
)
from pyvirtio.virtqueue import make_device_queue
from pyvirtio.virtqueue.common import DescriptorChain, DeviceVirtqueue, QueueAddresses

MAC = bytes.fromhex("525400abcdef")
MEM = 8 << 20
V1 = bit(Feature.VERSION_1)
CTRL = bit(NetFeature.CTRL_VQ) | bit(NetFeature.CTRL_RX)
BASIC = V1 | bit(NetFeature.MAC) | bit(NetFeature.STATUS) | CTRL
PLAIN = RingOptions(indirect=False, event_idx=False, in_order=False)


def _b(*feats: int) -> int:
    return sum(bit(f) for f in feats)


class FakeNet:
    """A DriverTransport whose device side the test scripts: control commands are
    answered with ``ack`` on notify (None: left unanswered), transmitted chains are
    recorded (and returned unless ``hold_tx``), receive chains wait to be filled."""

    def __init__(
        self,
        features: int,
        *,
        legacy: bool = False,
        queues: int = 3,
        qsize: int = 16,
        status: int = 1,
        pairs: int = 1,
        mtu: int = 1500,
        speed: int = 1000,
    ) -> None:
        self.mem = GuestMemory.create(MEM)
        self.allocator = GuestAllocator(0x1000, MEM - 0x1000)
        self.legacy = legacy
        self.offered = features
        self.accepted = 0
        self.status = 0
        self.config = bytearray(
            VIRTIO_NET_CONFIG.pack(VirtioNetConfig(MAC, status, pairs, mtu, speed, 1, 0, 0, 0))
        )
        self._queues = queues
        self.qsize = qsize
        self.dq: dict[int, DeviceVirtqueue] = {}
        self.pending: set[int] = set()
        self.ack: int | None = 0
        self.hold_tx = False
        self.ctrl_seen: list[list[bytes]] = []
        self.tx_seen: list[list[bytes]] = []
        self.rx_chains: list[DescriptorChain] = []

    # -- DriverTransport ----------------------------------------------------------
    def device_id(self) -> int:
        return 1

    def reset(self) -> None:
        self.status = 0
        self.dq = {}

    def get_status(self) -> int:
        return self.status

    def set_status(self, status: int) -> None:
        self.status = status

    def get_device_features(self) -> int:
        return self.offered

    def set_driver_features(self, features: int) -> None:
        self.accepted = features

    def config_generation(self) -> int:
        return 0

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(self.config[offset : offset + size])

    def write_config(self, offset: int, data: bytes) -> None:
        self.config[offset : offset + len(data)] = data

    def num_queues(self) -> int:
        return self._queues

    def queue_max_size(self, index: int) -> int:
        return self.qsize if index < self._queues else 0

    def setup_queue(self, index: int, size: int, addrs: QueueAddresses) -> None:
        self.dq[index] = make_device_queue(self.mem, size, addrs, self.accepted, index=index)

    def notify(self, index: int) -> None:
        q = self.dq[index]
        if index == self._queues - 1 and self._queues % 2:  # controlq
            while self.ack is not None and (chain := q.pop()) is not None:
                self.ctrl_seen.append([self.mem.read(a, n) for a, n in chain.readable])
                self.mem.write(chain.writable[0][0], bytes([self.ack]))
                q.push(chain, 1)
        elif index % 2:  # transmitq
            if self.hold_tx:
                return
            while (chain := q.pop()) is not None:
                self.tx_seen.append([self.mem.read(a, n) for a, n in chain.readable])
                q.push(chain, 0)
        else:
            return
        q.flush()
        self.pending.add(index)

    def poll_interrupts(self, timeout: float | None) -> set[int]:
        fired, self.pending = self.pending, set()
        return fired

    def interrupt_fds(self) -> list[int]:
        return []

    def close(self) -> None:
        self.mem.close()

    # -- the scripted device ----------------------------------------------------------
    def release_tx(self, index: int = 1) -> None:
        self.hold_tx = False
        self.notify(index)

    def rx_chain(self, index: int = 0) -> DescriptorChain:
        chain = self.dq[index].pop()
        assert chain is not None, "no receive buffer posted"
        return chain

    def deliver(
        self, chains: list[tuple[DescriptorChain, bytes, int | None]], index: int = 0
    ) -> None:
        """Write each ``data`` into its chain and use it with ``written`` (None: the
        data length)."""
        q = self.dq[index]
        for chain, data, written in chains:
            chain.write_all(self.mem, data)
            q.push(chain, len(data) if written is None else written)
        q.flush()
        self.pending.add(index)

    def rx(self, data: bytes, *, num_buffers: int = 1, hdr_size: int = 12, index: int = 0) -> None:
        """A packet in one buffer, header first."""
        hdr = VIRTIO_NET_HDR.pack(VirtioNetHdr(0, 0, 0, 0, 0, 0, num_buffers))[:hdr_size]
        self.deliver([(self.rx_chain(index), hdr + data, None)], index)


def _open(fake: FakeNet, **kw: Any) -> NetDriver:
    kw.setdefault("ring", PLAIN)
    drv = NetDriver(fake, timeout=0.2, ctrl_timeout=0.2, **kw)
    drv.initialize()
    return drv


def _frame(n: int, seed: int = 0) -> bytes:
    return MAC + bytes(6) + b"\x88\xb5" + bytes((i + seed) & 0xFF for i in range(n - 14))


# -- negotiation ---------------------------------------------------------------------------


def test_feature_requirements_drop_dependent_bits() -> None:
    """virtio-v1.2 §5.1.3.1: e.g. CTRL_RX needs CTRL_VQ, GUEST_TSO4 needs GUEST_CSUM,
    GUEST_ECN needs GUEST_TSO4 or TSO6, MQ needs CTRL_VQ."""
    f = _b(NetFeature.CTRL_RX, NetFeature.MQ, NetFeature.GUEST_TSO4, NetFeature.GUEST_ECN)
    assert feature_closure(f) == 0
    f2 = f | _b(NetFeature.CTRL_VQ, NetFeature.GUEST_CSUM)
    assert feature_closure(f2) == f2
    assert feature_closure(_b(NetFeature.HOST_ECN, NetFeature.HOST_TSO6)) == 0


def test_defaults_accept_control_features_not_offloads() -> None:
    everything = V1 | sum(bit(f) for f in NetFeature if f < 32 or f == NetFeature.SPEED_DUPLEX)
    fake = FakeNet(everything)
    drv = _open(fake)
    assert drv.has_feature(NetFeature.MRG_RXBUF) and drv.has_feature(NetFeature.CTRL_MAC_ADDR)
    assert drv.has_feature(NetFeature.SPEED_DUPLEX) and drv.has_feature(NetFeature.MTU)
    for off in (NetFeature.CSUM, NetFeature.GUEST_CSUM, NetFeature.GUEST_TSO4, NetFeature.GSO):
        assert not drv.has_feature(off)
    assert drv.mac == MAC and drv.link_up and drv.mtu == 1500
    assert drv.speed == 1000 and drv.duplex == 1
    drv.close()
    # offloads only when asked, only with what they need
    drv = _open(FakeNet(everything), offloads=[NetFeature.GUEST_TSO4, NetFeature.HOST_TSO4])
    assert not drv.has_feature(NetFeature.GUEST_TSO4)  # GUEST_CSUM not asked for
    drv.close()
    drv = _open(
        FakeNet(everything),
        offloads=[NetFeature.GUEST_CSUM, NetFeature.GUEST_TSO4],
        mrg_rxbuf=False,
    )
    assert drv.has_feature(NetFeature.GUEST_TSO4)
    # §5.1.6.3.1: GUEST_TSO without MRG_RXBUF -> buffers of at least 65562 bytes
    assert drv.rx_buffer_size == 65562
    drv.close()


def test_ctrl_features_need_the_control_queue() -> None:
    offered = V1 | CTRL | _b(NetFeature.MQ, NetFeature.CTRL_VLAN, NetFeature.GUEST_ANNOUNCE)
    drv = _open(FakeNet(offered, queues=2), ctrl_vq=False)
    assert drv.features & ~(V1 | bit(NetFeature.MRG_RXBUF)) == 0
    assert len(drv.queues) == 2
    with pytest.raises(NetUnsupportedError):
        drv.set_rx_mode(promisc=False)
    drv.close()


@pytest.mark.parametrize(
    ("legacy", "mrg", "size"), [(True, False, 10), (True, True, 12), (False, False, 12)]
)
def test_header_size_from_features(legacy: bool, mrg: bool, size: int) -> None:
    offered = (0 if legacy else V1) | bit(NetFeature.MRG_RXBUF) | bit(NetFeature.MAC)
    fake = FakeNet(offered, legacy=legacy, queues=2)
    drv = _open(fake, mrg_rxbuf=mrg)
    assert drv.hdr_size == size
    frame = _frame(100)
    drv.send(frame)
    # legacy framing (no ANY_LAYOUT): the header in a descriptor of its own
    assert fake.tx_seen[-1] == [bytes(size), frame]
    chain = fake.rx_chain()
    if legacy and not mrg:
        assert [n for _, n in chain.writable] == [10, 1518]
    hdr = VIRTIO_NET_HDR.pack(VirtioNetHdr(0, 0, 0, 0, 0, 0, 1))[:size]
    fake.deliver([(chain, hdr + frame, None)])
    assert drv.recv() == frame
    drv.close()


# -- the data path ---------------------------------------------------------------------------


def test_send_recv_and_merged_buffers() -> None:
    fake = FakeNet(BASIC | bit(NetFeature.MRG_RXBUF))
    drv = _open(fake, rx_buffer_size=64)
    frame = _frame(150, 3)
    drv.send(frame)
    assert fake.tx_seen == [[bytes(12), frame]]
    drv.flush_tx()
    # 12 + 150 bytes over three 64-byte buffers, num_buffers 3
    stream = VIRTIO_NET_HDR.pack(VirtioNetHdr(0, 0, 0, 0, 0, 0, 3)) + frame
    chains = [fake.rx_chain() for _ in range(3)]
    fake.deliver([(c, stream[64 * i : 64 * (i + 1)], None) for i, c in enumerate(chains)])
    hdr, got = drv.recv_with_header()
    assert got == frame and hdr.num_buffers == 3
    assert drv.stats.rx_buffers == 3 and drv.stats.rx_packets == 1
    # the buffers were posted again
    assert fake.dq[0].has_available()
    drv.close()


def test_recv_times_out_rather_than_hangs() -> None:
    drv = _open(FakeNet(BASIC))
    with pytest.raises(NetTimeoutError):
        drv.recv(timeout=0.05)
    drv.close()


Lie = Callable[[FakeNet], None]


def _num_buffers_zero(fake: FakeNet) -> None:
    fake.rx(_frame(40), num_buffers=0)


def _num_buffers_too_many(fake: FakeNet) -> None:
    fake.rx(_frame(40), num_buffers=fake.qsize + 1)


def _used_len_shorter_than_header(fake: FakeNet) -> None:
    fake.deliver([(fake.rx_chain(), bytes(8), None)])


def _used_len_longer_than_buffer(fake: FakeNet) -> None:
    chain = fake.rx_chain()
    q: Any = fake.dq[0]
    fake.deliver([(chain, bytes(12) + _frame(40), None)])
    # rewrite the published used element's len (split ring: used ring at addrs.device)
    addrs = q.addrs
    fake.mem.write(addrs.device + 4 + 4, (chain.writable_len + 1).to_bytes(4, "little"))


def _merged_buffer_not_full(fake: FakeNet) -> None:
    stream = VIRTIO_NET_HDR.pack(VirtioNetHdr(0, 0, 0, 0, 0, 0, 2)) + _frame(60)
    a, b = fake.rx_chain(), fake.rx_chain()
    # the first of two buffers holds only 40 of its 64 bytes
    fake.deliver([(a, stream[:40], None), (b, stream[40:], None)])


@pytest.mark.parametrize(
    "lie",
    [
        _num_buffers_zero,
        _num_buffers_too_many,
        _used_len_shorter_than_header,
        _used_len_longer_than_buffer,
        _merged_buffer_not_full,
    ],
)
def test_lying_device_is_a_device_error_and_breaks_the_queue(lie: Lie) -> None:
    fake = FakeNet(BASIC | bit(NetFeature.MRG_RXBUF))
    drv = _open(fake, rx_buffer_size=64)
    lie(fake)
    with pytest.raises(DeviceError):
        drv.recv()
    assert drv.queues[0].broken
    assert drv.stats.device_errors == 1
    with pytest.raises(QueueBrokenError):
        drv.recv(timeout=0.05)
    # transmit still works: only the receive queue broke
    drv.send(_frame(60))
    drv.close()


def test_device_needs_reset_ends_a_wait() -> None:
    """DEVICE_NEEDS_RESET plus a configuration change: the waiting recv raises at
    once (virtio-v1.2 §2.1.1) instead of running into its timeout."""
    fake = FakeNet(BASIC)
    drv = _open(fake)
    fake.status |= 0x40
    fake.pending.add(CONFIG_CHANGE)
    with pytest.raises(QueueBrokenError, match="needs reset"):
        drv.recv(timeout=5)
    drv.close()


def test_without_mrg_rxbuf_num_buffers_is_ignored() -> None:
    """No MRG_RXBUF: the packet is the one buffer (QEMU leaves num_buffers 0 there)."""
    fake = FakeNet(BASIC)
    drv = _open(fake, mrg_rxbuf=False)
    fake.rx(_frame(1514), num_buffers=0)
    assert drv.recv() == _frame(1514)
    drv.close()


def test_tx_ring_full_waits_then_times_out_then_proceeds() -> None:
    fake = FakeNet(BASIC, qsize=4)
    drv = _open(fake)
    fake.hold_tx = True
    for i in range(2):  # 2 descriptors per frame: a 4-entry ring holds two
        drv.send(_frame(60, i))
    with pytest.raises(NetTimeoutError):
        drv.send(_frame(60, 9), timeout=0.05)
    fake.release_tx()
    drv.send(_frame(60, 9))
    drv.flush_tx()
    assert drv.tx_in_flight == 0
    assert len(fake.tx_seen) == 3
    drv.close()


def test_tx_header_musts() -> None:
    drv = _open(FakeNet(BASIC | bit(NetFeature.MTU)))
    needs_csum = VirtioNetHdr(NetHdrFlags.NEEDS_CSUM, 0, 0, 0, 14, 16)
    with pytest.raises(ValueError, match="flags to zero"):
        drv.send(_frame(60), needs_csum)  # VIRTIO_NET_F_CSUM not negotiated
    with pytest.raises(ValueError, match="not negotiated"):
        drv.send(_frame(60), VirtioNetHdr(0, NetGsoType.TCPV4, 54, 1448, 0, 0))
    with pytest.raises(ValueError, match="DATA_VALID"):
        drv.send(_frame(60), VirtioNetHdr(NetHdrFlags.DATA_VALID, 0, 0, 0, 0, 0))
    with pytest.raises(ValueError, match="exceeds"):
        drv.send(_frame(1515))  # mtu 1500 + 14
    drv.close()
    offered = BASIC | _b(NetFeature.CSUM, NetFeature.HOST_TSO4)
    drv = _open(FakeNet(offered), offloads=[NetFeature.CSUM, NetFeature.HOST_TSO4])
    drv.send(_frame(2000), VirtioNetHdr(NetHdrFlags.NEEDS_CSUM, NetGsoType.TCPV4, 54, 1448, 34, 16))
    with pytest.raises(ValueError, match="NEEDS_CSUM"):
        drv.send(_frame(2000), VirtioNetHdr(0, NetGsoType.TCPV4, 54, 1448, 0, 0))
    drv.close()


# -- control queue ---------------------------------------------------------------------------


def test_control_commands_framing_and_answers() -> None:
    offered = BASIC | _b(NetFeature.CTRL_RX_EXTRA, NetFeature.CTRL_VLAN, NetFeature.CTRL_MAC_ADDR)
    fake = FakeNet(offered)
    drv = _open(fake)
    drv.set_rx_mode(promisc=False, nobcast=True)
    assert fake.ctrl_seen[-2:] == [
        [bytes([NetCtrlClass.RX, NetCtrlRx.PROMISC]), b"\x00"],
        [bytes([NetCtrlClass.RX, NetCtrlRx.NOBCAST]), b"\x01"],
    ]
    uni, multi = bytes.fromhex("020000000001"), bytes.fromhex("01005e000001")
    drv.set_mac_table([uni], [multi])
    # §5.1.6.6: class+command, one descriptor per table, then the ack
    assert fake.ctrl_seen[-1] == [
        bytes([NetCtrlClass.MAC, NetCtrlMac.TABLE_SET]),
        b"\x01\x00\x00\x00" + uni,
        b"\x01\x00\x00\x00" + multi,
    ]
    with pytest.raises(ValueError):
        drv.set_mac_table([multi])  # a multicast address in the unicast table
    drv.vlan_add(100)
    assert fake.ctrl_seen[-1][1] == (100).to_bytes(2, "little")
    fake.ack = 1
    with pytest.raises(NetControlError) as info:
        drv.vlan_del(100)
    assert info.value.ack == 1 and drv.stats.ctrl_errors == 1
    fake.ack = 7
    with pytest.raises(DeviceError):
        drv.vlan_add(1)
    # the device "updates" mac in config space: MAC_ADDR_SET is checked against it
    fake.ack = 0
    new = bytes.fromhex("020000000077")
    with pytest.raises(DeviceError, match="after MAC_ADDR_SET"):
        drv.set_mac(new)
    fake.write_config(0, new)
    drv.set_mac(new)
    assert drv.mac == new
    with pytest.raises(NetUnsupportedError):
        drv.announce_ack()
    with pytest.raises(NetUnsupportedError):
        drv.set_queue_pairs(1)
    drv.close()


def test_control_command_never_answered_times_out() -> None:
    fake = FakeNet(BASIC)
    drv = _open(fake)
    fake.ack = None
    with pytest.raises(NetTimeoutError):
        drv.set_rx_mode(promisc=True)
    # the device answers late: the orphaned command is taken back and freed
    fake.ack = 0
    drv.set_rx_mode(promisc=False)
    assert not drv._orphans
    drv.close()


def test_control_ack_never_written_is_a_device_error() -> None:
    fake = FakeNet(BASIC)
    drv = _open(fake)
    q = fake.dq[2]
    fake.ack = None
    cmd = drv.control_start(NetCtrlClass.RX, NetCtrlRx.PROMISC, b"\x01")
    chain = q.pop()
    assert chain is not None
    q.push(chain, 0)  # used without writing ack
    q.flush()
    drv.service()
    assert cmd.done
    with pytest.raises(DeviceError, match="without writing ack"):
        drv.control_result(cmd)
    drv.close()


def test_multiqueue_layout_and_pairs_set() -> None:
    offered = BASIC | bit(NetFeature.MQ)
    fake = FakeNet(offered, queues=7, pairs=3)
    drv = _open(fake, queue_pairs=2)
    assert drv.max_queue_pairs == 3 and drv.queue_pairs == 2
    assert len(drv.queues) == 7  # rx0 tx0 rx1 tx1 rx2 tx2 ctrl(6)
    assert fake.ctrl_seen[-1] == [bytes([4, 0]), b"\x02\x00"]
    assert fake.dq[2].has_available() and not fake.dq[4].has_available()
    drv.send(_frame(60), queue=1)
    assert fake.tx_seen[-1][1] == _frame(60)
    with pytest.raises(ValueError):
        drv.send(_frame(60), queue=2)
    fake.rx(_frame(70), index=2)
    assert drv.recv() == _frame(70)
    with pytest.raises(ValueError):
        drv.set_queue_pairs(4)
    drv.close()


def test_max_virtqueue_pairs_out_of_range_is_a_device_error() -> None:
    fake = FakeNet(BASIC | bit(NetFeature.MQ), pairs=0)
    with pytest.raises(DeviceError, match="max_virtqueue_pairs"):
        NetDriver(fake).initialize()


def test_config_change_rereads_link_speed_duplex() -> None:
    offered = BASIC | _b(NetFeature.SPEED_DUPLEX, NetFeature.GUEST_ANNOUNCE)
    fake = FakeNet(offered, speed=0xFFFFFFFF)
    drv = _open(fake)
    assert drv.speed is None and drv.link_up
    fake.config[6:8] = (2).to_bytes(2, "little")  # link down, announce
    fake.config[10 + 2 : 10 + 6] = (100).to_bytes(4, "little")
    fake.config[16] = 5  # duplex unknown
    fake.pending.add(CONFIG_CHANGE)
    drv.poll()
    assert not drv.link_up and drv.announce_pending
    assert drv.speed == 100 and drv.duplex is None
    drv.announce_ack()
    assert fake.ctrl_seen[-1] == [bytes([3, 0])]
    drv.close()


def test_async_driver_send_recv_control() -> None:
    fake = FakeNet(BASIC | bit(NetFeature.MRG_RXBUF))
    adrv = AsyncNetDriver(_open(fake))

    async def run() -> bytes:
        await adrv.send(_frame(80))
        await adrv.set_rx_mode(promisc=False)
        loop = asyncio.get_running_loop()
        loop.call_later(0.02, lambda: fake.rx(_frame(90)))
        return await adrv.recv(timeout=2)

    try:
        assert asyncio.run(run()) == _frame(90)
        assert fake.tx_seen[-1][1] == _frame(80)
    finally:
        adrv.close()


def test_legacy_mac_write_without_ctrl_mac_addr() -> None:
    fake = FakeNet(bit(NetFeature.MAC), legacy=True, queues=2)
    drv = _open(fake)
    drv.set_mac("02:00:00:00:00:33")
    assert fake.read_config(0, 6) == bytes.fromhex("020000000033")
    assert drv.mac == bytes.fromhex("020000000033")
    drv.close()
    drv = _open(FakeNet(V1 | bit(NetFeature.MAC), queues=2))
    with pytest.raises(NetUnsupportedError):
        drv.set_mac("02:00:00:00:00:33")
    drv.close()


def test_legacy_header_layout_is_ten_bytes() -> None:
    assert VIRTIO_NET_HDR_LEGACY.size == 10 and VIRTIO_NET_HDR.size == 12
