"""The vhost-user back-end without I/O: a scripted front-end drives it over the codec.

The front-end plays QEMU's part (message sequence of vhost-user-blk in QEMU 7.2, see
``vhost_rules``): guest RAM is a memfd it maps at a fake user address and shares with
ADD_MEM_REG / SET_MEM_TABLE, rings are pyvirtio driver queues in that memory, kick /
call / error descriptors are real eventfds, and every reply is decoded with the
codec's reply decoder (so a malformed reply fails the test).
"""

from __future__ import annotations

import gc
import os
import socket
import struct
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtio.core.device import VirtioDevice
from pyvirtio.devices.blk import BlkDevice, MemoryBackend
from pyvirtio.devices.rng import CallableSource, RngDevice
from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.memory.guest_memory import GuestMemory, create_memfd
from pyvirtio.spec.blk import VIRTIO_BLK_CONFIG, VIRTIO_BLK_OUTHDR, BlkReqType
from pyvirtio.spec.features import Feature
from pyvirtio.spec.ids import DeviceId
from pyvirtio.spec.ring import VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.transport.vhost_user.backend import (
    DEFAULT_PROTOCOL_FEATURES,
    Action,
    Disconnect,
    Reply,
    SendBackend,
    Signal,
    UnwatchKick,
    VhostUserBackend,
    WatchKick,
    decode_packed_base,
    encode_packed_base,
)
from pyvirtio.transport.vhost_user.codec import Channel, Decoder, Message, encode
from pyvirtio.transport.vhost_user.dirty_log import DirtyLog
from pyvirtio.transport.vhost_user.inflight import (
    InflightArea,
    PackedInflight,
    SplitInflight,
    inflight_area_size,
    packed_region_size,
    split_region_size,
)
from pyvirtio.transport.vhost_user.spec import (
    REPLY_FLAGS,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_HEADER,
    VHOST_USER_VRING_NOFD_MASK,
    BackendRequest,
    FrontendRequest,
    ProtocolFeature,
    VhostUserConfig,
    VhostUserInflight,
    VhostUserLog,
    VhostUserMemory,
    VhostUserMemoryRegion,
    VhostUserU64,
    VhostVringAddr,
    VhostVringState,
)
from pyvirtio.virtqueue import QueueState, make_driver_queue
from pyvirtio.virtqueue.common import DescriptorChain, DriverVirtqueue

R = FrontendRequest
PF = ProtocolFeature
UADDR = 0x7F3A_0000_0000  # where the front-end maps guest RAM in its own address space
MEM_SIZE = 1 << 22
ONE = (1).to_bytes(8, "little")
BIT30 = 1 << VHOST_USER_F_PROTOCOL_FEATURES
SECTOR = 512


def fd_count() -> int:
    gc.collect()  # mappings of earlier tests' objects hold a descriptor until collected
    return len(os.listdir("/proc/self/fd"))


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def drain(fd: int) -> int:
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


class HoldingDevice(VirtioDevice):
    """A device that takes every available chain and completes it only when told
    (an asynchronous device: requests stay in flight between calls)."""

    device_id = DeviceId.BLOCK

    def __init__(self, num_queues: int = 1) -> None:
        super().__init__(num_queues=num_queues, queue_max_size=256)
        self.held: list[DescriptorChain] = []
        self.seen: list[int] = []

    def specific_features(self) -> int:
        return 0

    def config_bytes(self) -> bytes:
        return bytes(8)

    def handle_queue(self, index: int) -> None:
        vq = self.queues[index]
        assert vq is not None
        while (chain := vq.pop()) is not None:
            self.held.append(chain)
            self.seen.append(chain.id)

    def complete(self, ids: Sequence[int], index: int = 0) -> None:
        vq = self.queues[index]
        assert vq is not None
        for cid in ids:
            chain = next(c for c in self.held if c.id == cid)
            self.held.remove(chain)
            vq.push(chain, 0)
        if vq.flush() and self.host is not None:
            self.host.notify_used(index)


class Front:
    """A scripted vhost-user front-end (QEMU's part) around one back-end."""

    def __init__(self, device: VirtioDevice, mem: GuestMemory | None = None, **opts: Any) -> None:
        self.device = device
        self.be = VhostUserBackend(device, **opts)
        self.owns_mem = mem is None
        self.mem = mem if mem is not None else GuestMemory.create(MEM_SIZE)
        self.alloc = GuestAllocator(0x1000, len(self.mem.regions[0].view) - 0x1000)
        self.replies: deque[Message] = deque()
        self._dec = Decoder(replies=True)
        self.watched: dict[int, int] = {}
        self.kick_fd: dict[int, int] = {}
        self.call_fd: dict[int, int] = {}
        self.err_fd: dict[int, int] = {}
        self.backend_sock: socket.socket | None = None
        self.backend_msgs: list[bytes] = []
        self.disconnected: str | None = None
        self.queues: dict[int, DriverVirtqueue[Any]] = {}
        self.inflight_fd = -1
        self.features = 0

    # -- plumbing ---------------------------------------------------------------------

    def apply(self, actions: list[Action]) -> list[Action]:
        for a in actions:
            if isinstance(a, Reply):
                assert VHOST_USER_HEADER.unpack_from(a.data, 0).flags == REPLY_FLAGS
                self._dec.feed(a.data, [os.dup(fd) for fd in a.fds])
                self.replies.extend(self._dec)
            elif isinstance(a, Signal):
                os.write(a.fd, ONE)
            elif isinstance(a, WatchKick):
                self.watched[a.ring] = a.fd
            elif isinstance(a, UnwatchKick):
                assert self.watched.pop(a.ring) == a.fd
            elif isinstance(a, SendBackend):
                self.backend_msgs.append(a.data)
            elif isinstance(a, Disconnect):
                self.disconnected = a.reason
        return actions

    def send(
        self,
        request: FrontendRequest,
        body: Any = None,
        *,
        need_reply: bool = False,
        fds: Sequence[int] = (),
    ) -> list[Action]:
        data = encode(request, body, need_reply=need_reply, fds=fds)
        return self.apply(self.be.receive(data, [os.dup(fd) for fd in fds]))

    def raw(self, data: bytes, fds: Sequence[int] = ()) -> list[Action]:
        return self.apply(self.be.receive(data, [os.dup(fd) for fd in fds]))

    def reply(self, request: FrontendRequest) -> Message:
        msg = self.replies.popleft()
        assert msg.request is request
        return msg

    def u64(self, request: FrontendRequest) -> int:
        return self.reply(request).body_as(VhostUserU64).u64

    def ack(self, request: FrontendRequest) -> int:
        return self.u64(request)

    def ask(self, request: FrontendRequest, body: Any = None) -> int:
        self.send(request, body)
        return self.u64(request)

    def kick(self, ring: int) -> None:
        os.write(self.kick_fd[ring], ONE)
        if ring in self.watched:
            drain(self.watched[ring])
        self.apply(self.be.kick(ring))

    # -- QEMU's sequences -------------------------------------------------------------------

    def connect(self, num_rings: int = 1) -> None:
        """vhost_dev_init + vhost-user-blk realize."""
        offered = self.ask(R.GET_FEATURES)
        assert offered & BIT30 and offered & 1 << VHOST_F_LOG_ALL
        pf = self.ask(R.GET_PROTOCOL_FEATURES)
        self.send(R.SET_PROTOCOL_FEATURES, pf)
        assert self.ask(R.GET_QUEUE_NUM) == self.device.num_queues
        assert self.ask(R.GET_MAX_MEM_SLOTS) >= 1
        ours, theirs = socket.socketpair()
        self.backend_sock = ours
        self.send(R.SET_BACKEND_REQ_FD, need_reply=True, fds=[theirs.fileno()])
        theirs.close()
        assert self.ack(R.SET_BACKEND_REQ_FD) == 0
        self.send(R.SET_OWNER)
        self.ask(R.GET_FEATURES)
        for i in range(num_rings):
            self.call_fd[i] = eventfd()
            self.err_fd[i] = eventfd()
            self.send(R.SET_VRING_CALL, i, fds=[self.call_fd[i]])
            self.send(R.SET_VRING_ERR, i, fds=[self.err_fd[i]])

    def start(
        self,
        features: int,
        sizes: Sequence[int] | None = None,
        *,
        inflight: bool = True,
        inflight_fd: int = -1,
        bases: Sequence[int] | None = None,
        table: bool = False,
        keep_queues: bool = False,
    ) -> None:
        """vhost_user_blk_start: inflight area, features, memory, rings, DRIVER_OK."""
        if sizes is None:
            sizes = getattr(self, "sizes", (128,))
        self.sizes = tuple(sizes)
        if inflight:
            if inflight_fd < 0:
                self.send(R.GET_INFLIGHT_FD, VhostUserInflight(0, 0, len(sizes), max(sizes)))
                msg = self.reply(R.GET_INFLIGHT_FD)
                self.inflight_body = msg.body_as(VhostUserInflight)
                fd = msg.take_fd()
                assert fd is not None
                self.inflight_fd = fd
            self.send(R.SET_INFLIGHT_FD, self.inflight_body, fds=[self.inflight_fd])
        self.features = features
        self.send(R.SET_FEATURES, features | BIT30)
        status = self.ask(R.GET_STATUS)
        self.send(R.SET_STATUS, status | DeviceStatus.FEATURES_OK)
        region = self.mem.regions[0]
        desc = VhostUserMemoryRegion(0, region.size, UADDR, 0)
        if table:
            self.send(R.SET_MEM_TABLE, VhostUserMemory((desc,)), need_reply=True, fds=[region.fd])
            assert self.ack(R.SET_MEM_TABLE) == 0
        else:
            self.send(R.ADD_MEM_REG, desc, need_reply=True, fds=[region.fd])
            assert self.ack(R.ADD_MEM_REG) == 0
        for i, size in enumerate(sizes):
            if not keep_queues or i not in self.queues:
                self.queues[i] = make_driver_queue(self.mem, self.alloc, size, features)
            q = self.queues[i]
            base = bases[i] if bases is not None else self.default_base()
            self.send(R.SET_VRING_NUM, VhostVringState(i, size))
            self.send(R.SET_VRING_BASE, VhostVringState(i, base))
            self.send(R.SET_VRING_ADDR, self.vring_addr(i, q))
            if i in self.kick_fd:
                os.close(self.kick_fd[i])
            self.kick_fd[i] = eventfd()
            os.write(self.kick_fd[i], ONE)  # QEMU's host notifier starts signalled
            self.send(R.SET_VRING_KICK, i, fds=[self.kick_fd[i]])
        for i in range(len(sizes)):
            self.send(R.SET_VRING_ENABLE, VhostVringState(i, 1))
        status = self.ask(R.GET_STATUS)
        self.send(R.SET_STATUS, status | 7)
        for i in range(len(sizes)):
            self.kick(i)  # the back-end sees the signalled host notifier

    def default_base(self) -> int:
        if self.features >> Feature.RING_PACKED & 1:
            return encode_packed_base(QueueState())
        return 0

    def vring_addr(self, i: int, q: DriverVirtqueue[Any], flags: int = 0) -> VhostVringAddr:
        a = q.addrs
        return VhostVringAddr(
            i, flags, UADDR + a.desc, UADDR + a.device, UADDR + a.driver, a.device
        )

    def stop(self, rings: int = 1) -> list[int]:
        """vhost_dev_stop (QEMU 7.2 order): SET_STATUS 0, disable, GET_VRING_BASE."""
        self.send(R.SET_STATUS, 0)
        bases = []
        for i in range(rings):
            self.send(R.SET_VRING_ENABLE, VhostVringState(i, 0))
        for i in range(rings):
            self.send(R.GET_VRING_BASE, VhostVringState(i, 0))
            bases.append(self.reply(R.GET_VRING_BASE).body_as(VhostVringState).num)
        return bases

    def close(self) -> None:
        self.be.close()
        fds = [*self.kick_fd.values(), *self.call_fd.values(), *self.err_fd.values()]
        if self.inflight_fd >= 0:
            fds.append(self.inflight_fd)
        for fd in fds:
            os.close(fd)
        self.kick_fd.clear()
        self.call_fd.clear()
        self.err_fd.clear()
        self.inflight_fd = -1
        while self.replies:
            self.replies.popleft().close()
        self._dec.close()
        if self.backend_sock is not None:
            self.backend_sock.close()
        if self.owns_mem:
            self.queues.clear()  # the driver rings hold views of guest RAM
            self.mem.close()


# -- block requests through a driver queue --------------------------------------------


def ring_features(packed: bool) -> int:
    """VIRTIO_F_VERSION_1, with VIRTIO_F_RING_PACKED for the packed ring."""
    return Feature.VERSION_1.mask | (Feature.RING_PACKED.mask if packed else 0)


def started(
    device: VirtioDevice,
    features: int = Feature.VERSION_1.mask,
    sizes: Sequence[int] | None = None,
    *,
    num_rings: int = 1,
    **start_kw: Any,
) -> Front:
    """A front-end that connected to a back-end for ``device`` and started its rings."""
    front = Front(device)
    front.connect(num_rings=num_rings)
    front.start(features, sizes, **start_kw)
    return front


def blk_request(
    front: Front, ring: int, rtype: int, sector: int, data: bytes | int, token: object
) -> tuple[int, int]:
    """Queue a virtio-blk request; returns (data address, status address)."""
    q = front.queues[ring]
    hdr = front.alloc.alloc(16)
    front.mem.write(hdr, VIRTIO_BLK_OUTHDR.pack_values(rtype, 0, sector))
    status = front.alloc.alloc(1)
    front.mem.write(status, b"\xff")
    if rtype == BlkReqType.OUT:
        assert isinstance(data, bytes)
        buf = front.alloc.alloc(len(data))
        front.mem.write(buf, data)
        q.add([(hdr, 16), (buf, len(data))], [(status, 1)], token)
    elif rtype == BlkReqType.IN:
        assert isinstance(data, int)
        buf = front.alloc.alloc(data)
        q.add([(hdr, 16)], [(buf, data), (status, 1)], token)
    else:
        buf = 0
        q.add([(hdr, 16)], [(status, 1)], token)
    return buf, status


def used(front: Front, ring: int = 0) -> list[tuple[Any, int]]:
    out = []
    q = front.queues[ring]
    while (u := q.get_used()) is not None:
        out.append(u)
    return out


BLK_FEATURES = [
    pytest.param(Feature.VERSION_1.mask, id="split"),
    pytest.param(
        Feature.VERSION_1.mask | Feature.EVENT_IDX.mask | Feature.INDIRECT_DESC.mask,
        id="split-event-idx-indirect",
    ),
    pytest.param(Feature.VERSION_1.mask | Feature.RING_PACKED.mask, id="packed"),
    pytest.param(
        Feature.VERSION_1.mask | Feature.RING_PACKED.mask | Feature.EVENT_IDX.mask,
        id="packed-event-idx",
    ),
    pytest.param(Feature.VERSION_1.mask | Feature.IN_ORDER.mask, id="split-in-order"),
    pytest.param(
        Feature.VERSION_1.mask | Feature.RING_PACKED.mask | Feature.IN_ORDER.mask,
        id="packed-in-order",
    ),
]


@pytest.fixture
def blk() -> Iterator[tuple[BlkDevice, MemoryBackend]]:
    storage = MemoryBackend(1 << 20)
    yield BlkDevice(storage, num_queues=2), storage


# -- the QEMU sequence ---------------------------------------------------------------------


@pytest.mark.parametrize("features", BLK_FEATURES)
def test_qemu_sequence_serves_blk_writes_and_reads(
    blk: tuple[BlkDevice, MemoryBackend], features: int
) -> None:
    device, storage = blk
    before = fd_count()
    front = Front(device)
    front.connect(num_rings=2)
    # GET_CONFIG: the size asked for, the device's bytes
    front.send(R.GET_CONFIG, VhostUserConfig(0, 57, 0, bytes(57)))
    cfg = front.reply(R.GET_CONFIG).body_as(VhostUserConfig)
    assert cfg.size == 57 and cfg.payload == device.config_bytes()[:57]
    front.start(features, sizes=(64, 64))
    assert front.be.device_features == features
    assert front.be.status == 0xF

    payloads = [bytes([i]) * 4096 for i in range(40)]
    done: list[tuple[Any, int]] = []
    for i, data in enumerate(payloads):  # more than a lap of each 64-entry ring
        q = i % 2
        blk_request(front, q, BlkReqType.OUT, i * 8, data, ("w", i))
        front.queues[q].kick_prepare()
        front.kick(q)
        done += used(front, q)
    assert sorted(t for t, _ in done) == [("w", i) for i in range(40)]
    assert bytes(storage.data[: 40 * 4096]) == b"".join(payloads)
    assert drain(front.call_fd[0]) >= 1 and drain(front.call_fd[1]) >= 1

    done = []
    for i in range(40):
        buf, st_addr = blk_request(front, 0, BlkReqType.IN, i * 8, 4096, ("r", i))
        front.queues[0].kick_prepare()
        front.kick(0)
        done += used(front, 0)
        assert front.mem.read(buf, 4096) == payloads[i]
        assert front.mem.read(st_addr, 1) == b"\0"
    assert done == [(("r", i), 4097) for i in range(40)]

    bases = front.stop(rings=2)
    if features & Feature.RING_PACKED.mask:
        states = [decode_packed_base(b) for b in bases]
        for state, chains in zip(states, (60, 20), strict=True):
            slots = chains * 3  # header, data, status: three descriptors each
            lap_wrap = (slots // 64) % 2 == 0
            assert state == QueueState(slots % 64, slots % 64, lap_wrap, lap_wrap)
    else:
        assert bases == [60, 20]
    assert front.be.suspended and device.queues == [None, None]
    assert front.disconnected is None
    front.close()
    assert device.host is None
    assert fd_count() == before


def test_reply_ack_answers_each_need_reply_exactly_once(
    blk: tuple[BlkDevice, MemoryBackend],
) -> None:
    device, _ = blk
    front = Front(device)
    front.connect()
    for request, body in [
        (R.SET_OWNER, None),
        (R.SET_FEATURES, Feature.VERSION_1.mask | BIT30),
        (R.SET_VRING_NUM, VhostVringState(0, 64)),
        (R.SET_VRING_BASE, VhostVringState(0, 0)),
        (R.SET_VRING_ENABLE, VhostVringState(0, 1)),
        (R.SET_STATUS, 1),
    ]:
        front.send(request, body, need_reply=True)
        assert len(front.replies) == 1
        assert front.ack(request) == 0
    # a request with its own reply gets only that one
    front.send(R.GET_FEATURES, need_reply=True)
    assert len(front.replies) == 1 and front.u64(R.GET_FEATURES) == front.be.offered_features
    front.close()


def test_set_mem_table_translates_user_addresses(blk: tuple[BlkDevice, MemoryBackend]) -> None:
    device, storage = blk
    front = started(device, table=True)
    mem = front.be.memory
    assert mem is not None and mem.gpa_of_userspace(UADDR + 0x1234) == 0x1234
    blk_request(front, 0, BlkReqType.OUT, 0, b"x" * 512, "w")
    front.kick(0)
    assert used(front) == [("w", 1)] and storage.data[:512] == b"x" * 512
    front.close()


def test_memory_table_replaced_under_a_running_ring(blk: tuple[BlkDevice, MemoryBackend]) -> None:
    """Memory hotplug: a new table (the same RAM plus a new region) while the ring
    runs; the ring continues where it was."""
    device, storage = blk
    before = fd_count()
    front = started(device)
    blk_request(front, 0, BlkReqType.OUT, 0, b"1" * 512, "a")
    front.kick(0)
    assert used(front) == [("a", 1)]
    region = front.mem.regions[0]
    extra = create_memfd(1 << 16)
    table = (
        VhostUserMemoryRegion(0, region.size, UADDR, 0),
        VhostUserMemoryRegion(1 << 32, 1 << 16, UADDR * 2, 0),
    )
    front.send(R.SET_MEM_TABLE, VhostUserMemory(table), need_reply=True, fds=[region.fd, extra])
    os.close(extra)
    assert front.ack(R.SET_MEM_TABLE) == 0
    blk_request(front, 0, BlkReqType.OUT, 1, b"2" * 512, "b")
    front.kick(0)
    assert used(front) == [("b", 1)]
    assert storage.data[:1024] == b"1" * 512 + b"2" * 512
    mem = front.be.memory
    assert mem is not None and mem.gpa_of_userspace(UADDR * 2 + 8) == (1 << 32) + 8
    front.close()
    assert fd_count() == before


def test_add_and_remove_memory_regions(blk: tuple[BlkDevice, MemoryBackend]) -> None:
    device, _ = blk
    before = fd_count()
    front = Front(device)
    front.connect()
    extra = create_memfd(1 << 16)
    region = VhostUserMemoryRegion(1 << 30, 1 << 16, UADDR + (1 << 30), 0)
    front.send(R.ADD_MEM_REG, region, need_reply=True, fds=[extra])
    assert front.ack(R.ADD_MEM_REG) == 0
    # overlapping region: refused with a failure ack, descriptor closed
    overlap = VhostUserMemoryRegion((1 << 30) + 4096, 1 << 16, UADDR, 0)
    front.send(R.ADD_MEM_REG, overlap, need_reply=True, fds=[extra])
    assert front.ack(R.ADD_MEM_REG) != 0
    front.send(R.REM_MEM_REG, region, need_reply=True)
    assert front.ack(R.REM_MEM_REG) == 0
    mem = front.be.memory
    assert mem is not None and mem.regions == ()
    front.send(R.REM_MEM_REG, region, need_reply=True)
    assert front.ack(R.REM_MEM_REG) != 0
    os.close(extra)
    front.close()
    assert fd_count() == before


def test_memory_region_beyond_its_file_is_refused(blk: tuple[BlkDevice, MemoryBackend]) -> None:
    """A region larger than its file would fault the back-end on access."""
    device, _ = blk
    before = fd_count()
    front = Front(device)
    front.connect()
    small = create_memfd(4096)
    big = VhostUserMemoryRegion(0, 1 << 20, UADDR, 0)
    front.send(R.SET_MEM_TABLE, VhostUserMemory((big,)), need_reply=True, fds=[small])
    assert front.ack(R.SET_MEM_TABLE) != 0
    assert front.be.memory is None
    os.close(small)
    front.close()
    assert fd_count() == before


def test_get_and_set_status_and_features_ok(blk: tuple[BlkDevice, MemoryBackend]) -> None:
    device, _ = blk
    front = Front(device)
    front.connect()
    assert front.ask(R.GET_STATUS) == 0
    front.send(R.SET_STATUS, 3)
    assert front.ask(R.GET_STATUS) == 3
    front.send(R.SET_FEATURES, Feature.VERSION_1.mask | BIT30)
    front.send(R.SET_STATUS, 0xB)
    assert front.ask(R.GET_STATUS) == 0xB
    front.send(R.SET_STATUS, 0)
    assert front.ask(R.GET_STATUS) == 0
    front.close()


def test_set_features_refuses_bits_not_offered(blk: tuple[BlkDevice, MemoryBackend]) -> None:
    device, _ = blk
    front = Front(device)
    front.connect()
    front.send(R.SET_FEATURES, 1 << 63 | BIT30, need_reply=True)
    assert front.ack(R.SET_FEATURES) != 0
    front.send(R.SET_FEATURES, 1 << 63 | BIT30)
    assert front.disconnected is not None
    front.close()


def test_config_space_read_write_and_change_notification(
    blk: tuple[BlkDevice, MemoryBackend],
) -> None:
    device, storage = blk
    front = Front(device)
    front.connect()
    features = Feature.VERSION_1.mask | 1 << 11  # VIRTIO_BLK_F_CONFIG_WCE
    front.start(features | 1 << 9)  # + FLUSH
    off = VIRTIO_BLK_CONFIG.offset_of("writeback")
    front.send(R.SET_CONFIG, VhostUserConfig(off, 1, 0, b"\0"), need_reply=True)
    assert front.ack(R.SET_CONFIG) == 0
    front.send(R.GET_CONFIG, VhostUserConfig(off, 1, 0, b"\0"))
    assert front.reply(R.GET_CONFIG).body_as(VhostUserConfig).payload == b"\0"
    # capacity change: the device notifies, the back-end sends CONFIG_CHANGE_MSG
    storage.data.extend(bytes(1 << 20))
    assert device.refresh_capacity()
    front.apply(front.be.take_actions())
    assert len(front.backend_msgs) == 1
    dec = Decoder(channel=Channel.BACKEND)
    dec.feed(front.backend_msgs[0])
    msg = dec.next_message()
    assert msg is not None and msg.request is BackendRequest.CONFIG_CHANGE_MSG
    assert not msg.need_reply
    # while suspended, the notification waits for the rings to start again
    front.stop()
    assert front.be.suspended
    storage.data.extend(bytes(1 << 20))
    device.refresh_capacity()
    front.apply(front.be.take_actions())
    assert len(front.backend_msgs) == 1
    front.start(features | 1 << 9, keep_queues=True, bases=[0])
    assert len(front.backend_msgs) == 2
    front.close()


def test_get_config_without_protocol_feature_gets_the_empty_error_reply(
    blk: tuple[BlkDevice, MemoryBackend],
) -> None:
    device, _ = blk
    front = Front(device)
    front.send(R.GET_CONFIG, VhostUserConfig(0, 8, 0, bytes(8)))
    assert front.reply(R.GET_CONFIG).body is None  # "zero length of payload"
    front.close()


def test_entropy_device_offers_no_config_protocol_feature() -> None:
    front = Front(RngDevice(CallableSource(lambda n: b"\x42" * n)))
    pf = front.ask(R.GET_PROTOCOL_FEATURES)
    assert not pf & PF.CONFIG.mask
    assert pf | PF.CONFIG.mask == DEFAULT_PROTOCOL_FEATURES
    front.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_rng_device_fills_buffers(packed: bool) -> None:
    device = RngDevice(CallableSource(lambda n: b"\x5a" * n))
    features = ring_features(packed)
    front = started(device, features, sizes=(8,), inflight=False)
    bufs = []
    done = []
    for i in range(20):  # more than two laps of an 8-entry ring
        buf = front.alloc.alloc(64)
        bufs.append(buf)
        front.queues[0].add([], [(buf, 64)], i)
        front.kick(0)
        done += used(front)
    assert done == [(i, 64) for i in range(20)]
    assert all(front.mem.read(b, 64) == b"\x5a" * 64 for b in bufs)
    front.close()


# -- ring states ----------------------------------------------------------------------------


def test_disabled_ring_is_not_processed_until_enabled(
    blk: tuple[BlkDevice, MemoryBackend],
) -> None:
    device, storage = blk
    front = started(device)
    front.send(R.SET_VRING_ENABLE, VhostVringState(0, 0))
    blk_request(front, 0, BlkReqType.OUT, 0, b"a" * 512, "w")
    front.kick(0)
    assert used(front) == [] and storage.data[:512] == bytes(512)
    front.send(R.SET_VRING_ENABLE, VhostVringState(0, 1))
    assert used(front) == [("w", 1)] and storage.data[:512] == b"a" * 512
    front.close()


def test_ring_change_on_a_started_ring_is_refused(blk: tuple[BlkDevice, MemoryBackend]) -> None:
    """vhost-user.rst "Ring states": a started ring keeps its size and base."""
    device, _ = blk
    front = started(device)
    front.send(R.SET_VRING_NUM, VhostVringState(0, 32), need_reply=True)
    assert front.ack(R.SET_VRING_NUM) != 0
    assert front.disconnected is None
    front.send(R.SET_VRING_BASE, VhostVringState(0, 5))
    assert front.disconnected is not None  # no reply possible: the connection ends
    front.close()


def test_ring_larger_than_the_device_maximum_is_refused() -> None:
    device = BlkDevice(MemoryBackend(1 << 20), queue_max_size=64)
    front = Front(device)
    front.send(R.SET_VRING_NUM, VhostVringState(0, 128), need_reply=True)
    assert front.ack(R.SET_VRING_NUM) != 0
    assert front.be.rings[0].num is None
    front.send(R.SET_VRING_NUM, VhostVringState(0, 64), need_reply=True)
    assert front.ack(R.SET_VRING_NUM) == 0
    front.close()


def test_get_vring_base_stops_the_ring_and_forgets_its_kick(
    blk: tuple[BlkDevice, MemoryBackend],
) -> None:
    device, storage = blk
    front = started(device)
    kick = front.watched[0]
    assert front.stop() == [0]
    assert 0 not in front.watched
    blk_request(front, 0, BlkReqType.OUT, 0, b"b" * 512, "w")
    front.apply(front.be.kick(0))  # a stale kick must not restart the ring
    assert used(front) == [] and storage.data[:512] == bytes(512)
    with pytest.raises(OSError):
        os.fstat(kick)  # closed by the next call, once the adapter forgot it
    front.close()


def test_batches_take_turns_between_rings() -> None:
    """A ring with more work than its budget yields; the other ring is served between."""
    storage = MemoryBackend(1 << 20)
    device = BlkDevice(storage, num_queues=2)
    front = Front(device, batch=4)
    front.connect(num_rings=2)
    front.start(Feature.VERSION_1.mask, sizes=(64, 64))
    for i in range(20):
        blk_request(front, 0, BlkReqType.OUT, i, bytes([i]) * 512, ("q0", i))
    blk_request(front, 1, BlkReqType.OUT, 100, b"z" * 512, ("q1", 0))
    front.kick(0)
    assert len(used(front, 0)) == 4 and front.be.pending
    front.kick(1)
    assert used(front, 1) == [(("q1", 0), 1)]
    rounds = 0
    while front.be.pending:
        front.apply(front.be.run_pending())
        rounds += 1
    assert rounds in (4, 5) and len(used(front, 0)) == 16
    front.close()


def test_polling_ring_starts_without_a_kick_descriptor(
    blk: tuple[BlkDevice, MemoryBackend],
) -> None:
    device, storage = blk
    front = started(device, inflight=False)
    front.stop()
    q = front.queues[0]
    front.send(R.SET_FEATURES, Feature.VERSION_1.mask | BIT30)
    front.send(R.SET_VRING_NUM, VhostVringState(0, 128))
    front.send(R.SET_VRING_BASE, VhostVringState(0, 0))
    front.send(R.SET_VRING_ADDR, front.vring_addr(0, q))
    front.send(R.SET_VRING_KICK, VHOST_USER_VRING_NOFD_MASK)
    front.send(R.SET_VRING_ENABLE, VhostVringState(0, 1))
    assert front.be.polling
    blk_request(front, 0, BlkReqType.OUT, 0, b"p" * 512, "w")
    front.apply(front.be.run_pending())
    assert used(front) == [("w", 1)] and storage.data[:512] == b"p" * 512
    front.close()


def test_driver_error_sets_needs_reset_and_signals_the_error_eventfd(
    blk: tuple[BlkDevice, MemoryBackend],
) -> None:
    device, _ = blk
    front = started(device)
    q = front.queues[0]
    # a request without a device-writable status byte breaks the ring's framing
    hdr = front.alloc.alloc(16)
    front.mem.write(hdr, VIRTIO_BLK_OUTHDR.pack_values(BlkReqType.OUT, 0, 0))
    q.add([(hdr, 16)], [], "bad")
    front.kick(0)
    assert drain(front.err_fd[0]) >= 1
    assert front.ask(R.GET_STATUS) & DeviceStatus.DEVICE_NEEDS_RESET
    # a reset clears it
    front.send(R.RESET_DEVICE)
    assert not front.ask(R.GET_STATUS) & DeviceStatus.DEVICE_NEEDS_RESET
    front.close()


def test_ring_outside_guest_memory_fails_that_ring_only(
    blk: tuple[BlkDevice, MemoryBackend],
) -> None:
    device, _ = blk
    front = started(device, sizes=(64, 64), num_rings=2)
    front.stop(rings=2)
    front.send(R.SET_FEATURES, Feature.VERSION_1.mask | BIT30)
    bad = VhostVringAddr(1, 0, UADDR + MEM_SIZE - 16, UADDR + 0x2000, UADDR + 0x1000, 0)
    for i, addr in ((0, front.vring_addr(0, front.queues[0])), (1, bad)):
        front.send(R.SET_VRING_NUM, VhostVringState(i, 64))
        front.send(R.SET_VRING_BASE, VhostVringState(i, 0))
        front.send(R.SET_VRING_ADDR, addr)
        front.send(R.SET_VRING_KICK, i, fds=[front.kick_fd[i]])
        front.send(R.SET_VRING_ENABLE, VhostVringState(i, 1))
        front.kick(i)
    assert drain(front.err_fd[1]) >= 1
    assert front.be.queue(0) is not None and front.be.queue(1) is None
    assert front.disconnected is None
    front.close()


# -- malformed input: every class of the codec's refusals --------------------------------------


def _frame(request: int, flags: int, payload: bytes) -> bytes:
    return VHOST_USER_HEADER.pack_values(request, flags, len(payload)) + payload


MALFORMED = [
    # (name, bytes, fds to attach, expected: "close" or the request of the error reply)
    ("unknown request", _frame(999, 1, b""), 0, "close"),
    ("version 2 header", _frame(R.GET_FEATURES, 2, b""), 0, "close"),
    ("reply flag on a request", _frame(R.SET_OWNER, 5, b""), 0, "close"),
    ("payload larger than any body", _frame(R.SET_OWNER, 1, bytes(64)), 0, "close"),
    ("wrong body size, reply expected", _frame(R.SET_VRING_NUM, 9, bytes(4)), 0, R.SET_VRING_NUM),
    ("wrong body size, no reply", _frame(R.SET_VRING_NUM, 1, bytes(4)), 0, "close"),
    (
        "vring index out of range, reply expected",
        _frame(R.SET_VRING_NUM, 9, struct.pack("<II", 200, 64)),
        0,
        R.SET_VRING_NUM,
    ),
    ("queue size zero", _frame(R.SET_VRING_NUM, 9, struct.pack("<II", 0, 0)), 0, R.SET_VRING_NUM),
    (
        "kick without descriptor",
        _frame(R.SET_VRING_KICK, 9, struct.pack("<Q", 0)),
        0,
        R.SET_VRING_KICK,
    ),
    (
        "descriptor on a message that takes none",
        _frame(R.SET_OWNER, 9, b""),
        1,
        R.SET_OWNER,
    ),
    (
        "memory table without regions",
        _frame(R.SET_MEM_TABLE, 9, struct.pack("<II", 0, 0)),
        0,
        R.SET_MEM_TABLE,
    ),
    (
        "memory table, fewer descriptors than regions",
        _frame(R.SET_MEM_TABLE, 9, struct.pack("<II4Q", 1, 0, 0, 4096, UADDR, 0)),
        0,
        R.SET_MEM_TABLE,
    ),
    (
        "config access beyond 256 bytes",
        _frame(R.GET_CONFIG, 1, struct.pack("<III", 250, 8, 0) + bytes(8)),
        0,
        R.GET_CONFIG,
    ),
    (
        "GET_VRING_BASE of a missing ring",
        _frame(R.GET_VRING_BASE, 1, struct.pack("<II", 9, 0)),
        0,
        "close",
    ),
    ("status beyond 8 bits", _frame(R.SET_STATUS, 9, struct.pack("<Q", 0x1FF)), 0, R.SET_STATUS),
    (
        "inband notifications alone",
        _frame(R.SET_PROTOCOL_FEATURES, 1, struct.pack("<Q", PF.INBAND_NOTIFICATIONS.mask)),
        0,
        "close",
    ),
    ("unsupported request, reply expected", _frame(R.SEND_RARP, 9, bytes(8)), 0, R.SEND_RARP),
    ("unsupported request, no reply", _frame(R.NET_SET_MTU, 1, bytes(8)), 0, "close"),
]


@pytest.mark.parametrize(
    ("data", "nfds", "expected"),
    [pytest.param(d, n, e, id=name) for name, d, n, e in MALFORMED],
)
def test_malformed_message_is_answered_or_closes_and_leaks_no_descriptor(
    blk: tuple[BlkDevice, MemoryBackend], data: bytes, nfds: int, expected: object
) -> None:
    device, _ = blk
    before = fd_count()
    front = Front(device)
    front.send(R.SET_PROTOCOL_FEATURES, DEFAULT_PROTOCOL_FEATURES)
    fds = [eventfd() for _ in range(nfds)]
    front.raw(data, fds)
    for fd in fds:
        os.close(fd)
    if expected == "close":
        assert front.disconnected is not None
    else:
        assert front.disconnected is None
        msg = front.reply(expected)  # type: ignore[arg-type]
        if expected is R.GET_CONFIG:
            assert msg.body is None
        else:
            assert msg.body_as(VhostUserU64).u64 != 0
        assert not front.replies
        # the session goes on
        assert front.ask(R.GET_QUEUE_NUM) == 2
    front.close()
    assert fd_count() == before


def test_descriptors_that_start_no_message_close_the_connection(
    blk: tuple[BlkDevice, MemoryBackend],
) -> None:
    """Descriptors travel with the first byte of their message (vhost-user.rst)."""
    device, _ = blk
    before = fd_count()
    front = Front(device)
    msg = encode(R.GET_FEATURES)
    fd = eventfd()
    front.raw(msg[:6])
    front.raw(msg[6:], [fd])
    assert front.disconnected is not None
    os.close(fd)
    front.close()
    assert fd_count() == before


def test_fd_count_unchanged_after_a_full_session_with_replaced_descriptors(
    blk: tuple[BlkDevice, MemoryBackend],
) -> None:
    device, _ = blk
    before = fd_count()
    front = started(device, sizes=(64, 64), num_rings=2)
    for _ in range(3):  # call / error / kick / back-end channel replaced while running
        for i in (0, 1):
            fd = eventfd()
            front.send(R.SET_VRING_CALL, i, fds=[fd])
            front.send(R.SET_VRING_ERR, i, fds=[fd])
            os.close(fd)
        a, b = socket.socketpair()
        front.send(R.SET_BACKEND_REQ_FD, fds=[b.fileno()])
        a.close()
        b.close()
        log_fd = create_memfd(4096)
        front.send(R.SET_LOG_BASE, VhostUserLog(4096, 0), fds=[log_fd])
        assert front.ack(R.SET_LOG_BASE) == 0
        os.close(log_fd)
        front.start(
            Feature.VERSION_1.mask,
            sizes=(64, 64),
            inflight=True,
            inflight_fd=front.inflight_fd,
            keep_queues=True,
            bases=front.stop(rings=2),
        )
    front.close()
    assert fd_count() == before


# -- dirty logging ----------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_dirty_log_marks_device_writes_only_while_asked(
    blk: tuple[BlkDevice, MemoryBackend], packed: bool
) -> None:
    device, storage = blk
    storage.data[:8192] = b"d" * 8192
    features = ring_features(packed)
    front = started(device, features)
    pages = MEM_SIZE // 4096
    log_fd = create_memfd(pages // 8)
    front.send(R.SET_LOG_BASE, VhostUserLog(pages // 8, 0), fds=[log_fd])
    assert front.ack(R.SET_LOG_BASE) == 0
    log = DirtyLog(os.dup(log_fd), pages // 8, 0)  # the front-end's view of the bitmap
    # migration starts: LOG_ALL, then the ring's log flag
    front.send(R.SET_FEATURES, features | BIT30 | 1 << VHOST_F_LOG_ALL, need_reply=True)
    assert front.ack(R.SET_FEATURES) == 0
    q = front.queues[0]
    front.send(R.SET_VRING_ADDR, front.vring_addr(0, q, flags=1), need_reply=True)
    assert front.ack(R.SET_VRING_ADDR) == 0
    # a read: the device writes the data buffer, the status byte and the used side
    buf_addr, st_addr = blk_request(front, 0, BlkReqType.IN, 0, 8192, "r")
    # and a write: the device only reads the data
    wbuf, _ = blk_request(front, 0, BlkReqType.OUT, 64, b"w" * 8192, "w")
    front.kick(0)
    assert [t for t, _ in used(front)] == ["r", "w"]
    for addr in (buf_addr, buf_addr + 4096, st_addr):
        assert log.is_dirty(addr)
    used_area = q.addrs.desc if packed else q.addrs.device
    assert log.is_dirty(used_area)
    assert not log.is_dirty(wbuf + 4096)  # only read by the device
    # migration ends: no more logging
    front.send(R.SET_FEATURES, features | BIT30, need_reply=True)
    front.ack(R.SET_FEATURES)
    front.send(R.SET_VRING_ADDR, front.vring_addr(0, q), need_reply=True)
    front.ack(R.SET_VRING_ADDR)
    os.pwrite(log_fd, bytes(pages // 8), 0)
    buf2, _ = blk_request(front, 0, BlkReqType.IN, 0, 4096, "r2")
    front.kick(0)
    assert used(front) == [("r2", 4097)]
    assert not log.is_dirty(buf2)
    log.close()
    os.close(log_fd)
    front.close()


def test_dirty_log_bitmap_layout() -> None:
    fd = create_memfd(64)
    log = DirtyLog(fd, 64, 0)
    log.mark(0x3000, 1)
    log.mark(0x9FFF, 2)  # pages 9 and 10
    log.mark(0x20000, 0x41000)  # pages 32..96 (whole bytes in between)
    view = bytearray(os.pread(fd, 64, 0))
    assert view[0] == 1 << 3
    assert view[1] == 0b110
    assert view[4:12] == b"\xff" * 8 and view[12] == 1
    assert log.out_of_range == 0
    log.mark(64 * 8 * 4096, 1)  # beyond the log: dropped and counted
    assert log.out_of_range == 1
    log.close()
    assert log.closed


def test_dirty_log_refuses_a_log_beyond_its_file() -> None:
    before = fd_count()
    fd = create_memfd(16)
    with pytest.raises(Exception, match="beyond the end"):
        DirtyLog(fd, 4096, 0)
    assert fd_count() == before


# -- inflight tracking and reconnection ------------------------------------------------------


def reconnect(old: Front, device: VirtioDevice, features: int, bases: Sequence[int]) -> Front:
    """The back-end died (no GET_VRING_BASE); a new one gets QEMU's replay."""
    inflight_fd = os.dup(old.inflight_fd)
    old.owns_mem = False  # guest RAM and the driver's rings live on
    old.close()
    new = Front(device, mem=old.mem)
    new.owns_mem = True
    new.alloc = old.alloc
    new.queues = old.queues
    new.inflight_body = old.inflight_body
    new.inflight_fd = inflight_fd
    new.sizes = old.sizes
    new.connect()
    new.start(features, inflight_fd=inflight_fd, bases=bases, keep_queues=True)
    return new


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_reconnect_resubmits_requests_in_flight_exactly_once_in_fetch_order(
    packed: bool,
) -> None:
    device = HoldingDevice()
    features = ring_features(packed)
    front = started(device, features, sizes=(16,))
    q = front.queues[0]
    for i in range(6):
        b = front.alloc.alloc(8)
        q.add([], [(b, 8)], i)
    front.kick(0)
    ids = list(device.seen)
    assert len(ids) == 6
    # the device completes three of them out of order; then the back-end dies
    device.complete([ids[4], ids[1], ids[0]])
    front.apply(front.be.take_actions())
    assert sorted(t for t, _ in used(front)) == [0, 1, 4]
    device.held.clear()
    device.seen.clear()
    # QEMU's replay: split base = used idx (from memory); packed: its stale base
    bases = [encode_packed_base(QueueState())] if packed else [3]
    new = reconnect(front, device, features, bases)
    assert device.seen == [ids[2], ids[3], ids[5]]  # resubmitted, in fetch order
    # new requests continue after them
    for i in range(6, 9):
        b = new.alloc.alloc(8)
        new.queues[0].add([], [(b, 8)], i)
    new.kick(0)
    assert device.seen[3:] == [c.id for c in device.held[3:]] and len(device.held) == 6
    device.complete([c.id for c in list(device.held)])
    new.apply(new.be.take_actions())
    assert sorted(t for t, _ in used(new)) == [2, 3, 5, 6, 7, 8]
    assert new.be.metrics.resubmitted == 0  # counted when the ring stops
    bases = new.stop()
    assert new.be.metrics.resubmitted == 3
    # a clean restart resubmits nothing
    device.seen.clear()
    new.start(features, inflight_fd=new.inflight_fd, bases=bases, keep_queues=True)
    assert device.seen == []
    new.close()


def test_requests_in_flight_at_a_clean_stop_survive_through_the_inflight_area() -> None:
    device = HoldingDevice()
    front = started(device, sizes=(16,))
    b = front.alloc.alloc(8)
    front.queues[0].add([], [(b, 8)], "x")
    front.kick(0)
    assert device.seen == [0]
    bases = front.stop()
    assert bases == [1]
    device.held.clear()
    device.seen.clear()
    front.start(
        Feature.VERSION_1.mask, inflight_fd=front.inflight_fd, bases=bases, keep_queues=True
    )
    assert device.seen == [0]
    device.complete([0])
    front.apply(front.be.take_actions())
    assert used(front) == [("x", 0)]
    front.close()


def test_requests_in_flight_at_a_stop_without_inflight_area_are_returned() -> None:
    device = HoldingDevice()
    front = started(device, sizes=(16,), inflight=False)
    b = front.alloc.alloc(8)
    front.queues[0].add([], [(b, 8)], "x")
    front.kick(0)
    assert front.stop() == [1]
    assert used(front) == [("x", 0)]  # given back, nothing written, not lost
    front.close()


def test_inflight_area_sizes_follow_the_document_layouts() -> None:
    assert split_region_size(128) == 16 + 16 * 128 + 48  # header + entries, 64-aligned
    assert packed_region_size(128) == 32 + 32 * 128 + 32
    assert inflight_area_size(2, 128) == 2 * packed_region_size(128)
    area = InflightArea.create(2, 128)
    q0, q1 = area.split_queue(0), area.split_queue(1)
    assert q0 is not None and q1 is not None and area.split_queue(2) is None
    assert not q0.initialized
    area.close()
    assert area.closed


# region-level crash consistency: every prefix of the document's update order


def _split_region() -> tuple[SplitInflight, bytearray]:
    buf = bytearray(split_region_size(16))
    region = SplitInflight(memoryview(buf), 16)
    region.reset(0)
    return region, buf


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=1, max_size=30),
    crash=st.sampled_from(["none", "before_publish", "after_publish", "after_clear"]),
)
def test_split_region_recovers_exactly_the_unpublished_requests(
    ops: list[tuple[bool, int]], crash: str
) -> None:
    """Fetch heads and complete random batches; crash in a random step of the last
    batch; ``recover`` returns exactly the heads the driver has not seen used, in
    fetch order."""
    region, _ = _split_region()
    free = list(range(16))
    inflight: list[int] = []
    used_idx = 0
    for fetch, n in ops:
        if fetch and free:
            head = free.pop(n % len(free))
            region.fetch(head)
            inflight.append(head)
        elif inflight:
            batch = []
            for _ in range(min(max(n, 1), len(inflight))):
                batch.append(inflight.pop(n % len(inflight)))
            region.complete_begin(batch)
            used_idx += len(batch)
            region.complete_end(batch, used_idx)
            free.extend(batch)
    if inflight:
        batch = inflight[: max(1, len(inflight) // 2)]
        region.complete_begin(batch)
        if crash in ("after_publish", "after_clear"):
            used_idx += len(batch)
            inflight = [h for h in inflight if h not in batch]
        if crash == "after_clear":
            region.complete_end(batch, used_idx)
        if crash == "none":
            used_idx += len(batch)
            region.complete_end(batch, used_idx)
            inflight = [h for h in inflight if h not in batch]
    assert region.recover(used_idx) == inflight
    assert region.recover(used_idx) == inflight  # idempotent


def _packed_ring(size: int) -> bytearray:
    ring = bytearray(16 * size)
    for pos in range(size):  # every slot shows the driver's first-lap "available"
        struct.pack_into("<H", ring, pos * 16 + 14, VIRTQ_DESC_F_AVAIL)
    return ring


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3), min_size=1, max_size=5),
    done=st.integers(0, 5),
    crash=st.sampled_from(["none", "before_publish", "after_publish"]),
)
def test_packed_region_rolls_forward_or_back(sizes: list[int], done: int, crash: str) -> None:
    size = 16
    buf = bytearray(packed_region_size(size))
    region = PackedInflight(memoryview(buf), size)
    region.reset(0, True)
    ring = _packed_ring(size)
    pos = 0
    chains = []
    for bid, n in enumerate(sizes):
        descs = [(0x1000 * bid + k, 8, bid, 0) for k in range(n)]
        region.fetch(descs)
        chains.append((bid, n, descs))
        pos += n
    done = min(done, len(chains))
    batch = chains[:done]
    expect = chains
    if batch:
        advance = sum(n for _, n, _ in batch)
        heads = region.complete_begin([bid for bid, _, _ in batch], advance % size, advance < size)
        if crash in ("after_publish", "none"):
            # the device wrote the first used descriptor of the batch (wrap counter 1)
            struct.pack_into("<H", ring, 14, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)
            expect = chains[done:]
        if crash == "none":
            region.complete_end(heads)
    recovered = region.recover(memoryview(ring), size)
    assert [d for _, d in recovered] == [d for _, _, d in expect]
    used_idx, _ = region.used
    assert used_idx == (sum(n for _, n, _ in chains) - sum(n for _, n, _ in expect)) % size


def test_inflight_region_from_the_front_end_is_checked() -> None:
    """The region is shared memory the front-end can scribble on."""
    region, buf = _split_region()
    region.fetch(3)
    struct.pack_into("<H", buf, 10, 99)  # desc_num corrupted
    with pytest.raises(Exception, match="entries"):
        region.recover(0)
    region, buf = _split_region()
    region.fetch(3)
    region.complete_begin([3])
    struct.pack_into("<H", buf, 12, 40)  # last_batch_head out of range
    with pytest.raises(Exception, match="last-batch"):
        region.recover(1)


# -- shared memory the front-end could shrink under us (SIGBUS) -----------------------------


def _unsealable(kind: str, tmp: Path) -> int:
    if kind == "memfd-without-sealing":
        fd = os.memfd_create("no-seals", os.MFD_CLOEXEC)
    else:
        fd = os.open(tmp / "ram", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, MEM_SIZE)
    return fd


@pytest.mark.parametrize("kind", ["memfd-without-sealing", "regular-file"])
@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted", "trust-frontend"])
def test_guest_ram_that_cannot_be_sealed_against_shrinking_is_refused_unless_trusted(
    kind: str, trusted: bool, tmp_path: Path
) -> None:
    fd = _unsealable(kind, tmp_path)
    f = Front(RngDevice(), trust_frontend=trusted)
    try:
        f.connect()
        region = VhostUserMemoryRegion(0, MEM_SIZE, 0x7F00_0000_0000, 0)
        f.send(R.SET_MEM_TABLE, VhostUserMemory((region,)), need_reply=True, fds=[fd])
        if trusted:
            assert f.ack(R.SET_MEM_TABLE) == 0 and f.be.memory is not None
        else:
            assert f.ack(R.SET_MEM_TABLE) != 0  # an error reply, the session goes on
            assert f.be.memory is None and f.disconnected is None
            assert f.ask(R.GET_FEATURES)
    finally:
        f.be.close()
        os.close(fd)


def test_a_sealable_memfd_is_sealed_so_the_front_end_cannot_shrink_it() -> None:
    import fcntl

    fd = os.memfd_create("sealable", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, MEM_SIZE)
    f = Front(RngDevice())
    try:
        f.connect()
        region = VhostUserMemoryRegion(0, MEM_SIZE, 0x7F00_0000_0000, 0)
        f.send(R.SET_MEM_TABLE, VhostUserMemory((region,)), need_reply=True, fds=[fd])
        assert f.ack(R.SET_MEM_TABLE) == 0
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)  # what used to SIGBUS the back-end at its next access
    finally:
        f.be.close()
        os.close(fd)


@pytest.mark.parametrize("what", ["log", "inflight"])
def test_log_and_inflight_areas_that_cannot_be_sealed_are_refused(what: str) -> None:
    fd = os.memfd_create("no-seals", os.MFD_CLOEXEC)
    os.ftruncate(fd, 1 << 16)
    f = Front(RngDevice())
    try:
        f.connect()
        if what == "log":
            f.send(R.SET_LOG_BASE, VhostUserLog(1 << 16, 0), fds=[fd])
            assert f.be.dirty_log is None
            # refused: an error reply where the protocol has one, else the connection
            # is closed (the front-end must not believe the log is in place)
            assert f.disconnected is not None or f.u64(R.SET_LOG_BASE) != 0
        else:
            f.send(
                R.SET_INFLIGHT_FD, VhostUserInflight(1 << 16, 0, 1, 128), need_reply=True, fds=[fd]
            )
            assert f.ack(R.SET_INFLIGHT_FD) != 0 and f.be.inflight is None
    finally:
        f.be.close()
        os.close(fd)


def test_packed_vring_base_in_the_16_bit_form_puts_used_where_avail_is() -> None:
    """DPDK 22.11's virtio-user sends SET_VRING_BASE ``1 << 15`` for a fresh packed
    ring (bits 0-15 only; DPDK's vhost library reads only those and sets the used
    position to the available one). Read as the 32-bit form it would start the used
    wrap counter at 0: every used descriptor of the first lap written with the wrong
    USED/AVAIL bits, and the driver never sees one (found with testpmd)."""
    assert decode_packed_base(1 << 15) == QueueState(0, 0, True, True)
    assert decode_packed_base(5 | 1 << 15) == QueueState(5, 5, True, True)
    # the 32-bit form (QEMU's, ours) is unchanged, whatever the wrap counters
    for state in (
        QueueState(),
        QueueState(3, 1, True, True),
        QueueState(2, 250, True, False),
        QueueState(7, 7, False, False),
        QueueState(0, 0, False, False),
    ):
        assert decode_packed_base(encode_packed_base(state)) == state
