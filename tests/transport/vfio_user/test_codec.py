"""vfio-user framing (transport/vfio_user/codec.py) and wire layouts (spec.py)."""

from __future__ import annotations

import os

import pytest

from pyvirtio.transport.vfio_user import spec
from pyvirtio.transport.vfio_user.codec import (
    MessageReader,
    VfioUserError,
    VfioUserProtocolError,
    decode_version,
    encode_command,
    encode_error,
    encode_reply,
    encode_version,
)
from pyvirtio.transport.vfio_user.spec import HEADER, Command, Header, HeaderFlags


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_layout_sizes_match_vfio_user_rst() -> None:
    assert HEADER.size == 16
    assert spec.VERSION.size == 4
    assert spec.DMA_MAP.size == 32  # "the message size is 16 + 32 bytes"
    assert spec.DMA_UNMAP.size == 24
    assert spec.DEVICE_INFO.size == 16
    assert spec.REGION_INFO.size == 32
    assert spec.IRQ_INFO.size == 16
    assert spec.IRQ_SET.size == 20
    assert spec.REGION_ACCESS.size == 16
    assert spec.REGION_INFO.offset_of("size") == 16
    assert spec.IRQ_SET.offset_of("irq_count") == 16


def test_header_round_trip_and_reply_echoes_id_and_command() -> None:
    raw = encode_command(7, Command.DEVICE_RESET)
    (msg,) = MessageReader().feed(raw)
    assert msg.header == Header(7, Command.DEVICE_RESET, 16, 0, 0) and msg.payload == b""
    reply = HEADER.unpack(encode_reply(msg.header, b"")[:16])
    assert (reply.msg_id, reply.command, reply.flags, reply.size) == (7, 13, HeaderFlags.REPLY, 16)


def test_error_reply_has_error_bit_errno_and_no_payload() -> None:
    hdr = Header(3, Command.DMA_MAP, 48, 0, 0)
    raw = encode_error(hdr, 17)
    assert len(raw) == 16
    h = HEADER.unpack(raw)
    assert h.flags == HeaderFlags.REPLY | HeaderFlags.ERROR and h.error_no == 17 and h.msg_id == 3


def test_messages_split_and_joined_across_chunks() -> None:
    a = encode_command(1, Command.REGION_READ, bytes(16))
    b = encode_command(2, Command.DEVICE_RESET)
    r = MessageReader()
    stream = a + b
    got = []
    for i in range(len(stream)):
        got += r.feed(stream[i : i + 1])
    assert [m.header.msg_id for m in got] == [1, 2]
    assert r.pending == 0


def test_fds_go_to_the_message_holding_the_chunks_last_byte() -> None:
    """Linux stops a stream recvmsg after the buffer carrying SCM_RIGHTS, which is the
    first buffer of its sendmsg: a chunk [tail of A][B] with fds gives them to B."""
    a = encode_command(1, Command.DEVICE_RESET)
    b = encode_command(2, Command.DMA_MAP, bytes(32))
    fd = os.eventfd(0)
    r = MessageReader()
    assert r.feed(a[:5]) == []
    m1, m2 = r.feed(a[5:] + b, [fd])
    assert m1.fds == [] and m2.fds == [fd]
    m2.close()
    assert not _fd_open(fd)


@pytest.mark.parametrize("size", [0, 15, spec.MAX_MESSAGE_SIZE + 1])
def test_bad_message_size_closes_the_connection_and_the_fds(size: int) -> None:
    fd = os.eventfd(0)
    raw = HEADER.pack(Header(1, 1, size, 0, 0))
    r = MessageReader()
    with pytest.raises(VfioUserProtocolError):
        r.feed(raw, [fd])
    assert not _fd_open(fd)


def test_a_reply_sent_to_the_server_closes_the_connection() -> None:
    raw = HEADER.pack(Header(1, 1, 16, HeaderFlags.REPLY, 0))
    with pytest.raises(VfioUserProtocolError):
        MessageReader().feed(raw)


def test_incomplete_message_fds_closed_on_close() -> None:
    fd = os.eventfd(0)
    r = MessageReader()
    r.feed(encode_command(1, Command.DMA_MAP, bytes(32))[:20], [fd])
    r.close()
    assert not _fd_open(fd)


def test_take_fds_hands_over_ownership() -> None:
    fd = os.eventfd(0)
    (m,) = MessageReader().feed(encode_command(1, 2, bytes(32)), [fd])
    assert m.take_fds() == [fd]
    m.close()
    assert _fd_open(fd)
    os.close(fd)


def test_version_round_trip_with_capabilities() -> None:
    body = encode_version(0, 1, {"max_msg_fds": 8, "max_data_xfer_size": 4096})
    assert body.endswith(b"\0")
    ver, caps = decode_version(body)
    assert (ver.major, ver.minor, caps.max_msg_fds, caps.max_data_xfer_size) == (0, 1, 8, 4096)


def test_version_defaults_without_json() -> None:
    _, caps = decode_version(spec.VERSION.pack(spec.Version(0, 0)))
    assert caps.max_msg_fds == 1 and caps.max_data_xfer_size == 1 << 20


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00\x00", b"\0\0\0\0not json\0", b"\0\0\0\0[1]\0", b'\0\0\0\0{"capabilities": 3}\0',
     b'\0\0\0\0{"capabilities": {"max_msg_fds": -1}}\0', b"\0\0\0\0{}\0{}\0"],
)  # fmt: skip
def test_malformed_version_is_an_error(data: bytes) -> None:
    with pytest.raises(VfioUserError):
        decode_version(data)
