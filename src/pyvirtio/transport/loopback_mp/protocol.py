"""Control messages of the two-process loopback transport (sans-I/O codec).

The driver process sends a request, the device process answers with one reply,
over a ``SOCK_SEQPACKET`` unix socket pair (one message per datagram, file
descriptors travel as ``SCM_RIGHTS`` beside the bytes). Available buffer and used
buffer / configuration change notifications do not use the socket: they are
eventfds (one kick and one call eventfd per queue, one configuration eventfd).

Every message is a :data:`HEADER` followed by ``size`` payload bytes: the op's
fixed body (one :class:`~pyvirtio.spec.layout.WireStruct`, declared here once) and,
for a few ops, a variable tail (memory regions, configuration bytes, error text).
A reply carries the request's op with :attr:`Flags.REPLY`; a refused request gets
:attr:`Flags.ERROR` with an :data:`ERROR_BODY` and a UTF-8 message.

Decoding validates everything (length, op, flags, body size, tail bounds) and
raises :class:`~pyvirtio.errors.ProtocolError`; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any, NamedTuple

from pyvirtio.errors import ProtocolError
from pyvirtio.spec.layout import WireStruct

__all__ = [
    "CONFIG_ACCESS",
    "ERROR_BODY",
    "FEATURES",
    "HEADER",
    "HELLO",
    "HELLO_REPLY",
    "MAX_ERROR_TEXT",
    "MAX_MESSAGE",
    "MAX_REGIONS",
    "PROTOCOL_VERSION",
    "QUEUE_INDEX",
    "QUEUE_SETUP",
    "REGION",
    "VALUE32",
    "ConfigAccess",
    "ErrorBody",
    "ErrorCode",
    "Features",
    "Flags",
    "Header",
    "Hello",
    "HelloFlags",
    "HelloReply",
    "Message",
    "Op",
    "QueueIndex",
    "QueueSetup",
    "Region",
    "Value32",
    "decode",
    "decode_regions",
    "encode",
    "encode_error",
    "encode_regions",
    "expected_fds",
]

#: Version sent in HELLO; the device refuses any other.
PROTOCOL_VERSION = 1
#: Largest message (header included) either side sends or accepts.
MAX_MESSAGE = 8192
#: Most guest memory regions in a HELLO.
MAX_REGIONS = 8
#: Longest error text sent (bytes, UTF-8).
MAX_ERROR_TEXT = 1024


class Op(IntEnum):
    """Control operations (requests, and the replies that answer them)."""

    #: only in an error reply: the request's op could not be read or is unknown
    INVALID = 0
    #: map guest RAM, say the protocol version; fds: region memfds + config eventfd
    HELLO = 1
    #: device reset (status 0); replied once done
    RESET = 2
    GET_STATUS = 3
    SET_STATUS = 4
    #: the features the device offers
    GET_FEATURES = 5
    #: the features the driver accepts
    SET_FEATURES = 6
    GET_CONFIG_GENERATION = 7
    READ_CONFIG = 8
    WRITE_CONFIG = 9
    GET_QUEUE_MAX = 10
    #: size, addresses and enable of a queue; fds: kick eventfd, call eventfd
    SETUP_QUEUE = 11
    #: reset one queue (VIRTIO_F_RING_RESET)
    RESET_QUEUE = 12
    #: the device process exits after replying
    SHUTDOWN = 13


class Flags(IntFlag):
    """Header flags."""

    NONE = 0
    REPLY = 1
    ERROR = 2


class HelloFlags(IntFlag):
    """Flags of a HELLO request."""

    NONE = 0
    #: drive the device through the legacy interface
    LEGACY = 1


class ErrorCode(IntEnum):
    """Why a request was refused."""

    #: the request was malformed or out of sequence
    PROTOCOL = 1
    #: the request broke a rule of the virtio spec (e.g. an unusable queue)
    DRIVER = 2
    #: the device failed internally
    DEVICE = 3


class Header(NamedTuple):
    """Every message starts with it. ``size`` counts the bytes after the header."""

    op: int
    flags: int
    size: int


HEADER = WireStruct(Header, [("op", "le16"), ("flags", "le16"), ("size", "le32")])


class Value32(NamedTuple):
    """One 32-bit value (status, generation, queue maximum...)."""

    value: int


VALUE32 = WireStruct(Value32, [("value", "le32")])


class Features(NamedTuple):
    """128 feature bits as two halves."""

    lo: int
    hi: int


FEATURES = WireStruct(Features, [("lo", "le64"), ("hi", "le64")])


class ConfigAccess(NamedTuple):
    """A configuration space access: READ_CONFIG uses both fields, WRITE_CONFIG only
    ``offset`` (``size`` must equal the tail length)."""

    offset: int
    size: int


CONFIG_ACCESS = WireStruct(ConfigAccess, [("offset", "le32"), ("size", "le32")])


class QueueIndex(NamedTuple):
    """A queue index (GET_QUEUE_MAX, RESET_QUEUE)."""

    queue_index: int


QUEUE_INDEX = WireStruct(QueueIndex, [("queue_index", "le32")])


class QueueSetup(NamedTuple):
    """SETUP_QUEUE: the queue's size and the guest-physical addresses of its areas."""

    queue_index: int
    size: int
    desc: int
    driver: int
    device: int


QUEUE_SETUP = WireStruct(
    QueueSetup,
    [
        ("queue_index", "le32"),
        ("size", "le32"),
        ("desc", "le64"),
        ("driver", "le64"),
        ("device", "le64"),
    ],
)


class Hello(NamedTuple):
    """HELLO request body, followed by ``nregions`` :data:`REGION` entries."""

    version: int
    flags: int
    nregions: int


HELLO = WireStruct(Hello, [("version", "le32"), ("flags", "le32"), ("nregions", "le32")])


class Region(NamedTuple):
    """One guest RAM region; its memfd is the HELLO's fd at the same position."""

    guest_phys_addr: int
    size: int
    mmap_offset: int


REGION = WireStruct(
    Region, [("guest_phys_addr", "le64"), ("size", "le64"), ("mmap_offset", "le64")]
)


class HelloReply(NamedTuple):
    """HELLO reply: who the device is."""

    version: int
    device_id: int
    num_queues: int


HELLO_REPLY = WireStruct(
    HelloReply, [("version", "le32"), ("device_id", "le32"), ("num_queues", "le32")]
)


class ErrorBody(NamedTuple):
    """Body of an error reply, followed by the UTF-8 message."""

    code: int


ERROR_BODY = WireStruct(ErrorBody, [("code", "le32")])

# op -> (request body, request has a tail, reply body, reply has a tail)
_FORMATS: dict[Op, tuple[WireStruct[Any] | None, bool, WireStruct[Any] | None, bool]] = {
    Op.HELLO: (HELLO, True, HELLO_REPLY, False),
    Op.RESET: (None, False, None, False),
    Op.GET_STATUS: (None, False, VALUE32, False),
    Op.SET_STATUS: (VALUE32, False, None, False),
    Op.GET_FEATURES: (None, False, FEATURES, False),
    Op.SET_FEATURES: (FEATURES, False, None, False),
    Op.GET_CONFIG_GENERATION: (None, False, VALUE32, False),
    Op.READ_CONFIG: (CONFIG_ACCESS, False, None, True),
    Op.WRITE_CONFIG: (CONFIG_ACCESS, True, None, False),
    Op.GET_QUEUE_MAX: (QUEUE_INDEX, False, VALUE32, False),
    Op.SETUP_QUEUE: (QUEUE_SETUP, False, None, False),
    Op.RESET_QUEUE: (QUEUE_INDEX, False, None, False),
    Op.SHUTDOWN: (None, False, None, False),
}


def expected_fds(op: Op, body: Any) -> int:
    """How many file descriptors a valid request ``op`` carries."""
    if op == Op.HELLO:
        return int(body.nregions) + 1
    if op == Op.SETUP_QUEUE:
        return 2
    return 0


@dataclass(frozen=True)
class Message:
    """One decoded message: its op, flags, fixed body (a NamedTuple or None) and tail."""

    op: Op
    flags: Flags
    body: Any
    tail: bytes = b""

    @property
    def is_error(self) -> bool:
        """True for an error reply."""
        return bool(self.flags & Flags.ERROR)

    def error(self) -> tuple[ErrorCode, str]:
        """Code and message of an error reply."""
        code = self.body.code
        try:
            ecode = ErrorCode(code)
        except ValueError:
            ecode = ErrorCode.DEVICE
        return ecode, self.tail.decode("utf-8", "replace")


def encode(op: Op, body: Any = None, tail: bytes = b"", *, reply: bool = False) -> bytes:
    """Encode a request (or, with ``reply``, a successful reply) of ``op``."""
    req_fmt, req_tail, rep_fmt, rep_tail = _FORMATS[op]
    fmt, has_tail = (rep_fmt, rep_tail) if reply else (req_fmt, req_tail)
    if (fmt is None) != (body is None):
        raise ValueError(f"{op.name}: body does not match the layout")
    if tail and not has_tail:
        raise ValueError(f"{op.name}: this message has no tail")
    payload = (fmt.pack(body) if fmt is not None else b"") + tail
    if HEADER.size + len(payload) > MAX_MESSAGE:
        raise ValueError(f"{op.name}: message of {len(payload)} bytes is too large")
    flags = Flags.REPLY if reply else Flags.NONE
    return HEADER.pack(Header(op, flags, len(payload))) + payload


def encode_error(op: int, code: ErrorCode, text: str) -> bytes:
    """Encode an error reply to a request of ``op`` (:attr:`Op.INVALID` if that
    number is not an op)."""
    if op not in _FORMATS:
        op = Op.INVALID
    data = text.encode("utf-8", "replace")[:MAX_ERROR_TEXT]
    payload = ERROR_BODY.pack(ErrorBody(code)) + data
    return HEADER.pack(Header(op, Flags.REPLY | Flags.ERROR, len(payload))) + payload


def decode(data: bytes, *, reply: bool = False) -> Message:
    """Decode one message: a request, or with ``reply`` a reply.

    Raises :class:`~pyvirtio.errors.ProtocolError` for anything malformed: short or
    oversized data, a size field that disagrees with the length, an unknown op,
    wrong flags, a body of the wrong size, a tail where none belongs.
    """
    if len(data) < HEADER.size:
        raise ProtocolError(f"message of {len(data)} bytes is shorter than its header")
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    hdr = HEADER.unpack_from(data)
    if hdr.size != len(data) - HEADER.size:
        raise ProtocolError(f"header says {hdr.size} payload bytes, got {len(data) - HEADER.size}")
    if hdr.flags & ~int(Flags.REPLY | Flags.ERROR):
        raise ProtocolError(f"undefined flags {hdr.flags:#x}")
    flags = Flags(hdr.flags)
    is_error_reply = reply and flags == Flags.REPLY | Flags.ERROR
    if hdr.op not in _FORMATS and not (hdr.op == Op.INVALID and is_error_reply):
        raise ProtocolError(f"unknown op {hdr.op}")
    op = Op(hdr.op)
    payload = memoryview(data)[HEADER.size :]
    if not reply:
        if flags:
            raise ProtocolError(f"{op.name}: a request carries no flags")
        fmt, has_tail = _FORMATS[op][0], _FORMATS[op][1]
    elif not flags & Flags.REPLY:
        raise ProtocolError(f"{op.name}: expected a reply")
    elif flags & Flags.ERROR:
        fmt, has_tail = ERROR_BODY, True
    else:
        fmt, has_tail = _FORMATS[op][2], _FORMATS[op][3]
    need = fmt.size if fmt is not None else 0
    if len(payload) < need or (not has_tail and len(payload) != need):
        raise ProtocolError(f"{op.name}: payload of {len(payload)} bytes, expected {need}")
    body: Any = fmt.unpack(payload[:need]) if fmt is not None else None
    tail = bytes(payload[need:])
    if op == Op.HELLO and not reply:
        if not 1 <= body.nregions <= MAX_REGIONS:
            raise ProtocolError(f"HELLO: {body.nregions} regions (1..{MAX_REGIONS} allowed)")
        if len(tail) != body.nregions * REGION.size:
            raise ProtocolError(f"HELLO: {len(tail)} bytes of regions for {body.nregions}")
    if op == Op.WRITE_CONFIG and not reply and body.size != len(tail):
        raise ProtocolError(f"WRITE_CONFIG: size {body.size} but {len(tail)} data bytes")
    return Message(op, flags, body, tail)


def encode_regions(regions: list[Region]) -> bytes:
    """The tail of a HELLO request."""
    return b"".join(REGION.pack(r) for r in regions)


def decode_regions(tail: bytes) -> list[Region]:
    """Regions out of a HELLO tail already validated by :func:`decode`."""
    return [REGION.unpack_from(tail, i) for i in range(0, len(tail), REGION.size)]
