"""vhost-user front-end against a scripted fake back-end.

The fake speaks the back-end side with the committed codec and can be told to answer
any request wrongly: a reply with the wrong request code, a bad size, bad flags,
unexpected descriptors, no answer at all, or a hang-up. The front-end must turn each
into a ProtocolError (never a hang, never a leaked descriptor), and otherwise send the
message sequence of QEMU's docs/interop/vhost-user.rst. Negative tests are named after
the rule they check.
"""

from __future__ import annotations

import array
import contextlib
import io
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from pyvirtio.cli import probe as probe_cli
from pyvirtio.core.driver import CONFIG_CHANGE, RingOptions
from pyvirtio.devices.registry import guess_device_id
from pyvirtio.drivers.rng import RngDriver
from pyvirtio.errors import ConfigurationError, DeviceError, DriverError, ProtocolError
from pyvirtio.spec.blk import VIRTIO_BLK_CONFIG, BlkFeature, VirtioBlkConfig
from pyvirtio.spec.features import Feature
from pyvirtio.spec.ids import DeviceId
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.transport.vhost_user.codec import Decoder, Message, encode, encode_ack, encode_reply
from pyvirtio.transport.vhost_user.frontend import (
    SUPPORTED_PROTOCOL_FEATURES,
    VhostUserFrontend,
    encode_vring_base,
)
from pyvirtio.transport.vhost_user.spec import (
    VHOST_USER_HEADER,
    VHOST_USER_VRING_NOFD_MASK,
    BackendRequest,
    FrontendRequest,
    ProtocolFeature,
    VhostUserConfig,
    VhostUserMemory,
    VhostUserU64,
    VhostUserVringArea,
    VhostVringAddr,
    VhostVringState,
)
from pyvirtio.virtqueue.common import QueueState

F = FrontendRequest
PF = ProtocolFeature

#: what a typical back-end offers: VERSION_1, INDIRECT, EVENT_IDX, LOG_ALL, bit 30
BASE_FEATURES = 1 << 32 | 1 << 28 | 1 << 29 | 1 << 26 | 1 << 30
ALL_PROTOCOL = PF.MQ.mask | PF.REPLY_ACK.mask | PF.BACKEND_REQ.mask | PF.CONFIG.mask
TIMEOUT = 0.4


def blk_config(capacity: int = 2048) -> bytes:
    fields = [0] * len(VirtioBlkConfig._fields)
    cfg = VirtioBlkConfig(*fields)._replace(capacity=capacity, seg_max=126, blk_size=512)
    return VIRTIO_BLK_CONFIG.pack(cfg)


# ---------------------------------------------------------------------------
# the fake back-end
# ---------------------------------------------------------------------------

#: script actions: hang up now / never answer this request
CLOSE = "close"
SILENT = "silent"
Action = Any  # bytes | tuple[bytes, list[int]] | CLOSE | SILENT | None (= default)


def _fds_from(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % 4])
            fds.extend(a)
    return fds


class FakeBackend:
    """A scripted vhost-user back-end on one connection, in a thread."""

    def __init__(
        self,
        *,
        features: int = BASE_FEATURES,
        protocol: int = ALL_PROTOCOL,
        queue_num: int = 1,
        config: bytes = b"",
        status: int | None = None,
        script: dict[FrontendRequest, Callable[[Message], Action]] | None = None,
    ) -> None:
        self.features = features
        self.protocol = protocol
        self.queue_num = queue_num
        self.config = config
        self.status = status
        self.script = script or {}
        #: (request, flags, body) of every message received, in order
        self.log: list[tuple[FrontendRequest, int, Any]] = []
        #: descriptors kept: kick/call per ring, memory region fds
        self.kick: dict[int, int] = {}
        self.call: dict[int, int] = {}
        self.mem_fds: list[int] = []
        self.channel: socket.socket | None = None
        self.sock: socket.socket | None = None
        self._listener: socket.socket | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.done = threading.Event()

    # -- starting ---------------------------------------------------------------

    def pair(self) -> socket.socket:
        """Start on a socket pair; returns the front-end's end."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = ours
        self.thread.start()
        return theirs

    def listen(self, path: str) -> None:
        """Start listening on ``path`` for one connection."""
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(1)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(5)
        assert not self.thread.is_alive(), "fake back-end did not stop"

    # -- protocol ---------------------------------------------------------------

    def requests(self) -> list[FrontendRequest]:
        return [r for r, _, _ in self.log]

    def bodies(self, request: FrontendRequest) -> list[Any]:
        return [b for r, _, b in self.log if r is request]

    def _main(self) -> None:
        try:
            if self._listener is not None:
                self._listener.settimeout(5)
                try:
                    self.sock, _ = self._listener.accept()
                except OSError:
                    return
            assert self.sock is not None
            self._serve(self.sock)
        finally:
            self._cleanup()
            self.done.set()

    def _serve(self, sock: socket.socket) -> None:
        dec = Decoder()
        while True:
            try:
                data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(64))
            except OSError:
                return
            fds = _fds_from(anc)
            if not data:
                for fd in fds:
                    os.close(fd)
                return
            dec.feed(data, fds)
            for msg in dec:
                with msg:
                    self.log.append((msg.request, msg.flags, msg.body))
                    handler = self.script.get(msg.request)  # type: ignore[call-overload]
                    out = handler(msg) if handler is not None else None
                    if out is None:
                        out = self.default(msg)
                    if out == CLOSE:
                        return
                    if out == SILENT or out == b"":
                        continue
                    data_out, out_fds = out if isinstance(out, tuple) else (out, [])
                    if out_fds:
                        anc_out = [
                            (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", out_fds))
                        ]
                        sock.sendmsg([data_out], anc_out)
                    else:
                        sock.sendall(data_out)

    def default(self, msg: Message) -> bytes:
        r = msg.request
        assert isinstance(r, FrontendRequest)
        if r is F.GET_FEATURES:
            return encode_reply(r, self.features)
        if r is F.GET_PROTOCOL_FEATURES:
            return encode_reply(r, self.protocol)
        if r is F.GET_QUEUE_NUM:
            return encode_reply(r, self.queue_num)
        if r is F.GET_CONFIG:
            body = msg.body_as(VhostUserConfig)
            if body.size > len(self.config):
                return _raw(r, 0x5, b"")  # "zero length of payload to indicate an error"
            return encode_reply(
                r, VhostUserConfig(body.offset, body.size, 0, self.config[: body.size])
            )
        if r is F.GET_VRING_BASE:
            return encode_reply(r, VhostVringState(msg.body_as(VhostVringState).index, 7))
        if r is F.GET_STATUS:
            return encode_reply(r, self.status or 0)
        if r is F.SET_STATUS:
            self.status = msg.body_as(VhostUserU64).u64
        elif r in (F.SET_VRING_KICK, F.SET_VRING_CALL):
            index = msg.body_as(VhostUserU64).u64 & 0xFF
            table = self.kick if r is F.SET_VRING_KICK else self.call
            fd = msg.take_fd()
            if fd is not None:
                old = table.pop(index, None)
                if old is not None:
                    os.close(old)
                table[index] = fd
        elif r is F.SET_MEM_TABLE:
            for fd in self.mem_fds:
                os.close(fd)
            self.mem_fds = msg.take_fds()
        elif r is F.SET_BACKEND_REQ_FD:
            fd = msg.take_fd()
            assert fd is not None
            if self.channel is not None:
                self.channel.close()
            self.channel = socket.socket(fileno=fd)
        if msg.need_reply:
            return encode_ack(r, 0)
        return b""

    def _cleanup(self) -> None:
        for fd in [*self.kick.values(), *self.call.values(), *self.mem_fds]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.kick.clear()
        self.call.clear()
        self.mem_fds = []
        for s in (self.channel, self.sock, self._listener):
            if s is not None:
                s.close()

    # -- back-end channel ---------------------------------------------------------

    def backend_request(
        self, request: BackendRequest, body: Any = None, *, need_reply: bool
    ) -> int | None:
        """Send a back-end request; return the front-end's REPLY_ACK status if asked."""
        assert self.channel is not None
        self.channel.sendall(encode(request, body, need_reply=need_reply))
        if not need_reply:
            return None
        dec = Decoder(channel=_backend_channel(), replies=True)
        self.channel.settimeout(5)
        while True:
            data = self.channel.recv(4096)
            assert data, "front-end closed the back-end channel"
            dec.feed(data)
            msg = dec.next_message()
            if msg is not None:
                with msg:
                    assert msg.request is request
                    return msg.body_as(VhostUserU64).u64


def _backend_channel() -> Any:
    from pyvirtio.transport.vhost_user.codec import Channel

    return Channel.BACKEND


def _raw(request: int, flags: int, payload: bytes, size: int | None = None) -> bytes:
    """A hand-made message (for malformed replies)."""
    n = len(payload) if size is None else size
    return VHOST_USER_HEADER.pack_values(int(request), flags, n) + payload


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def session(
    fe_kw: dict[str, Any] | None = None, **fake_kw: Any
) -> Iterator[tuple[VhostUserFrontend, FakeBackend]]:
    fake = FakeBackend(**fake_kw)
    sock = fake.pair()
    try:
        fe = VhostUserFrontend(sock, reply_timeout=TIMEOUT, **(fe_kw or {}))
    except BaseException:
        sock.close()
        fake.join()
        raise
    try:
        yield fe, fake
    finally:
        fe.close()
        fake.join()


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    before = _fd_count()
    yield
    # give daemon threads a moment to close their ends
    deadline = time.monotonic() + 2
    while _fd_count() != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _fd_count() == before, "file descriptors leaked"


# ---------------------------------------------------------------------------
# handshake and message sequence
# ---------------------------------------------------------------------------


def test_handshake_sequence_follows_vhost_user_communication(no_fd_leak: None) -> None:
    with session(protocol=ALL_PROTOCOL | PF.LOG_SHMFD.mask | PF.PAGEFAULT.mask) as (fe, fake):
        assert fe.protocol_features == ALL_PROTOCOL
        assert fe.protocol_features_offered == ALL_PROTOCOL | PF.LOG_SHMFD.mask | PF.PAGEFAULT.mask
        assert fe.backend_queue_num == 1
        assert fe.num_queues() == 1
        assert fe.get_device_features() == BASE_FEATURES & ~(1 << 26 | 1 << 30)
    assert fake.requests() == [
        F.GET_FEATURES,
        F.GET_PROTOCOL_FEATURES,
        F.SET_PROTOCOL_FEATURES,
        F.GET_QUEUE_NUM,
        F.SET_BACKEND_REQ_FD,
        F.SET_OWNER,
    ]
    assert fake.bodies(F.SET_PROTOCOL_FEATURES) == [VhostUserU64(ALL_PROTOCOL)]
    flags = {r: f for r, f, _ in fake.log}
    # REPLY_ACK is in use once negotiated: SET_BACKEND_REQ_FD and SET_OWNER ask for it
    assert flags[F.SET_OWNER] & 0x8 and flags[F.SET_BACKEND_REQ_FD] & 0x8
    assert not flags[F.GET_FEATURES] & 0x8


def test_unimplemented_protocol_features_are_never_asked_for(no_fd_leak: None) -> None:
    offered = ALL_PROTOCOL | PF.INBAND_NOTIFICATIONS.mask | PF.INFLIGHT_SHMFD.mask
    with session(fe_kw={"protocol_features": (1 << 64) - 1}, protocol=offered) as (fe, fake):
        assert fe.protocol_features == ALL_PROTOCOL
    assert fake.bodies(F.SET_PROTOCOL_FEATURES) == [VhostUserU64(ALL_PROTOCOL)]


def test_protocol_features_argument_masks_what_is_asked(no_fd_leak: None) -> None:
    with session(fe_kw={"protocol_features": PF.CONFIG.mask}) as (fe, fake):
        assert fe.protocol_features == PF.CONFIG.mask
        assert fe.backend_queue_num is None
    assert F.SET_BACKEND_REQ_FD not in fake.requests()


def test_without_protocol_features_bit_no_protocol_messages(no_fd_leak: None) -> None:
    with session(features=1 << 32) as (fe, fake):
        assert fe.protocol_features == 0
        assert fe.num_queues() == 1
        assert fe.get_device_features() == 1 << 32
    assert fake.requests() == [F.GET_FEATURES, F.SET_OWNER]


def test_fixed_queue_count_without_mq_follows_device_type(no_fd_leak: None) -> None:
    with session(fe_kw={"device_id": DeviceId.NET}, protocol=PF.REPLY_ACK.mask) as (fe, _):
        assert fe.num_queues() == 2
        assert fe.queue_max_size(1) > 0 and fe.queue_max_size(2) == 0
        fe.assume_device(DeviceId.ENTROPY)
        assert fe.num_queues() == 1


def test_num_queues_above_get_queue_num_is_refused(no_fd_leak: None) -> None:
    with (
        pytest.raises(ConfigurationError, match="more than"),
        session(fe_kw={"num_queues": 2}, queue_num=1),
    ):
        pass


def test_driver_initialization_and_reset_message_sequence(no_fd_leak: None) -> None:
    protocol = ALL_PROTOCOL | PF.RESET_DEVICE.mask | PF.STATUS.mask
    with session(fe_kw={"device_id": DeviceId.ENTROPY}, protocol=protocol) as (fe, fake):
        drv = RngDriver(fe, ring=RingOptions(packed=False))
        start = len(fake.log)
        drv.initialize()
        init = fake.requests()[start:]
        ok = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
        assert init == [
            F.RESET_DEVICE,
            F.SET_STATUS,  # 0: the reset
            F.SET_STATUS,  # ACKNOWLEDGE
            F.SET_STATUS,  # ACKNOWLEDGE | DRIVER
            F.SET_FEATURES,
            F.SET_MEM_TABLE,
            F.SET_STATUS,  # FEATURES_OK
            F.GET_STATUS,
            F.SET_VRING_NUM,
            F.SET_VRING_BASE,
            F.SET_VRING_ADDR,
            F.SET_VRING_KICK,
            F.SET_VRING_CALL,
            F.SET_VRING_ENABLE,
            F.SET_STATUS,  # DRIVER_OK
        ]
        statuses = [b.u64 for b in fake.bodies(F.SET_STATUS)]
        assert statuses == [
            0,
            DeviceStatus.ACKNOWLEDGE,
            ok,
            ok | DeviceStatus.FEATURES_OK,
            ok | DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK,
        ]
        # bit 30 goes with SET_FEATURES once the back-end offered it
        (features,) = fake.bodies(F.SET_FEATURES)
        assert features.u64 >> 30 & 1
        assert features.u64 & ~(1 << 30) == drv.features
        # guest RAM is shared: user address == guest-physical address, fd passed
        (table,) = fake.bodies(F.SET_MEM_TABLE)
        assert isinstance(table, VhostUserMemory) and len(table.regions) == 1
        region = table.regions[0]
        assert region.userspace_addr == region.guest_phys_addr == 0
        assert region.memory_size == fe.mem.size
        assert len(fake.mem_fds) == 1
        (addr,) = fake.bodies(F.SET_VRING_ADDR)
        assert isinstance(addr, VhostVringAddr)
        q = drv.queues[0].addrs
        assert (addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr) == (
            q.desc,
            q.driver,
            q.device,
        )
        assert fake.bodies(F.SET_VRING_BASE) == [VhostVringState(0, 0)]
        assert fake.bodies(F.SET_VRING_ENABLE) == [VhostVringState(0, 1)]
        # every request without its own reply asked for REPLY_ACK
        for r, flags, _ in fake.log[start:]:
            if r not in (F.GET_STATUS,):
                assert flags & 0x8, r
        start = len(fake.log)
        drv.close()
        assert fake.requests()[start:] == [
            F.SET_VRING_ENABLE,
            F.GET_VRING_BASE,
            F.RESET_DEVICE,
            F.SET_STATUS,
        ]
        assert fe.vring_bases == {0: 7}
        assert fake.bodies(F.SET_STATUS)[-1] == VhostUserU64(0)


def test_without_reply_ack_ring_setup_ends_with_get_features_barrier(no_fd_leak: None) -> None:
    with session(fe_kw={"device_id": DeviceId.ENTROPY}, protocol=PF.MQ.mask) as (fe, fake):
        drv = RngDriver(fe, ring=RingOptions(packed=False))
        drv.initialize()
        reqs = fake.requests()
        i = reqs.index(F.SET_VRING_ENABLE)
        assert reqs[i + 1] is F.GET_FEATURES
        assert not any(flags & 0x8 for _, flags, _ in fake.log)
        drv.close()


def test_packed_ring_base_encodes_wrap_counters(no_fd_leak: None) -> None:
    feats = BASE_FEATURES | Feature.RING_PACKED.mask
    with session(fe_kw={"device_id": DeviceId.ENTROPY}, features=feats) as (fe, fake):
        drv = RngDriver(fe, ring=RingOptions(packed=True))
        drv.initialize()
        assert fake.bodies(F.SET_VRING_BASE) == [VhostVringState(0, 0x8000_8000)]
        drv.close()


def test_encode_vring_base() -> None:
    assert encode_vring_base(QueueState(avail_idx=0x1_0005), packed=False) == 5
    state = QueueState(avail_idx=3, used_idx=2, avail_wrap=False, used_wrap=True)
    assert encode_vring_base(state, packed=True) == 3 | (2 | 0x8000) << 16


def test_notify_writes_kick_eventfd_and_call_eventfd_interrupts(no_fd_leak: None) -> None:
    with session(fe_kw={"device_id": DeviceId.ENTROPY}) as (fe, fake):
        drv = RngDriver(fe, ring=RingOptions(packed=False))
        drv.initialize()
        fe.notify(0)
        assert os.eventfd_read(fake.kick[0]) == 1
        assert fe.poll_interrupts(0) == set()
        os.eventfd_write(fake.call[0], 1)
        assert fe.poll_interrupts(1.0) == {0}
        assert fe.interrupt_fds()[0] != fake.call[0]  # ours, not the back-end's copy
        with pytest.raises(DriverError):
            fe.notify(1)
        drv.close()


def test_driver_must_not_accept_a_feature_the_device_did_not_offer(no_fd_leak: None) -> None:
    with session() as (fe, _):
        with pytest.raises(DriverError, match="not offered"):
            fe.set_driver_features(Feature.RING_PACKED.mask)
        # the vhost-only bits are never offered to a driver either
        with pytest.raises(DriverError):
            fe.set_driver_features(1 << 30)


def test_feature_negotiation_refused_by_back_end_status(no_fd_leak: None) -> None:
    """With F_STATUS the back-end decides: FEATURES_OK not kept -> the driver fails."""
    protocol = ALL_PROTOCOL | PF.STATUS.mask
    script = {F.GET_STATUS: lambda m: encode_reply(F.GET_STATUS, int(DeviceStatus.ACKNOWLEDGE))}
    with session(fe_kw={"device_id": DeviceId.ENTROPY}, protocol=protocol, script=script) as (
        fe,
        fake,
    ):
        drv = RngDriver(fe)
        with pytest.raises(DeviceError, match="FEATURES_OK"):
            drv.initialize()
        # the driver marked the device FAILED through SET_STATUS
        assert fake.bodies(F.SET_STATUS)[-1].u64 & DeviceStatus.FAILED


# ---------------------------------------------------------------------------
# configuration space
# ---------------------------------------------------------------------------


def test_read_config_always_starts_at_offset_zero(no_fd_leak: None) -> None:
    cfg = blk_config(capacity=0x1234)
    with session(config=cfg) as (fe, fake):
        assert fe.read_config(20, 4) == cfg[20:24]
        assert fake.bodies(F.GET_CONFIG)[-1][:3] == (0, 24, 0)
        assert fe.read_config(0, 0) == b""
        with pytest.raises(ConfigurationError):
            fe.read_config(250, 10)


def test_get_config_empty_reply_is_a_refusal_not_fatal(no_fd_leak: None) -> None:
    with session(config=b"\1" * 8) as (fe, _):
        with pytest.raises(ProtocolError, match="refused"):
            fe.read_config(0, 60)
        assert fe.read_config(0, 8) == b"\1" * 8  # the connection is still up
        assert fe.try_read_config(60) is None


def test_get_config_reply_must_match_request_size(no_fd_leak: None) -> None:
    def short(msg: Message) -> Action:
        return encode_reply(F.GET_CONFIG, VhostUserConfig(0, 4, 0, b"abcd"))

    with session(config=b"x" * 60, script={F.GET_CONFIG: short}) as (fe, _):
        with pytest.raises(ProtocolError, match="does not match"):
            fe.read_config(0, 8)
        with pytest.raises(ProtocolError):
            fe.get_status()  # dead: the same error, at once


def test_config_without_f_config_is_a_configuration_error(no_fd_leak: None) -> None:
    with session(protocol=PF.MQ.mask) as (fe, _):
        assert not fe.has_config
        with pytest.raises(ConfigurationError, match="F_CONFIG"):
            fe.read_config(0, 8)
        with pytest.raises(ConfigurationError):
            fe.write_config(0, b"\0")
        assert fe.try_read_config(8) is None


def test_write_config_sends_set_config_writable(no_fd_leak: None) -> None:
    with session(config=blk_config()) as (fe, fake):
        fe.write_config(20, b"\1")
        assert fake.bodies(F.SET_CONFIG) == [VhostUserConfig(20, 1, 0, b"\1")]


def test_config_change_with_need_reply_is_acknowledged(no_fd_leak: None) -> None:
    with session(config=blk_config()) as (fe, fake):
        result: list[int | None] = []
        t = threading.Thread(
            target=lambda: result.append(
                fake.backend_request(BackendRequest.CONFIG_CHANGE_MSG, need_reply=True)
            )
        )
        t.start()
        deadline = time.monotonic() + 5
        fired: set[int] = set()
        while CONFIG_CHANGE not in fired and time.monotonic() < deadline:
            fired |= fe.poll_interrupts(0.1)
        t.join(5)
        assert CONFIG_CHANGE in fired
        assert result == [0]
        assert fe.config_generation() == 1


def test_config_generation_sees_pending_config_change(no_fd_leak: None) -> None:
    with session(config=blk_config()) as (fe, fake):
        fake.backend_request(BackendRequest.CONFIG_CHANGE_MSG, need_reply=False)
        time.sleep(0.05)
        assert fe.config_generation() == 1
        assert fe.poll_interrupts(0) == {CONFIG_CHANGE}
        assert fe.poll_interrupts(0) == set()


def test_unnegotiated_backend_request_is_refused(no_fd_leak: None) -> None:
    with session() as (fe, fake):
        result: list[int | None] = []
        body = VhostUserVringArea(VHOST_USER_VRING_NOFD_MASK, 0, 0)
        t = threading.Thread(
            target=lambda: result.append(
                fake.backend_request(BackendRequest.VRING_HOST_NOTIFIER_MSG, body, need_reply=True)
            )
        )
        t.start()
        deadline = time.monotonic() + 5
        while not result and time.monotonic() < deadline:
            fe.poll_interrupts(0.05)
        t.join(5)
        assert result and result[0] != 0
        assert fe.backend_requests_refused == 1


def test_backend_channel_hangup_keeps_main_connection(no_fd_leak: None) -> None:
    with session(config=blk_config()) as (fe, fake):
        fds = fe.interrupt_fds()
        assert fake.channel is not None
        fake.channel.close()
        fake.channel = None
        assert fe.poll_interrupts(0.05) == set()
        assert fe.poll_interrupts(0) == set()  # the retired channel is quiet
        assert fe.interrupt_fds() == fds  # same fd numbers for event loops
        assert fe.read_config(0, 8) == blk_config()[:8]


def test_backend_channel_garbage_retires_channel(no_fd_leak: None) -> None:
    with session() as (fe, fake):
        assert fake.channel is not None
        fake.channel.sendall(b"\xff" * 12)
        time.sleep(0.05)
        assert fe.poll_interrupts(0) == set()
        assert fe.get_status() == 0


# ---------------------------------------------------------------------------
# malformed replies: ProtocolError, no hang, no leak
# ---------------------------------------------------------------------------


def _wrong_code(msg: Message) -> Action:
    return encode_reply(F.GET_PROTOCOL_FEATURES, 0)


def _bad_size(msg: Message) -> Action:
    return _raw(msg.request, 0x5, b"\0" * 4)


def _bad_flags(msg: Message) -> Action:
    return _raw(msg.request, 0x1, b"\0" * 8)  # REPLY bit missing


def _bad_version(msg: Message) -> Action:
    return _raw(msg.request, 0x6, b"\0" * 8)


def _huge(msg: Message) -> Action:
    return _raw(msg.request, 0x5, b"", size=1 << 20)


def _truncated(msg: Message) -> Action:
    return _raw(msg.request, 0x5, b"\0" * 4, size=8)  # then silence


def _with_fd(msg: Message) -> Action:
    fd = os.eventfd(0)
    # sendmsg dups it into the message; close ours after sending via a finalizer
    return (encode_reply(msg.request, 1 << 32), [fd])


def _silent(msg: Message) -> Action:
    return SILENT


def _hangup(msg: Message) -> Action:
    return CLOSE


MALFORMED = {
    "reply_names_another_request": _wrong_code,
    "reply_body_size_wrong": _bad_size,
    "reply_flags_without_reply_bit": _bad_flags,
    "reply_version_not_1": _bad_version,
    "reply_announces_oversize_payload": _huge,
    "reply_truncated_then_silent": _truncated,
    "reply_carries_unexpected_descriptor": _with_fd,
    "no_reply_within_timeout": _silent,
    "backend_hangs_up": _hangup,
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_front_end_closes_connection_on_wrong_reply(name: str, no_fd_leak: None) -> None:
    """vhost-user.rst "Communication": "If front-end ... receives a wrong reply it will
    close the connection"."""
    sent: list[int] = []
    action = MALFORMED[name]

    def script(msg: Message) -> Action:
        out = action(msg)
        if isinstance(out, tuple):
            sent.extend(out[1])
        return out

    fake = FakeBackend(script={F.GET_FEATURES: script})
    sock = fake.pair()
    t0 = time.monotonic()
    with pytest.raises(ProtocolError):
        VhostUserFrontend(sock, reply_timeout=TIMEOUT)
    assert time.monotonic() - t0 < TIMEOUT + 3
    fake.join()
    for fd in sent:
        os.close(fd)


def test_get_queue_num_zero_is_refused(no_fd_leak: None) -> None:
    with pytest.raises(ProtocolError, match="GET_QUEUE_NUM"), session(queue_num=0):
        pass


def test_nonzero_reply_ack_raises_but_keeps_connection(no_fd_leak: None) -> None:
    script = {F.SET_CONFIG: lambda m: encode_ack(F.SET_CONFIG, 1)}
    with session(config=blk_config(), script=script) as (fe, _):
        with pytest.raises(ProtocolError, match="refused"):
            fe.write_config(20, b"\1")
        assert fe.read_config(0, 8) == blk_config()[:8]


def test_reply_ack_with_wrong_body_kills_connection(no_fd_leak: None) -> None:
    script = {F.SET_CONFIG: lambda m: _raw(F.SET_CONFIG, 0x5, b"")}
    with session(config=blk_config(), script=script) as (fe, _):
        with pytest.raises(ProtocolError):
            fe.write_config(20, b"\1")
        with pytest.raises(ProtocolError):
            fe.read_config(0, 8)


def test_get_vring_base_reply_must_name_the_ring(no_fd_leak: None) -> None:
    script = {F.GET_VRING_BASE: lambda m: encode_reply(F.GET_VRING_BASE, VhostVringState(3, 0))}
    with session(fe_kw={"device_id": DeviceId.ENTROPY}, queue_num=4, script=script) as (fe, _):
        drv = RngDriver(fe, ring=RingOptions(packed=False))
        drv.initialize()
        with pytest.raises(ProtocolError, match="names ring 3"):
            drv.close()


def test_get_status_wider_than_8_bits_is_refused(no_fd_leak: None) -> None:
    protocol = ALL_PROTOCOL | PF.STATUS.mask
    with session(protocol=protocol, status=0x1FF) as (fe, _), pytest.raises(ProtocolError):
        fe.get_status()


def test_hangup_while_idle_is_reported_by_poll_interrupts(no_fd_leak: None) -> None:
    with session(fe_kw={"device_id": DeviceId.ENTROPY}, protocol=ALL_PROTOCOL | PF.STATUS.mask) as (
        fe,
        fake,
    ):
        drv = RngDriver(fe, ring=RingOptions(packed=False))
        drv.initialize()
        assert fake.sock is not None
        fake.sock.shutdown(socket.SHUT_RDWR)
        with pytest.raises(ProtocolError, match="closed"):
            for _ in range(50):
                fe.poll_interrupts(0.1)
        with pytest.raises(ProtocolError):
            fe.get_status()
        with pytest.raises(ProtocolError):
            drv.close()  # cannot reset a dead connection, but frees the rings


def test_unsolicited_message_on_main_socket_is_fatal(no_fd_leak: None) -> None:
    with session() as (fe, fake):
        assert fake.sock is not None
        fake.sock.sendall(encode_reply(F.GET_FEATURES, 1))
        with pytest.raises(ProtocolError, match="nobody asked"):
            fe.poll_interrupts(1.0)


def test_connect_gives_up_after_timeout(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(ConfigurationError, match="cannot connect"):
        VhostUserFrontend(tmp_path / "missing.sock", connect_timeout=0.2)
    assert time.monotonic() - t0 < 3


def test_closed_transport_refuses_use(no_fd_leak: None) -> None:
    with session() as (fe, _):
        pass
    with pytest.raises(ConfigurationError, match="closed"):
        fe.get_status()
    fe.close()  # idempotent


# ---------------------------------------------------------------------------
# device type guess and probe
# ---------------------------------------------------------------------------


def test_guess_device_id() -> None:
    blk_feats = BASE_FEATURES | 1 << BlkFeature.SEG_MAX | 1 << BlkFeature.FLUSH
    assert guess_device_id(blk_feats, blk_config()[:24], 1) == DeviceId.BLOCK
    assert guess_device_id(BASE_FEATURES, None, None) == DeviceId.ENTROPY
    assert guess_device_id(BASE_FEATURES, None, 1) == DeviceId.ENTROPY
    # a config that reads as zeros (past the end of an empty config) is no config
    assert guess_device_id(BASE_FEATURES, bytes(24), 1) == DeviceId.ENTROPY
    assert guess_device_id(BASE_FEATURES, bytes(8) + b"\1" + bytes(15), 1) == 0
    # a zero-capacity config or extra queues is not an entropy device
    assert guess_device_id(BASE_FEATURES, None, 4) == 0
    assert guess_device_id(blk_feats, bytes(24), 1) == 0
    # bits beyond the block device's (e.g. net's CTRL_VQ 17 + GUEST_ANNOUNCE 21)
    assert guess_device_id(BASE_FEATURES | 1 << 21, blk_config()[:24], 1) == 0


def test_supported_protocol_features_exclude_unimplemented() -> None:
    for f in (PF.INBAND_NOTIFICATIONS, PF.CONFIGURE_MEM_SLOTS, PF.LOG_SHMFD):
        assert not SUPPORTED_PROTOCOL_FEATURES & f.mask
    # INFLIGHT_SHMFD is implemented, and asked for only with inflight=True
    assert SUPPORTED_PROTOCOL_FEATURES & PF.INFLIGHT_SHMFD.mask


def _run_probe(path: Path, *argv: str) -> tuple[int, str]:
    from pyvirtio.cli.main import build_parser

    args = build_parser().parse_args(["probe", "--socket", str(path), "--timeout", "2", *argv])
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = args.func(args)
    return rc, buf.getvalue()


def test_probe_prints_block_features_and_config(tmp_path: Path, no_fd_leak: None) -> None:
    path = tmp_path / "blk.sock"
    feats = BASE_FEATURES | 1 << BlkFeature.SEG_MAX | 1 << BlkFeature.FLUSH
    fake = FakeBackend(features=feats, config=blk_config(capacity=4096))
    fake.listen(str(path))
    rc, out = _run_probe(path)
    fake.join()
    assert rc == 0
    assert "device type: 2 (block)" in out
    for name in (
        "VIRTIO_BLK_F_SEG_MAX",
        "VIRTIO_BLK_F_FLUSH",
        "VIRTIO_F_VERSION_1",
        "VIRTIO_F_INDIRECT_DESC",
        "VHOST_USER_F_PROTOCOL_FEATURES",
        "VHOST_F_LOG_ALL",
        "VHOST_USER_PROTOCOL_F_CONFIG",
        "VHOST_USER_PROTOCOL_F_MQ",
    ):
        assert name in out
    assert "capacity" in out and "4096" in out and "seg_max" in out
    assert "queues: 1 (GET_QUEUE_NUM)" in out


def test_probe_json_for_entropy_device(tmp_path: Path, no_fd_leak: None) -> None:
    import json

    path = tmp_path / "rng.sock"
    fake = FakeBackend(protocol=PF.MQ.mask | PF.REPLY_ACK.mask)
    fake.listen(str(path))
    rc, out = _run_probe(path, "--json")
    fake.join()
    assert rc == 0
    info = json.loads(out)
    assert info["device_type"]["name"] == "entropy"
    assert info["config"]["fields"] is None
    assert "VIRTIO_F_VERSION_1" in info["features"]["virtio"]
    assert info["protocol_features"]["names"] == [
        "VHOST_USER_PROTOCOL_F_MQ",
        "VHOST_USER_PROTOCOL_F_REPLY_ACK",
    ]


def test_probe_reports_protocol_error(tmp_path: Path, no_fd_leak: None) -> None:
    path = tmp_path / "bad.sock"
    fake = FakeBackend(script={F.GET_FEATURES: _bad_size})
    fake.listen(str(path))
    from pyvirtio.cli.main import build_parser

    args = build_parser().parse_args(["probe", "--socket", str(path), "--timeout", "1"])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = args.func(args)
    fake.join()
    assert rc == 1
    assert "broke the vhost-user protocol" in err.getvalue()


def test_decode_config_keeps_only_complete_fields() -> None:
    fields = probe_cli.decode_config(VIRTIO_BLK_CONFIG, blk_config(capacity=9)[:12])
    assert fields == {"capacity": 9, "size_max": 0}
