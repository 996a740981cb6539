"""Host back-ends of the network device: where its frames go and come from.

A :class:`NetBackend` carries Ethernet frames between a
:class:`~pyvirtio.devices.net.NetDevice` and the host over one or more *channels*
(a multiqueue TAP has one per queue pair; the others have one). Every channel has a
file descriptor that is readable while frames wait (the device declares it as a host
event source, :mod:`pyvirtio.core.events`), so the device's transport loop - the
vhost-user server, a loopback, PCI/MMIO over ``InProcessBus`` - serves receive with
no thread of its own. Descriptors are non-blocking: a back-end never blocks the
device, and what a full host queue cannot take is dropped and counted.

Back-ends here:

- :class:`TapBackend`: a Linux TAP interface (``/dev/net/tun``, ``IFF_TAP |
  IFF_NO_PI``, with ``IFF_VNET_HDR`` so the virtio_net_hdr - checksum and
  segmentation offload state - passes through both ways, and ``IFF_MULTI_QUEUE``
  for one channel per queue pair). Guest receive offloads are switched on the TAP
  with ``TUNSETOFFLOAD`` as negotiated.
- :class:`SocketBackend`: frames over a unix socket to another process: datagrams
  (one frame per datagram, QEMU's ``-netdev dgram``) or a stream with a 4-byte
  big-endian length before each frame (QEMU's ``-netdev stream`` framing).
- :class:`~pyvirtio.devices.net.switch.SwitchPort` (module ``switch``): a port of an
  in-process learning switch joining several pyvirtio devices.

The virtio_net_hdr seen by a back-end with :attr:`NetBackend.vnet_hdr` is always the
12-byte VERSION_1 layout (``num_buffers`` included, little-endian); the device
converts from and to what the driver negotiated.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Sequence
from typing import Protocol

from pyvirtio.errors import ConfigurationError

__all__ = [
    "MAX_FRAME",
    "VNET_HDR_LEN",
    "NetBackend",
    "SocketBackend",
    "TapBackend",
    "TUN_F_CSUM",
    "TUN_F_TSO4",
    "TUN_F_TSO6",
    "TUN_F_TSO_ECN",
]

#: The largest frame any back-end carries: a 64 KiB IP packet plus the Ethernet and
#: VLAN headers (virtio-v1.2 §5.1.6.3: "the maximum incoming packet will be to 65550
#: bytes long"; 4 more for a VLAN tag).
MAX_FRAME = 65550 + 4
#: The virtio_net_hdr a vnet-header back-end carries (VERSION_1 layout).
VNET_HDR_LEN = 12

# <linux/if_tun.h>
_TUNSETIFF = 0x400454CA
_TUNSETOFFLOAD = 0x400454D0
_TUNSETVNETHDRSZ = 0x400454D8
_TUNSETQUEUE = 0x400454D9
_TUNSETVNETLE = 0x400454DC
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_IFF_MULTI_QUEUE = 0x0100
_IFF_ATTACH_QUEUE = 0x0200
_IFF_DETACH_QUEUE = 0x0400
#: TUNSETOFFLOAD bits: what the TAP may hand the device (the guest's receive offloads)
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
_IFNAMSIZ = 16


class NetBackend(Protocol):
    """What the network device needs of a host back-end."""

    #: frames carry a 12-byte virtio_net_hdr in front, both ways (offloads can pass)
    vnet_hdr: bool
    #: host channels; the device maps queue pair ``i`` to channel ``i % channels``
    channels: int

    def fileno(self, channel: int) -> int:
        """A descriptor readable while frames wait on ``channel``."""

    def recv_into(self, channel: int, buf: memoryview) -> int | None:
        """Take one waiting frame (with its header if :attr:`vnet_hdr`) into ``buf``;
        its length, or None if none is waiting. A frame longer than ``buf`` is cut.
        :class:`EOFError` if the channel is gone for good (its peer hung up)."""

    def send(self, channel: int, parts: Sequence[bytes | bytearray | memoryview]) -> bool:
        """Send one frame (header first if :attr:`vnet_hdr`) gathered from ``parts``.
        False if the host could not take it now (dropped)."""

    def flush(self) -> bool:
        """Push out frames the host held back; True when nothing waits (the device
        retries from a timer otherwise)."""

    def set_offloads(self, tun_flags: int) -> None:
        """The guest's receive offloads (``TUN_F_*``): what may come with a header
        that asks for checksum completion or segmentation. Only for vnet back-ends."""

    def set_active_channels(self, n: int) -> None:
        """Only channels ``0..n-1`` are in use (the driver's queue pairs)."""

    def close(self) -> None:
        """Release the back-end's descriptors."""


def _set_nonblocking(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


class TapBackend:
    """A Linux TAP interface, opened (or created) by name.

    ``queues`` > 1 opens a multiqueue TAP: one descriptor per queue pair, each its
    own channel (the kernel steers a flow's receive to the queue it was sent on).
    ``vnet_hdr`` (default True) asks for ``IFF_VNET_HDR`` so checksum and
    segmentation offloads pass through; the header size is set to 12 bytes.
    The interface is created if it does not exist (and removed with the last
    descriptor, as TAPs that are not persistent are); bring it up and give it an
    address with ``ip``. Needs CAP_NET_ADMIN, or a TAP made for this user.
    """

    def __init__(self, name: str, *, queues: int = 1, vnet_hdr: bool = True) -> None:
        """See :class:`NetBackend`."""
        if not 0 < len(name.encode()) < _IFNAMSIZ:
            raise ConfigurationError(f"TAP name {name!r} must be 1..15 bytes")
        if queues < 1:
            raise ConfigurationError("a TAP needs at least one queue")
        self.name = name
        self.vnet_hdr = vnet_hdr
        self.channels = queues
        self._fds: list[int] = []
        flags = _IFF_TAP | _IFF_NO_PI
        if vnet_hdr:
            flags |= _IFF_VNET_HDR
        if queues > 1:
            flags |= _IFF_MULTI_QUEUE
        try:
            for _ in range(queues):
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
                self._fds.append(fd)
                ifr = struct.pack("16sH22x", name.encode(), flags)
                fcntl.ioctl(fd, _TUNSETIFF, ifr)
                if vnet_hdr:
                    fcntl.ioctl(fd, _TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
                    # the header is little-endian whatever the host (virtio 1)
                    try:
                        fcntl.ioctl(fd, _TUNSETVNETLE, struct.pack("i", 1))
                    except OSError as e:  # pragma: no cover - a big-endian host only
                        if e.errno != errno.EINVAL:
                            raise
                _set_nonblocking(fd)
            if vnet_hdr:
                self.set_offloads(0)
        except OSError as e:
            self.close()
            raise ConfigurationError(f"cannot open TAP {name!r}: {e.strerror}") from e
        self._active = queues

    def fileno(self, channel: int) -> int:
        """The descriptor of ``channel`` (readable while frames wait)."""
        return self._fds[channel]

    def recv_into(self, channel: int, buf: memoryview) -> int | None:
        """One waiting frame into ``buf`` (see :meth:`NetBackend.recv_into`)."""
        try:
            return os.readv(self._fds[channel], [buf])
        except BlockingIOError:
            return None

    def send(self, channel: int, parts: Sequence[bytes | bytearray | memoryview]) -> bool:
        """Send one frame (see :meth:`NetBackend.send`)."""
        try:
            os.writev(self._fds[channel], parts)
        except BlockingIOError:
            return False
        except OSError as e:
            # the kernel refused the frame (a header it rejects: EINVAL; the
            # interface down: EIO): the frame is lost, the device carries on
            if e.errno in (errno.EINVAL, errno.EIO, errno.ENOBUFS, errno.EFAULT):
                return False
            raise
        return True

    def flush(self) -> bool:
        """Nothing is ever held back here."""
        return True

    def set_offloads(self, tun_flags: int) -> None:
        """``TUNSETOFFLOAD`` on every queue."""
        for fd in self._fds:
            fcntl.ioctl(fd, _TUNSETOFFLOAD, tun_flags)

    def set_active_channels(self, n: int) -> None:
        """Attach queues ``0..n-1`` and detach the others (``TUNSETQUEUE``), so the
        kernel steers no frame to a queue the driver does not use."""
        if self.channels == 1:
            return
        n = max(1, min(n, self.channels))
        for i, fd in enumerate(self._fds):
            want = _IFF_ATTACH_QUEUE if i < n else _IFF_DETACH_QUEUE
            try:
                fcntl.ioctl(fd, _TUNSETQUEUE, struct.pack("16sH22x", b"", want))
            except OSError as e:
                if e.errno != errno.EINVAL:  # already in that state
                    raise
        self._active = n

    def close(self) -> None:
        """Close every descriptor."""
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


_LEN = struct.Struct(">I")
#: bytes a stream socket may hold back before new frames are dropped
_STREAM_BACKLOG = 1 << 20


class SocketBackend:
    """Frames over a unix socket to another process (one channel, no offloads).

    - :meth:`dgram`: a datagram socket bound at ``local``; each datagram is one
      frame. Frames go to ``remote`` if given, else to whoever sent the last frame
      (QEMU: ``-netdev dgram,id=n,local.type=unix,local.path=REMOTE,
      remote.type=unix,remote.path=LOCAL``).
    - :meth:`stream`: a connected stream socket; each frame is preceded by its length
      as a 4-byte big-endian number (QEMU's ``-netdev stream`` framing). :meth:`listen`
      waits for one peer at a path first.

    A frame longer than :data:`MAX_FRAME` from the peer is dropped (a stream peer
    that sends one is disconnected: its framing can no longer be trusted). When the
    peer's socket buffer is full the frame is dropped.
    """

    vnet_hdr = False
    channels = 1

    def __init__(self, sock: socket.socket, *, remote: str | None = None) -> None:
        """See :class:`NetBackend`."""
        sock.setblocking(False)
        self.sock = sock
        self.remote = remote
        self._stream = sock.type == socket.SOCK_STREAM
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._last_peer: str | None = None
        #: frames dropped because the peer could not take them, or too long
        self.dropped = 0
        #: True once a stream peer hung up or broke the framing
        self.disconnected = False

    @classmethod
    def dgram(cls, local: str, remote: str | None = None) -> SocketBackend:
        """A datagram socket bound at ``local`` (an old socket file there is removed)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(local)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(local)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        except OSError:
            s.close()
            raise
        return cls(s, remote=remote)

    @classmethod
    def stream(cls, sock: socket.socket) -> SocketBackend:
        """A connected stream socket (length-prefixed frames)."""
        return cls(sock)

    @classmethod
    def listen(cls, path: str, timeout: float | None = None) -> SocketBackend:
        """Listen at ``path`` and take the first stream peer (QEMU ``-netdev
        stream,server=off,addr.type=unix,addr.path=PATH``)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            srv.bind(path)
            srv.listen(1)
            srv.settimeout(timeout)
            conn, _ = srv.accept()
        finally:
            srv.close()
        return cls(conn)

    def fileno(self, channel: int) -> int:
        """The descriptor of ``channel`` (readable while frames wait)."""
        return self.sock.fileno()

    def recv_into(self, channel: int, buf: memoryview) -> int | None:
        """One waiting frame into ``buf`` (see :meth:`NetBackend.recv_into`)."""
        if self.disconnected:
            raise EOFError("the stream peer is gone")
        if not self._stream:
            try:
                n, addr = self.sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:
                return None
            if isinstance(addr, str) and addr:
                self._last_peer = addr
            return n
        return self._recv_stream(buf)

    def _recv_stream(self, buf: memoryview) -> int | None:
        while True:
            frame = self._frame_from_buffer(buf)
            if frame is not None:
                return frame
            try:
                data = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:
                data = b""
            if not data:
                self._hang_up()
                raise EOFError("the stream peer hung up")
            self._inbuf += data

    def _frame_from_buffer(self, buf: memoryview) -> int | None:
        if len(self._inbuf) < 4:
            return None
        n: int = _LEN.unpack_from(self._inbuf)[0]
        if n > MAX_FRAME:
            self.dropped += 1
            self._hang_up()
            raise EOFError(f"the stream peer sent a {n}-byte frame (framing broken)")
        if len(self._inbuf) < 4 + n:
            return None
        take = min(n, len(buf))
        buf[:take] = self._inbuf[4 : 4 + take]
        del self._inbuf[: 4 + n]
        return take

    def _hang_up(self) -> None:
        """The stream peer is gone or broke the framing: stop using it."""
        self.disconnected = True
        self._inbuf.clear()
        self._outbuf.clear()

    def send(self, channel: int, parts: Sequence[bytes | bytearray | memoryview]) -> bool:
        """Send one frame (see :meth:`NetBackend.send`)."""
        if self.disconnected:
            self.dropped += 1
            return False
        if self._stream:
            return self._send_stream(parts)
        dest = self.remote or self._last_peer
        if dest is None:
            self.dropped += 1
            return False
        try:
            self.sock.sendmsg(list(parts), [], 0, dest)
        except OSError:
            # the peer's buffer is full (EAGAIN), or no peer at the address
            # (ECONNREFUSED, ENOENT): the frame is dropped
            self.dropped += 1
            return False
        return True

    def _send_stream(self, parts: Sequence[bytes | bytearray | memoryview]) -> bool:
        # whole frames only: a frame is queued entirely or not at all, and what the
        # socket did not take waits (bounded) for flush()
        if not self.flush() and len(self._outbuf) >= _STREAM_BACKLOG:
            self.dropped += 1
            return False
        self._outbuf += _LEN.pack(sum(len(p) for p in parts))
        for p in parts:
            self._outbuf += p
        self.flush()
        return True

    def flush(self) -> bool:
        """Push out what a stream socket did not take yet; True when nothing waits."""
        if not self._outbuf:
            return True
        if self.disconnected:
            return True
        try:
            sent = self.sock.send(self._outbuf, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self._hang_up()
            return True
        del self._outbuf[:sent]
        return not self._outbuf

    def set_offloads(self, tun_flags: int) -> None:
        """No offloads: frames carry no header."""

    def set_active_channels(self, n: int) -> None:
        """One channel."""

    def close(self) -> None:
        """Close every descriptor."""
        self.sock.close()
