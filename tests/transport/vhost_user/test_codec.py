"""vhost-user codec: layouts, round trips, malformed input, descriptor ownership, ring states.

The protocol is QEMU's docs/interop/vhost-user.rst; negative tests are named after the
rule they check.
"""

from __future__ import annotations

import array
import ctypes
import errno
import itertools
import os
import socket
import struct
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtio.errors import ProtocolError
from pyvirtio.spec.layout import WireStruct
from pyvirtio.transport.vhost_user import spec
from pyvirtio.transport.vhost_user.codec import (
    Body,
    Channel,
    Decoder,
    KickMode,
    Message,
    MessageRejected,
    RingTracker,
    check_memory_regions,
    encode,
    encode_ack,
    encode_reply,
    error_reply,
)
from pyvirtio.transport.vhost_user.spec import (
    VHOST_USER_VRING_NOFD_MASK,
    BackendRequest,
    FrontendRequest,
    ProtocolFeature,
    VhostIotlbMsg,
    VhostUserConfig,
    VhostUserInflight,
    VhostUserLog,
    VhostUserMemory,
    VhostUserMemoryRegion,
    VhostUserMMap,
    VhostUserShared,
    VhostUserTransferDeviceState,
    VhostUserU64,
    VhostUserVringArea,
    VhostVringAddr,
    VhostVringState,
)

F = FrontendRequest
B = BackendRequest
NOFD = VHOST_USER_VRING_NOFD_MASK
VERSION = 0x1
REPLY = 0x4
NEED_REPLY = 0x8

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def new_fds(n: int) -> list[int]:
    return [os.eventfd(0) for _ in range(n)]


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


def assert_closed(fds: list[int]) -> None:
    for fd in fds:
        assert not is_open(fd), f"fd {fd} leaked"


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    before = open_fd_count()
    yield
    assert open_fd_count() == before


def header(request: int, flags: int, size: int) -> bytes:
    return struct.pack("<III", request, flags, size)


def raw(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    return header(request, flags, len(payload)) + payload


def region(
    gpa: int, size: int = 0x1000_0000, uaddr: int | None = None, off: int = 0
) -> VhostUserMemoryRegion:
    return VhostUserMemoryRegion(gpa, size, 0x7F00_0000_0000 + gpa if uaddr is None else uaddr, off)


def memory_payload(regions: list[tuple[int, int, int, int]], nregions: int | None = None) -> bytes:
    n = len(regions) if nregions is None else nregions
    return struct.pack("<II", n, 0) + b"".join(struct.pack("<QQQQ", *r) for r in regions)


def decode_one(
    data: bytes, fds: list[int] | None = None, *, num_queues: int | None = 4, **kw: object
) -> Message:
    dec = Decoder(num_queues=num_queues, **kw)  # type: ignore[arg-type]
    dec.feed(data, fds or [])
    msg = dec.next_message()
    assert msg is not None
    assert dec.next_message() is None
    return msg


def expect_rejected(
    data: bytes, nfds: int = 0, *, num_queues: int | None = 4, **kw: object
) -> MessageRejected:
    """The message is refused, its fds closed, and the decoder keeps working."""
    fds = new_fds(nfds)
    dec = Decoder(num_queues=num_queues, **kw)  # type: ignore[arg-type]
    dec.feed(data, fds)
    with pytest.raises(MessageRejected) as info:
        dec.next_message()
    assert_closed(fds)
    assert not dec.closed
    assert dec.pending_fds == 0
    # still in sync: a good message decodes next
    backend = kw.get("channel") is Channel.BACKEND
    if kw.get("replies"):
        dec.feed(encode_ack(B.CONFIG_CHANGE_MSG if backend else F.GET_FEATURES))
    else:
        dec.feed(raw(B.CONFIG_CHANGE_MSG if backend else F.GET_FEATURES))
    msg = dec.next_message()
    assert msg is not None
    return info.value


def expect_fatal(data: bytes, nfds: int = 0, **kw: object) -> ProtocolError:
    """The stream is abandoned: ProtocolError (not MessageRejected), every fd closed."""
    fds = new_fds(nfds)
    dec = Decoder(num_queues=4, **kw)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError) as info:
        dec.feed(data, fds)
        dec.next_message()
    assert not isinstance(info.value, MessageRejected)
    assert_closed(fds)
    assert dec.closed
    # a closed decoder refuses input and closes what it is given
    late = new_fds(1)
    with pytest.raises(ProtocolError):
        dec.feed(raw(F.GET_FEATURES), late)
    assert_closed(late)
    with pytest.raises(ProtocolError):
        dec.next_message()
    return info.value


# ---------------------------------------------------------------------------
# layouts against the document's C structs
# ---------------------------------------------------------------------------

LAYOUT_SIZES = [
    (spec.VHOST_USER_HEADER, 12),
    (spec.VHOST_USER_U64, 8),
    (spec.VHOST_VRING_STATE, 8),
    (spec.VHOST_VRING_ADDR, 40),
    (spec.VHOST_USER_MEMORY_REGION, 32),
    (spec.VHOST_USER_MEMORY_HEADER, 8),
    (spec.VHOST_USER_MEM_REG_MSG, 40),
    (spec.VHOST_USER_LOG, 16),
    (spec.VHOST_IOTLB_MSG, 32),
    (spec.VHOST_USER_CONFIG_HEADER, 12),
    (spec.VHOST_USER_VRING_AREA, 24),
    (spec.VHOST_USER_INFLIGHT, 24),
    (spec.VHOST_USER_SHARED, 16),
    (spec.VHOST_USER_TRANSFER_DEVICE_STATE, 8),
    (spec.VHOST_USER_MMAP, 40),
    (spec.DESC_STATE_SPLIT, 16),
    (spec.QUEUE_REGION_SPLIT, 16),
    (spec.DESC_STATE_PACKED, 32),
    (spec.QUEUE_REGION_PACKED, 32),
]


@pytest.mark.parametrize(("layout", "size"), LAYOUT_SIZES, ids=lambda v: getattr(v, "__name__", ""))
def test_layout_sizes_match_the_document(layout: WireStruct[object], size: int) -> None:
    assert layout.size == size


class _CIotlb(ctypes.Structure):
    _fields_ = [
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("uaddr", ctypes.c_uint64),
        ("perm", ctypes.c_uint8),
        ("type", ctypes.c_uint8),
    ]


class _CInflight(ctypes.Structure):
    _fields_ = [
        ("mmap_size", ctypes.c_uint64),
        ("mmap_offset", ctypes.c_uint64),
        ("num_queues", ctypes.c_uint16),
        ("queue_size", ctypes.c_uint16),
    ]


class _CQueueRegionPacked(ctypes.Structure):
    _fields_ = [
        ("features", ctypes.c_uint64),
        ("version", ctypes.c_uint16),
        ("desc_num", ctypes.c_uint16),
        ("free_head", ctypes.c_uint16),
        ("old_free_head", ctypes.c_uint16),
        ("used_idx", ctypes.c_uint16),
        ("old_used_idx", ctypes.c_uint16),
        ("used_wrap_counter", ctypes.c_uint8),
        ("old_used_wrap_counter", ctypes.c_uint8),
        ("padding", ctypes.c_uint8 * 7),
    ]


class _CDescStatePacked(ctypes.Structure):
    _fields_ = [
        ("inflight", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
        ("next", ctypes.c_uint16),
        ("last", ctypes.c_uint16),
        ("num", ctypes.c_uint16),
        ("counter", ctypes.c_uint64),
        ("id", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("len", ctypes.c_uint32),
        ("addr", ctypes.c_uint64),
    ]


@pytest.mark.parametrize(
    ("layout", "cstruct", "fields"),
    [
        (spec.VHOST_IOTLB_MSG, _CIotlb, ["iova", "size", "uaddr", "perm", "type"]),
        (spec.VHOST_USER_INFLIGHT, _CInflight, ["mmap_offset", "num_queues", "queue_size"]),
        (
            spec.QUEUE_REGION_PACKED,
            _CQueueRegionPacked,
            ["used_idx", "old_used_idx", "used_wrap_counter", "old_used_wrap_counter"],
        ),
        (spec.DESC_STATE_PACKED, _CDescStatePacked, ["next", "counter", "id", "len", "addr"]),
    ],
)
def test_layouts_with_c_padding_match_the_c_compiler(
    layout: WireStruct[object], cstruct: type[ctypes.Structure], fields: list[str]
) -> None:
    # C tail padding (struct vhost_iotlb_msg, VhostUserInflight) and the 8-aligned
    # flexible array of QueueRegionPacked: sizes as a C compiler lays them out
    assert layout.size == ctypes.sizeof(cstruct)
    for name in fields:
        assert layout.offset_of(name) == getattr(cstruct, name).offset


def test_single_region_message_has_eight_bytes_of_padding_first() -> None:
    assert spec.VHOST_USER_MEM_REG_MSG.offset_of("guest_phys_addr") == 8
    assert spec.VHOST_USER_MEM_REG_MSG.offset_of("mmap_offset") == 32


def test_wire_image_of_set_vring_num_and_set_mem_table() -> None:
    assert encode(F.SET_VRING_NUM, VhostVringState(1, 256)) == header(8, 1, 8) + struct.pack(
        "<II", 1, 256
    )
    r = region(0x1000, 0x2000, 0x7F00_0000_1000, 0x40)
    fds = new_fds(1)
    data = encode(F.SET_MEM_TABLE, VhostUserMemory((r,)), need_reply=True, fds=fds)
    os.close(fds[0])
    assert data == header(5, VERSION | NEED_REPLY, 40) + memory_payload([tuple(r)])  # type: ignore[list-item]


def test_shared_object_uuid_is_big_endian_bytes() -> None:
    u = uuid.UUID("12345678-9abc-def0-1122-334455667788")
    body = VhostUserShared.from_uuid(u)
    assert spec.VHOST_USER_SHARED.pack(body) == u.bytes
    assert spec.VHOST_USER_SHARED.unpack(u.bytes).uuid == u


def test_request_codes_and_feature_bits_follow_the_document() -> None:
    codes = {r.spec_name: int(r) for r in [*F, *B]}
    assert codes["VHOST_USER_GET_FEATURES"] == 1
    assert codes["VHOST_USER_SET_MEM_TABLE"] == 5
    assert codes["VHOST_USER_GET_VRING_BASE"] == 11
    assert codes["VHOST_USER_SET_BACKEND_REQ_FD"] == 21
    assert F.__members__["SET_SLAVE_REQ_FD"] is F.SET_BACKEND_REQ_FD  # previous name
    assert codes["VHOST_USER_VRING_KICK"] == 35
    assert codes["VHOST_USER_CHECK_DEVICE_STATE"] == 43
    assert codes["VHOST_USER_BACKEND_VRING_HOST_NOTIFIER_MSG"] == 3
    assert codes["VHOST_USER_BACKEND_SHARED_OBJECT_LOOKUP"] == 8
    bits = {f.spec_name: int(f) for f in ProtocolFeature}
    assert bits["VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS"] == 15
    assert ProtocolFeature.DEVICE_STATE.mask == 1 << 19
    assert spec.VHOST_USER_F_PROTOCOL_FEATURES == 30
    flags = [int(f) for f in (spec.HeaderFlags.VERSION_1, spec.HeaderFlags.REPLY)]
    assert flags == [1, 4] and int(spec.HeaderFlags.NEED_REPLY) == 8


# ---------------------------------------------------------------------------
# round trips of every message
# ---------------------------------------------------------------------------

R1 = region(0, 0x8000_0000, 0x7F00_0000_0000, 0)
R2 = region(0x1_0000_0000, 0x4000_0000, 0x7F80_0000_0000, 0x8000_0000)

FRONTEND_SAMPLES: dict[FrontendRequest, tuple[Body, int]] = {
    F.GET_FEATURES: (None, 0),
    F.SET_FEATURES: (VhostUserU64(1 << 30 | 1 << 32), 0),
    F.SET_OWNER: (None, 0),
    F.RESET_OWNER: (None, 0),
    F.SET_MEM_TABLE: (VhostUserMemory((R1, R2)), 2),
    F.SET_LOG_BASE: (VhostUserLog(0x4000, 0), 1),
    F.SET_LOG_FD: (None, 1),
    F.SET_VRING_NUM: (VhostVringState(1, 256), 0),
    F.SET_VRING_ADDR: (
        VhostVringAddr(1, 1, 0x7F00_0000_1000, 0x7F00_0000_3000, 0x7F00_0000_2000, 0x3000),
        0,
    ),
    F.SET_VRING_BASE: (VhostVringState(1, 0x8005_8003), 0),
    F.GET_VRING_BASE: (VhostVringState(1, 0), 0),
    F.SET_VRING_KICK: (VhostUserU64(1), 1),
    F.SET_VRING_CALL: (VhostUserU64(1 | NOFD), 0),
    F.SET_VRING_ERR: (VhostUserU64(3), 1),
    F.GET_PROTOCOL_FEATURES: (None, 0),
    F.SET_PROTOCOL_FEATURES: (
        VhostUserU64(ProtocolFeature.MQ.mask | ProtocolFeature.REPLY_ACK.mask),
        0,
    ),
    F.GET_QUEUE_NUM: (None, 0),
    F.SET_VRING_ENABLE: (VhostVringState(0, 1), 0),
    F.SEND_RARP: (VhostUserU64(int.from_bytes(b"\x52\x54\x00\x12\x34\x56", "little")), 0),
    F.NET_SET_MTU: (VhostUserU64(1500), 0),
    F.SET_BACKEND_REQ_FD: (None, 1),
    F.IOTLB_MSG: (VhostIotlbMsg(0x1000, 0x2000, 0x7F00_0000_1000, 3, 2), 0),
    F.SET_VRING_ENDIAN: (VhostVringState(2, 1), 0),
    F.GET_CONFIG: (VhostUserConfig(0, 60, 0, bytes(60)), 0),
    F.SET_CONFIG: (VhostUserConfig(20, 4, 0, b"\x01\x02\x03\x04"), 0),
    F.CREATE_CRYPTO_SESSION: (bytes(range(100)), 0),
    F.CLOSE_CRYPTO_SESSION: (VhostUserU64(7), 0),
    F.POSTCOPY_ADVISE: (None, 0),
    F.POSTCOPY_LISTEN: (None, 0),
    F.POSTCOPY_END: (None, 0),
    F.GET_INFLIGHT_FD: (VhostUserInflight(0, 0, 2, 128), 0),
    F.SET_INFLIGHT_FD: (VhostUserInflight(0x2000, 0, 2, 128), 1),
    F.GPU_SET_SOCKET: (None, 1),
    F.RESET_DEVICE: (None, 0),
    F.VRING_KICK: (VhostVringState(3, 0), 0),
    F.GET_MAX_MEM_SLOTS: (None, 0),
    F.ADD_MEM_REG: (R2, 1),
    F.REM_MEM_REG: (R2, 0),
    F.SET_STATUS: (VhostUserU64(0x0F), 0),
    F.GET_STATUS: (None, 0),
    F.GET_SHARED_OBJECT: (VhostUserShared.from_uuid(uuid.UUID(int=0x1234)), 0),
    F.SET_DEVICE_STATE_FD: (VhostUserTransferDeviceState(1, 0), 1),
    F.CHECK_DEVICE_STATE: (None, 0),
    F.GET_SHMEM_CONFIG: (None, 0),
}

BACKEND_SAMPLES: dict[BackendRequest, tuple[Body, int]] = {
    B.IOTLB_MSG: (VhostIotlbMsg(0x5000, 0, 0, 1, 1), 0),
    B.CONFIG_CHANGE_MSG: (None, 0),
    B.VRING_HOST_NOTIFIER_MSG: (VhostUserVringArea(2, 4096, 0), 1),
    B.VRING_CALL: (VhostVringState(1, 0), 0),
    B.VRING_ERR: (VhostVringState(0, 0), 0),
    B.SHARED_OBJECT_ADD: (VhostUserShared.from_uuid(uuid.UUID(int=1)), 0),
    B.SHARED_OBJECT_REMOVE: (VhostUserShared.from_uuid(uuid.UUID(int=2)), 0),
    B.SHARED_OBJECT_LOOKUP: (VhostUserShared.from_uuid(uuid.UUID(int=3)), 0),
    B.SHMEM_MAP: (VhostUserMMap(1, 0, 0x1000, 0x2000, 1), 1),
    B.SHMEM_UNMAP: (VhostUserMMap(1, 0, 0x1000, 0x2000, 0), 0),
}


def test_every_request_has_a_sample() -> None:
    assert set(FRONTEND_SAMPLES) == set(F) - {F.NONE}
    assert set(BACKEND_SAMPLES) == set(B) - {B.NONE}


@pytest.mark.parametrize("need_reply", [False, True])
@pytest.mark.parametrize("request_", list(FRONTEND_SAMPLES), ids=lambda r: r.name)
def test_frontend_request_round_trip(request_: FrontendRequest, need_reply: bool) -> None:
    body, nfds = FRONTEND_SAMPLES[request_]
    fds = new_fds(nfds)
    data = encode(request_, body, need_reply=need_reply, fds=fds)
    with decode_one(data, fds) as msg:
        assert msg.request is request_
        assert msg.body == body
        assert msg.need_reply is need_reply
        assert not msg.is_reply
        assert msg.fds == fds
        assert all(is_open(fd) for fd in fds)
        if need_reply:
            assert msg.expects_reply
    assert_closed(fds)


@pytest.mark.parametrize("request_", list(BACKEND_SAMPLES), ids=lambda r: r.name)
def test_backend_request_round_trip(request_: BackendRequest) -> None:
    body, nfds = BACKEND_SAMPLES[request_]
    fds = new_fds(nfds)
    data = encode(request_, body, need_reply=True, fds=fds)
    msg = decode_one(data, fds, channel=Channel.BACKEND)
    assert (msg.request, msg.body, msg.need_reply) == (request_, body, True)
    taken = msg.take_fds()
    assert taken == fds and msg.fds == []
    msg.close()  # owns nothing any more
    assert all(is_open(fd) for fd in taken)
    for fd in taken:
        os.close(fd)


REPLY_SAMPLES: list[tuple[FrontendRequest | BackendRequest, Body, int]] = [
    (F.GET_FEATURES, VhostUserU64(1 << 30 | 1 << 32), 0),
    (F.GET_PROTOCOL_FEATURES, VhostUserU64(0x1FFFF), 0),
    (F.GET_VRING_BASE, VhostVringState(0, 42), 0),
    (F.GET_QUEUE_NUM, VhostUserU64(4), 0),
    (F.GET_CONFIG, VhostUserConfig(0, 8, 0, b"abcdefgh"), 0),
    (F.GET_CONFIG, None, 0),
    (F.GET_INFLIGHT_FD, VhostUserInflight(0x3000, 0, 2, 128), 1),
    (F.GET_INFLIGHT_FD, VhostUserInflight(0, 0, 2, 128), 0),
    (F.SET_DEVICE_STATE_FD, VhostUserU64(0), 1),
    (F.SET_DEVICE_STATE_FD, VhostUserU64(NOFD), 0),
    (F.SET_MEM_TABLE, VhostUserU64(0), 0),
    (F.SET_MEM_TABLE, VhostUserMemory((R1,)), 0),
    (F.ADD_MEM_REG, R1, 0),
    (F.POSTCOPY_ADVISE, None, 1),
    (F.GET_SHARED_OBJECT, VhostUserU64(0), 1),
    (F.SET_VRING_ENABLE, VhostUserU64(0), 0),
    (F.SET_LOG_BASE, VhostUserU64(0), 0),
    (B.CONFIG_CHANGE_MSG, VhostUserU64(0), 0),
    (B.SHARED_OBJECT_LOOKUP, VhostUserU64(0), 1),
    (B.SHARED_OBJECT_LOOKUP, VhostUserU64(1), 0),
]


@pytest.mark.parametrize(
    ("request_", "body", "nfds"), REPLY_SAMPLES, ids=lambda v: getattr(v, "name", None)
)
def test_reply_round_trip(
    request_: FrontendRequest | BackendRequest, body: Body, nfds: int
) -> None:
    fds = new_fds(nfds)
    data = encode_reply(request_, body, fds=fds)
    # every reply carries exactly version 1 + REPLY (QEMU refuses any other flags)
    assert struct.unpack_from("<I", data, 4)[0] == VERSION | REPLY
    channel = Channel.MAIN if isinstance(request_, FrontendRequest) else Channel.BACKEND
    with decode_one(data, fds, channel=channel, replies=True) as msg:
        assert (msg.request, msg.body, msg.fds) == (request_, body, fds)
        assert msg.is_reply and not msg.expects_reply
    assert_closed(fds)


def test_encode_ack_and_error_reply() -> None:
    assert encode_ack(F.SET_MEM_TABLE) == raw(5, struct.pack("<Q", 0), VERSION | REPLY)
    assert encode_ack(F.SET_MEM_TABLE, 1) == raw(5, struct.pack("<Q", 1), VERSION | REPLY)
    assert error_reply(F.GET_CONFIG) == raw(24, b"", VERSION | REPLY)
    state_reply = error_reply(F.SET_DEVICE_STATE_FD)
    assert state_reply is not None
    state_err = struct.unpack_from("<Q", state_reply, 12)[0]
    assert state_err & 0xFF and state_err & NOFD


def test_encoder_refuses_bodies_and_fd_counts_the_protocol_does_not_allow() -> None:
    with pytest.raises(TypeError):
        encode(F.SET_VRING_NUM, VhostUserU64(1))
    with pytest.raises(ValueError, match="descriptors"):
        encode(F.SET_VRING_KICK, 0)  # needs an fd unless the no-fd bit is set
    with pytest.raises(ValueError, match="descriptors"):
        encode(F.SET_VRING_KICK, NOFD, fds=[0])
    with pytest.raises(ValueError):
        encode(F.SET_MEM_TABLE, VhostUserMemory(()))
    with pytest.raises(ValueError):
        encode(F.SET_CONFIG, VhostUserConfig(0, 4, 0, b"abc"))
    with pytest.raises(TypeError):
        encode_reply(F.GET_VRING_BASE, VhostUserLog(0, 0))
    assert encode(F.NET_SET_MTU, 1500) == encode(F.NET_SET_MTU, VhostUserU64(1500))


# ---------------------------------------------------------------------------
# partial feeds and descriptor attribution
# ---------------------------------------------------------------------------


def test_header_split_across_feeds_with_fds_in_the_first_chunk() -> None:
    fds = new_fds(1)
    data = encode(F.SET_VRING_KICK, 2, fds=fds)
    dec = Decoder(num_queues=4)
    dec.feed(data[:5], fds)
    assert dec.next_message() is None
    dec.feed(data[5:11])
    assert dec.next_message() is None
    dec.feed(data[11:])
    with dec.next_message() as msg:  # type: ignore[union-attr]
        assert msg.body == VhostUserU64(2) and msg.fds == fds
        assert msg.vring_index == 2
    assert dec.at_boundary


def test_byte_by_byte_memory_table() -> None:
    fds = new_fds(2)
    data = encode(F.SET_MEM_TABLE, VhostUserMemory((R1, R2)), fds=fds)
    dec = Decoder()
    got: list[Message] = []
    for i in range(len(data)):
        dec.feed(data[i : i + 1], fds if i == 0 else ())
        got.extend(dec)
    assert len(got) == 1 and got[0].fds == fds and got[0].body == VhostUserMemory((R1, R2))
    got[0].close()


def test_fds_belong_to_the_last_message_starting_in_their_chunk() -> None:
    # Linux may glue fd-less segments before the segment that carries descriptors into
    # one read, but never reads past that segment.
    fds = new_fds(1)
    data = encode(F.SET_VRING_NUM, VhostVringState(0, 8)) + encode(F.SET_VRING_KICK, 0, fds=fds)
    dec = Decoder(num_queues=1)
    dec.feed(data, fds)
    first, second = list(dec)
    assert first.fds == [] and second.fds == fds
    second.close()


def _recv_all(sock: socket.socket, dec: Decoder, count: int) -> list[Message]:
    out: list[Message] = []
    while len(out) < count:
        data, anc, flags, _ = sock.recvmsg(4096, socket.CMSG_SPACE(8 * 4))
        assert not flags & socket.MSG_CTRUNC
        fds: list[int] = []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
        assert data
        dec.feed(data, fds)
        out.extend(dec)
    return out


@pytest.mark.parametrize("pattern", ["-F", "F-", "FF", "-F-F", "F--F"])
def test_fd_attribution_through_a_real_unix_socket(pattern: str) -> None:
    """Messages sent back to back ('F' with an eventfd, '-' without) are decoded with their
    own descriptors however the kernel splits the reads."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        for i, kind in enumerate(pattern):
            if kind == "F":
                (fd,) = new_fds(1)
                data = encode(F.SET_VRING_CALL, i, fds=[fd])
                a.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
                os.close(fd)
            else:
                a.sendmsg([encode(F.SET_VRING_NUM, VhostVringState(i, 64))])
        msgs = _recv_all(b, Decoder(num_queues=8), len(pattern))
        for i, (kind, msg) in enumerate(zip(pattern, msgs, strict=True)):
            assert msg.vring_index == i
            assert len(msg.fds) == (kind == "F")
            msg.close()


@st.composite
def _streams(draw: st.DrawFn) -> tuple[list[tuple[FrontendRequest, Body, int]], list[int]]:
    requests = draw(st.lists(st.sampled_from(sorted(FRONTEND_SAMPLES)), min_size=1, max_size=6))
    msgs = [(r, *FRONTEND_SAMPLES[r]) for r in requests]
    total = sum(len(encode(r, b, fds=[0] * n)) for r, b, n in msgs)
    cuts = draw(st.lists(st.integers(1, total - 1), max_size=8)) if total > 1 else []
    return msgs, cuts


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_streams())
def test_any_kernel_like_chunking_decodes_the_same_messages(
    stream: tuple[list[tuple[FrontendRequest, Body, int]], list[int]],
) -> None:
    msgs, cuts = stream
    before = open_fd_count()
    sent_fds: list[list[int]] = []
    data = b""
    starts: list[int] = []
    for request_, body, nfds in msgs:
        fds = new_fds(nfds)
        sent_fds.append(fds)
        starts.append(len(data))
        data += encode(request_, body, fds=fds)
    # as the kernel does: a read ends right after the segment carrying descriptors,
    # and that segment begins with its message's first byte
    boundaries = set(cuts)
    for i, fds in enumerate(sent_fds):
        if fds and i + 1 < len(starts):
            boundaries.add(starts[i + 1])
    edges = [0, *sorted(boundaries), len(data)]
    dec = Decoder(num_queues=4)
    got: list[Message] = []
    for lo, hi in itertools.pairwise(edges):
        chunk_fds = [
            fd for s, fds in zip(starts, sent_fds, strict=True) if lo <= s < hi for fd in fds
        ]
        dec.feed(data[lo:hi], chunk_fds)
        got.extend(dec)
    assert [(m.request, m.body) for m in got] == [(r, b) for r, b, _ in msgs]
    assert [m.fds for m in got] == sent_fds
    assert dec.at_boundary
    for m in got:
        m.close()
    assert open_fd_count() == before


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 3), st.booleans())
def test_garbage_never_crashes_and_never_leaks(data: bytes, nfds: int, replies: bool) -> None:
    before = open_fd_count()
    dec = Decoder(num_queues=2, replies=replies)
    try:
        dec.feed(data, new_fds(nfds))
        while True:
            try:
                msg = dec.next_message()
            except MessageRejected:
                continue
            if msg is None:
                break
            msg.close()
    except ProtocolError:
        assert dec.closed
    dec.close()
    assert open_fd_count() == before


# ---------------------------------------------------------------------------
# fatal errors: the connection must be closed
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3])
def test_header_version_must_be_1(flags: int) -> None:
    expect_fatal(raw(F.GET_FEATURES, flags=flags), nfds=1)


def test_unknown_header_flag_bits_are_fatal() -> None:
    expect_fatal(raw(F.GET_FEATURES, flags=VERSION | 0x10))


def test_request_must_not_carry_the_reply_flag() -> None:
    expect_fatal(raw(F.GET_FEATURES, flags=VERSION | REPLY))


def test_reply_flags_must_be_exactly_version_and_reply() -> None:
    expect_fatal(raw(F.GET_FEATURES, struct.pack("<Q", 1), VERSION), replies=True)
    expect_fatal(
        raw(F.GET_FEATURES, struct.pack("<Q", 1), VERSION | REPLY | NEED_REPLY), replies=True
    )


@pytest.mark.parametrize("code", [0, 99, 0xFFFF_FFFF])
def test_unknown_request_is_fatal(code: int) -> None:
    expect_fatal(raw(code), nfds=2)


def test_unknown_backend_request_is_fatal() -> None:
    expect_fatal(raw(11), channel=Channel.BACKEND)


@pytest.mark.parametrize(
    ("request_", "size"),
    [
        (F.CREATE_CRYPTO_SESSION, 0xFFFF_FFFF),  # opaque bodies: the global cap
        (F.CREATE_CRYPTO_SESSION, spec.VHOST_USER_MAX_PAYLOAD_SIZE + 1),
        (F.SET_MEM_TABLE, 8 + 9 * 32),  # bigger than any memory table
        (F.SET_CONFIG, 12 + 257),
        (F.SET_VRING_NUM, 4096),
        (F.SET_VRING_NUM, 12),
        (F.GET_FEATURES, 8),
    ],
)
def test_oversize_message_is_fatal_before_its_payload_arrives(
    request_: FrontendRequest, size: int
) -> None:
    # only the header is fed: the decoder must not wait for (or allocate) the payload
    expect_fatal(header(request_, VERSION, size), nfds=1)


def test_more_than_eight_descriptors_is_fatal() -> None:
    expect_fatal(encode(F.SET_OWNER), nfds=9)


def test_descriptors_must_come_with_the_first_byte_of_a_message() -> None:
    fds = new_fds(1)
    data = encode(F.SET_FEATURES, 0)
    dec = Decoder()
    dec.feed(data[:12])
    assert dec.next_message() is None
    dec.feed(data[12:], fds)  # arrives mid-message: belongs to no header
    msg = dec.next_message()
    assert msg is not None and msg.fds == []
    with pytest.raises(ProtocolError):
        dec.next_message()
    assert dec.closed
    assert_closed(fds)


def test_inband_notifications_without_backend_req_and_reply_ack_closes_connection() -> None:
    bad = ProtocolFeature.INBAND_NOTIFICATIONS.mask | ProtocolFeature.REPLY_ACK.mask
    expect_fatal(encode(F.SET_PROTOCOL_FEATURES, bad))
    good = bad | ProtocolFeature.BACKEND_REQ.mask
    assert decode_one(encode(F.SET_PROTOCOL_FEATURES, good)).body == VhostUserU64(good)


def test_undrained_decoder_is_bounded() -> None:
    dec = Decoder()
    fds = new_fds(1)
    with pytest.raises(ProtocolError):
        for _ in range(100_000):
            dec.feed(encode(F.GET_FEATURES), fds)
            fds = []
    assert dec.closed
    assert dec.pending_fds == 0


def test_close_releases_pending_descriptors() -> None:
    fds = new_fds(2)
    dec = Decoder()
    dec.feed(encode(F.SET_LOG_FD, fds=fds[:1])[:7], fds)
    assert dec.pending_fds == 2 and not dec.at_boundary
    dec.close()
    dec.close()
    assert_closed(fds)


# ---------------------------------------------------------------------------
# rejected messages: error reply or closed connection, fds closed
# ---------------------------------------------------------------------------


def test_fixed_body_must_have_its_exact_size() -> None:
    # shorter than the body: one bad message; longer than it: fatal (see the oversize test)
    expect_rejected(raw(F.SET_VRING_NUM, struct.pack("<I", 0)))
    expect_rejected(raw(F.SET_FEATURES, struct.pack("<I", 1)))
    expect_rejected(raw(F.SET_VRING_ADDR, bytes(32)))
    expect_rejected(raw(F.SET_MEM_TABLE, memory_payload([])[:4]))
    expect_rejected(raw(F.SET_CONFIG, bytes(11)))


@pytest.mark.parametrize(
    ("data_fn", "nfds"),
    [
        (lambda: encode(F.SET_VRING_KICK, 1, fds=[0]), 0),  # fd announced, none sent
        (lambda: encode(F.SET_VRING_CALL, 1 | NOFD), 1),  # no-fd bit, but one sent
        (lambda: encode(F.SET_VRING_ERR, 1, fds=[0]), 2),
        (lambda: encode(F.SET_MEM_TABLE, VhostUserMemory((R1, R2)), fds=[0, 0]), 1),
        (lambda: encode(F.SET_MEM_TABLE, VhostUserMemory((R1, R2)), fds=[0, 0]), 3),
        (lambda: encode(F.GET_INFLIGHT_FD, VhostUserInflight(0, 0, 1, 128)), 1),
        (lambda: encode(F.SET_INFLIGHT_FD, VhostUserInflight(4096, 0, 1, 128), fds=[0]), 0),
        (lambda: encode(F.SET_LOG_FD, fds=[0]), 0),
        (lambda: encode(F.SET_LOG_BASE, VhostUserLog(4096, 0), fds=[0]), 0),
        (lambda: encode(F.SET_BACKEND_REQ_FD, fds=[0]), 2),
        (lambda: encode(F.ADD_MEM_REG, R1, fds=[0]), 0),
        (lambda: encode(F.SET_DEVICE_STATE_FD, VhostUserTransferDeviceState(0, 0), fds=[0]), 0),
        (lambda: encode(F.SET_OWNER), 1),
        (lambda: encode(F.GET_VRING_BASE, VhostVringState(0, 0)), 1),
        (lambda: encode(F.REM_MEM_REG, R1), 2),
    ],
)
def test_descriptor_count_must_match_the_request(data_fn: object, nfds: int) -> None:
    exc = expect_rejected(data_fn(), nfds)  # type: ignore[operator]
    assert "descriptors" in exc.message


def test_rem_mem_reg_descriptor_must_be_closed_without_use() -> None:
    fds = new_fds(1)
    msg = decode_one(encode(F.REM_MEM_REG, R1), fds)
    assert msg.fds == [] and msg.body == R1
    assert_closed(fds)


def test_legacy_set_log_base_without_fd_only_for_an_empty_log() -> None:
    assert decode_one(encode(F.SET_LOG_BASE, VhostUserLog(0, 0))).fds == []


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (memory_payload([]), "zero regions"),
        (memory_payload([tuple(R1)] * 8, nregions=9), "regions"),  # type: ignore[list-item]
        (memory_payload([tuple(R1)], nregions=2), "needs"),  # type: ignore[list-item]
        (memory_payload([tuple(R1), tuple(R1)]), "overlap"),  # type: ignore[list-item]
        (
            memory_payload([(0, 0x2000, 0x10000, 0), (0x1000, 0x1000, 0x20000, 0)]),
            "overlap",
        ),
        (memory_payload([(0, 0, 0x10000, 0)]), "size 0"),
        (memory_payload([(2**64 - 0x1000, 0x2000, 0x10000, 0)]), "guest_phys_addr"),
        (memory_payload([(0, 0x2000, 2**64 - 0x1000, 0)]), "userspace_addr"),
        (memory_payload([(0, 0x2000, 0x10000, 2**64 - 0x1000)]), "mmap_offset"),
    ],
)
def test_bad_memory_table_is_rejected(payload: bytes, why: str) -> None:
    n = struct.unpack_from("<I", payload)[0]
    nfds = min(n, 8) if len(payload) == 8 + 32 * n else 1
    exc = expect_rejected(raw(F.SET_MEM_TABLE, payload), nfds)
    assert why in exc.message


def test_memory_table_may_reach_the_top_of_the_address_space() -> None:
    top = region(2**64 - 0x1000, 0x1000, 2**64 - 0x1000, 2**64 - 0x1000)
    check_memory_regions([R1, top])
    with pytest.raises(ProtocolError):
        check_memory_regions([R1, R2], max_regions=1)


def test_add_mem_reg_region_is_checked() -> None:
    for bad in (region(0, 0), region(2**64 - 1, 2, 0x10000)):
        expect_rejected(encode(F.ADD_MEM_REG, bad, fds=[0]), 1)


@pytest.mark.parametrize(
    "data_fn",
    [
        lambda: encode(F.SET_VRING_NUM, VhostVringState(4, 8)),
        lambda: encode(F.SET_VRING_ADDR, VhostVringAddr(200, 0, 0, 0, 0, 0)),
        lambda: encode(F.SET_VRING_BASE, VhostVringState(4, 0)),
        lambda: encode(F.GET_VRING_BASE, VhostVringState(2**32 - 1, 0)),
        lambda: encode(F.SET_VRING_KICK, 4 | NOFD),
        lambda: encode(F.SET_VRING_CALL, 0xFF | NOFD),
        lambda: encode(F.SET_VRING_ENABLE, VhostVringState(4, 1)),
        lambda: encode(F.SET_VRING_ENDIAN, VhostVringState(9, 0)),
        lambda: encode(F.VRING_KICK, VhostVringState(4, 0)),
        lambda: encode(F.GET_INFLIGHT_FD, VhostUserInflight(0, 0, 5, 128)),
    ],
)
def test_vring_index_must_be_below_the_queue_count(data_fn: object) -> None:
    expect_rejected(data_fn(), num_queues=4)  # type: ignore[operator]


def test_vring_index_out_of_range_on_the_backend_channel() -> None:
    expect_rejected(encode(B.VRING_CALL, VhostVringState(4, 0)), channel=Channel.BACKEND)
    expect_rejected(
        encode(B.VRING_HOST_NOTIFIER_MSG, VhostUserVringArea(4 | NOFD, 0, 0)),
        channel=Channel.BACKEND,
    )


def test_without_num_queues_indexes_are_unchecked() -> None:
    assert (
        decode_one(encode(F.SET_VRING_NUM, VhostVringState(77, 8)), num_queues=None).vring_index
        == 77
    )


@pytest.mark.parametrize(
    "data",
    [
        encode(F.SET_VRING_KICK, 1 << 9 | NOFD),  # reserved bits of the vring file u64
        encode(F.SET_VRING_NUM, VhostVringState(0, 0)),
        encode(F.SET_VRING_NUM, VhostVringState(0, 32769)),
        encode(F.SET_VRING_ENABLE, VhostVringState(0, 2)),
        encode(F.SET_VRING_ENDIAN, VhostVringState(0, 2)),
        encode(F.SET_VRING_ADDR, VhostVringAddr(0, 2, 0, 0, 0, 0)),
        encode(F.SET_CONFIG, VhostUserConfig(0, 4, 2, b"abcd")),
        encode(F.GET_CONFIG, VhostUserConfig(250, 8, 0, bytes(8))),
        raw(F.SET_CONFIG, struct.pack("<III", 0, 5, 0) + b"abcd"),  # size field vs payload
        encode(F.GET_INFLIGHT_FD, VhostUserInflight(0, 0, 0, 128)),
        encode(F.GET_INFLIGHT_FD, VhostUserInflight(0, 0, 1, 0)),
        encode(F.GET_INFLIGHT_FD, VhostUserInflight(0, 0, 1, 32769)),
        encode(F.SET_STATUS, 0x100),
        encode(F.IOTLB_MSG, VhostIotlbMsg(0, 0x1000, 0, 3, 1)),  # a miss comes from the back-end
        encode(F.IOTLB_MSG, VhostIotlbMsg(2**64 - 1, 0x1000, 0, 3, 2)),
        encode(F.IOTLB_MSG, VhostIotlbMsg(0, 0x1000, 0, 4, 2)),
    ],
)
def test_invalid_field_values_are_rejected(data: bytes) -> None:
    expect_rejected(data)


def test_invalid_fields_of_fd_messages_are_rejected_and_fds_closed() -> None:
    expect_rejected(encode(F.SET_INFLIGHT_FD, VhostUserInflight(0, 0, 1, 128), fds=[0]), 1)
    expect_rejected(encode(F.SET_LOG_BASE, VhostUserLog(0x2000, 2**64 - 0x1000), fds=[0]), 1)
    expect_rejected(encode(F.SET_DEVICE_STATE_FD, VhostUserTransferDeviceState(0, 1), fds=[0]), 1)
    expect_rejected(encode(F.SET_DEVICE_STATE_FD, VhostUserTransferDeviceState(2, 0), fds=[0]), 1)
    expect_rejected(
        encode(B.SHMEM_MAP, VhostUserMMap(0, 0, 0, 0, 0), fds=[0]), 1, channel=Channel.BACKEND
    )


def test_rejected_reply_must_not_both_report_an_error_and_return_a_descriptor() -> None:
    data = raw(F.SET_DEVICE_STATE_FD, struct.pack("<Q", 1), VERSION | REPLY)
    exc = expect_rejected(data, 1, replies=True)
    assert exc.error_reply is None  # nobody waits for an answer to a reply


def test_need_reply_rejection_carries_an_error_reply() -> None:
    exc = expect_rejected(encode(F.SET_VRING_NUM, VhostVringState(9, 8), need_reply=True))
    assert exc.request is F.SET_VRING_NUM
    assert exc.error_reply == raw(F.SET_VRING_NUM, struct.pack("<Q", 1), VERSION | REPLY)


def test_rejection_without_need_reply_has_no_reply_to_send() -> None:
    exc = expect_rejected(encode(F.SET_VRING_NUM, VhostVringState(9, 8)))
    assert exc.error_reply is None


def test_requests_that_always_get_a_reply_get_an_error_reply() -> None:
    exc = expect_rejected(encode(F.GET_INFLIGHT_FD, VhostUserInflight(0, 0, 9, 8)))
    assert exc.error_reply is not None
    assert struct.unpack_from("<IIIQ", exc.error_reply) == (F.GET_INFLIGHT_FD, 5, 8, 1)
    exc = expect_rejected(encode(F.GET_CONFIG, VhostUserConfig(255, 2, 0, b"\0\0")))
    assert exc.error_reply == raw(F.GET_CONFIG, b"", VERSION | REPLY)


def test_value_replies_cannot_report_failure_so_the_connection_must_close() -> None:
    # a u64 1 in a GET_VRING_BASE reply would read as "ring 1, base 0"
    exc = expect_rejected(encode(F.GET_VRING_BASE, VhostVringState(9, 0), need_reply=True))
    assert exc.error_reply is None
    exc = expect_rejected(encode(F.GET_FEATURES), nfds=1)
    assert exc.error_reply is None
    assert error_reply(F.SET_LOG_BASE) is None


def test_reply_with_the_wrong_body_is_rejected() -> None:
    expect_rejected(raw(F.GET_VRING_BASE, bytes(4), VERSION | REPLY), replies=True)
    # GET_INFLIGHT_FD answered with an area but no descriptor
    expect_rejected(
        raw(F.GET_INFLIGHT_FD, struct.pack("<QQHH4x", 4096, 0, 1, 8), VERSION | REPLY),
        replies=True,
    )


def test_decoder_recovers_after_a_rejection_inside_one_chunk() -> None:
    bad = encode(F.SET_VRING_NUM, VhostVringState(0, 0))
    fds = new_fds(1)
    good = encode(F.SET_VRING_KICK, 0, fds=fds)
    dec = Decoder(num_queues=1)
    dec.feed(bad + good, fds)
    with pytest.raises(MessageRejected):
        dec.next_message()
    with dec.next_message() as msg:  # type: ignore[union-attr]
        assert msg.fds == fds
    assert_closed(fds)


# ---------------------------------------------------------------------------
# ring states
# ---------------------------------------------------------------------------


def _msg(request: FrontendRequest, body: Body = None, flags: int = VERSION) -> Message:
    return Message(request, flags, body)


ADDR0 = VhostVringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0)


def _configure(tracker: RingTracker, index: int = 0) -> None:
    tracker.handle(_msg(F.SET_VRING_NUM, VhostVringState(index, 256)))
    tracker.handle(_msg(F.SET_VRING_BASE, VhostVringState(index, 0)))
    tracker.handle(_msg(F.SET_VRING_ADDR, ADDR0._replace(index=index)))


def test_rings_start_stopped_and_disabled() -> None:
    tracker = RingTracker(2)
    assert not tracker.is_started(0) and not tracker.is_enabled(1)
    assert tracker.suspended


def test_set_features_without_protocol_features_must_enable_all_rings() -> None:
    tracker = RingTracker(2)
    tracker.handle(_msg(F.SET_FEATURES, VhostUserU64(1 << 30)))
    assert not tracker.is_enabled(0)
    tracker.handle(_msg(F.SET_FEATURES, VhostUserU64(1 << 32)))
    assert tracker.is_enabled(0) and tracker.is_enabled(1)


def test_ring_starts_at_the_first_kick_not_at_set_vring_kick() -> None:
    tracker = RingTracker(1)
    _configure(tracker)
    tracker.handle(_msg(F.SET_VRING_KICK, VhostUserU64(0)))
    assert tracker[0].kick is KickMode.FD and not tracker.is_started(0)
    tracker.handle(_msg(F.SET_VRING_NUM, VhostVringState(0, 128)))  # still stopped: allowed
    assert tracker.kicked(0) is True
    assert tracker.is_started(0) and not tracker.suspended
    assert tracker.kicked(0) is False  # already started


def test_kick_before_size_and_addresses_starts_nothing() -> None:
    tracker = RingTracker(1)
    tracker.handle(_msg(F.SET_VRING_KICK, VhostUserU64(0)))
    assert tracker.kicked(0) is False
    with pytest.raises(MessageRejected):
        tracker.handle(_msg(F.VRING_KICK, VhostVringState(0, 0)))
    with pytest.raises(MessageRejected):
        tracker.handle(_msg(F.SET_VRING_KICK, VhostUserU64(NOFD)))


@pytest.mark.parametrize(
    "change",
    [
        _msg(F.SET_VRING_NUM, VhostVringState(0, 128)),
        _msg(F.SET_VRING_BASE, VhostVringState(0, 7)),
        _msg(F.SET_VRING_ENDIAN, VhostVringState(0, 1)),
        _msg(F.SET_VRING_ADDR, ADDR0._replace(used_user_addr=0x4000)),
    ],
    ids=["num", "base", "endian", "addr"],
)
def test_started_ring_must_not_change_size_base_or_addresses(change: Message) -> None:
    tracker = RingTracker(1)
    _configure(tracker)
    tracker.handle(_msg(F.SET_VRING_KICK, VhostUserU64(NOFD)))  # polling: started at once
    assert tracker.is_started(0) and tracker[0].kick is KickMode.POLLING
    before = (tracker[0].num, tracker[0].base, tracker[0].addr)
    with pytest.raises(MessageRejected) as info:
        tracker.handle(change)
    assert "started" in info.value.message
    assert (tracker[0].num, tracker[0].base, tracker[0].addr) == before


def test_started_ring_accepts_a_log_flag_change() -> None:
    tracker = RingTracker(1)
    _configure(tracker)
    tracker.handle(_msg(F.VRING_KICK, VhostVringState(0, 0)))
    assert tracker.is_started(0)
    tracker.handle(_msg(F.SET_VRING_ADDR, ADDR0._replace(flags=1, log_guest_addr=0x3000)))
    assert tracker[0].log
    tracker.handle(_msg(F.SET_VRING_CALL, VhostUserU64(0)))  # call fd may change anytime
    tracker.handle(_msg(F.SET_VRING_KICK, VhostUserU64(0)))  # new kick fd: keeps running
    assert tracker.is_started(0)


def test_get_vring_base_stops_the_ring_and_drops_its_kick() -> None:
    tracker = RingTracker(2)
    _configure(tracker, 1)
    tracker.handle(_msg(F.SET_VRING_KICK, VhostUserU64(1)))
    assert tracker.kicked(1)
    tracker.handle(_msg(F.GET_VRING_BASE, VhostVringState(1, 0)))
    assert not tracker.is_started(1) and tracker.suspended
    assert tracker.kicked(1) is False  # a stale kick must not restart the ring
    tracker.handle(_msg(F.SET_VRING_NUM, VhostVringState(1, 64)))  # stopped: allowed again
    assert tracker[1].num == 64


def test_enable_state_is_tracked_while_stopped() -> None:
    tracker = RingTracker(2)
    tracker.handle(_msg(F.SET_VRING_ENABLE, VhostVringState(1, 1)))
    assert tracker.is_enabled(1) and not tracker.is_started(1)
    tracker.handle(_msg(F.SET_VRING_ENABLE, VhostVringState(1, 0)))
    assert not tracker.is_enabled(1)


def test_reset_device_and_reset_owner() -> None:
    tracker = RingTracker(2)
    _configure(tracker)
    tracker.handle(_msg(F.SET_VRING_ENABLE, VhostVringState(0, 1)))
    tracker.handle(_msg(F.VRING_KICK, VhostVringState(0, 0)))
    tracker.handle(_msg(F.RESET_OWNER))
    assert tracker.is_started(0) and not tracker.is_enabled(0)
    tracker.handle(_msg(F.RESET_DEVICE))
    assert not tracker.is_started(0) and not tracker[0].configured


def test_ring_tracker_rejects_indexes_outside_the_device() -> None:
    tracker = RingTracker(2)
    for msg in (
        _msg(F.SET_VRING_NUM, VhostVringState(2, 8)),
        _msg(F.SET_VRING_CALL, VhostUserU64(2)),
        _msg(F.GET_VRING_BASE, VhostVringState(5, 0)),
    ):
        with pytest.raises(MessageRejected):
            tracker.handle(msg)


def test_ring_tracker_ignores_device_wide_requests_and_replies() -> None:
    tracker = RingTracker(1)
    tracker.handle(_msg(F.GET_FEATURES))
    tracker.handle(_msg(F.SET_MEM_TABLE, VhostUserMemory((R1,))))
    tracker.handle(Message(F.SET_VRING_NUM, VERSION | REPLY, VhostUserU64(0)))
    assert tracker[0].num is None


def test_decoded_messages_drive_the_tracker() -> None:
    fds = new_fds(1)
    dec = Decoder(num_queues=1)
    tracker = RingTracker(1)
    stream = (
        encode(F.SET_VRING_NUM, VhostVringState(0, 8))
        + encode(F.SET_VRING_ADDR, ADDR0)
        + encode(F.SET_VRING_KICK, 0, fds=fds)
    )
    dec.feed(stream, fds)
    for msg in dec:
        tracker.handle(msg)
        msg.close()
    assert tracker[0].configured and tracker.kicked(0)
    assert_closed(fds)
