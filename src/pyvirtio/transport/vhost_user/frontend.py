"""vhost-user front-end (driver side): pyvirtio drivers over any vhost-user back-end.

:class:`VhostUserFrontend` implements :class:`~pyvirtio.core.driver.DriverTransport`
over the vhost-user protocol (QEMU ``docs/interop/vhost-user.rst``): it plays the part
QEMU plays for a VM. It connects to a back-end's unix socket, owns memfd-backed guest
RAM that it shares with ``VHOST_USER_SET_MEM_TABLE``, negotiates virtio and protocol
features, and turns the driver's register operations into vhost-user messages:

=============================  ==========================================================
driver operation               vhost-user
=============================  ==========================================================
(construction)                 GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
                               SET_BACKEND_REQ_FD, SET_OWNER
``get_device_features``        the GET_FEATURES answer, minus the vhost-only bits 26/30
``set_driver_features``        SET_FEATURES (+ bit 30 when offered), SET_MEM_TABLE; with
                               ``inflight=True`` GET_INFLIGHT_FD (once), SET_INFLIGHT_FD
``get_status``/``set_status``  GET_STATUS/SET_STATUS with ``F_STATUS``, else local
``read_config``/``write_...``  GET_CONFIG / SET_CONFIG (``F_CONFIG``)
``config_generation``          a counter bumped by each BACKEND_CONFIG_CHANGE_MSG
``setup_queue``                SET_VRING_NUM, _BASE, _ADDR, _KICK, _CALL, _ENABLE 1
``notify``                     a write to the ring's kick eventfd
``poll_interrupts``            the call eventfds and the back-end channel
``reset``                      SET_VRING_ENABLE 0 + GET_VRING_BASE per set-up ring, then
                               RESET_DEVICE and/or SET_STATUS 0 when negotiated
``reconnect`` (not a driver    a new connection to a restarted back-end: the handshake,
operation)                     SET_FEATURES, SET_MEM_TABLE, SET_INFLIGHT_FD (the area
                               kept), every ring again, SET_STATUS, a kick per ring
=============================  ==========================================================

Addresses: guest RAM is one memfd region at guest-physical 0 whose front-end
"user address" is chosen identical to its guest-physical address, so a ring's
``SET_VRING_ADDR`` user addresses equal its guest-physical addresses. The allocator
never hands out the first page (a ring at address 0 would read as "not set up").

vhost-user has no device-type message: the driver's type is given to the constructor
(``device_id``, 0 = unknown, any driver accepted); ``pyvirtio probe`` guesses it
from what the back-end offers (:func:`pyvirtio.devices.registry.guess_device_id`) when
the user does not say.

The back-end is untrusted: every reply is checked (request code, flags, body size and
shape, vring index, config size) and waited for with a deadline. A malformed, late or
missing reply raises :class:`~pyvirtio.errors.ProtocolError` and the connection is
dropped (vhost-user.rst "Communication": "If front-end ... receives a wrong reply it
will close the connection"); every later call raises the same error, never hangs. A
well-formed refusal (a non-zero REPLY_ACK, an empty GET_CONFIG reply) raises
``ProtocolError`` too but keeps the connection. Descriptors received from the back-end
are always closed.

Not thread-safe: use one transport from one thread (as the drivers are).
"""

from __future__ import annotations

import array
import contextlib
import math
import mmap
import os
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pyvirtio.core.driver import CONFIG_CHANGE, VirtioDriver
from pyvirtio.errors import ConfigurationError, DriverError, ProtocolError
from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.features import Feature, has
from pyvirtio.spec.ids import FIXED_QUEUES
from pyvirtio.transport._unix import close_fds, connect_unix, fds_from_ancdata
from pyvirtio.transport.vhost_user.codec import (
    Channel,
    Decoder,
    Message,
    MessageRejected,
    encode,
    encode_ack,
)
from pyvirtio.transport.vhost_user.spec import (
    FRONTEND_REPLY_PAYLOAD,
    NATIVE_LITTLE_ENDIAN,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_MAX_CONFIG_SIZE,
    VHOST_USER_MAX_FDS,
    VHOST_USER_VRING_IDX_MASK,
    VIRTQUEUE_MAX_SIZE,
    BackendRequest,
    ConfigFlags,
    FrontendRequest,
    ProtocolFeature,
    VhostUserConfig,
    VhostUserInflight,
    VhostUserMemory,
    VhostUserMemoryRegion,
    VhostUserU64,
    VhostVringAddr,
    VhostVringState,
)
from pyvirtio.virtqueue.common import QueueAddresses, QueueState

__all__ = [
    "DEFAULT_MEM_SIZE",
    "DEFAULT_QUEUE_SIZE",
    "DEFAULT_REPLY_TIMEOUT",
    "SUPPORTED_PROTOCOL_FEATURES",
    "VHOST_ONLY_FEATURES",
    "VhostUserFrontend",
    "connect",
    "encode_vring_base",
]

#: Guest RAM of a front-end unless told otherwise (16 MiB).
DEFAULT_MEM_SIZE = 16 << 20
#: Largest queue size offered to drivers unless told otherwise. vhost-user has no
#: "maximum queue size" message; 256 is QEMU's default ``queue-size`` for
#: vhost-user-blk, and libvhost-user accepts up to 1024.
DEFAULT_QUEUE_SIZE = 256
#: Seconds to wait for each reply before declaring the back-end broken.
DEFAULT_REPLY_TIMEOUT = 10.0
#: Seconds to keep retrying ``connect()`` while the socket does not exist yet / refuses.
DEFAULT_CONNECT_TIMEOUT = 5.0

#: Protocol features this front-end implements (and asks for when offered).
SUPPORTED_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ.mask
    | ProtocolFeature.REPLY_ACK.mask
    | ProtocolFeature.BACKEND_REQ.mask
    | ProtocolFeature.CONFIG.mask
    | ProtocolFeature.RESET_DEVICE.mask
    | ProtocolFeature.STATUS.mask
    | ProtocolFeature.INFLIGHT_SHMFD.mask
)

#: GET_FEATURES bits that are vhost's, not the device's: ``VHOST_F_LOG_ALL`` (26,
#: migration dirty logging) and ``VHOST_USER_F_PROTOCOL_FEATURES`` (30, the virtio
#: UNUSED bit a driver must refuse). Never shown to a driver.
VHOST_ONLY_FEATURES = 1 << VHOST_F_LOG_ALL | 1 << VHOST_USER_F_PROTOCOL_FEATURES

_EFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC
_RECV_SIZE = 16384
_CMSG_SPACE = socket.CMSG_SPACE(VHOST_USER_MAX_FDS * array.array("i").itemsize)

_C_COMM = 'vhost-user.rst "Communication"'
_C_FEATURES = 'virtio-v1.2 §2.2.1 "Driver Requirements: Feature Bits"'

D = TypeVar("D", bound=VirtioDriver)


def _c_msg(request: FrontendRequest | BackendRequest) -> str:
    return f'vhost-user.rst "{request.spec_name}"'


def encode_vring_base(state: QueueState, packed: bool) -> int:
    """The ``num`` of SET_VRING_BASE / GET_VRING_BASE for ``state``.

    Split rings: the next available index to process (16 bits, free-running). Packed
    rings: bits 0-14 last avail index, 15 driver (avail) wrap counter, 16-30 used index,
    31 used wrap counter (virtio-v1.2 §2.8.1 "Driver and Device Ring Wrap Counters").
    """
    if not packed:
        return state.avail_idx & 0xFFFF
    avail = (state.avail_idx & 0x7FFF) | (0x8000 if state.avail_wrap else 0)
    used = (state.used_idx & 0x7FFF) | (0x8000 if state.used_wrap else 0)
    return avail | used << 16


@dataclass
class _Ring:
    """What this front-end told the back-end about one vring."""

    kick: int
    call: int
    size: int = 0
    configured: bool = False
    addrs: QueueAddresses | None = None


class VhostUserFrontend:
    """A :class:`~pyvirtio.core.driver.DriverTransport` to a vhost-user back-end.

    ``path`` is the back-end's listening unix socket (retried for
    ``connect_timeout`` seconds while it does not exist yet or refuses), or an already
    connected ``socket.socket`` the transport takes over. ``device_id`` is the
    device type the back-end serves (0: unknown). ``mem_size`` bytes of guest RAM are
    created as one memfd. ``num_queues`` overrides the queue count for back-ends
    without ``VHOST_USER_PROTOCOL_F_MQ`` (default: the device type's fixed count);
    ``queue_size`` is the largest ring size offered to drivers. ``protocol_features``
    masks the protocol features asked for (default: all those implemented, see
    :data:`SUPPORTED_PROTOCOL_FEATURES`).

    Raises :class:`~pyvirtio.errors.ConfigurationError` if the socket cannot be
    reached and :class:`~pyvirtio.errors.ProtocolError` if the back-end misbehaves
    during the connection handshake (nothing is leaked either way).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | socket.socket,
        *,
        device_id: int = 0,
        mem_size: int = DEFAULT_MEM_SIZE,
        num_queues: int | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        protocol_features: int = SUPPORTED_PROTOCOL_FEATURES,
        reply_timeout: float = DEFAULT_REPLY_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        inflight: bool = False,
    ) -> None:
        if not NATIVE_LITTLE_ENDIAN:  # pragma: no cover - no such host in CI
            raise ConfigurationError(
                "vhost-user numbers are host-endian: big-endian hosts unsupported"
            )
        page = mmap.PAGESIZE
        if mem_size < 2 * page or mem_size % page:
            raise ConfigurationError(
                f"guest RAM must be a multiple of {page} bytes, at least {2 * page}"
            )
        if not 1 <= queue_size <= VIRTQUEUE_MAX_SIZE:
            raise ConfigurationError(f"queue_size must be 1..{VIRTQUEUE_MAX_SIZE}")
        if num_queues is not None and not 1 <= num_queues <= VHOST_USER_VRING_IDX_MASK + 1:
            raise ConfigurationError("num_queues must be 1..256 (vring indexes are 8-bit)")
        if reply_timeout <= 0:
            raise ConfigurationError("reply_timeout must be positive")
        #: vhost-user carries virtio 1.x devices only
        self.legacy = False
        #: the socket path (None when given a connected socket)
        self.path: str | None = None if isinstance(path, socket.socket) else os.fspath(path)
        self.reply_timeout = reply_timeout
        self._device_id = int(device_id)
        self._queues_override = num_queues
        self._queue_size = queue_size
        self._dead: ProtocolError | None = None
        self._closed = False
        self._want_protocol = protocol_features
        #: ask for an inflight area (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) and keep it
        #: across :meth:`reconnect`, so requests in flight survive a back-end restart
        self.use_inflight = inflight
        self._inflight_fd = -1
        self._inflight_body: VhostUserInflight | None = None
        self._sock: socket.socket | None = None
        self._backend: socket.socket | None = None
        #: an fd number kept for the back-end channel after it hung up (stays quiet)
        self._backend_quiet = -1
        self._rings: dict[int, _Ring] = {}
        self._fd_queue: dict[int, int] = {}
        self._poller = select.poll()
        self._reply_decoder = Decoder(channel=Channel.MAIN, replies=True)
        self._backend_decoder = Decoder(channel=Channel.BACKEND, replies=False)
        self._status = 0
        self._driver_features: int | None = None
        self._generation = 0
        self._config_pending = False
        self._own_config: bytes | None = None
        #: raw GET_FEATURES answer (virtio bits plus the vhost bits 26/30)
        self.backend_features = 0
        #: GET_PROTOCOL_FEATURES answer (0 without bit 30)
        self.protocol_features_offered = 0
        #: protocol features in use (offered & asked for)
        self.protocol_features = 0
        #: GET_QUEUE_NUM answer (None without F_MQ)
        self.backend_queue_num: int | None = None
        #: back-end channel requests refused (unexpected types), for diagnostics
        self.backend_requests_refused = 0
        #: last GET_VRING_BASE answer per ring (ring position when it was stopped)
        self.vring_bases: dict[int, int] = {}
        self.mem = GuestMemory.create(mem_size, name="pyvirtio-vhost-user")
        try:
            for region in self.mem.regions:
                # the front-end address space: user address == guest-physical address
                region.userspace_addr = region.guest_phys_addr
            self.allocator = GuestAllocator(page, mem_size - page)
            self._sock = (
                path if isinstance(path, socket.socket) else self._connect(path, connect_timeout)
            )
            self._sock.settimeout(reply_timeout)
            self._poller.register(self._sock.fileno(), select.POLLIN)
            self._handshake(protocol_features)
            self._num_queues = self._queue_count(num_queues)
            self._reply_decoder.num_queues = self._num_queues
            self._backend_decoder.num_queues = self._num_queues
        except BaseException:
            self.close()
            raise

    # -- connection -----------------------------------------------------------------

    @staticmethod
    def _connect(path: str | os.PathLike[str], timeout: float) -> socket.socket:
        name = f"vhost-user socket {os.fspath(path)!r}"
        return connect_unix(path, timeout, name=name, retry_every=0.02)

    def _handshake(self, wanted: int) -> None:
        """vhost-user "Communication": features, protocol features, queue count,
        back-end channel, then SET_OWNER ("Issued when a new connection is
        established")."""
        self.backend_features = self._get_u64(FrontendRequest.GET_FEATURES)
        if has(self.backend_features, VHOST_USER_F_PROTOCOL_FEATURES):
            self.protocol_features_offered = self._get_u64(FrontendRequest.GET_PROTOCOL_FEATURES)
            wanted &= SUPPORTED_PROTOCOL_FEATURES  # never one this class does not implement
            if not self.use_inflight:
                wanted &= ~ProtocolFeature.INFLIGHT_SHMFD.mask
            self.protocol_features = self.protocol_features_offered & wanted
            self._send(FrontendRequest.SET_PROTOCOL_FEATURES, VhostUserU64(self.protocol_features))
        if self.has_protocol_feature(ProtocolFeature.MQ):
            qnum = self._get_u64(FrontendRequest.GET_QUEUE_NUM)
            if not 1 <= qnum <= VHOST_USER_VRING_IDX_MASK + 1:
                raise self._die(
                    f"GET_QUEUE_NUM answered {qnum} (a device has 1..256 queues)",
                    _c_msg(FrontendRequest.GET_QUEUE_NUM),
                )
            self.backend_queue_num = qnum
        if self.has_protocol_feature(ProtocolFeature.BACKEND_REQ):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                ours.setblocking(False)
                self._backend = ours
                self._request(FrontendRequest.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
            finally:
                theirs.close()
            self._poller.register(ours.fileno(), select.POLLIN)
        self._request(FrontendRequest.SET_OWNER)

    def _queue_count(self, override: int | None) -> int:
        if override is not None:
            if self.backend_queue_num is not None and override > self.backend_queue_num:
                raise ConfigurationError(
                    f"num_queues {override} is more than the back-end's {self.backend_queue_num}"
                )
            return override
        if self.backend_queue_num is not None:
            return self.backend_queue_num
        return FIXED_QUEUES.get(self._device_id, 1)

    # -- message I/O ------------------------------------------------------------------

    def _die(self, message: str, clause: str | None = _C_COMM) -> ProtocolError:
        """The connection is unusable: drop it; every later call raises this error."""
        if self._dead is None:
            self._dead = ProtocolError(message, clause)
            sock, self._sock = self._sock, None
            if sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._poller.unregister(sock.fileno())
                sock.close()
            self._reply_decoder.close()
        return self._dead

    def _check_alive(self) -> socket.socket:
        if self._dead is not None:
            raise self._dead
        if self._closed or self._sock is None:
            raise ConfigurationError("the vhost-user front-end is closed")
        return self._sock

    def _send(
        self,
        request: FrontendRequest,
        body: Any = None,
        *,
        need_reply: bool = False,
        fds: Sequence[int] = (),
    ) -> None:
        sock = self._check_alive()
        data = encode(request, body, need_reply=need_reply, fds=fds)
        try:
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sent = sock.sendmsg([data], anc)
            else:
                sent = sock.send(data)
            if sent < len(data):
                sock.sendall(data[sent:])
        except OSError as e:  # includes the socket timeout
            raise self._die(
                f"cannot send {request.spec_name} to the back-end: {e or 'timed out'}"
            ) from None

    def _recv_reply(self, request: FrontendRequest) -> Message:
        """Wait (with a deadline) for the reply to ``request``; validate its code."""
        deadline = time.monotonic() + self.reply_timeout
        while True:
            sock = self._check_alive()
            try:
                msg = self._reply_decoder.next_message()
            except ProtocolError as e:  # MessageRejected too: the reply we wait for is bad
                raise self._die(
                    f"bad reply to {request.spec_name}: {e.message}", e.clause
                ) from None
            if msg is not None:
                if msg.request is not request:
                    msg.close()
                    raise self._die(
                        f"reply to {request.spec_name} is a {msg.request.spec_name} reply"
                    )
                return msg
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not _wait_fd(sock.fileno(), select.POLLIN, remaining):
                raise self._die(
                    f"the back-end did not answer {request.spec_name} within "
                    f"{self.reply_timeout:g} s"
                )
            self._recv_into(sock, self._reply_decoder, f"waiting for {request.spec_name}")

    def _recv_into(self, sock: socket.socket, decoder: Decoder, what: str) -> None:
        """One ``recvmsg`` from the main socket into ``decoder``; any failure (end of
        stream, truncated descriptors, a stream the decoder refuses) kills the
        transport and raises."""
        got = _recvmsg(sock)
        if isinstance(got, OSError):
            raise self._die(f"connection to the back-end failed {what}: {got}")
        if got is None:
            raise self._die(f"connection to the back-end failed {what}: no data")
        data, fds, truncated = got
        if truncated:
            close_fds(fds)
            raise self._die(f"the back-end sent more than {VHOST_USER_MAX_FDS} descriptors")
        if not data:
            close_fds(fds)
            raise self._die(f"the back-end closed the connection {what}")
        try:
            decoder.feed(data, fds)
        except ProtocolError as e:
            raise self._die(f"bad data from the back-end {what}: {e.message}", e.clause) from None

    def _request(
        self,
        request: FrontendRequest,
        body: Any = None,
        *,
        fds: Sequence[int] = (),
        ack: bool = True,
    ) -> Message | None:
        """Send ``request``; wait for its reply when it has one, or when REPLY_ACK is
        negotiated and ``ack`` (then a non-zero status raises ProtocolError)."""
        natural = request in FRONTEND_REPLY_PAYLOAD
        need_reply = not natural and ack and self.has_protocol_feature(ProtocolFeature.REPLY_ACK)
        self._send(request, body, need_reply=need_reply, fds=fds)
        if natural:
            return self._recv_reply(request)
        if need_reply:
            with self._recv_reply(request) as msg:
                if not isinstance(msg.body, VhostUserU64):
                    raise self._die(
                        f"REPLY_ACK for {request.spec_name} is not a u64",
                        'vhost-user.rst "VHOST_USER_PROTOCOL_F_REPLY_ACK"',
                    )
                if msg.body.u64:
                    raise ProtocolError(
                        f"the back-end refused {request.spec_name} (status {msg.body.u64})",
                        'vhost-user.rst "VHOST_USER_PROTOCOL_F_REPLY_ACK"',
                    )
        return None

    def _get_u64(self, request: FrontendRequest) -> int:
        msg = self._request(request)
        assert msg is not None  # requests with a natural reply always return one
        with msg:
            if not isinstance(msg.body, VhostUserU64):
                raise self._die(f"{request.spec_name} reply is not a u64", _c_msg(request))
            return msg.body.u64

    def _barrier(self) -> None:
        """Make sure the back-end processed everything sent so far: nothing to do with
        REPLY_ACK (each request was acknowledged), else a GET_FEATURES round trip."""
        if not self.has_protocol_feature(ProtocolFeature.REPLY_ACK):
            self._get_u64(FrontendRequest.GET_FEATURES)

    # -- back-end channel --------------------------------------------------------------

    def _service_backend(self) -> None:
        """Handle every request waiting on the back-end channel (never blocks).

        A broken channel (hang-up, malformed stream) is retired, as QEMU closes it;
        the main connection carries on.
        """
        while (chan := self._backend) is not None:
            got = _recvmsg(chan)
            if got is None:  # nothing more for now
                return
            if isinstance(got, OSError):
                self._retire_backend_channel()
                return
            data, fds, truncated = got
            if truncated or not data:
                close_fds(fds)
                self._retire_backend_channel()
                return
            try:
                self._backend_decoder.feed(data, fds)
                while True:
                    try:
                        msg = self._backend_decoder.next_message()
                    except MessageRejected as e:
                        if e.error_reply is not None:
                            self._backend_reply(e.error_reply)
                        continue
                    if msg is None:
                        break
                    with msg:
                        self._handle_backend_request(msg)
            except ProtocolError:
                self._retire_backend_channel()
                return

    def _handle_backend_request(self, msg: Message) -> None:
        if msg.request is BackendRequest.CONFIG_CHANGE_MSG:
            # "the virtio device's configuration space has changed"
            self._generation = (self._generation + 1) & 0xFFFFFFFF
            self._config_pending = True
            if msg.expects_reply:
                self._backend_reply(encode_ack(msg.request, 0))
            return
        # nothing else was negotiated: refuse it if the back-end waits for an answer
        self.backend_requests_refused += 1
        if msg.expects_reply:
            self._backend_reply(encode_ack(msg.request, 1))

    def _backend_reply(self, data: bytes) -> None:
        chan = self._backend
        if chan is None:
            return
        try:
            if not _wait_fd(chan.fileno(), select.POLLOUT, self.reply_timeout):
                raise OSError("the back-end does not read its channel")
            chan.sendall(data)
        except OSError:
            self._retire_backend_channel()

    def _retire_backend_channel(self) -> None:
        """The back-end channel broke: stop using it, keeping its fd number alive as a
        quiet eventfd so event loops watching :meth:`interrupt_fds` never spin on it."""
        chan, self._backend = self._backend, None
        if chan is None:
            return
        self._backend_decoder.close()
        with contextlib.suppress(KeyError, ValueError):
            self._poller.unregister(chan.fileno())
        fd = chan.detach()
        quiet = os.eventfd(0, _EFD_FLAGS)
        try:
            os.dup2(quiet, fd, inheritable=False)
        finally:
            os.close(quiet)
        self._backend_quiet = fd

    # -- introspection ----------------------------------------------------------------

    def has_protocol_feature(self, feature: int) -> bool:
        """True if protocol feature bit ``feature`` is in use."""
        return has(self.protocol_features, feature)

    @property
    def has_config(self) -> bool:
        """True if the back-end gives access to the configuration space (``F_CONFIG``)."""
        return self.has_protocol_feature(ProtocolFeature.CONFIG)

    def keep_config(self, data: bytes) -> None:
        """Keep a configuration space of the front-end's own, served to the driver
        when the back-end has none (no VHOST_USER_PROTOCOL_F_CONFIG): what QEMU's
        vhost-user netdev and DPDK's virtio-user do for network back-ends, whose
        ``mac``, ``status`` and ``max_virtqueue_pairs`` belong to the front-end."""
        self._own_config = bytes(data)

    def try_read_config(self, size: int) -> bytes | None:
        """The first ``size`` bytes of configuration space, or ``None`` if there is no
        config access or the back-end refused this size (the connection stays up)."""
        if not self.has_config:
            return None
        try:
            return self.read_config(0, size)
        except ProtocolError:
            if self._dead is not None:
                raise
            return None

    def assume_device(self, device_id: int) -> None:
        """Set the device type after connecting (e.g. a guess from what it offers);
        the queue count follows it for back-ends without ``F_MQ``. Only before a
        driver set up rings."""
        if any(r.configured for r in self._rings.values()):
            raise ConfigurationError("the device type cannot change while rings are set up")
        self._device_id = int(device_id)
        self._num_queues = self._queue_count(self._queues_override)
        self._reply_decoder.num_queues = self._num_queues
        self._backend_decoder.num_queues = self._num_queues

    # -- DriverTransport ----------------------------------------------------------------

    def device_id(self) -> int:
        """The device type given to the constructor (0: unknown)."""
        return self._device_id

    def reset(self) -> None:
        """Reset the device: virtio-v1.2 §2.4 "Device Reset", over vhost-user.

        Each ring set up since the last reset is disabled (with
        ``VHOST_USER_F_PROTOCOL_FEATURES``) and stopped with GET_VRING_BASE, which the
        back-end answers only once it stopped using the ring ("stop ring upon
        receiving VHOST_USER_GET_VRING_BASE"); then RESET_DEVICE and SET_STATUS 0
        are sent when negotiated. Without either, stopped rings and renegotiated
        features are all the reset a back-end sees (as with QEMU). Pending
        notifications are dropped.
        """
        self._check_alive()
        configured = sorted(i for i, r in self._rings.items() if r.configured)
        if configured and has(self.backend_features, VHOST_USER_F_PROTOCOL_FEATURES):
            for i in configured:
                self._request(FrontendRequest.SET_VRING_ENABLE, VhostVringState(i, 0))
        for i in configured:
            self.vring_bases[i] = self._get_vring_base(i)
            self._rings[i].configured = False
        if self.has_protocol_feature(ProtocolFeature.RESET_DEVICE):
            self._request(FrontendRequest.RESET_DEVICE)
        if self.has_protocol_feature(ProtocolFeature.STATUS):
            self._request(FrontendRequest.SET_STATUS, VhostUserU64(0))
        self._status = 0
        self._driver_features = None
        for ring in self._rings.values():
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(ring.call)

    def _get_vring_base(self, index: int) -> int:
        msg = self._request(FrontendRequest.GET_VRING_BASE, VhostVringState(index, 0))
        assert msg is not None
        with msg:
            body = msg.body
            if not isinstance(body, VhostVringState) or body.index != index:
                raise self._die(
                    f"GET_VRING_BASE reply names ring {getattr(body, 'index', None)}, not {index}",
                    _c_msg(FrontendRequest.GET_VRING_BASE),
                )
            return body.num

    def get_status(self) -> int:
        """The device status: GET_STATUS with ``F_STATUS``, else the value last set."""
        if self.has_protocol_feature(ProtocolFeature.STATUS):
            status = self._get_u64(FrontendRequest.GET_STATUS)
            if status > 0xFF:
                raise self._die(
                    f"GET_STATUS answered {status:#x} (the status field is 8 bits)",
                    _c_msg(FrontendRequest.GET_STATUS),
                )
            return status
        self._check_alive()
        return self._status

    def set_status(self, status: int) -> None:
        """Write the device status (SET_STATUS with ``F_STATUS``; 0 resets)."""
        status &= 0xFF
        if status == 0:
            self.reset()
            return
        if self.has_protocol_feature(ProtocolFeature.STATUS):
            self._request(FrontendRequest.SET_STATUS, VhostUserU64(status))
        else:
            self._check_alive()
        self._status = status

    def get_device_features(self) -> int:
        """The device's feature bits: the GET_FEATURES answer without the vhost-only
        bits (:data:`VHOST_ONLY_FEATURES`)."""
        self._check_alive()
        return self.backend_features & ~VHOST_ONLY_FEATURES

    def set_driver_features(self, features: int) -> None:
        """SET_FEATURES (with ``VHOST_USER_F_PROTOCOL_FEATURES`` when the back-end
        offered it), then SET_MEM_TABLE sharing guest RAM.

        virtio-v1.2 §2.2.1: "The driver MUST NOT accept a feature which the device did
        not offer" (raises :class:`~pyvirtio.errors.DriverError`).
        """
        offered = self.backend_features & ~VHOST_ONLY_FEATURES
        if features < 0 or features & ~offered:
            raise DriverError(
                f"features {features & ~offered:#x} were not offered by the back-end", _C_FEATURES
            )
        value = features
        if has(self.backend_features, VHOST_USER_F_PROTOCOL_FEATURES):
            value |= 1 << VHOST_USER_F_PROTOCOL_FEATURES
        self._request(FrontendRequest.SET_FEATURES, VhostUserU64(value))
        self._driver_features = features
        self._set_mem_table()
        self._set_inflight()

    def _set_inflight(self) -> None:
        """With :attr:`use_inflight`: GET_INFLIGHT_FD once (the area is ours from then
        on, kept across reconnections), SET_INFLIGHT_FD after every SET_MEM_TABLE
        (vhost-user.rst "Inflight I/O tracking")."""
        if not self.use_inflight or not self.has_protocol_feature(ProtocolFeature.INFLIGHT_SHMFD):
            return
        if self._inflight_fd < 0:
            want = VhostUserInflight(0, 0, self._num_queues, self._queue_size)
            msg = self._request(FrontendRequest.GET_INFLIGHT_FD, want)
            assert msg is not None  # GET_INFLIGHT_FD has a reply payload
            with msg:
                body = msg.body_as(VhostUserInflight)
                fd = msg.take_fd()
            if fd is None or body.mmap_size == 0:
                if fd is not None:
                    os.close(fd)
                raise self._die(
                    "GET_INFLIGHT_FD answered no area", _c_msg(FrontendRequest.GET_INFLIGHT_FD)
                )
            self._inflight_fd = fd
            self._inflight_body = VhostUserInflight(
                body.mmap_size, body.mmap_offset, self._num_queues, self._queue_size
            )
        self._request(FrontendRequest.SET_INFLIGHT_FD, self._inflight_body, fds=[self._inflight_fd])

    def reconnect(self, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        """Connect again to a back-end that went away (it died, it was restarted) and
        bring it to where the last one was: the handshake, the negotiated features,
        guest RAM, the inflight area, every ring set up, status - then kick every ring,
        so the new back-end starts them and resubmits what the inflight area says was
        in flight (vhost-user.rst "Inflight I/O tracking"). Requests the driver has in
        flight stay valid and complete normally afterwards.

        Split rings restart from the used index in guest memory (what QEMU does: the
        requests between it and the last available index are in the inflight area);
        packed rings from the inflight area's own record of the used position.
        """
        if self.path is None:
            raise ConfigurationError("reconnect needs the back-end's socket path")
        if self._closed:
            raise ConfigurationError("the vhost-user front-end is closed")
        for sock in (self._sock, self._backend):
            if sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._poller.unregister(sock.fileno())
                sock.close()
        self._sock = self._backend = None
        self._dead = None
        self._reply_decoder.close()
        self._backend_decoder.close()
        self._reply_decoder = Decoder(channel=Channel.MAIN, replies=True)
        self._backend_decoder = Decoder(channel=Channel.BACKEND, replies=False)
        self._reply_decoder.num_queues = self._num_queues
        self._backend_decoder.num_queues = self._num_queues
        sock = self._connect(self.path, timeout)
        sock.settimeout(self.reply_timeout)
        self._sock = sock
        self._poller.register(sock.fileno(), select.POLLIN)
        self._handshake(self._want_protocol)
        if self._driver_features is None:
            return
        self.set_driver_features(self._driver_features)
        packed = has(self._driver_features, Feature.RING_PACKED)
        for index, ring in sorted(self._rings.items()):
            if not ring.configured or ring.addrs is None:
                continue
            if packed:
                base = encode_vring_base(QueueState(), True)
            else:
                base = self.mem.read_le16(ring.addrs.device + 2)  # used idx
            self._program_ring(index, ring, ring.addrs, base)
        if self.has_protocol_feature(ProtocolFeature.STATUS) and self._status:
            self._request(FrontendRequest.SET_STATUS, VhostUserU64(self._status))
        for ring in self._rings.values():
            if ring.configured:
                os.eventfd_write(ring.kick, 1)

    def _set_mem_table(self) -> None:
        regions = self.mem.regions
        body = VhostUserMemory(
            tuple(
                VhostUserMemoryRegion(r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset)
                for r in regions
            )
        )
        self._request(FrontendRequest.SET_MEM_TABLE, body, fds=[r.fd for r in regions])

    def config_generation(self) -> int:
        """vhost-user has no generation counter: this counts the back-end's
        CONFIG_CHANGE_MSG notifications (checked for new ones first)."""
        self._check_alive()
        self._service_backend()
        return self._generation

    def read_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG: ``size`` bytes of configuration space at ``offset``.

        The request always starts at offset 0 (as QEMU's does: some back-ends,
        libvhost-user's among them, ignore ``offset``) and the answer is sliced. The
        reply must have exactly the size asked ("payload size MUST match the
        front-end's request"); an empty one is the back-end's refusal.
        """
        if offset < 0 or size < 0 or offset + size > VHOST_USER_MAX_CONFIG_SIZE:
            raise ConfigurationError(
                f"config access {offset}+{size} beyond the {VHOST_USER_MAX_CONFIG_SIZE} bytes "
                "vhost-user can carry"
            )
        if not self.has_config:
            self._check_alive()
            if self._own_config is not None:
                return bytes(self._own_config[offset : offset + size]).ljust(size, b"\0")
            raise ConfigurationError(
                "the back-end gives no access to the configuration space "
                "(VHOST_USER_PROTOCOL_F_CONFIG not offered)"
            )
        if size == 0:
            return b""
        total = offset + size
        request = FrontendRequest.GET_CONFIG
        msg = self._request(request, VhostUserConfig(0, total, 0, bytes(total)))
        assert msg is not None
        with msg:
            body = msg.body
            if body is None:
                raise ProtocolError(
                    f"the back-end refused to read {total} bytes of configuration space",
                    _c_msg(request),
                )
            if not isinstance(body, VhostUserConfig) or body.size != total or body.offset != 0:
                raise self._die(
                    f"GET_CONFIG reply does not match the request (offset 0, {total} bytes)",
                    _c_msg(request),
                )
            return body.payload[offset:total]

    def write_config(self, offset: int, data: bytes) -> None:
        """SET_CONFIG (flags: writable fields) of ``data`` at ``offset``."""
        if offset < 0 or offset + len(data) > VHOST_USER_MAX_CONFIG_SIZE:
            raise ConfigurationError(f"config write {offset}+{len(data)} out of range")
        if not self.has_config:
            self._check_alive()
            if self._own_config is not None:
                return  # the front-end's own configuration space is read-only
            raise ConfigurationError(
                "the back-end gives no access to the configuration space "
                "(VHOST_USER_PROTOCOL_F_CONFIG not offered)"
            )
        body = VhostUserConfig(offset, len(data), ConfigFlags.WRITABLE, bytes(data))
        self._request(FrontendRequest.SET_CONFIG, body)

    def num_queues(self) -> int:
        """GET_QUEUE_NUM with ``F_MQ``; otherwise the ``num_queues`` argument or the
        device type's fixed queue count."""
        return self._num_queues

    def queue_max_size(self, index: int) -> int:
        """The ``queue_size`` argument for an existing queue, else 0."""
        return self._queue_size if 0 <= index < self._num_queues else 0

    def _uaddr(self, gpa: int, what: str) -> int:
        for r in self.mem.regions:
            if r.guest_phys_addr <= gpa < r.end:
                return r.userspace_addr + (gpa - r.guest_phys_addr)
        raise DriverError(f"{what} at {gpa:#x} is not in guest RAM")

    def setup_queue(self, index: int, size: int, addrs: QueueAddresses) -> None:
        """Describe ring ``index`` to the back-end and enable it.

        SET_VRING_NUM, SET_VRING_BASE (a fresh ring's position), SET_VRING_ADDR
        (user addresses: descriptor area, used = Device Area, avail = Driver Area),
        SET_VRING_KICK and SET_VRING_CALL with this ring's eventfds, then
        SET_VRING_ENABLE 1 when ``VHOST_USER_F_PROTOCOL_FEATURES`` is in use ("the
        ring is initialized in a disabled state"). Each is acknowledged (REPLY_ACK)
        or followed by a GET_FEATURES barrier, so the ring is live when this returns.
        """
        self._check_alive()
        if not 0 <= index < self._num_queues:
            raise DriverError(f"queue {index} does not exist ({self._num_queues} queues)")
        if not 1 <= size <= self._queue_size:
            raise DriverError(f"queue size {size} outside 1..{self._queue_size}")
        if self._driver_features is None:
            raise DriverError("setup_queue before the features were set (FEATURES_OK)")
        ring = self._rings.get(index)
        if ring is None:
            kick = os.eventfd(0, _EFD_FLAGS)
            try:
                call = os.eventfd(0, _EFD_FLAGS)
            except BaseException:
                os.close(kick)
                raise
            ring = self._rings[index] = _Ring(kick, call)
            self._fd_queue[call] = index
            self._poller.register(call, select.POLLIN)
        packed = has(self._driver_features, Feature.RING_PACKED)
        ring.size = size
        self._program_ring(index, ring, addrs, encode_vring_base(QueueState(), packed))
        ring.addrs = addrs
        ring.configured = True

    def _program_ring(self, index: int, ring: _Ring, addrs: QueueAddresses, base: int) -> None:
        desc = self._uaddr(addrs.desc, "descriptor area")
        avail = self._uaddr(addrs.driver, "driver area")
        used = self._uaddr(addrs.device, "device area")
        self._request(FrontendRequest.SET_VRING_NUM, VhostVringState(index, ring.size))
        self._request(FrontendRequest.SET_VRING_BASE, VhostVringState(index, base))
        self._request(
            FrontendRequest.SET_VRING_ADDR, VhostVringAddr(index, 0, desc, used, avail, 0)
        )
        self._request(FrontendRequest.SET_VRING_KICK, VhostUserU64(index), fds=[ring.kick])
        self._request(FrontendRequest.SET_VRING_CALL, VhostUserU64(index), fds=[ring.call])
        if has(self.backend_features, VHOST_USER_F_PROTOCOL_FEATURES):
            self._request(FrontendRequest.SET_VRING_ENABLE, VhostVringState(index, 1))
        self._barrier()

    def notify(self, index: int) -> None:
        """Available buffer notification: write the ring's kick eventfd."""
        ring = self._rings.get(index)
        if ring is None or not ring.configured:
            raise DriverError(f"notification for queue {index}, which is not set up")
        os.eventfd_write(ring.kick, 1)

    def poll_interrupts(self, timeout: float | None) -> set[int]:
        """Wait up to ``timeout`` seconds (None: forever) for a call eventfd or a
        back-end channel message; return the rings signalled plus
        :data:`~pyvirtio.core.driver.CONFIG_CHANGE` after a CONFIG_CHANGE_MSG.

        Raises :class:`~pyvirtio.errors.ProtocolError` if the back-end closed the
        connection or sent something unsolicited on it.
        """
        sock = self._check_alive()
        fired: set[int] = set()
        if self._config_pending:
            timeout = 0
        ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
        for fd, _ in self._poller.poll(ms):
            if fd == sock.fileno():
                # nothing is ever unsolicited on the main socket: a hang-up or junk
                self._recv_into(sock, self._reply_decoder, "while idle")
                raise self._die("the back-end sent a message nobody asked for")
            if self._backend is not None and fd == self._backend.fileno():
                self._service_backend()
                continue
            index = self._fd_queue.get(fd)
            if index is None:
                continue
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                continue
            fired.add(index)
        if self._config_pending:
            self._config_pending = False
            fired.add(CONFIG_CHANGE)
        return fired

    def interrupt_fds(self) -> list[int]:
        """Each set-up ring's call eventfd, then the back-end channel (if any)."""
        fds = [self._rings[i].call for i in sorted(self._rings)]
        if self._backend is not None:
            fds.append(self._backend.fileno())
        elif self._backend_quiet >= 0:
            fds.append(self._backend_quiet)
        return fds

    def close(self) -> None:
        """Drop the connection and release every descriptor and guest RAM (idempotent).

        Does not reset the device: the driver's ``close()`` does that first.
        """
        if self._closed:
            return
        self._closed = True
        for sock in (self._sock, self._backend):
            if sock is not None:
                sock.close()
        self._sock = None
        self._backend = None
        if self._backend_quiet >= 0:
            os.close(self._backend_quiet)
            self._backend_quiet = -1
        for ring in self._rings.values():
            os.close(ring.kick)
            os.close(ring.call)
        self._rings.clear()
        if self._inflight_fd >= 0:
            os.close(self._inflight_fd)
            self._inflight_fd = -1
        self._fd_queue.clear()
        self._reply_decoder.close()
        self._backend_decoder.close()
        self.mem.close()

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_fd(fd: int, events: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``events`` on ``fd`` (poll: no fd limit)."""
    p = select.poll()
    p.register(fd, events)
    return bool(p.poll(max(0, math.ceil(timeout * 1000))))


def _recvmsg(sock: socket.socket) -> tuple[bytes, list[int], bool] | OSError | None:
    """One ``recvmsg``: ``(data, fds, truncated)``; None if it would block; the
    ``OSError`` if the socket failed. Received descriptors are close-on-exec."""
    try:
        data, anc, flags, _ = sock.recvmsg(_RECV_SIZE, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as e:  # includes the socket timeout
        return e
    return data, fds_from_ancdata(anc), bool(flags & socket.MSG_CTRUNC)


def connect(
    driver_cls: type[D],
    path: str | os.PathLike[str] | socket.socket,
    *,
    mem_size: int = DEFAULT_MEM_SIZE,
    num_queues: int | None = None,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    reply_timeout: float = DEFAULT_REPLY_TIMEOUT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    **driver_kw: Any,
) -> D:
    """Connect a :class:`VhostUserFrontend` to the back-end at ``path``, build
    ``driver_cls(transport, **driver_kw)`` over it and initialize it.

    The caller closes both: ``drv.close(); drv.transport.close()``.
    """
    transport = VhostUserFrontend(
        path,
        device_id=int(driver_cls.device_id),
        mem_size=mem_size,
        num_queues=num_queues,
        queue_size=queue_size,
        reply_timeout=reply_timeout,
        connect_timeout=connect_timeout,
    )
    try:
        driver = driver_cls(transport, **driver_kw)
        driver.initialize()
    except BaseException:
        transport.close()
        raise
    return driver
