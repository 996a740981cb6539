"""vhost-user message codec, sans-I/O: bytes + file descriptors in, validated messages out.

Reading side: a :class:`Decoder` is fed exactly what each ``recvmsg`` returned (the bytes
and the ``SCM_RIGHTS`` descriptors) and hands out :class:`Message` objects, one at a time,
each fully validated: known request code, version 1 flags, exact body size, file
descriptor count, and the per-message rules of QEMU's ``docs/interop/vhost-user.rst``
(memory tables, vring indexes, config sizes, ...). Writing side: :func:`encode`,
:func:`encode_reply` and :func:`encode_ack` build the bytes to send (the caller passes
the descriptors to ``sendmsg``). :class:`RingTracker` follows each ring through the
stopped / started and disabled / enabled states of the document's "Ring states" section
and refuses ring changes the back-end must not accept on a started ring.

Two kinds of failure, both :class:`~pyvirtio.errors.ProtocolError`:

- a plain ``ProtocolError`` is fatal: the byte stream can no longer be trusted (bad
  version, unknown request, oversize header, descriptors that belong to no message).
  The decoder closes every descriptor it holds and refuses further input; the caller
  closes the connection ("If back-end detects some error ... it may also close the
  connection").
- :class:`MessageRejected` means one well-framed message was invalid. Its descriptors
  are already closed and the decoder stays usable. If the front-end waits for an answer
  (``error_reply`` is not None), send that reply (a non-zero ``u64``); otherwise the
  front-end would carry on believing the request took effect, so close the connection.

Descriptor ownership: the decoder owns descriptors from :meth:`Decoder.feed` until it
hands them out inside a :class:`Message`; from then on the message owns them until the
caller takes them (:meth:`Message.take_fds`) or closes the message. No path leaks one.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, NoReturn, TypeAlias, TypeVar

from pyvirtio.errors import ProtocolError
from pyvirtio.transport._unix import close_fds
from pyvirtio.transport.vhost_user.spec import (
    BACKEND_REPLY_PAYLOAD,
    BACKEND_REQUEST_PAYLOAD,
    FIXED_LAYOUTS,
    FRONTEND_REPLY_PAYLOAD,
    FRONTEND_REQUEST_PAYLOAD,
    HEADER_FLAGS_KNOWN,
    REPLY_FLAGS,
    VHOST_MEMORY_BASELINE_NREGIONS,
    VHOST_USER_CONFIG_HDR_SIZE,
    VHOST_USER_CONFIG_HEADER,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_HDR_SIZE,
    VHOST_USER_HEADER,
    VHOST_USER_MAX_CONFIG_SIZE,
    VHOST_USER_MAX_FDS,
    VHOST_USER_MAX_PAYLOAD_SIZE,
    VHOST_USER_MEMORY_HEADER,
    VHOST_USER_MEMORY_REGION,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    VHOST_USER_VERSION_MASK,
    VHOST_USER_VRING_IDX_MASK,
    VHOST_USER_VRING_NOFD_MASK,
    VHOST_VRING_F_LOG,
    VIRTQUEUE_MAX_SIZE,
    BackendRequest,
    ConfigFlags,
    FrontendRequest,
    HeaderFlags,
    IotlbPerm,
    IotlbType,
    MigrationPhase,
    Payload,
    ProtocolFeature,
    TransferDirection,
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

T = TypeVar("T")

#: Any request code (main channel: front-end requests; back-end channel: back-end requests).
Request: TypeAlias = FrontendRequest | BackendRequest
#: A decoded message body (``None``: no payload; ``bytes``: opaque payload).
Body: TypeAlias = (
    bytes
    | VhostUserU64
    | VhostVringState
    | VhostVringAddr
    | VhostUserMemory
    | VhostUserMemoryRegion
    | VhostUserLog
    | VhostIotlbMsg
    | VhostUserConfig
    | VhostUserVringArea
    | VhostUserInflight
    | VhostUserShared
    | VhostUserTransferDeviceState
    | VhostUserMMap
    | None
)

_U64_MAX = (1 << 64) - 1
#: Unparsed bytes a decoder keeps before declaring its caller broken (it must drain).
DECODER_BUFFER_LIMIT = 64 * 1024


def _clause(title: str) -> str:
    return f'vhost-user.rst "{title}"'


_C_HEADER = _clause("Header")
_C_COMM = _clause("Communication")
_C_RING_STATES = _clause("Ring states")
_C_REPLY_ACK = _clause("VHOST_USER_PROTOCOL_F_REPLY_ACK")
_C_INBAND = _clause("In-band notifications")
_C_BACKEND_COMM = _clause("Back-end communication")


def _c_msg(request: Request) -> str:
    return _clause(request.spec_name)


class Channel(Enum):
    """Which socket a stream belongs to."""

    #: the vhost-user socket: front-end requests, back-end replies
    MAIN = "main"
    #: the socket passed by SET_BACKEND_REQ_FD: back-end requests, front-end replies
    BACKEND = "backend"


class MessageRejected(ProtocolError):
    """One well-framed message broke a rule; the stream itself is still in sync.

    The message's descriptors are already closed. ``error_reply`` is the reply to send
    when the peer waits for one (REPLY_ACK ``need_reply``, or a request that is always
    answered) and a failure reply exists (see :func:`error_reply`), else ``None``: then
    the peer cannot learn of the failure and the caller should close the connection.
    """

    def __init__(
        self,
        message: str,
        clause: str | None,
        *,
        request: Request,
        flags: int,
        is_reply: bool = False,
    ) -> None:
        super().__init__(message, clause)
        self.request = request
        self.flags = flags
        self.error_reply: bytes | None = (
            None if is_reply or not _expects_reply(request, flags) else error_reply(request)
        )


class _Reject(Exception):
    """Internal: this message is invalid (becomes :class:`MessageRejected`)."""

    def __init__(self, message: str, clause: str) -> None:
        super().__init__(message)
        self.message = message
        self.clause = clause


class _Fatal(Exception):
    """Internal: this message means the connection must end (becomes ``ProtocolError``)."""

    def __init__(self, message: str, clause: str) -> None:
        super().__init__(message)
        self.message = message
        self.clause = clause


# ---------------------------------------------------------------------------
# Message
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class Message:
    """One decoded message: request code, header flags, body, and the descriptors it owns.

    A message owns ``fds`` until :meth:`take_fds` / :meth:`take_fd` hands them over;
    :meth:`close` (or leaving a ``with`` block) closes whatever it still owns.
    """

    request: Request
    flags: int
    body: Body = None
    fds: list[int] = field(default_factory=list)

    @property
    def is_reply(self) -> bool:
        """True for a reply (REPLY flag set)."""
        return bool(self.flags & VHOST_USER_REPLY_MASK)

    @property
    def need_reply(self) -> bool:
        """True if the sender set ``need_reply`` (REPLY_ACK)."""
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    @property
    def expects_reply(self) -> bool:
        """True if the sender of this request waits for an answer.

        Either the request is always answered (GET_FEATURES, GET_VRING_BASE, ...) or it
        carries ``need_reply``: "the back-end MUST respond with a Payload VhostUserMsg
        indicating success or failure" (REPLY_ACK). Never both: "for the message types
        that already solicit a reply ... need_reply ... brings no behavioural change".
        """
        return not self.is_reply and _expects_reply(self.request, self.flags)

    @property
    def vring_index(self) -> int | None:
        """The vring index this message addresses, or ``None`` for device-wide messages."""
        return _vring_index(self.body, self.request)

    def body_as(self, cls: type[T]) -> T:
        """The body, checked to be a ``cls`` (raises ``TypeError`` otherwise)."""
        if not isinstance(self.body, cls):
            raise TypeError(f"{self.request.spec_name} body is {type(self.body).__name__}")
        return self.body

    def take_fds(self) -> list[int]:
        """Hand over every descriptor; the caller now owns (and must close) them."""
        fds, self.fds = self.fds, []
        return fds

    def take_fd(self) -> int | None:
        """Hand over the single descriptor (``None`` if the message carries none)."""
        fds = self.take_fds()
        if len(fds) > 1:  # pragma: no cover - the decoder never delivers that
            close_fds(fds)
            raise ValueError("message carries several descriptors")
        return fds[0] if fds else None

    def close(self) -> None:
        """Close the descriptors this message still owns."""
        close_fds(self.take_fds())

    def __enter__(self) -> Message:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _expects_reply(request: Request, flags: int) -> bool:
    if isinstance(request, FrontendRequest):
        natural = request in FRONTEND_REPLY_PAYLOAD
    else:
        natural = request in BACKEND_REPLY_PAYLOAD
    return natural or bool(flags & VHOST_USER_NEED_REPLY_MASK)


def _vring_index(body: Body, request: Request) -> int | None:
    if isinstance(body, (VhostVringState, VhostVringAddr)):
        return body.index
    if isinstance(body, VhostUserU64) and request in _VRING_FILE_REQUESTS:
        return body.u64 & VHOST_USER_VRING_IDX_MASK
    if isinstance(body, VhostUserVringArea):
        return body.u64 & VHOST_USER_VRING_IDX_MASK
    return None


_VRING_FILE_REQUESTS = frozenset(
    {FrontendRequest.SET_VRING_KICK, FrontendRequest.SET_VRING_CALL, FrontendRequest.SET_VRING_ERR}
)

# ---------------------------------------------------------------------------
# Bodies: sizes, packing, unpacking
# ---------------------------------------------------------------------------

#: a memory table needs its header; region count vs size is checked while decoding
_MEMORY_MIN = VHOST_USER_MEMORY_HEADER.size
_MEMORY_MAX = (
    VHOST_USER_MEMORY_HEADER.size + VHOST_MEMORY_BASELINE_NREGIONS * VHOST_USER_MEMORY_REGION.size
)
_CONFIG_MAX = VHOST_USER_CONFIG_HDR_SIZE + VHOST_USER_MAX_CONFIG_SIZE

#: body Python type -> payload kind (for encoding)
_KIND_OF_TYPE: dict[type[Any], Payload] = {
    VhostUserU64: Payload.U64,
    VhostVringState: Payload.VRING_STATE,
    VhostVringAddr: Payload.VRING_ADDR,
    VhostUserMemory: Payload.MEMORY,
    VhostUserMemoryRegion: Payload.MEM_REG,
    VhostUserLog: Payload.LOG,
    VhostIotlbMsg: Payload.IOTLB,
    VhostUserConfig: Payload.CONFIG,
    VhostUserVringArea: Payload.VRING_AREA,
    VhostUserInflight: Payload.INFLIGHT,
    VhostUserShared: Payload.SHARED,
    VhostUserTransferDeviceState: Payload.TRANSFER_STATE,
    VhostUserMMap: Payload.MMAP,
    bytes: Payload.OPAQUE,
    type(None): Payload.NONE,
}


def _max_size(kind: Payload) -> int:
    if kind is Payload.NONE:
        return 0
    if kind is Payload.MEMORY:
        return _MEMORY_MAX
    if kind is Payload.CONFIG:
        return _CONFIG_MAX
    if kind is Payload.OPAQUE:
        return VHOST_USER_MAX_PAYLOAD_SIZE
    return int(FIXED_LAYOUTS[kind].size)


def _size_matches(kind: Payload, size: int) -> bool:
    """Whether a payload of ``size`` bytes can be a ``kind`` body (before decoding it)."""
    if kind is Payload.NONE:
        return size == 0
    if kind is Payload.MEMORY:
        return _MEMORY_MIN <= size <= _MEMORY_MAX
    if kind is Payload.CONFIG:
        return VHOST_USER_CONFIG_HDR_SIZE <= size <= _CONFIG_MAX
    if kind is Payload.OPAQUE:
        return size <= VHOST_USER_MAX_PAYLOAD_SIZE
    return size == FIXED_LAYOUTS[kind].size


def _decode_body(kind: Payload, payload: bytes, request: Request) -> Body:
    """Decode a payload whose size already satisfies :func:`_size_matches`."""
    if kind is Payload.NONE:
        return None
    if kind is Payload.OPAQUE:
        return payload
    if kind is Payload.MEMORY:
        (nregions,) = VHOST_USER_MEMORY_HEADER.unpack_from(payload, 0)
        if nregions == 0:
            raise _Reject("memory table with zero regions", _c_msg(request))
        if nregions > VHOST_MEMORY_BASELINE_NREGIONS:
            raise _Reject(
                f"memory table with {nregions} regions (at most {VHOST_MEMORY_BASELINE_NREGIONS})",
                _c_msg(request),
            )
        expected = VHOST_USER_MEMORY_HEADER.size + nregions * VHOST_USER_MEMORY_REGION.size
        if len(payload) != expected:
            raise _Reject(
                f"memory table of {nregions} regions needs {expected} bytes, got {len(payload)}",
                _c_msg(request),
            )
        regions = tuple(
            VHOST_USER_MEMORY_REGION.unpack_from(
                payload, VHOST_USER_MEMORY_HEADER.size + i * VHOST_USER_MEMORY_REGION.size
            )
            for i in range(nregions)
        )
        return VhostUserMemory(regions)
    if kind is Payload.CONFIG:
        offset, size, flags = VHOST_USER_CONFIG_HEADER.unpack_from(payload, 0)
        if size > VHOST_USER_MAX_CONFIG_SIZE:
            raise _Reject(
                f"config access of {size} bytes (at most {VHOST_USER_MAX_CONFIG_SIZE})",
                _c_msg(request),
            )
        if len(payload) != VHOST_USER_CONFIG_HDR_SIZE + size:
            raise _Reject(
                f"config payload is {len(payload) - VHOST_USER_CONFIG_HDR_SIZE} bytes but "
                f"size says {size}",
                _c_msg(request),
            )
        return VhostUserConfig(offset, size, flags, payload[VHOST_USER_CONFIG_HDR_SIZE:])
    body: Body = FIXED_LAYOUTS[kind].unpack(payload)
    return body


def _pack_body(kind: Payload, body: Body) -> bytes:
    if kind is Payload.NONE:
        return b""
    if kind is Payload.OPAQUE:
        assert isinstance(body, bytes)
        if len(body) > VHOST_USER_MAX_PAYLOAD_SIZE:
            raise ValueError(f"opaque payload of {len(body)} bytes is too large")
        return body
    if kind is Payload.MEMORY:
        assert isinstance(body, VhostUserMemory)
        if not 1 <= len(body.regions) <= VHOST_MEMORY_BASELINE_NREGIONS:
            raise ValueError(f"a memory table carries 1..8 regions, not {len(body.regions)}")
        return VHOST_USER_MEMORY_HEADER.pack_values(len(body.regions)) + b"".join(
            VHOST_USER_MEMORY_REGION.pack(r) for r in body.regions
        )
    if kind is Payload.CONFIG:
        assert isinstance(body, VhostUserConfig)
        if len(body.payload) != body.size or body.size > VHOST_USER_MAX_CONFIG_SIZE:
            raise ValueError("config payload length must equal size and be at most 256")
        return VHOST_USER_CONFIG_HEADER.pack_values(body.offset, body.size, body.flags) + bytes(
            body.payload
        )
    return bytes(FIXED_LAYOUTS[kind].pack(body))


# ---------------------------------------------------------------------------
# Descriptor rules
# ---------------------------------------------------------------------------

#: allowed descriptor counts, and whether surplus descriptors are closed instead of refused
_FdRule = Callable[[Body], "tuple[frozenset[int], bool]"]
_NO_FDS: tuple[frozenset[int], bool] = (frozenset({0}), False)
_ONE_FD: tuple[frozenset[int], bool] = (frozenset({1}), False)
_ZERO_OR_ONE: tuple[frozenset[int], bool] = (frozenset({0, 1}), False)


def _fd_unless_nofd(body: Body) -> tuple[frozenset[int], bool]:
    value = body.u64 if isinstance(body, (VhostUserU64, VhostUserVringArea)) else 0
    return _NO_FDS if value & VHOST_USER_VRING_NOFD_MASK else _ONE_FD


def _fd_per_region(body: Body) -> tuple[frozenset[int], bool]:
    n = len(body.regions) if isinstance(body, VhostUserMemory) else 0
    return (frozenset({n}), False)


def _fd_log(body: Body) -> tuple[frozenset[int], bool]:
    if isinstance(body, VhostUserLog) and body.mmap_size == 0:
        return _ZERO_OR_ONE
    return _ONE_FD


def _fd_rem_mem_reg(body: Body) -> tuple[frozenset[int], bool]:
    # "No file descriptors SHOULD be passed ... the back-end MAY accept messages with
    # one file descriptor. If a file descriptor is passed, the back-end MUST close it."
    return (frozenset({0, 1}), True)


def _fd_inflight_reply(body: Body) -> tuple[frozenset[int], bool]:
    # QEMU: "if (!msg.payload.inflight.mmap_size) return 0;" before taking the fd
    if isinstance(body, VhostUserInflight) and body.mmap_size != 0:
        return _ONE_FD
    return _NO_FDS


def _fd_device_state_reply(body: Body) -> tuple[frozenset[int], bool]:
    return _fd_unless_nofd(body)


_FRONTEND_REQUEST_FDS: dict[FrontendRequest, _FdRule] = {
    FrontendRequest.SET_MEM_TABLE: _fd_per_region,
    FrontendRequest.SET_LOG_BASE: _fd_log,
    FrontendRequest.SET_LOG_FD: lambda b: _ONE_FD,
    FrontendRequest.SET_VRING_KICK: _fd_unless_nofd,
    FrontendRequest.SET_VRING_CALL: _fd_unless_nofd,
    FrontendRequest.SET_VRING_ERR: _fd_unless_nofd,
    FrontendRequest.SET_BACKEND_REQ_FD: lambda b: _ONE_FD,
    FrontendRequest.SET_INFLIGHT_FD: lambda b: _ONE_FD,
    FrontendRequest.GPU_SET_SOCKET: lambda b: _ONE_FD,
    FrontendRequest.ADD_MEM_REG: lambda b: _ONE_FD,
    FrontendRequest.REM_MEM_REG: _fd_rem_mem_reg,
    FrontendRequest.SET_DEVICE_STATE_FD: lambda b: _ONE_FD,
}
_FRONTEND_REPLY_FDS: dict[FrontendRequest, _FdRule] = {
    FrontendRequest.GET_INFLIGHT_FD: _fd_inflight_reply,
    FrontendRequest.POSTCOPY_ADVISE: lambda b: _ONE_FD,
    FrontendRequest.GET_SHARED_OBJECT: lambda b: _ZERO_OR_ONE,
    FrontendRequest.SET_DEVICE_STATE_FD: _fd_device_state_reply,
}
_BACKEND_REQUEST_FDS: dict[BackendRequest, _FdRule] = {
    BackendRequest.VRING_HOST_NOTIFIER_MSG: _fd_unless_nofd,
    BackendRequest.SHMEM_MAP: lambda b: _ONE_FD,
}
_BACKEND_REPLY_FDS: dict[BackendRequest, _FdRule] = {
    BackendRequest.SHARED_OBJECT_LOOKUP: lambda b: _ZERO_OR_ONE,
}


def _fd_rule(request: Request, body: Body, *, reply: bool) -> tuple[frozenset[int], bool]:
    rule: _FdRule | None
    if isinstance(request, FrontendRequest):
        rule = (_FRONTEND_REPLY_FDS if reply else _FRONTEND_REQUEST_FDS).get(request)
    else:
        rule = (_BACKEND_REPLY_FDS if reply else _BACKEND_REQUEST_FDS).get(request)
    return rule(body) if rule is not None else _NO_FDS


# ---------------------------------------------------------------------------
# Payload kinds
# ---------------------------------------------------------------------------


def _request_kinds(request: Request) -> tuple[Payload, ...]:
    if isinstance(request, FrontendRequest):
        kind = FRONTEND_REQUEST_PAYLOAD[request]
        if request is FrontendRequest.GET_SHARED_OBJECT:
            # QEMU sends this request without its UUID payload (size 0).
            return (kind, Payload.NONE)
        return (kind,)
    return (BACKEND_REQUEST_PAYLOAD[request],)


def _reply_kinds(request: Request) -> tuple[Payload, ...]:
    """Reply bodies allowed for ``request``: natural reply, the REPLY_ACK u64, then the
    other forms (tried in this order against the payload size)."""
    kinds: list[Payload] = []
    if isinstance(request, FrontendRequest):
        natural = FRONTEND_REPLY_PAYLOAD.get(request)
        if natural is not None:
            kinds.append(natural)
        if Payload.U64 not in kinds:
            kinds.append(Payload.U64)
        if request is FrontendRequest.SET_MEM_TABLE:
            kinds.append(Payload.MEMORY)  # postcopy: the back-end's mapping bases
        elif request is FrontendRequest.ADD_MEM_REG:
            kinds.append(Payload.MEM_REG)  # postcopy
        elif request is FrontendRequest.GET_CONFIG:
            kinds.append(Payload.NONE)  # "zero length of payload to indicate an error"
        elif request is FrontendRequest.GET_SHARED_OBJECT:
            kinds.append(Payload.NONE)
        elif request is FrontendRequest.SET_LOG_BASE:
            kinds.append(Payload.NONE)  # QEMU checks only the request code
    else:
        natural = BACKEND_REPLY_PAYLOAD.get(request)
        if natural is not None:
            kinds.append(natural)
    if Payload.U64 not in kinds:
        kinds.append(Payload.U64)
    return tuple(kinds)


def _kind_for_size(kinds: tuple[Payload, ...], size: int) -> Payload | None:
    for kind in kinds:
        if _size_matches(kind, size):
            return kind
    return None


def _kind_of_body(body: Body | int) -> Payload:
    kind = _KIND_OF_TYPE.get(type(body))
    if kind is None:
        raise TypeError(f"not a vhost-user message body: {type(body).__name__}")
    return kind


# ---------------------------------------------------------------------------
# Semantic validation
# ---------------------------------------------------------------------------


def _overflows(base: int, size: int) -> bool:
    return base + size > _U64_MAX + 1


def check_memory_regions(
    regions: Sequence[VhostUserMemoryRegion],
    *,
    max_regions: int = VHOST_MEMORY_BASELINE_NREGIONS,
    clause: str = _clause("VHOST_USER_SET_MEM_TABLE"),
) -> None:
    """Refuse a memory table a back-end must not map (raises ``ProtocolError``).

    Rules: 1..``max_regions`` regions; every region non-empty; neither
    ``guest_phys_addr + memory_size``, ``userspace_addr + memory_size`` nor
    ``mmap_offset + memory_size`` beyond 2**64; guest-physical ranges pairwise disjoint
    (a guest address must translate to exactly one place). The back-end reuses it for
    ADD_MEM_REG by passing its current regions plus the new one.
    """
    if not regions:
        raise ProtocolError("memory table with zero regions", clause)
    if len(regions) > max_regions:
        raise ProtocolError(
            f"memory table with {len(regions)} regions (at most {max_regions})", clause
        )
    for i, region in enumerate(regions):
        _check_region(region, i, clause)
    ordered = sorted(regions, key=lambda r: r.guest_phys_addr)
    for prev, cur in itertools.pairwise(ordered):
        if prev.guest_phys_addr + prev.memory_size > cur.guest_phys_addr:
            raise ProtocolError(
                f"memory regions overlap in guest-physical space: "
                f"[{prev.guest_phys_addr:#x}, +{prev.memory_size:#x}) and "
                f"[{cur.guest_phys_addr:#x}, +{cur.memory_size:#x})",
                clause,
            )


def _check_region(region: VhostUserMemoryRegion, i: int, clause: str) -> None:
    if region.memory_size == 0:
        raise ProtocolError(f"memory region {i} has size 0", clause)
    for name in ("guest_phys_addr", "userspace_addr", "mmap_offset"):
        if _overflows(getattr(region, name), region.memory_size):
            raise ProtocolError(
                f"memory region {i}: {name} {getattr(region, name):#x} + size "
                f"{region.memory_size:#x} overflows 2**64",
                clause,
            )


class _Validator:
    """Per-message semantic rules; ``num_queues`` bounds vring indexes (None: unchecked)."""

    def __init__(self, num_queues: int | None) -> None:
        self.num_queues = num_queues

    def index(self, request: Request, index: int) -> None:
        if self.num_queues is not None and index >= self.num_queues:
            raise _Reject(
                f"vring index {index} out of range (device has {self.num_queues} queues)",
                _c_msg(request),
            )

    def frontend_request(self, request: FrontendRequest, body: Body) -> None:
        check = self._FRONTEND.get(request)
        if check is not None:
            check(self, request, body)

    def backend_request(self, request: BackendRequest, body: Body) -> None:
        check = self._BACKEND.get(request)
        if check is not None:
            check(self, request, body)

    # -- front-end requests ------------------------------------------------

    def _state(self, request: Request, body: Body) -> None:
        assert isinstance(body, VhostVringState)
        self.index(request, body.index)

    def _vring_num(self, request: Request, body: Body) -> None:
        assert isinstance(body, VhostVringState)
        self.index(request, body.index)
        if not 1 <= body.num <= VIRTQUEUE_MAX_SIZE:
            raise _Reject(f"queue size {body.num} outside 1..{VIRTQUEUE_MAX_SIZE}", _c_msg(request))

    def _bool_state(self, request: Request, body: Body) -> None:
        assert isinstance(body, VhostVringState)
        self.index(request, body.index)
        if body.num not in (0, 1):
            raise _Reject(f"num must be 0 or 1, got {body.num}", _c_msg(request))

    def _vring_addr(self, request: Request, body: Body) -> None:
        assert isinstance(body, VhostVringAddr)
        self.index(request, body.index)
        if body.flags & ~(1 << VHOST_VRING_F_LOG):
            raise _Reject(f"unknown vring address flags {body.flags:#x}", _c_msg(request))

    def _vring_file(self, request: Request, body: Body) -> None:
        assert isinstance(body, VhostUserU64)
        if body.u64 & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
            raise _Reject(
                f"reserved bits set in {body.u64:#x} (bits 0-7 index, bit 8 no-fd)",
                _c_msg(request),
            )
        self.index(request, body.u64 & VHOST_USER_VRING_IDX_MASK)

    def _mem_table(self, request: Request, body: Body) -> None:
        assert isinstance(body, VhostUserMemory)
        try:
            check_memory_regions(body.regions, clause=_c_msg(request))
        except ProtocolError as exc:
            raise _Reject(exc.message, exc.clause or _c_msg(request)) from None

    def _mem_reg(self, request: Request, body: Body) -> None:
        assert isinstance(body, VhostUserMemoryRegion)
        try:
            _check_region(body, 0, _c_msg(request))
        except ProtocolError as exc:
            raise _Reject(exc.message, exc.clause or _c_msg(request)) from None

    def _log_base(self, request: Request, body: Body) -> None:
        assert isinstance(body, VhostUserLog)
        if _overflows(body.mmap_offset, body.mmap_size):
            raise _Reject("log mmap_offset + mmap_size overflows 2**64", _c_msg(request))

    def _config(self, request: Request, body: Body) -> None:
        assert isinstance(body, VhostUserConfig)
        if body.offset + body.size > VHOST_USER_MAX_CONFIG_SIZE:
            raise _Reject(
                f"config access [{body.offset}, +{body.size}) beyond "
                f"{VHOST_USER_MAX_CONFIG_SIZE} bytes",
                _c_msg(request),
            )
        if request is FrontendRequest.SET_CONFIG and body.flags not in (
            ConfigFlags.WRITABLE,
            ConfigFlags.MIGRATION,
        ):
            raise _Reject(f"unknown SET_CONFIG flags {body.flags:#x}", _c_msg(request))

    def _inflight(self, request: Request, body: Body) -> None:
        assert isinstance(body, VhostUserInflight)
        if body.num_queues == 0 or (
            self.num_queues is not None and body.num_queues > self.num_queues
        ):
            raise _Reject(
                f"inflight area for {body.num_queues} queues (device has {self.num_queues})",
                _c_msg(request),
            )
        if not 1 <= body.queue_size <= VIRTQUEUE_MAX_SIZE:
            raise _Reject(
                f"inflight queue size {body.queue_size} outside 1..{VIRTQUEUE_MAX_SIZE}",
                _c_msg(request),
            )
        if request is FrontendRequest.SET_INFLIGHT_FD and (
            body.mmap_size == 0 or _overflows(body.mmap_offset, body.mmap_size)
        ):
            raise _Reject(
                f"inflight area size {body.mmap_size:#x} at offset {body.mmap_offset:#x}",
                _c_msg(request),
            )

    def _iotlb_front(self, request: Request, body: Body) -> None:
        assert isinstance(body, VhostIotlbMsg)
        if body.type not in (IotlbType.UPDATE, IotlbType.INVALIDATE):
            raise _Reject(f"front-end IOTLB message of type {body.type}", _c_msg(request))
        self._iotlb_common(request, body)

    def _iotlb_common(self, request: Request, body: VhostIotlbMsg) -> None:
        if body.perm > IotlbPerm.RW:
            raise _Reject(f"IOTLB permission {body.perm}", _c_msg(request))
        if _overflows(body.iova, body.size) or _overflows(body.uaddr, body.size):
            raise _Reject("IOTLB range overflows 2**64", _c_msg(request))
        if body.type == IotlbType.UPDATE and body.size == 0:
            raise _Reject("IOTLB update of size 0", _c_msg(request))

    def _status(self, request: Request, body: Body) -> None:
        assert isinstance(body, VhostUserU64)
        if body.u64 > 0xFF:
            raise _Reject(f"device status {body.u64:#x} does not fit 8 bits", _c_msg(request))

    def _protocol_features(self, request: Request, body: Body) -> None:
        assert isinstance(body, VhostUserU64)
        inband = body.u64 & ProtocolFeature.INBAND_NOTIFICATIONS.mask
        needed = ProtocolFeature.BACKEND_REQ.mask | ProtocolFeature.REPLY_ACK.mask
        if inband and body.u64 & needed != needed:
            # "the back-end should close the connection as a response to a
            # VHOST_USER_SET_PROTOCOL_FEATURES message that sets the in-band
            # notifications feature flag without the other two"
            raise _Fatal(
                "INBAND_NOTIFICATIONS negotiated without BACKEND_REQ and REPLY_ACK", _C_INBAND
            )

    def _device_state(self, request: Request, body: Body) -> None:
        assert isinstance(body, VhostUserTransferDeviceState)
        if body.direction not in (TransferDirection.SAVE, TransferDirection.LOAD):
            raise _Reject(f"unknown transfer direction {body.direction}", _c_msg(request))
        if body.phase != MigrationPhase.STOPPED:
            raise _Reject(f"unknown migration phase {body.phase}", _c_msg(request))

    # -- back-end requests -------------------------------------------------

    def _host_notifier(self, request: Request, body: Body) -> None:
        assert isinstance(body, VhostUserVringArea)
        if body.u64 & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
            raise _Reject(f"reserved bits set in {body.u64:#x}", _c_msg(request))
        self.index(request, body.u64 & VHOST_USER_VRING_IDX_MASK)
        if not body.u64 & VHOST_USER_VRING_NOFD_MASK and _overflows(body.offset, body.size):
            raise _Reject("host notifier area overflows 2**64", _c_msg(request))

    def _iotlb_back(self, request: Request, body: Body) -> None:
        assert isinstance(body, VhostIotlbMsg)
        if body.type not in (IotlbType.MISS, IotlbType.ACCESS_FAIL):
            raise _Reject(f"back-end IOTLB message of type {body.type}", _c_msg(request))
        self._iotlb_common(request, body)

    def _shmem_map(self, request: Request, body: Body) -> None:
        assert isinstance(body, VhostUserMMap)
        if body.len == 0 or _overflows(body.fd_offset, body.len):
            raise _Reject("shared memory mapping of size 0 or overflowing", _c_msg(request))
        if _overflows(body.shm_offset, body.len):
            raise _Reject("shared memory mapping overflows its region", _c_msg(request))

    _FRONTEND: ClassVar[dict[FrontendRequest, Callable[[_Validator, Request, Body], None]]] = {
        FrontendRequest.SET_MEM_TABLE: _mem_table,
        FrontendRequest.SET_LOG_BASE: _log_base,
        FrontendRequest.SET_VRING_NUM: _vring_num,
        FrontendRequest.SET_VRING_ADDR: _vring_addr,
        FrontendRequest.SET_VRING_BASE: _state,
        FrontendRequest.GET_VRING_BASE: _state,
        FrontendRequest.SET_VRING_KICK: _vring_file,
        FrontendRequest.SET_VRING_CALL: _vring_file,
        FrontendRequest.SET_VRING_ERR: _vring_file,
        FrontendRequest.SET_PROTOCOL_FEATURES: _protocol_features,
        FrontendRequest.SET_VRING_ENABLE: _bool_state,
        FrontendRequest.IOTLB_MSG: _iotlb_front,
        FrontendRequest.SET_VRING_ENDIAN: _bool_state,
        FrontendRequest.GET_CONFIG: _config,
        FrontendRequest.SET_CONFIG: _config,
        FrontendRequest.GET_INFLIGHT_FD: _inflight,
        FrontendRequest.SET_INFLIGHT_FD: _inflight,
        FrontendRequest.VRING_KICK: _state,
        FrontendRequest.ADD_MEM_REG: _mem_reg,
        FrontendRequest.SET_STATUS: _status,
        FrontendRequest.SET_DEVICE_STATE_FD: _device_state,
    }
    _BACKEND: ClassVar[dict[BackendRequest, Callable[[_Validator, Request, Body], None]]] = {
        BackendRequest.IOTLB_MSG: _iotlb_back,
        BackendRequest.VRING_HOST_NOTIFIER_MSG: _host_notifier,
        BackendRequest.VRING_CALL: _state,
        BackendRequest.VRING_ERR: _state,
        BackendRequest.SHMEM_MAP: _shmem_map,
    }

    def reply(self, request: Request, body: Body) -> None:
        if (
            request is FrontendRequest.SET_DEVICE_STATE_FD
            and isinstance(body, VhostUserU64)
            and body.u64 & 0xFF
            and not body.u64 & VHOST_USER_VRING_NOFD_MASK
        ):
            # "The back-end must not both indicate an error and return a file descriptor."
            raise _Reject("error reply that also returns a descriptor", _c_msg(request))
        if isinstance(body, VhostUserConfig) and body.offset + body.size > (
            VHOST_USER_MAX_CONFIG_SIZE
        ):
            raise _Reject("config reply beyond 256 bytes", _c_msg(request))
        if isinstance(body, VhostUserMemory):
            self._mem_table(request, body)


# ---------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------


@dataclass
class _FdBatch:
    """Descriptors that arrived with the stream bytes [start, end)."""

    start: int
    end: int
    fds: list[int]


class Decoder:
    """Turns a vhost-user byte stream plus its descriptors into validated messages.

    ``channel`` and ``replies`` say what this end reads:

    - back-end on the vhost-user socket: ``Channel.MAIN``, ``replies=False``
      (front-end requests);
    - front-end on the vhost-user socket: ``Channel.MAIN``, ``replies=True``
      (back-end replies);
    - front-end on the back-end channel: ``Channel.BACKEND``, ``replies=False``
      (back-end requests);
    - back-end on the back-end channel: ``Channel.BACKEND``, ``replies=True``
      (front-end replies).

    ``num_queues`` (the device's vring count) bounds every vring index; ``None`` leaves
    indexes unchecked.

    Feed each ``recvmsg`` result as one :meth:`feed` call: descriptors belong to the last
    message whose header starts in that chunk. (The document: descriptors are sent with
    "the first byte of the message header"; and Linux ends a stream read right after the
    segment that carried descriptors, so that segment's message is the last one starting
    in the chunk.) Then drain :meth:`next_message` (or iterate) until it returns ``None``.
    The I/O edge reads with room for :data:`~.spec.VHOST_USER_MAX_FDS` descriptors
    (``socket.CMSG_SPACE(8 * 4)``) and treats ``MSG_CTRUNC`` as fatal.
    """

    def __init__(
        self,
        *,
        channel: Channel = Channel.MAIN,
        replies: bool = False,
        num_queues: int | None = None,
    ) -> None:
        self.channel = channel
        self.replies = replies
        self.num_queues = num_queues
        self._buf = bytearray()
        self._pos = 0
        #: stream offset of ``_buf[0]``
        self._base = 0
        self._batches: deque[_FdBatch] = deque()
        self._closed = False

    # -- state ---------------------------------------------------------------

    @property
    def num_queues(self) -> int | None:
        """The vring count indexes are checked against (``None``: unchecked)."""
        return self._validator.num_queues

    @num_queues.setter
    def num_queues(self, value: int | None) -> None:
        if value is not None and not 0 < value <= VHOST_USER_VRING_IDX_MASK + 1:
            raise ValueError("num_queues must be 1..256 (vring indexes are 8-bit)")
        self._validator = _Validator(value)

    @property
    def closed(self) -> bool:
        """True after a fatal error or :meth:`close`: the decoder takes no more input."""
        return self._closed

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a delivered message."""
        return len(self._buf) - self._pos

    @property
    def pending_fds(self) -> int:
        """Descriptors received but not yet handed out in a message."""
        return sum(len(b.fds) for b in self._batches)

    @property
    def at_boundary(self) -> bool:
        """True if no partial message is buffered (a clean place for the peer to hang up)."""
        return self.buffered == 0 and not self._batches

    def close(self) -> None:
        """Drop buffered bytes and close every descriptor still held. Idempotent."""
        self._closed = True
        batches, self._batches = self._batches, deque()
        for batch in batches:
            close_fds(batch.fds)
        self._buf = bytearray()
        self._pos = 0

    # -- input ---------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Append one chunk of the stream and the descriptors received with it.

        The decoder owns ``fds`` from now on, even if this raises.
        """
        if self._closed:
            close_fds(fds)
            raise ProtocolError("decoder is closed after a fatal protocol error", _C_COMM)
        if fds:
            start = self._base + len(self._buf)
            end = start + max(len(data), 1)
            self._batches.append(_FdBatch(start, end, list(fds)))
            if self.pending_fds > VHOST_USER_MAX_FDS:
                self._fatal(
                    f"more than {VHOST_USER_MAX_FDS} descriptors pending for one message",
                    _C_BACKEND_COMM,
                )
        self._buf += data
        if self.buffered > DECODER_BUFFER_LIMIT:
            self._fatal(
                f"more than {DECODER_BUFFER_LIMIT} unparsed bytes: drain next_message()",
                _C_COMM,
            )

    # -- output --------------------------------------------------------------

    def __iter__(self) -> Iterator[Message]:
        """Yield every complete message buffered so far."""
        while (msg := self.next_message()) is not None:
            yield msg

    def next_message(self) -> Message | None:
        """The next complete, validated message, or ``None`` if more bytes are needed.

        Raises :class:`MessageRejected` for one invalid message (its descriptors closed,
        the decoder still usable) and ``ProtocolError`` for a fatal error (every
        descriptor closed, the decoder closed).
        """
        if self._closed:
            raise ProtocolError("decoder is closed after a fatal protocol error", _C_COMM)
        if self.buffered < VHOST_USER_HDR_SIZE:
            self._check_orphans(self._base + self._pos)
            return None
        hdr = VHOST_USER_HEADER.unpack_from(self._buf, self._pos)
        request, kinds = self._check_header(hdr.request, hdr.flags, hdr.size)
        total = VHOST_USER_HDR_SIZE + hdr.size
        if self.buffered < total:
            return None
        start = self._base + self._pos
        payload = bytes(self._buf[self._pos + VHOST_USER_HDR_SIZE : self._pos + total])
        self._pos += total
        if self._pos == len(self._buf) or (self._pos > 4096 and self._pos * 2 > len(self._buf)):
            del self._buf[: self._pos]
            self._base += self._pos
            self._pos = 0
        fds = self._claim_fds(start, start + total)
        try:
            return self._build(request, hdr.flags, kinds, payload, fds)
        except _Reject as exc:
            close_fds(fds)
            raise MessageRejected(
                f"{request.spec_name}: {exc.message}",
                exc.clause,
                request=request,
                flags=hdr.flags,
                is_reply=self.replies,
            ) from None
        except _Fatal as exc:
            close_fds(fds)
            self._fatal(f"{request.spec_name}: {exc.message}", exc.clause)
        except BaseException:
            close_fds(fds)
            raise

    # -- internals -----------------------------------------------------------

    def _fatal(self, message: str, clause: str) -> NoReturn:
        self.close()
        raise ProtocolError(message, clause)

    def _check_header(
        self, code: int, flags: int, size: int
    ) -> tuple[Request, tuple[Payload, ...]]:
        if flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
            self._fatal(f"protocol version {flags & VHOST_USER_VERSION_MASK} (only 1)", _C_HEADER)
        if flags & ~HEADER_FLAGS_KNOWN:
            self._fatal(f"unknown header flags {flags:#x}", _C_HEADER)
        if self.replies:
            if flags != REPLY_FLAGS:
                self._fatal(f"reply flags {flags:#x} (must be version 1 + REPLY)", _C_HEADER)
        elif flags & VHOST_USER_REPLY_MASK:
            self._fatal("REPLY flag set on a request", _C_HEADER)
        enum: type[FrontendRequest] | type[BackendRequest] = (
            FrontendRequest if self.channel is Channel.MAIN else BackendRequest
        )
        try:
            request: Request = enum(code)
        except ValueError:
            request = enum.NONE
        if request is enum.NONE:
            self._fatal(f"unknown {self.channel.value}-channel request {code}", _C_COMM)
        kinds = _reply_kinds(request) if self.replies else _request_kinds(request)
        limit = min(max(_max_size(k) for k in kinds), VHOST_USER_MAX_PAYLOAD_SIZE)
        if size > limit:
            self._fatal(
                f"{request.spec_name} announces a {size}-byte payload (at most {limit})",
                _C_HEADER,
            )
        return request, kinds

    def _claim_fds(self, start: int, end: int) -> list[int]:
        """Descriptors of the message occupying stream bytes [start, end)."""
        self._check_orphans(start)
        fds: list[int] = []
        while self._batches:
            batch = self._batches[0]
            # the batch's owner is the last message starting inside [batch.start, batch.end)
            if batch.start <= start < batch.end and end >= batch.end:
                fds.extend(batch.fds)
                self._batches.popleft()
            else:
                break
        return fds

    def _check_orphans(self, next_start: int) -> None:
        """Batches that end at or before ``next_start`` held no message start: fatal."""
        if self._batches and self._batches[0].end <= next_start:
            self._fatal(
                "descriptors arrived with bytes that start no message header "
                "(they must come with the first byte of a message)",
                _C_COMM,
            )

    def _build(
        self,
        request: Request,
        flags: int,
        kinds: tuple[Payload, ...],
        payload: bytes,
        fds: list[int],
    ) -> Message:
        kind = _kind_for_size(kinds, len(payload))
        if kind is None:
            wanted = " or ".join(k.value for k in kinds)
            raise _Reject(
                f"payload of {len(payload)} bytes is not a {wanted} body",
                _C_REPLY_ACK if self.replies else _c_msg(request),
            )
        body = _decode_body(kind, payload, request)
        allowed, close_extra = _fd_rule(request, body, reply=self.replies)
        if len(fds) not in allowed:
            raise _Reject(
                f"carries {len(fds)} descriptors, expected "
                f"{' or '.join(str(n) for n in sorted(allowed))}",
                _c_msg(request),
            )
        if close_extra and fds:
            close_fds(fds)
            fds = []
        if self.replies:
            self._validator.reply(request, body)
        elif isinstance(request, FrontendRequest):
            self._validator.frontend_request(request, body)
        else:
            self._validator.backend_request(request, body)
        return Message(request, flags, body, fds)


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


def _as_body(body: Body | int) -> Body:
    return VhostUserU64(body) if isinstance(body, int) else body


def _frame(request: Request, flags: int, payload: bytes) -> bytes:
    return VHOST_USER_HEADER.pack_values(int(request), flags, len(payload)) + payload


def _check_fd_count(request: Request, body: Body, nfds: int, *, reply: bool) -> None:
    allowed, _ = _fd_rule(request, body, reply=reply)
    if nfds not in allowed:
        raise ValueError(
            f"{request.spec_name} {'reply ' if reply else ''}carries "
            f"{' or '.join(str(n) for n in sorted(allowed))} descriptors, not {nfds}"
        )


def encode(
    request: Request,
    body: Body | int = None,
    *,
    need_reply: bool = False,
    fds: Sequence[int] = (),
) -> bytes:
    """Encode a request (front-end or back-end, by the type of ``request``).

    ``body`` must be the request's declared body type (an ``int`` stands for a
    :class:`~.spec.VhostUserU64`); ``fds`` are only counted here: pass them to
    ``sendmsg`` together with the returned bytes. Raises ``TypeError`` / ``ValueError``
    for a body or descriptor count the protocol does not allow.
    """
    body = _as_body(body)
    kind = _kind_of_body(body)
    if kind not in _request_kinds(request):
        raise TypeError(f"{request.spec_name} does not carry a {kind.value} body")
    payload = _pack_body(kind, body)
    _check_fd_count(request, body, len(fds), reply=False)
    flags = HeaderFlags.VERSION_1 | (HeaderFlags.NEED_REPLY if need_reply else 0)
    return _frame(request, int(flags), payload)


def encode_reply(request: Request, body: Body | int = None, *, fds: Sequence[int] = ()) -> bytes:
    """Encode the reply to ``request`` (flags: version 1 + REPLY, as QEMU requires)."""
    body = _as_body(body)
    kind = _kind_of_body(body)
    if kind not in _reply_kinds(request):
        raise TypeError(f"a {request.spec_name} reply does not carry a {kind.value} body")
    payload = _pack_body(kind, body)
    _check_fd_count(request, body, len(fds), reply=True)
    return _frame(request, int(REPLY_FLAGS), payload)


def encode_ack(request: Request, status: int = 0) -> bytes:
    """The REPLY_ACK answer: ``u64`` 0 on success, non-zero on failure."""
    return encode_reply(request, VhostUserU64(status))


#: Requests whose reply is a value, not a status: no reply can say "failed" (QEMU would
#: take a u64 1 as feature bits, a queue count, a ring base of index 1 ...; it ignores the
#: SET_LOG_BASE reply payload). A refused one must end the connection.
_NO_ERROR_REPLY = frozenset(
    {
        FrontendRequest.GET_FEATURES,
        FrontendRequest.GET_PROTOCOL_FEATURES,
        FrontendRequest.GET_QUEUE_NUM,
        FrontendRequest.GET_MAX_MEM_SLOTS,
        FrontendRequest.GET_STATUS,
        FrontendRequest.GET_VRING_BASE,
        FrontendRequest.SET_LOG_BASE,
        FrontendRequest.GET_SHMEM_CONFIG,
    }
)


def error_reply(request: Request) -> bytes | None:
    """The reply that tells a waiting peer ``request`` failed, or ``None`` if none can.

    A ``u64`` 1 (the REPLY_ACK failure), except: GET_CONFIG gets an empty payload ("uses
    zero length of payload to indicate an error"); SET_DEVICE_STATE_FD gets error code 1
    with the no-descriptor bit; GET_INFLIGHT_FD, POSTCOPY_ADVISE and CREATE_CRYPTO_SESSION
    get the ``u64``, whose size QEMU refuses (it sees the failure). Requests answered with
    a bare value (GET_FEATURES, GET_VRING_BASE, ...) have no failure reply: ``None``, the
    caller must close the connection.
    """
    if request in _NO_ERROR_REPLY:
        return None
    if request is FrontendRequest.GET_CONFIG:
        return _frame(request, int(REPLY_FLAGS), b"")
    if request is FrontendRequest.SET_DEVICE_STATE_FD:
        return encode_ack(request, 1 | VHOST_USER_VRING_NOFD_MASK)
    return _frame(request, int(REPLY_FLAGS), _pack_body(Payload.U64, VhostUserU64(1)))


# ---------------------------------------------------------------------------
# Ring states
# ---------------------------------------------------------------------------


class KickMode(Enum):
    """How a ring learns about new buffers."""

    #: no SET_VRING_KICK since the last stop
    NONE = "none"
    #: an eventfd: the ring starts at its first kick
    FD = "fd"
    #: SET_VRING_KICK with the no-fd bit: the back-end polls; the ring starts at once
    POLLING = "polling"


@dataclass
class RingState:
    """What the front-end has told the back-end about one ring."""

    index: int
    num: int | None = None
    base: int | None = None
    addr: VhostVringAddr | None = None
    kick: KickMode = KickMode.NONE
    started: bool = False
    enabled: bool = False

    @property
    def configured(self) -> bool:
        """True once size and addresses are known (the back-end can process the ring)."""
        return self.num is not None and self.addr is not None

    @property
    def log(self) -> bool:
        """True if used-ring writes of this ring must be dirty-logged (VHOST_VRING_F_LOG)."""
        return self.addr is not None and bool(self.addr.flags & (1 << VHOST_VRING_F_LOG))


class RingTracker:
    """The document's "Ring states", per ring: stopped/started and disabled/enabled.

    - "Each ring is initialized in a stopped and disabled state."
    - Started: "upon receiving a kick (that is, detecting that file descriptor is
      readable) on the descriptor specified by VHOST_USER_SET_VRING_KICK or receiving the
      in-band message VHOST_USER_VRING_KICK"; the I/O layer reports the first readable
      kick with :meth:`kicked`. A kick set with the no-fd bit means polling, which
      starts the ring at once.
    - Stopped: "upon receiving VHOST_USER_GET_VRING_BASE" (the kick source is dropped
      too: a stale kick must not restart the ring).
    - Enabled/disabled: SET_VRING_ENABLE, tracked even while stopped; "upon receiving a
      VHOST_USER_SET_FEATURES message from the front-end without
      VHOST_USER_F_PROTOCOL_FEATURES set, the back-end must enable all rings immediately".

    A started ring is processed (enabled or not: "started and disabled: the back-end
    must process the ring without causing any side effects"), so its size and base must
    not change under it: SET_VRING_NUM, SET_VRING_BASE and SET_VRING_ENDIAN are refused,
    and SET_VRING_ADDR only passes when the three ring addresses stay the same (QEMU
    re-sends it on a running ring to toggle VHOST_VRING_F_LOG for migration).
    """

    def __init__(self, num_queues: int) -> None:
        if not 0 < num_queues <= VHOST_USER_VRING_IDX_MASK + 1:
            raise ValueError("num_queues must be 1..256")
        self._rings = [RingState(i) for i in range(num_queues)]

    @property
    def num_queues(self) -> int:
        """Number of rings tracked."""
        return len(self._rings)

    def __getitem__(self, index: int) -> RingState:
        return self._rings[index]

    def __iter__(self) -> Iterator[RingState]:
        return iter(self._rings)

    def __len__(self) -> int:
        return len(self._rings)

    @property
    def suspended(self) -> bool:
        """True while every ring is stopped: the device is *suspended* and must not write
        guest memory, notify the guest or send back-end messages."""
        return not any(r.started for r in self._rings)

    def is_started(self, index: int) -> bool:
        """True if ring ``index`` is started (the back-end processes it)."""
        return self._rings[index].started

    def is_enabled(self, index: int) -> bool:
        """True if ring ``index`` is enabled."""
        return self._rings[index].enabled

    def kicked(self, index: int) -> bool:
        """Report that the kick descriptor of ring ``index`` became readable.

        Returns True if this kick started the ring. A kick on a ring with no kick
        descriptor armed, or whose size/addresses are not known yet, starts nothing.
        """
        ring = self._rings[index]
        if ring.started or ring.kick is not KickMode.FD or not ring.configured:
            return False
        ring.started = True
        return True

    def reset(self) -> None:
        """Back to the initial state: every ring stopped, disabled and unconfigured."""
        self._rings = [RingState(i) for i in range(len(self._rings))]

    def handle(self, msg: Message) -> None:
        """Check a front-end request against the ring states, then apply it.

        Raises :class:`MessageRejected` (nothing applied) when the request addresses a
        ring outside the device or changes a started ring. Requests that do not concern
        rings pass through untouched.
        """
        if not isinstance(msg.request, FrontendRequest) or msg.is_reply:
            return
        request = msg.request
        body = msg.body
        try:
            self._handle(request, body)
        except _Reject as exc:
            raise MessageRejected(
                f"{request.spec_name}: {exc.message}", exc.clause, request=request, flags=msg.flags
            ) from None

    def _ring(self, request: Request, index: int | None) -> RingState:
        if index is None or index >= len(self._rings):
            raise _Reject(
                f"vring index {index} out of range (device has {len(self._rings)} queues)",
                _c_msg(request),
            )
        return self._rings[index]

    def _handle(self, request: FrontendRequest, body: Body) -> None:
        index = _vring_index(body, request)
        if request is FrontendRequest.SET_FEATURES:
            assert isinstance(body, VhostUserU64)
            if not body.u64 >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
                for ring in self._rings:
                    ring.enabled = True
        elif request is FrontendRequest.RESET_DEVICE:
            self.reset()
        elif request is FrontendRequest.RESET_OWNER:
            # deprecated: "use it to disable all rings"
            for ring in self._rings:
                ring.enabled = False
        elif request in (
            FrontendRequest.SET_VRING_NUM,
            FrontendRequest.SET_VRING_BASE,
            FrontendRequest.SET_VRING_ENDIAN,
        ):
            assert isinstance(body, VhostVringState)
            ring = self._ring(request, index)
            if ring.started:
                raise _Reject(f"ring {ring.index} is started", _C_RING_STATES)
            if request is FrontendRequest.SET_VRING_NUM:
                ring.num = body.num
            elif request is FrontendRequest.SET_VRING_BASE:
                ring.base = body.num
        elif request is FrontendRequest.SET_VRING_ADDR:
            assert isinstance(body, VhostVringAddr)
            ring = self._ring(request, index)
            old = ring.addr
            if ring.started and (
                old is None
                or (old.desc_user_addr, old.used_user_addr, old.avail_user_addr)
                != (body.desc_user_addr, body.used_user_addr, body.avail_user_addr)
            ):
                raise _Reject(
                    f"ring {ring.index} is started: only its log flag may change", _C_RING_STATES
                )
            ring.addr = body
        elif request is FrontendRequest.SET_VRING_KICK:
            assert isinstance(body, VhostUserU64)
            ring = self._ring(request, index)
            if body.u64 & VHOST_USER_VRING_NOFD_MASK:
                if not ring.configured:
                    raise _Reject(
                        f"polling requested on ring {ring.index} before its size and addresses",
                        _C_RING_STATES,
                    )
                ring.kick = KickMode.POLLING
                ring.started = True
            else:
                ring.kick = KickMode.FD
        elif request is FrontendRequest.VRING_KICK:
            ring = self._ring(request, index)
            if not ring.configured:
                raise _Reject(
                    f"kick on ring {ring.index} before its size and addresses", _C_RING_STATES
                )
            ring.started = True
        elif request is FrontendRequest.GET_VRING_BASE:
            ring = self._ring(request, index)
            ring.started = False
            ring.kick = KickMode.NONE
        elif request is FrontendRequest.SET_VRING_ENABLE:
            assert isinstance(body, VhostVringState)
            self._ring(request, index).enabled = bool(body.num)
        elif request in (FrontendRequest.SET_VRING_CALL, FrontendRequest.SET_VRING_ERR):
            self._ring(request, index)
