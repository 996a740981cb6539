"""The two-process loopback's control protocol (sans-I/O): codec and request handler."""

from __future__ import annotations

import contextlib
import gc
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.errors import ProtocolError
from pyvirtio.memory.guest_memory import create_memfd
from pyvirtio.spec.status import DeviceStatus as S
from pyvirtio.transport.loopback_mp import protocol as P
from pyvirtio.transport.loopback_mp.device_side import DeviceServer
from tests.transport.echo import EchoDevice


def open_fds() -> set[str]:
    gc.collect()
    return set(os.listdir("/proc/self/fd"))


def test_layout_sizes() -> None:
    assert P.HEADER.size == 8
    assert P.QUEUE_SETUP.size == 32
    assert P.REGION.size == 24
    assert P.HELLO.size == 12
    assert P.FEATURES.size == 16


@pytest.mark.parametrize(
    ("op", "body", "tail"),
    [
        (P.Op.HELLO, P.Hello(1, 0, 1), P.encode_regions([P.Region(0, 4096, 0)])),
        (P.Op.RESET, None, b""),
        (P.Op.SET_STATUS, P.Value32(3), b""),
        (P.Op.SET_FEATURES, P.Features(1 << 32, 5), b""),
        (P.Op.READ_CONFIG, P.ConfigAccess(4, 8), b""),
        (P.Op.WRITE_CONFIG, P.ConfigAccess(4, 3), b"abc"),
        (P.Op.SETUP_QUEUE, P.QueueSetup(1, 256, 0x1000, 0x2000, 0x3000), b""),
        (P.Op.RESET_QUEUE, P.QueueIndex(2), b""),
        (P.Op.SHUTDOWN, None, b""),
    ],
)
def test_request_round_trip(op: P.Op, body: object, tail: bytes) -> None:
    msg = P.decode(P.encode(op, body, tail))
    assert (msg.op, msg.body, msg.tail, msg.flags) == (op, body, tail, P.Flags.NONE)


def test_reply_and_error_round_trip() -> None:
    msg = P.decode(P.encode(P.Op.GET_STATUS, P.Value32(7), reply=True), reply=True)
    assert msg.body == P.Value32(7) and not msg.is_error
    msg = P.decode(P.encode(P.Op.READ_CONFIG, tail=b"xyz", reply=True), reply=True)
    assert msg.tail == b"xyz"
    err = P.decode(P.encode_error(P.Op.SETUP_QUEUE, P.ErrorCode.DRIVER, "no"), reply=True)
    assert err.is_error and err.error() == (P.ErrorCode.DRIVER, "no")


def _hdr(op: int, flags: int, size: int) -> bytes:
    return P.HEADER.pack(P.Header(op, flags, size))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x01\x00", "shorter"),
        (_hdr(P.Op.GET_STATUS, 0, 4), "header says"),
        (_hdr(99, 0, 0), "unknown op"),
        (_hdr(P.Op.GET_STATUS, P.Flags.REPLY, 0), "no flags"),
        (_hdr(P.Op.GET_STATUS, 0x80, 0), "undefined flags"),
        (_hdr(P.Op.SET_STATUS, 0, 2) + b"\x00\x00", "expected 4"),
        (_hdr(P.Op.GET_STATUS, 0, 1) + b"\x00", "expected 0"),
        (_hdr(P.Op.HELLO, 0, 12) + struct.pack("<III", 1, 0, 0), "regions"),
        (_hdr(P.Op.HELLO, 0, 12) + struct.pack("<III", 1, 0, 9), "regions"),
        (_hdr(P.Op.HELLO, 0, 13) + struct.pack("<III", 1, 0, 1) + b"x", "bytes of regions"),
        (_hdr(P.Op.WRITE_CONFIG, 0, 9) + struct.pack("<II", 0, 5) + b"x", "data bytes"),
        (bytes(P.MAX_MESSAGE + 1), "exceeds"),
    ],
)
def test_decode_rejects_malformed_requests(data: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        P.decode(data)


def test_decode_reply_requires_reply_flag() -> None:
    with pytest.raises(ProtocolError, match="expected a reply"):
        P.decode(P.encode(P.Op.GET_STATUS), reply=True)


def test_encode_refuses_mismatched_bodies() -> None:
    with pytest.raises(ValueError):
        P.encode(P.Op.SET_STATUS)
    with pytest.raises(ValueError):
        P.encode(P.Op.GET_STATUS, tail=b"x")
    with pytest.raises(ValueError):
        P.encode(P.Op.WRITE_CONFIG, P.ConfigAccess(0, 9000), bytes(9000))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.booleans())
def test_decode_never_fails_otherwise(data: bytes, reply: bool) -> None:
    with contextlib.suppress(ProtocolError):
        P.decode(data, reply=reply)


# -- DeviceServer, driven without sockets ------------------------------------------------


def _hello(server: DeviceServer, size: int = 1 << 16) -> tuple[int, int]:
    memfd = create_memfd(size)
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    req = P.encode(P.Op.HELLO, P.Hello(1, 0, 1), P.encode_regions([P.Region(0, size, 0)]))
    reply = P.decode(server.handle(req, [memfd, efd]), reply=True)
    assert not reply.is_error, reply.tail
    return memfd, efd


def test_server_refuses_requests_before_hello() -> None:
    server = DeviceServer(EchoDevice())
    reply = P.decode(server.handle(P.encode(P.Op.GET_STATUS), []), reply=True)
    assert reply.is_error and "before HELLO" in reply.error()[1]
    server.close()


def test_server_answers_garbage_with_error_replies_and_keeps_going() -> None:
    server = DeviceServer(EchoDevice())
    _hello(server)
    for junk in [b"", b"\xff" * 3, _hdr(77, 0, 0), _hdr(P.Op.SET_STATUS, 0, 0)]:
        reply = P.decode(server.handle(junk, []), reply=True)
        assert reply.is_error and reply.error()[0] == P.ErrorCode.PROTOCOL
    reply = P.decode(server.handle(P.encode(P.Op.GET_STATUS), []), reply=True)
    assert reply.body.value == 0
    server.close()


def test_server_closes_fds_of_refused_requests() -> None:
    server = DeviceServer(EchoDevice())
    _hello(server)
    before = open_fds()
    extra = [os.eventfd(0), os.eventfd(0)]
    reply = P.decode(server.handle(P.encode(P.Op.GET_STATUS), extra), reply=True)
    assert reply.is_error and "fds" in reply.error()[1]
    # a queue the device refuses (not yet FEATURES_OK): its eventfds are closed too
    kick, call = os.eventfd(0), os.eventfd(0)
    req = P.encode(P.Op.SETUP_QUEUE, P.QueueSetup(0, 8, 4096, 8192, 12288))
    reply = P.decode(server.handle(req, [kick, call]), reply=True)
    assert reply.is_error and reply.error()[0] == P.ErrorCode.DRIVER
    # a kick fd that is not an eventfd is refused
    r, w = os.pipe()
    reply = P.decode(server.handle(req, [r, w]), reply=True)
    assert reply.is_error and "eventfd" in reply.error()[1]
    assert open_fds() == before
    server.close()


def test_server_refuses_bad_memory_and_second_hello() -> None:
    before = open_fds()
    server = DeviceServer(EchoDevice())
    small = create_memfd(4096)
    efd = os.eventfd(0)
    req = P.encode(P.Op.HELLO, P.Hello(1, 0, 1), P.encode_regions([P.Region(0, 1 << 20, 0)]))
    reply = P.decode(server.handle(req, [small, efd]), reply=True)
    assert reply.is_error and "exceeds its file" in reply.error()[1]
    r, w = os.pipe()
    req = P.encode(P.Op.HELLO, P.Hello(2, 0, 1), P.encode_regions([P.Region(0, 4096, 0)]))
    reply = P.decode(server.handle(req, [r, w]), reply=True)
    assert reply.is_error and "version" in reply.error()[1]  # r and w are closed by now
    _hello(server)
    memfd, efd = create_memfd(4096), os.eventfd(0)
    req = P.encode(P.Op.HELLO, P.Hello(1, 0, 1), P.encode_regions([P.Region(0, 4096, 0)]))
    reply = P.decode(server.handle(req, [memfd, efd]), reply=True)
    assert reply.is_error and "second HELLO" in reply.error()[1]
    server.close()
    assert open_fds() == before


def test_server_drives_device_state() -> None:
    server = DeviceServer(EchoDevice())
    _hello(server)

    def call(op: P.Op, body: object = None, tail: bytes = b"") -> P.Message:
        return P.decode(server.handle(P.encode(op, body, tail), []), reply=True)

    call(P.Op.SET_STATUS, P.Value32(S.ACKNOWLEDGE | S.DRIVER))
    feats = call(P.Op.GET_FEATURES).body
    assert feats.lo >> 32 & 1  # VERSION_1
    call(P.Op.SET_FEATURES, P.Features(1 << 32, 0))
    call(P.Op.SET_STATUS, P.Value32(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK))
    assert call(P.Op.GET_STATUS).body.value & S.FEATURES_OK
    assert call(P.Op.READ_CONFIG, P.ConfigAccess(8, 4)).tail == b"\x01\x00\x00\x00"
    assert call(P.Op.GET_QUEUE_MAX, P.QueueIndex(0)).body.value == 256
    assert call(P.Op.GET_QUEUE_MAX, P.QueueIndex(5)).body.value == 0
    reply = call(P.Op.RESET_QUEUE, P.QueueIndex(0))
    assert reply.is_error and "RING_RESET" in reply.error()[1]
    call(P.Op.RESET)
    assert call(P.Op.GET_STATUS).body.value == 0
    call(P.Op.SHUTDOWN)
    assert server.finished
    server.close()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80))
def test_server_answers_any_bytes_with_a_valid_reply(data: bytes) -> None:
    server = DeviceServer(EchoDevice())
    _hello(server)
    reply = P.decode(server.handle(data, []), reply=True)
    assert reply.flags & P.Flags.REPLY
    server.close()
