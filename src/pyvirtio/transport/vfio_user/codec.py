"""Sans-I/O framing of vfio-user messages (QEMU ``docs/interop/vfio-user.rst``).

:class:`MessageReader` takes the bytes and descriptors a stream socket delivered and
returns whole :class:`Message`\\ s; the ``encode_*`` functions build replies, error
replies and commands (the last for clients, such as the tests' one). Nothing here
touches a socket.

Descriptors: every descriptor received belongs to exactly one :class:`Message` (the
one whose first bytes arrived with it: the client sends a message and its
``SCM_RIGHTS`` in one ``sendmsg``; see :meth:`MessageReader.feed`). The message owns
them until a handler :meth:`Message.take_fds` them; :meth:`Message.close` closes
whatever was not taken, so each descriptor is closed exactly once whatever happens to
the message.

Malformed input: a header whose size is smaller than the header or larger than
:data:`~.spec.MAX_MESSAGE_SIZE`, or a message that is not a command, cannot be
answered reliably: :meth:`MessageReader.feed` raises :class:`VfioUserProtocolError` and
the connection is closed. A well-framed command with a bad body is answered with an
error reply (:class:`VfioUserError`, carrying the errno).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from dataclasses import dataclass, field
from typing import Any

from pyvirtio.errors import ProtocolError
from pyvirtio.transport.vfio_user.spec import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_MAX_MSG_FDS,
    HEADER,
    MAX_MESSAGE_SIZE,
    TYPE_MASK,
    VERSION,
    Command,
    Header,
    HeaderFlags,
    Version,
)

__all__ = [
    "Message",
    "MessageReader",
    "PeerCapabilities",
    "VfioUserError",
    "VfioUserProtocolError",
    "decode_version",
    "encode_command",
    "encode_error",
    "encode_reply",
    "encode_version",
]

_ST_HEADER = 'vfio-user.rst "Header"'
_ST_VERSION = 'vfio-user.rst "VFIO_USER_VERSION"'
#: Longest JSON capabilities document accepted in a VERSION message.
MAX_VERSION_DATA = 4096


class VfioUserProtocolError(ProtocolError):
    """The peer broke the framing: the connection must be closed."""


class VfioUserError(ProtocolError):
    """A command that is answered with an error reply carrying ``errno``."""

    def __init__(self, message: str, err: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = err


@dataclass(eq=False)
class Message:
    """One received message: its header, payload and the descriptors it carried."""

    header: Header
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def command(self) -> int:
        """The command number (may name no :class:`~.spec.Command`)."""
        return self.header.command

    @property
    def no_reply(self) -> bool:
        """True if the sender asked for no reply."""
        return bool(self.header.flags & HeaderFlags.NO_REPLY)

    def take_fds(self) -> list[int]:
        """Hand the descriptors over to the caller (the message no longer closes them)."""
        fds, self.fds = self.fds, []
        return fds

    def close(self) -> None:
        """Close every descriptor not taken (idempotent)."""
        fds, self.fds = self.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


class MessageReader:
    """Reassembles messages from stream chunks (see the module docs).

    ``expect_replies``: the reader of a client, which receives replies; a server's
    reader accepts commands only.
    """

    def __init__(self, *, expect_replies: bool = False) -> None:
        self._buf = bytearray()
        # stream offset of _buf[0], and of the end of what was fed
        self._base = 0
        self._end = 0
        # descriptors not yet given to a message: (stream offset of the last byte of
        # the chunk they came with, fds)
        self._fd_groups: list[tuple[int, list[int]]] = []
        self._replies = expect_replies
        self.closed = False

    def feed(self, data: bytes, fds: list[int] = []) -> list[Message]:  # noqa: B006 - read only
        """Add the bytes and descriptors of one ``recvmsg``; return the messages now
        complete.

        The descriptors belong to the message holding the chunk's last byte: Linux
        attaches ``SCM_RIGHTS`` to the first buffer of a ``sendmsg`` and a stream
        ``recvmsg`` stops after the buffer that carries descriptors, so they arrive
        with the first bytes of their message and no bytes of a later one.

        Raises :class:`VfioUserProtocolError` on a framing error (every descriptor
        held is closed first)."""
        if data:
            self._end += len(data)
            if fds:
                self._fd_groups.append((self._end - 1, list(fds)))
            self._buf += data
        elif fds:
            self._fd_groups.append((self._end, list(fds)))
        out: list[Message] = []
        try:
            while len(self._buf) >= HEADER.size:
                hdr = HEADER.unpack_from(self._buf, 0)
                if not HEADER.size <= hdr.size <= MAX_MESSAGE_SIZE:
                    raise VfioUserProtocolError(
                        f"message size {hdr.size} outside {HEADER.size}..{MAX_MESSAGE_SIZE} "
                        f"({_ST_HEADER})"
                    )
                kind = hdr.flags & TYPE_MASK
                want = HeaderFlags.REPLY if self._replies else HeaderFlags.COMMAND
                if kind != want:
                    raise VfioUserProtocolError(
                        f"message type {kind} where {int(want)} was expected ({_ST_HEADER})"
                    )
                if len(self._buf) < hdr.size:
                    break
                payload = bytes(self._buf[HEADER.size : hdr.size])
                end = self._base + hdr.size
                del self._buf[: hdr.size]
                self._base = end
                mine: list[int] = []
                while self._fd_groups and self._fd_groups[0][0] < end:
                    mine.extend(self._fd_groups.pop(0)[1])
                out.append(Message(hdr, payload, mine))
        except BaseException:
            for m in out:
                m.close()
            self.close()
            raise
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held."""
        return len(self._buf)

    def close(self) -> None:
        """Close the descriptors of an incomplete message (idempotent)."""
        self.closed = True
        groups, self._fd_groups = self._fd_groups, []
        for _, fds in groups:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._buf.clear()


def _encode(msg_id: int, command: int, flags: int, err: int, payload: bytes) -> bytes:
    size = HEADER.size + len(payload)
    return HEADER.pack(Header(msg_id & 0xFFFF, command, size, flags, err)) + payload


def encode_reply(request: Header, payload: bytes = b"") -> bytes:
    """The reply to ``request`` ("Message ID ... is echoed in the command's reply
    message"; the command "is also set in the reply header")."""
    return _encode(request.msg_id, request.command, HeaderFlags.REPLY, 0, payload)


def encode_error(request: Header, err: int) -> bytes:
    """An error reply: "If an error occurs, the reply message must only include the
    reply header", with the Error flag and the errno."""
    return _encode(request.msg_id, request.command, HeaderFlags.REPLY | HeaderFlags.ERROR, err, b"")


def encode_command(
    msg_id: int, command: int, payload: bytes = b"", *, no_reply: bool = False
) -> bytes:
    """A command message (clients)."""
    flags = HeaderFlags.COMMAND | (HeaderFlags.NO_REPLY if no_reply else 0)
    return _encode(msg_id, command, flags, 0, payload)


@dataclass(frozen=True)
class PeerCapabilities:
    """What the peer said in its VERSION capabilities (defaults of vfio-user.rst)."""

    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    pgsizes: int = 4096
    raw: dict[str, Any] = field(default_factory=dict)


def _positive(caps: dict[str, Any], name: str, default: int) -> int:
    value = caps.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise VfioUserError(f"capability {name}={value!r} is not a positive number ({_ST_VERSION})")
    return value


def decode_version(payload: bytes) -> tuple[Version, PeerCapabilities]:
    """Decode a VERSION body: major, minor and the optional NUL-terminated UTF-8 JSON
    ``{"capabilities": {...}}``. Raises :class:`VfioUserError` (EINVAL) if malformed."""
    if len(payload) < VERSION.size:
        raise VfioUserError(f"VERSION body of {len(payload)} bytes ({_ST_VERSION})")
    ver = VERSION.unpack_from(payload, 0)
    data = payload[VERSION.size :]
    caps: dict[str, Any] = {}
    if data:
        if len(data) > MAX_VERSION_DATA:
            raise VfioUserError(f"VERSION data of {len(data)} bytes ({_ST_VERSION})")
        text = data[:-1] if data.endswith(b"\0") else data
        if b"\0" in text:
            raise VfioUserError(f"VERSION data has a NUL inside ({_ST_VERSION})")
        try:
            doc = json.loads(text.decode("utf-8")) if text.strip() else {}
        except (UnicodeDecodeError, ValueError) as e:
            raise VfioUserError(f"VERSION data is not JSON: {e} ({_ST_VERSION})") from None
        if not isinstance(doc, dict):
            raise VfioUserError(f"VERSION data is not a JSON object ({_ST_VERSION})")
        got = doc.get("capabilities", {})
        if not isinstance(got, dict):
            raise VfioUserError(f"capabilities is not an object ({_ST_VERSION})")
        caps = got
    peer = PeerCapabilities(
        max_msg_fds=_positive(caps, "max_msg_fds", DEFAULT_MAX_MSG_FDS),
        max_data_xfer_size=_positive(caps, "max_data_xfer_size", DEFAULT_MAX_DATA_XFER_SIZE),
        pgsizes=_positive(caps, "pgsizes", 4096),
        raw=caps,
    )
    return ver, peer


def encode_version(major: int, minor: int, capabilities: dict[str, Any]) -> bytes:
    """A VERSION body: major, minor, then the JSON capabilities with their NUL."""
    doc = json.dumps({"capabilities": capabilities}, separators=(",", ":")).encode()
    return VERSION.pack(Version(major, minor)) + doc + b"\0"


def describe(msg: Message) -> str:
    """One line for a trace: the command, its id, and its decoded fixed body."""
    from pyvirtio.transport.vfio_user import spec

    layouts: dict[int, Any] = {
        Command.DMA_MAP: spec.DMA_MAP,
        Command.DMA_UNMAP: spec.DMA_UNMAP,
        Command.DEVICE_GET_REGION_INFO: spec.REGION_INFO,
        Command.DEVICE_GET_IRQ_INFO: spec.IRQ_INFO,
        Command.DEVICE_SET_IRQS: spec.IRQ_SET,
        Command.REGION_READ: spec.REGION_ACCESS,
        Command.REGION_WRITE: spec.REGION_ACCESS,
    }
    text = f"{command_name(msg.command)} id={msg.header.msg_id} size={msg.header.size}"
    if msg.fds:
        text += f" fds={len(msg.fds)}"
    if msg.no_reply:
        text += " no_reply"
    layout = layouts.get(msg.command)
    if layout is not None and len(msg.payload) >= layout.size:
        body = layout.unpack_from(msg.payload, 0)
        text += " " + " ".join(
            f"{k}={v:#x}" if isinstance(v, int) else f"{k}={v}" for k, v in body._asdict().items()
        )
        if msg.command == Command.REGION_WRITE:
            text += f" data={msg.payload[layout.size :][:8].hex()}"
    return text


def command_name(command: int) -> str:
    """``VFIO_USER_<NAME>`` of a command number (or the number)."""
    try:
        return f"VFIO_USER_{Command(command).name}"
    except ValueError:
        return f"command {command}"
