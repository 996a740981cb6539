"""The vhost-user back-end (device side), sans-I/O: messages in, actions out.

:class:`VhostUserBackend` serves one :class:`~pyvirtio.core.device.VirtioDevice` to
one front-end connection (QEMU, cloud-hypervisor, DPDK's virtio-user ...). It is fed
what the socket delivered (:meth:`VhostUserBackend.receive`) and what the kick
eventfds said (:meth:`VhostUserBackend.kick`), and answers with a list of
:data:`Action` objects for the I/O adapter (:mod:`.server`) to carry out: replies to
send, eventfds to signal, kick descriptors to watch or forget, back-end channel
messages, or "close the connection". It never reads or writes a socket itself, so
the whole protocol is testable without a VM.

What it implements (QEMU ``docs/interop/vhost-user.rst``):

- feature negotiation: the device's bits plus ``VHOST_USER_F_PROTOCOL_FEATURES`` and
  ``VHOST_F_LOG_ALL``; protocol features MQ, LOG_SHMFD, REPLY_ACK, BACKEND_REQ,
  CONFIG, INFLIGHT_SHMFD, RESET_DEVICE, CONFIGURE_MEM_SLOTS and STATUS;
- guest memory from SET_MEM_TABLE or ADD_MEM_REG/REM_MEM_REG (each region's fd
  mapped at its ``mmap_offset``; ring addresses translated from front-end user
  addresses, buffer addresses are guest-physical);
- the document's "Ring states" (via :class:`~.codec.RingTracker`): a ring starts at
  its first kick and is then served from its kick eventfd; GET_VRING_BASE stops it
  and returns its position; a disabled ring is not processed (no side effects);
- device queues made with :func:`~pyvirtio.virtqueue.make_device_queue` at the
  SET_VRING_BASE position, split or packed as negotiated, wrapped in a
  :class:`ServedQueue` that adds batching budgets, inflight tracking and dirty
  logging without touching the ring code;
- the device's notifications: used buffers become call-eventfd signals, a
  configuration change becomes ``VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`` on the
  back-end channel, a driver error sets DEVICE_NEEDS_RESET (GET_STATUS) and signals
  the ring's error eventfd;
- inflight I/O tracking (:mod:`.inflight`): chains in flight when the connection
  dropped are resubmitted, in fetch order, exactly once when the ring restarts;
- dirty-page logging (:mod:`.dirty_log`) of every device-writable part returned and
  of used-ring writes while migration asks for it.

Every request that waits for an answer gets exactly one; a request that cannot be
honoured gets the failure reply when one exists, otherwise the connection is closed
(the front-end would otherwise carry on believing it took effect). Every file
descriptor received is owned by exactly one object and closed exactly once.
Descriptors this object replaces while the I/O layer may still watch or signal them
are closed at the start of the next call, after the caller carried out the actions
that mention them (:meth:`VhostUserBackend.close` closes everything).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Protocol, TypeAlias, runtime_checkable

from pyvirtio.core.device import VirtioDevice, strip_traceback
from pyvirtio.errors import (
    DriverError,
    GuestMemoryError,
    ProtocolError,
    VirtioError,
)
from pyvirtio.memory.guest_memory import GuestMemory, MemoryRegion, seal_against_shrinking
from pyvirtio.spec.features import Feature, has
from pyvirtio.spec.ring import (
    PVIRTQ_DESC,
    VIRTQ_USED_HEADER,
    packed_desc_ring_size,
    split_used_size,
)
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.transport.vhost_user.codec import (
    Body,
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
from pyvirtio.transport.vhost_user.dirty_log import DirtyLog
from pyvirtio.transport.vhost_user.inflight import (
    InflightArea,
    InflightError,
    PackedInflight,
    RawDesc,
    SplitInflight,
    packed_chain,
)
from pyvirtio.transport.vhost_user.spec import (
    FRONTEND_REPLY_PAYLOAD,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_MAX_RAM_SLOTS,
    VHOST_USER_VRING_NOFD_MASK,
    BackendRequest,
    ConfigFlags,
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
from pyvirtio.virtqueue import make_device_queue
from pyvirtio.virtqueue.common import (
    DescriptorChain,
    DeviceVirtqueue,
    QueueAddresses,
    QueueState,
    Segment,
)
from pyvirtio.virtqueue.split.device import SplitDeviceQueue

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_MAX_MEM_SLOTS",
    "DEFAULT_PROTOCOL_FEATURES",
    "Action",
    "BackendMetrics",
    "Disconnect",
    "Reply",
    "SendBackend",
    "ServedQueue",
    "Signal",
    "UnwatchKick",
    "VhostUserBackend",
    "WatchKick",
    "decode_packed_base",
    "encode_packed_base",
]

_log = logging.getLogger("pyvirtio.vhost_user")


@runtime_checkable
class VhostUserNetExtras(Protocol):
    """What a network device offers beyond the generic messages: the front-end's
    ``host_mtu`` (VHOST_USER_NET_SET_MTU) and a RARP announce after migration
    (VHOST_USER_SEND_RARP). Devices that have both get VHOST_USER_PROTOCOL_F_MTU and
    VHOST_USER_PROTOCOL_F_RARP offered."""

    def guarded(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """See :meth:`~pyvirtio.core.device.VirtioDevice.guarded`."""

    def vhost_user_set_mtu(self, mtu: int) -> bool:
        """Accept ``mtu`` (True) or refuse it."""

    def vhost_user_send_rarp(self, mac: bytes) -> None:
        """Announce ``mac`` on the host network."""


R = FrontendRequest
_PF = ProtocolFeature
#: messages after which the rings' enabled state may have changed
_ENABLE_CHANGES = frozenset(
    {R.SET_VRING_ENABLE, R.SET_FEATURES, R.RESET_OWNER, R.RESET_DEVICE, R.SET_OWNER}
)

#: Protocol features this back-end implements end to end.
DEFAULT_PROTOCOL_FEATURES = (
    _PF.MQ.mask
    | _PF.LOG_SHMFD.mask
    | _PF.REPLY_ACK.mask
    | _PF.BACKEND_REQ.mask
    | _PF.CONFIG.mask
    | _PF.INFLIGHT_SHMFD.mask
    | _PF.RESET_DEVICE.mask
    | _PF.CONFIGURE_MEM_SLOTS.mask
    | _PF.STATUS.mask
)
#: Memory slots offered with CONFIGURE_MEM_SLOTS (libvhost-user offers the same).
DEFAULT_MAX_MEM_SLOTS = 32
#: Chains one ring may serve before the others get their turn.
DEFAULT_BATCH = 128
#: The budget of pops outside a processing round (host events): none.
_UNBUDGETED = 1 << 62

#: vhost-level feature bits (not virtio features): stripped before the device sees them.
_VHOST_BITS = 1 << VHOST_USER_F_PROTOCOL_FEATURES | 1 << VHOST_F_LOG_ALL

_C_RING_STATES = 'vhost-user.rst "Ring states"'
_C_MEMORY = 'vhost-user.rst "Memory access"'
_C_MIGRATION = 'vhost-user.rst "Migration"'
_EVENT_SUPPRESS_SIZE = 4
_PDESC = PVIRTQ_DESC.struct
_USED_IDX_OFF = VIRTQ_USED_HEADER.offset_of("idx")


# ---------------------------------------------------------------------------
# Actions for the I/O adapter
# ---------------------------------------------------------------------------


class Reply(NamedTuple):
    """Send ``data`` on the vhost-user socket, with ``fds`` (borrowed: do not close)."""

    data: bytes
    fds: tuple[int, ...] = ()


class Signal(NamedTuple):
    """Signal the eventfd ``fd`` (a call or error eventfd): write a u64 1 to it."""

    fd: int


class SendBackend(NamedTuple):
    """Send ``data`` on the back-end channel socket ``fd`` (no reply is awaited)."""

    fd: int
    data: bytes


class WatchKick(NamedTuple):
    """Start watching kick eventfd ``fd`` of ring ``ring``; report it via ``kick()``."""

    ring: int
    fd: int


class UnwatchKick(NamedTuple):
    """Stop watching kick eventfd ``fd`` of ring ``ring`` (it is closed afterwards)."""

    ring: int
    fd: int


class Disconnect(NamedTuple):
    """Close the connection: the stream or the session can no longer be trusted."""

    reason: str


#: Everything the back-end may ask of its I/O adapter.
Action: TypeAlias = Reply | Signal | SendBackend | WatchKick | UnwatchKick | Disconnect


def encode_packed_base(state: QueueState) -> int:
    """The ``num`` of SET/GET_VRING_BASE for a packed ring: bits 0-14 last avail index,
    15 avail wrap counter, 16-30 used index, 31 used wrap counter."""
    return (
        (state.avail_idx & 0x7FFF)
        | int(state.avail_wrap) << 15
        | (state.used_idx & 0x7FFF) << 16
        | int(state.used_wrap) << 31
    )


def decode_packed_base(num: int) -> QueueState:
    """Inverse of :func:`encode_packed_base`.

    Front-ends that send only the low 16 bits (DPDK 22.11's virtio-user sends
    ``1 << 15`` for a fresh ring; DPDK's own vhost library reads only those bits and
    puts the used position where the available one is, the ring being stopped) leave
    bits 16-31 zero. With the available wrap counter set, a zero upper half cannot be
    a used position (index 0, wrap 0 is one lap ahead of an available position at
    wrap 1, or more than a ring behind it), so it is read as that 16-bit form: the
    used position equals the available one.
    """
    avail_idx = num & 0x7FFF
    avail_wrap = bool(num >> 15 & 1)
    if num >> 16 == 0 and avail_wrap:
        return QueueState(avail_idx=avail_idx, used_idx=avail_idx)
    return QueueState(
        avail_idx=avail_idx,
        avail_wrap=avail_wrap,
        used_idx=num >> 16 & 0x7FFF,
        used_wrap=bool(num >> 31 & 1),
    )


# ---------------------------------------------------------------------------
# The queue wrapper: budgets, inflight tracking, dirty logging
# ---------------------------------------------------------------------------


@dataclass
class UsedLog:
    """Where a ring's used-side writes are logged: the log and the guest ranges."""

    log: DirtyLog
    ranges: tuple[Segment, ...]


class ServedQueue(DeviceVirtqueue):
    """A device queue as the back-end serves it: the ring plus vhost-user duties.

    Wraps the split or packed :class:`~pyvirtio.virtqueue.common.DeviceVirtqueue`
    the device model sees and adds, without changing the ring code:

    - a batching budget: after ``budget`` chains in one round :meth:`pop` reports the
      ring empty and :attr:`exhausted` is set, so one busy queue cannot starve the
      others or the control socket (the adapter calls again);
    - inflight tracking: each chain fetched and each batch published is recorded in
      the ring's inflight region; chains recovered from it are handed out first;
    - dirty logging: the device-writable part of each returned chain (all of it: the
      device may write anywhere in it) and the ring areas the device writes.
    """

    def __init__(
        self,
        inner: DeviceVirtqueue,
        *,
        packed: bool,
        budget: int = DEFAULT_BATCH,
        split_inflight: SplitInflight | None = None,
        packed_inflight: PackedInflight | None = None,
        resubmit: Iterable[DescriptorChain] = (),
    ) -> None:
        # DeviceVirtqueue.__init__ is not called: every attribute mirrors ``inner``.
        self._inner = inner
        self.mem = inner.mem
        self.size = inner.size
        self.addrs = inner.addrs
        self.features = inner.features
        self.index = inner.index
        self.packed = packed
        self.budget = budget
        self._left = _UNBUDGETED
        #: True when the last round stopped because the budget ran out
        self.exhausted = False
        self._split = split_inflight
        self._packed = packed_inflight
        self._in_order = inner.features.in_order
        self._resubmit: deque[DescriptorChain] = deque()
        #: chains the ring holds in flight: popped (or resubmitted) and not pushed
        self._outstanding: dict[int, DescriptorChain] = {}
        self._pushed: list[DescriptorChain] = []
        self._order: deque[DescriptorChain] = deque()
        self._pushed_ids: set[int] = set()
        #: set by the back-end while VHOST_F_LOG_ALL is negotiated and a log exists
        self.log_data: DirtyLog | None = None
        #: set by the back-end while the ring's VHOST_VRING_F_LOG is set
        self.log_used: UsedLog | None = None
        self._desc_ring = self._view_desc_ring() if packed_inflight is not None else None
        self.fetched = 0
        self.completed = 0
        self.resubmitted = 0
        for chain in resubmit:
            inner.adopt(chain)
            self._resubmit.append(chain)
            self._outstanding[chain.id] = chain
            if self._in_order:
                self._order.append(chain)

    def _view_desc_ring(self) -> memoryview:
        return self._inner.mem.view(self.addrs.desc, packed_desc_ring_size(self.size))

    # -- state shared with the ring ------------------------------------------------

    @property
    def broken_reason(self) -> VirtioError | None:
        """The ring's broken reason (the device model may set it)."""
        return self._inner.broken_reason

    @broken_reason.setter
    def broken_reason(self, value: VirtioError | None) -> None:
        self._inner.broken_reason = value

    @property
    def inner(self) -> DeviceVirtqueue:
        """The split or packed ring underneath."""
        return self._inner

    @property
    def outstanding(self) -> list[DescriptorChain]:
        """Chains in flight: taken from the ring (or resubmitted) and not returned."""
        return list(self._outstanding.values())

    @property
    def pending_resubmissions(self) -> int:
        """Recovered chains not yet handed to the device."""
        return len(self._resubmit)

    def begin_round(self) -> None:
        """Give the ring a fresh budget for one round of processing."""
        self._left = self.budget
        self.exhausted = False

    def end_round(self) -> None:
        """The round is over: pops outside a round (a device serving a held receive
        from a host event) are not budgeted; :attr:`exhausted` keeps what the round
        saw."""
        self._left = _UNBUDGETED

    def replace_inner(self, inner: DeviceVirtqueue) -> None:
        """Continue on a new ring object (new guest memory), same position; chains in
        flight are carried over."""
        for chain in self._outstanding.values():
            inner.adopt(chain)
        self._inner = inner
        self.mem = inner.mem
        self.addrs = inner.addrs
        if self._desc_ring is not None:
            self._desc_ring = self._view_desc_ring()

    # -- DeviceVirtqueue ------------------------------------------------------------

    def pop(self) -> DescriptorChain | None:
        """Next chain: recovered ones first, then the ring's; ``None`` past the budget."""
        if self._left <= 0:
            self.exhausted = True
            return None
        chain: DescriptorChain | None
        if self._resubmit:
            chain = self._resubmit.popleft()
            self.resubmitted += 1
        else:
            if self._packed is not None:
                pos = self._inner.get_state().avail_idx
                chain = self._inner.pop()
                if chain is None:
                    return None
                self._record_packed_fetch(pos, chain)
            else:
                chain = self._inner.pop()
                if chain is None:
                    return None
                if self._split is not None:
                    self._split.fetch(chain.id)
            self._outstanding[chain.id] = chain
            if self._in_order:
                self._order.append(chain)
        self._left -= 1
        self.fetched += 1
        used = self.log_used
        if used is not None and self.features.event_idx:
            for addr, n in used.ranges:
                used.log.mark(addr, n)
        return chain

    def _record_packed_fetch(self, pos: int, chain: DescriptorChain) -> None:
        ring = self._desc_ring
        tracker = self._packed
        if ring is None or tracker is None:
            return
        unpack = _PDESC.unpack_from
        descs: list[RawDesc] = []
        for k in range(chain.ndescs):
            addr, length, bid, flags = unpack(ring, ((pos + k) % self.size) * 16)
            descs.append((addr, length, bid, flags))
        try:
            tracker.fetch(descs)
        except InflightError as e:
            _log.warning("queue %d: inflight tracking stops: %s", self.index, e)
            self._packed = None

    def push(self, chain: DescriptorChain, written: int) -> None:
        """Return ``chain``; its device-writable part is dirty-logged when asked."""
        self._inner.push(chain, written)
        self._outstanding.pop(chain.id, None)
        log = self.log_data
        if log is not None:
            for addr, n in chain.writable:
                log.mark(addr, n)
        if self._in_order:
            self._pushed_ids.add(chain.id)
        else:
            self._pushed.append(chain)

    def _published(self) -> list[DescriptorChain]:
        """The chains the next ``flush`` of the ring makes visible to the driver."""
        if not self._in_order:
            out, self._pushed = self._pushed, []
            return out
        out = []
        order = self._order
        ids = self._pushed_ids
        while order and order[0].id in ids:
            chain = order.popleft()
            ids.discard(chain.id)
            out.append(chain)
        return out

    def flush(self) -> bool:
        """Publish; the inflight region is updated around it in the document's order."""
        batch = self._published()
        if not batch:
            return self._inner.flush()
        split = self._split
        packed = self._packed
        if split is not None:
            heads = [c.id for c in batch]
            split.complete_begin(heads)
            notify = self._inner.flush()
            split.complete_end(heads, self._inner.get_state().used_idx)
        elif packed is not None:
            used_idx, used_wrap = packed.used
            lap = used_idx if used_wrap else used_idx + self.size
            lap = (lap + sum(c.ndescs for c in batch)) % (2 * self.size)
            new_idx, new_wrap = (lap, True) if lap < self.size else (lap - self.size, False)
            entries = packed.complete_begin([c.id for c in batch], new_idx, new_wrap)
            notify = self._inner.flush()
            packed.complete_end(entries)
            st = self._inner.get_state()
            if (st.used_idx, st.used_wrap) != (new_idx, new_wrap):  # pragma: no cover
                _log.error("queue %d: inflight used position diverged from the ring", self.index)
        else:
            notify = self._inner.flush()
        self.completed += len(batch)
        used = self.log_used
        if used is not None:
            for addr, n in used.ranges:
                used.log.mark(addr, n)
        return notify

    def has_available(self) -> bool:
        """True if :meth:`pop` would return a chain (never past the budget)."""
        if self._left <= 0:
            self.exhausted = True
            return False
        return bool(self._resubmit) or self._inner.has_available()

    def set_notification(self, enable: bool) -> None:
        """Available buffer notification suppression of the ring (logged: a used-side
        write)."""
        self._inner.set_notification(enable)
        used = self.log_used
        if used is not None:
            for addr, n in used.ranges:
                used.log.mark(addr, n)

    def get_state(self) -> QueueState:
        """The ring's position."""
        return self._inner.get_state()

    @property
    def in_flight(self) -> int:
        """Chains in flight in the ring."""
        return self._inner.in_flight

    def abandon_outstanding(self) -> int:
        """Return every chain in flight with nothing written (used when a ring stops
        with no inflight region to remember them). Returns how many."""
        chains = [c for c in self._outstanding.values() if c not in self._resubmit]
        for chain in chains:
            self.push(chain, 0)
        if chains:
            self.flush()
        return len(chains)


# ---------------------------------------------------------------------------
# The back-end
# ---------------------------------------------------------------------------


@dataclass
class BackendMetrics:
    """What the back-end saw and did (requests by name, notifications, errors)."""

    requests: Counter[str] = field(default_factory=Counter)
    calls: int = 0
    errs: int = 0
    config_changes: int = 0
    rings_started: int = 0
    resubmitted: int = 0
    rejected: int = 0
    #: dirty-log page bits set (earlier logs; see :attr:`VhostUserBackend.dirty_pages`)
    dirty_pages: int = 0
    errors: Counter[str] = field(default_factory=Counter)


@dataclass
class _Ring:
    """Descriptors and queue of one vring (the tracker holds the protocol state)."""

    kick: int = -1
    call: int = -1
    err: int = -1
    queue: ServedQueue | None = None
    pending: bool = False
    failed: bool = False
    fetched: int = 0
    completed: int = 0


class _Refused(Exception):
    """Internal: this request cannot be honoured."""


class VhostUserBackend:
    """vhost-user back-end state machine for ``device`` (see the module docs).

    ``protocol_features`` limits what is offered (default: everything implemented),
    ``max_mem_slots`` is the GET_MAX_MEM_SLOTS answer and the region limit, ``batch``
    the per-round chain budget of each ring. Shared memory the front-end passes (guest
    RAM regions, the dirty log, the inflight area) must be a memfd sealed, or sealable,
    against shrinking (:func:`~pyvirtio.memory.guest_memory.seal_against_shrinking`):
    a front-end that truncates a mapped file makes the next access SIGBUS. Such memory
    is refused unless ``trust_frontend`` is set (file-backed memory, e.g. QEMU's
    ``memory-backend-file`` on /dev/shm or hugetlbfs, can only be served so).

    The back-end attaches itself as the device's :class:`~pyvirtio.core.device.DeviceHost`
    and detaches in :meth:`close`.
    """

    def __init__(
        self,
        device: VirtioDevice,
        *,
        protocol_features: int | None = None,
        max_mem_slots: int = DEFAULT_MAX_MEM_SLOTS,
        batch: int = DEFAULT_BATCH,
        trust_frontend: bool = False,
    ) -> None:
        if device.host is not None:
            raise VirtioError("the device is already attached to a transport")
        if not 1 <= device.num_queues <= 256:
            raise VirtioError("vhost-user carries 1..256 virtqueues")
        if not 1 <= max_mem_slots <= VHOST_USER_MAX_RAM_SLOTS:
            raise ValueError(f"max_mem_slots must be 1..{VHOST_USER_MAX_RAM_SLOTS}")
        self.device = device
        implemented = DEFAULT_PROTOCOL_FEATURES
        if isinstance(device, VhostUserNetExtras):
            # a network device also implements NET_SET_MTU and SEND_RARP
            implemented |= _PF.MTU.mask | _PF.RARP.mask
        # None: everything implemented for this device; a mask restricts it
        offered = implemented if protocol_features is None else protocol_features & implemented
        if not device.config_bytes() or not device.config_over_vhost_user:
            # no configuration space (an entropy device), or one the front-end keeps
            # itself (QEMU's and DPDK's vhost-user net): nothing to GET/SET
            offered &= ~_PF.CONFIG.mask
        self.offered_protocol_features = offered
        self.max_mem_slots = max_mem_slots
        self.batch = max(1, batch)
        #: accept shared memory that cannot be sealed against shrinking (the front-end
        #: could then kill the back-end with SIGBUS by truncating it)
        self.trust_frontend = trust_frontend
        self.metrics = BackendMetrics()
        self._decoder = Decoder(num_queues=device.num_queues)
        self._tracker = RingTracker(device.num_queues)
        self._rings = [_Ring() for _ in range(device.num_queues)]
        self._queues: list[DeviceVirtqueue | None] = [None] * device.num_queues
        self._out: list[Action] = []
        self._retired: list[int] = []
        self._features = 0
        self._features_set = False
        self._protocol_features = 0
        self._owner = False
        self._status = 0
        self._needs_reset: VirtioError | None = None
        self._reset_when_stopped = False
        self._mem: GuestMemory | None = None
        self._log: DirtyLog | None = None
        self._log_fd = -1
        self._backend_fd = -1
        self._inflight: InflightArea | None = None
        self._offered_inflight: InflightArea | None = None
        self._config_pending = False
        self._active_features: int | None = None
        self._current: int | None = None
        self._closed = False
        device.host = self
        self._sync_enabled()

    # -- introspection -----------------------------------------------------------

    @property
    def offered_features(self) -> int:
        """GET_FEATURES: the device's bits, VHOST_USER_F_PROTOCOL_FEATURES, VHOST_F_LOG_ALL."""
        return self.device.device_features() | _VHOST_BITS

    @property
    def features(self) -> int:
        """The features of the last SET_FEATURES (vhost bits included)."""
        return self._features

    @property
    def device_features(self) -> int:
        """The negotiated virtio feature bits (vhost-level bits removed)."""
        return self._features & ~_VHOST_BITS

    @property
    def protocol_features(self) -> int:
        """The negotiated protocol features."""
        return self._protocol_features

    @property
    def status(self) -> int:
        """The device status as GET_STATUS reports it."""
        return self._status | (DeviceStatus.DEVICE_NEEDS_RESET if self._needs_reset else 0)

    @property
    def memory(self) -> GuestMemory | None:
        """Guest memory as mapped from the memory table (None before one arrives)."""
        return self._mem

    @property
    def rings(self) -> RingTracker:
        """The protocol state of every ring."""
        return self._tracker

    @property
    def dirty_log(self) -> DirtyLog | None:
        """The dirty-page log set by SET_LOG_BASE, if any."""
        return self._log

    @property
    def inflight(self) -> InflightArea | None:
        """The inflight area set by SET_INFLIGHT_FD, if any."""
        return self._inflight

    def queue(self, index: int) -> ServedQueue | None:
        """The served queue of ring ``index`` while it is started."""
        return self._rings[index].queue

    def served(self, index: int) -> tuple[int, int]:
        """Chains of ring ``index`` fetched and completed during this connection."""
        ring = self._rings[index]
        sq = ring.queue
        if sq is None:
            return ring.fetched, ring.completed
        return ring.fetched + sq.fetched, ring.completed + sq.completed

    def ring_fds(self, index: int) -> tuple[int, int, int]:
        """``(kick, call, err)`` descriptors of ring ``index`` (-1: none)."""
        ring = self._rings[index]
        return ring.kick, ring.call, ring.err

    @property
    def suspended(self) -> bool:
        """True while every ring is stopped (no guest writes, no notifications)."""
        return self._tracker.suspended

    @property
    def pending(self) -> bool:
        """True if some ring stopped on its budget and wants another round."""
        return any(r.pending for r in self._rings)

    @property
    def polling(self) -> bool:
        """True if some started ring has no kick eventfd (the adapter must poll)."""
        return any(
            ring.kick is KickMode.POLLING and ring.started and ring.enabled
            for ring in self._tracker
        )

    def has_negotiated(self, feature: ProtocolFeature) -> bool:
        """True if protocol feature ``feature`` was negotiated."""
        return bool(self._protocol_features & feature.mask)

    # -- entry points ---------------------------------------------------------------

    def _begin(self) -> None:
        retired, self._retired = self._retired, []
        for fd in retired:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _take(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def take_actions(self) -> list[Action]:
        """Actions produced between calls: a device that completes requests on its own
        (another thread, a timer) notifies through here. The adapter collects them."""
        self._begin()
        return self._take()

    def receive(
        self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()
    ) -> list[Action]:
        """Feed one ``recvmsg`` result (bytes and descriptors) and handle every complete
        message in it. The back-end owns ``fds`` from now on."""
        self._begin()
        if self._closed:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            return [Disconnect("back-end closed")]
        try:
            self._decoder.feed(data, fds)
        except ProtocolError as e:
            self._out.append(Disconnect(str(e)))
            return self._take()
        while True:
            try:
                msg = self._decoder.next_message()
            except MessageRejected as e:
                self.metrics.rejected += 1
                _log.warning("rejected: %s", e)
                if e.error_reply is not None:
                    self._out.append(Reply(e.error_reply))
                else:
                    self._out.append(Disconnect(str(e)))
                    break
                continue
            except ProtocolError as e:
                _log.warning("protocol error: %s", e)
                self._out.append(Disconnect(str(e)))
                break
            if msg is None:
                break
            self._dispatch(msg)
            if any(isinstance(a, Disconnect) for a in self._out):
                break
        return self._take()

    def handle_message(self, msg: Message) -> list[Action]:
        """Handle one already decoded front-end request (the back-end owns its fds)."""
        self._begin()
        self._dispatch(msg)
        return self._take()

    def kick(self, index: int) -> list[Action]:
        """The kick eventfd of ring ``index`` was readable (the adapter drained it)."""
        self._begin()
        if 0 <= index < len(self._rings) and not self._closed:
            if self._tracker.kicked(index):
                self._start_ring(index)
            else:
                self._process(index)
        return self._take()

    def run_pending(self) -> list[Action]:
        """Give every ring that stopped on its budget (or is polled) another round."""
        self._begin()
        for i, ring in enumerate(self._rings):
            if ring.pending or (
                self._tracker[i].kick is KickMode.POLLING and self._tracker.is_started(i)
            ):
                self._process(i)
        return self._take()

    def close(self) -> None:
        """End of the connection: stop everything, detach from the device, release
        every descriptor and mapping. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._begin()
        for i in range(len(self._rings)):
            self._drop_ring(i)
            ring = self._rings[i]
            for fd in (ring.kick, ring.call, ring.err):
                self._retire(fd)
            ring.kick = ring.call = ring.err = -1
        self._reset_device_model()
        if self.device.host is self:
            self.device.host = None
        self._decoder.close()
        self._drop_memory()
        self._set_log(None)
        self._retire(self._log_fd)
        self._retire(self._backend_fd)
        self._log_fd = self._backend_fd = -1
        for area in (self._inflight, self._offered_inflight):
            if area is not None:
                area.close()
        self._inflight = self._offered_inflight = None
        self._begin()
        self._out = []

    # -- DeviceHost -------------------------------------------------------------------

    def notify_used(self, queue_index: int) -> None:
        """A used buffer notification: signal the ring's call eventfd."""
        if not 0 <= queue_index < len(self._rings) or not self._tracker.is_started(queue_index):
            return
        fd = self._rings[queue_index].call
        if fd >= 0:
            self.metrics.calls += 1
            self._out.append(Signal(fd))

    def _reset_device_model(self) -> None:
        """The device's life ends (virtio-v1.2 §2.4): host I/O finishes, it forgets
        features and queues; the next ring start activates it again."""
        self._active_features = None
        self.device.guarded("reset", self.device.reset)

    def notify_config(self) -> None:
        """A configuration change: ``VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`` (deferred while
        the device is suspended)."""
        if self.suspended:
            self._config_pending = True
            return
        self._send_config_change()

    def _send_config_change(self) -> None:
        self._config_pending = False
        needed = _PF.BACKEND_REQ.mask | _PF.CONFIG.mask
        if self._protocol_features & needed != needed or self._backend_fd < 0:
            return
        self.metrics.config_changes += 1
        self._out.append(SendBackend(self._backend_fd, encode(BackendRequest.CONFIG_CHANGE_MSG)))

    def needs_reset(self, reason: VirtioError) -> None:
        """The device failed (the driver broke a rule, or the model raised):
        DEVICE_NEEDS_RESET (GET_STATUS), the error eventfd of the ring being served
        (of every started ring when it came from a host event or a timer), and a
        configuration change notification where the back-end channel can carry one
        (virtio-v1.2 §2.1.2: "If DRIVER_OK is set, after it sets DEVICE_NEEDS_RESET,
        the device MUST send a device configuration change notification")."""
        _log.warning("device needs reset: %s", reason)
        self._needs_reset = strip_traceback(reason)  # type: ignore[assignment]
        self.metrics.errors["needs_reset"] += 1
        i = self._current
        if i is not None:
            self._signal_err(i)
        else:
            for j, ring in enumerate(self._rings):
                if ring.queue is not None:
                    self._signal_err(j)
        self.notify_config()

    def _signal_err(self, index: int) -> None:
        fd = self._rings[index].err
        if fd >= 0:
            self.metrics.errs += 1
            self._out.append(Signal(fd))

    # -- dispatch ---------------------------------------------------------------------

    def _dispatch(self, msg: Message) -> None:
        request = msg.request
        assert isinstance(request, FrontendRequest)
        self.metrics.requests[request.name] += 1
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("<- %s flags=%#x %s", request.spec_name, msg.flags, _describe(msg))
        try:
            with msg:
                if request is R.SET_VRING_NUM:
                    num = msg.body_as(VhostVringState).num
                    if num > self.device.queue_max_size:
                        raise _Refused(
                            f"queue size {num} exceeds the device's maximum "
                            f"{self.device.queue_max_size}"
                        )
                self._tracker.handle(msg)
                handler = self._HANDLERS.get(request)
                if handler is None:
                    raise _Refused(f"{request.spec_name} is not supported by this back-end")
                handler(self, msg)
                if request in _ENABLE_CHANGES:
                    self._sync_enabled()
        except MessageRejected as e:
            self._refuse(msg, str(e))
            return
        except _Refused as e:
            self._refuse(msg, str(e))
            return
        except ProtocolError as e:
            self._refuse(msg, str(e))
            return
        if msg.need_reply and request not in FRONTEND_REPLY_PAYLOAD:
            _log.debug("-> %s ack 0", request.spec_name)
            self._out.append(Reply(encode_ack(request, 0)))

    def _refuse(self, msg: Message, reason: str) -> None:
        self.metrics.rejected += 1
        request = msg.request
        _log.warning("refused %s: %s", request.spec_name, reason)
        reply = error_reply(request) if msg.expects_reply else None
        if reply is not None:
            self._out.append(Reply(reply))
        else:
            self._out.append(Disconnect(f"{request.spec_name}: {reason}"))

    def _reply(self, request: FrontendRequest, body: Body, fds: tuple[int, ...] = ()) -> None:
        if _log.isEnabledFor(logging.DEBUG):
            shown = f"u64={body.u64:#x}" if isinstance(body, VhostUserU64) else repr(body)
            _log.debug("-> %s %s", request.spec_name, shown)
        self._out.append(Reply(encode_reply(request, body, fds=fds), fds))

    def _need(self, feature: ProtocolFeature, request: FrontendRequest) -> None:
        if not self.has_negotiated(feature):
            raise _Refused(f"{request.spec_name} without {feature.spec_name} negotiated")

    # -- features ---------------------------------------------------------------------

    def _get_features(self, msg: Message) -> None:
        self._reply(R.GET_FEATURES, VhostUserU64(self.offered_features))

    def _set_features(self, msg: Message) -> None:
        features = msg.body_as(VhostUserU64).u64
        extra = features & ~self.offered_features
        if extra:
            raise _Refused(f"features {extra:#x} were not offered")
        if self._features_set and not self.suspended:
            changed = (features ^ self._features) & ~(1 << VHOST_F_LOG_ALL)
            if changed:
                raise _Refused(
                    f"features {changed:#x} changed while rings are started (only "
                    "VHOST_F_LOG_ALL may change)"
                )
        self._features = features
        self._features_set = True
        if not features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            # negotiated without protocol features: nothing of them is in force
            self._protocol_features = 0
        self._apply_logging()

    def _get_protocol_features(self, msg: Message) -> None:
        self._reply(R.GET_PROTOCOL_FEATURES, VhostUserU64(self.offered_protocol_features))

    def _set_protocol_features(self, msg: Message) -> None:
        self._protocol_features = msg.body_as(VhostUserU64).u64 & self.offered_protocol_features

    def _get_queue_num(self, msg: Message) -> None:
        self._reply(R.GET_QUEUE_NUM, VhostUserU64(self.device.num_queues))

    def _set_owner(self, msg: Message) -> None:
        self._owner = True

    def _reset_owner(self, msg: Message) -> None:
        # deprecated: the tracker disabled every ring ("use it to disable all rings")
        pass

    def _reset_device(self, msg: Message) -> None:
        self._need(_PF.RESET_DEVICE, R.RESET_DEVICE)
        for i in range(len(self._rings)):
            self._drop_ring(i)
            self._unwatch_kick(i)
            ring = self._rings[i]
            for fd in (ring.call, ring.err):
                self._retire(fd)
            ring.call = ring.err = -1
            ring.failed = False
        self._reset_device_model()
        self._features = 0
        self._features_set = False
        self._status = 0
        self._needs_reset = None
        self._reset_when_stopped = False
        self._set_log(None)
        if self._inflight is not None:
            self._inflight.close()
            self._inflight = None

    # -- status (VHOST_USER_PROTOCOL_F_STATUS) ------------------------------------------

    def _set_status(self, msg: Message) -> None:
        self._need(_PF.STATUS, R.SET_STATUS)
        status = msg.body_as(VhostUserU64).u64 & 0xFF & ~DeviceStatus.DEVICE_NEEDS_RESET
        if status == 0:
            self._status = 0
            self._needs_reset = None
            # QEMU sends this before (or after) the GET_VRING_BASE of each ring: the
            # rings keep their state until they are stopped one by one.
            if self.suspended:
                self._reset_device_model()
            else:
                self._reset_when_stopped = True
            return
        if (
            status & DeviceStatus.FEATURES_OK
            and not self._status & DeviceStatus.FEATURES_OK
            and not self.device.validate_features(self.device_features)
        ):
            status &= ~DeviceStatus.FEATURES_OK
        self._status = status

    def _get_status(self, msg: Message) -> None:
        self._need(_PF.STATUS, R.GET_STATUS)
        self._reply(R.GET_STATUS, VhostUserU64(self.status))

    # -- memory -------------------------------------------------------------------------

    def _map_regions(
        self, regions: Sequence[VhostUserMemoryRegion], fds: list[int], mem: GuestMemory
    ) -> None:
        """Map ``regions`` into ``mem``; every fd in ``fds`` is owned (and closed on error)."""
        pending = list(fds)
        try:
            for region in regions:
                fd = pending.pop(0)
                try:
                    why = None if self.trust_frontend else seal_against_shrinking(fd)
                    if why is not None:
                        raise ProtocolError(
                            f"memory region at {region.guest_phys_addr:#x} cannot be "
                            f"protected against shrinking: {why} (a back-end that trusts "
                            "its front-end can accept it: --trust-frontend)",
                            _C_MEMORY,
                        )
                    st = os.fstat(fd)
                    end = region.mmap_offset + region.memory_size
                    if stat.S_ISREG(st.st_mode) and st.st_size < end:
                        raise ProtocolError(
                            f"memory region at {region.guest_phys_addr:#x} ends at file offset "
                            f"{end:#x}, beyond its file ({st.st_size:#x} bytes)",
                            _C_MEMORY,
                        )
                    mr = MemoryRegion(
                        guest_phys_addr=region.guest_phys_addr,
                        size=region.memory_size,
                        fd=fd,
                        mmap_offset=region.mmap_offset,
                        userspace_addr=region.userspace_addr,
                        owns_fd=True,
                    )
                    mem.add_region(mr)
                except (OSError, ValueError, OverflowError, GuestMemoryError) as e:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                    raise ProtocolError(f"cannot map memory region: {e}", _C_MEMORY) from None
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                    raise
        finally:
            for fd in pending:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _set_mem_table(self, msg: Message) -> None:
        table = msg.body_as(VhostUserMemory)
        fds = msg.take_fds()
        mem = GuestMemory()
        try:
            self._map_regions(table.regions, fds, mem)
        except BaseException:
            mem.close()
            raise
        self._replace_memory(mem)

    def _get_max_mem_slots(self, msg: Message) -> None:
        self._need(_PF.CONFIGURE_MEM_SLOTS, R.GET_MAX_MEM_SLOTS)
        self._reply(R.GET_MAX_MEM_SLOTS, VhostUserU64(self.max_mem_slots))

    def _add_mem_reg(self, msg: Message) -> None:
        self._need(_PF.CONFIGURE_MEM_SLOTS, R.ADD_MEM_REG)
        region = msg.body_as(VhostUserMemoryRegion)
        fds = msg.take_fds()
        mem = self._mem if self._mem is not None else GuestMemory()
        for r in mem.regions:
            if (r.guest_phys_addr, r.size, r.userspace_addr) == (
                region.guest_phys_addr,
                region.memory_size,
                region.userspace_addr,
            ):
                for fd in fds:  # the same region again: nothing to do
                    os.close(fd)
                return
        current = [
            VhostUserMemoryRegion(r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset)
            for r in mem.regions
        ]
        try:
            check_memory_regions([*current, region], max_regions=self.max_mem_slots)
        except ProtocolError:
            for fd in fds:
                os.close(fd)
            raise
        self._map_regions([region], fds, mem)
        if self._mem is None:
            self._mem = mem

    def _rem_mem_reg(self, msg: Message) -> None:
        self._need(_PF.CONFIGURE_MEM_SLOTS, R.REM_MEM_REG)
        region = msg.body_as(VhostUserMemoryRegion)
        mem = self._mem
        if mem is not None:
            for r in mem.regions:
                if (r.guest_phys_addr, r.size, r.userspace_addr) == (
                    region.guest_phys_addr,
                    region.memory_size,
                    region.userspace_addr,
                ):
                    self.device.guarded("quiesce", self.device.quiesce)
                    mem.remove_region(r.guest_phys_addr, r.size)
                    r.close()
                    self._rebuild_queues()
                    return
        raise _Refused(
            f"no memory region at {region.guest_phys_addr:#x}+{region.memory_size:#x} "
            f"(user address {region.userspace_addr:#x})"
        )

    def _replace_memory(self, mem: GuestMemory) -> None:
        # host I/O in flight finishes in the old mapping before it goes
        self.device.guarded("quiesce", self.device.quiesce)
        old = self._mem
        self._mem = mem
        self._rebuild_queues()
        if old is not None:
            old.close()

    def _drop_memory(self) -> None:
        if self._mem is not None:
            self._mem.close()
            self._mem = None

    def _rebuild_queues(self) -> None:
        """Guest memory changed under started rings: re-create their ring objects."""
        for i, ring in enumerate(self._rings):
            sq = ring.queue
            if sq is None:
                continue
            try:
                addrs, _ = self._ring_addresses(i)
                inner = make_device_queue(
                    self._memory(),
                    sq.size,
                    addrs,
                    self.device_features,
                    index=i,
                    state=sq.get_state(),
                )
                sq.replace_inner(inner)
            except (VirtioError, ValueError) as e:
                self._ring_failed(i, e)
        self._apply_logging()

    def _memory(self) -> GuestMemory:
        if self._mem is None:
            raise ProtocolError("no memory table yet", _C_MEMORY)
        return self._mem

    # -- logging (migration) -------------------------------------------------------------

    def _set_log_base(self, msg: Message) -> None:
        self._need(_PF.LOG_SHMFD, R.SET_LOG_BASE)
        body = msg.body_as(VhostUserLog)
        fd = msg.take_fd()
        if fd is None or body.mmap_size == 0:
            if fd is not None:
                os.close(fd)
            self._set_log(None)
        else:
            self._set_log(
                DirtyLog(fd, body.mmap_size, body.mmap_offset, trusted=self.trust_frontend)
            )
        self._reply(R.SET_LOG_BASE, VhostUserU64(0))

    def _set_log_fd(self, msg: Message) -> None:
        fd = msg.take_fd()
        self._retire(self._log_fd)
        self._log_fd = fd if fd is not None else -1

    def _set_log(self, log: DirtyLog | None) -> None:
        old = self._log
        self._log = log
        self._apply_logging()
        if old is not None and old is not log:
            self.metrics.dirty_pages += old.pages_marked
            old.close()

    @property
    def dirty_pages(self) -> int:
        """Page bits this connection set in dirty logs (migration)."""
        log = self._log
        return self.metrics.dirty_pages + (log.pages_marked if log is not None else 0)

    def _apply_logging(self) -> None:
        """Give each started ring the log according to LOG_ALL and its VHOST_VRING_F_LOG."""
        log = self._log
        log_all = bool(self._features >> VHOST_F_LOG_ALL & 1) and log is not None
        for i, ring in enumerate(self._rings):
            sq = ring.queue
            if sq is None:
                continue
            sq.log_data = log if log_all else None
            state = self._tracker[i]
            if log is None or not state.log or state.addr is None:
                sq.log_used = None
                continue
            base = state.addr.log_guest_addr
            if sq.packed:
                ranges: tuple[Segment, ...] = (
                    (sq.addrs.desc, packed_desc_ring_size(sq.size)),
                    (base, _EVENT_SUPPRESS_SIZE),
                )
            else:
                ranges = ((base, split_used_size(sq.size)),)
            sq.log_used = UsedLog(log, ranges)

    # -- rings -----------------------------------------------------------------------------

    def _vring_simple(self, msg: Message) -> None:
        # SET_VRING_NUM / SET_VRING_BASE: the tracker recorded them
        pass

    def _set_vring_addr(self, msg: Message) -> None:
        addr = msg.body_as(VhostVringAddr)
        if self._rings[addr.index].queue is not None:
            self._apply_logging()  # only the log flag can change on a started ring

    def _get_vring_base(self, msg: Message) -> None:
        i = msg.body_as(VhostVringState).index
        ring = self._rings[i]
        sq = ring.queue
        if sq is not None:
            state = self._settle(i, sq)
        else:
            base = self._tracker[i].base
            packed = has(self.device_features, Feature.RING_PACKED)
            if base is None:
                base = encode_packed_base(QueueState()) if packed else 0
            state = decode_packed_base(base) if packed else QueueState(avail_idx=base & 0xFFFF)
        self._drop_ring(i)
        self._unwatch_kick(i)
        if has(self.device_features, Feature.RING_PACKED):
            num = encode_packed_base(state)
        else:
            num = state.avail_idx & 0xFFFF
        self._reply(R.GET_VRING_BASE, VhostVringState(i, num))
        if self.suspended and self._reset_when_stopped:
            self._reset_when_stopped = False
            self._reset_device_model()

    def _settle(self, i: int, sq: ServedQueue) -> QueueState:
        """Before a ring stops: host I/O in flight finishes (its chains complete);
        chains still held are either kept for resubmission (the inflight region
        records them) or returned with nothing written."""
        self._current = i
        try:
            self.device.guarded("quiesce", self.device.quiesce)
        finally:
            self._current = None
        if sq.broken:
            return sq.get_state()
        tracked = sq._split is not None or sq._packed is not None
        if not tracked and sq.outstanding:
            self._current = i
            try:
                if sq.abandon_outstanding():
                    fd = self._rings[i].call
                    if fd >= 0:
                        self._out.append(Signal(fd))
            except (VirtioError, ValueError) as e:
                _log.warning("queue %d: could not return chains in flight: %s", i, e)
            finally:
                self._current = None
        return sq.get_state()

    def _drop_ring(self, i: int) -> None:
        ring = self._rings[i]
        sq = ring.queue
        if sq is not None:
            ring.fetched += sq.fetched
            ring.completed += sq.completed
            self.metrics.resubmitted += sq.resubmitted
        ring.queue = None
        ring.pending = False
        self._queues[i] = None
        if sq is not None:
            self.device.guarded("queue stop", self.device.detach_queue, i)

    def _unwatch_kick(self, i: int) -> None:
        ring = self._rings[i]
        if ring.kick >= 0:
            self._out.append(UnwatchKick(i, ring.kick))
            self._retire(ring.kick)
            ring.kick = -1

    def _set_vring_kick(self, msg: Message) -> None:
        value = msg.body_as(VhostUserU64).u64
        i = value & 0xFF
        fd = _nonblocking(msg.take_fd(), f"ring {i} kick")
        self._unwatch_kick(i)
        if value & VHOST_USER_VRING_NOFD_MASK or fd is None:
            # polling: the tracker started the ring already
            if fd is not None:
                os.close(fd)
            if self._tracker.is_started(i) and self._rings[i].queue is None:
                self._start_ring(i)
            return
        self._rings[i].kick = fd
        self._out.append(WatchKick(i, fd))

    def _set_vring_call(self, msg: Message) -> None:
        i = msg.body_as(VhostUserU64).u64 & 0xFF
        fd = _nonblocking(msg.take_fd(), f"ring {i} call")
        ring = self._rings[i]
        self._retire(ring.call)
        ring.call = fd if fd is not None else -1
        if fd is not None and ring.queue is not None:
            # The front-end switches call eventfds on a running ring (QEMU masks and
            # unmasks its guest notifier) without waiting for us: a notification sent
            # to the old one in between may be lost. A spurious one is harmless.
            self._out.append(Signal(fd))

    def _set_vring_err(self, msg: Message) -> None:
        i = msg.body_as(VhostUserU64).u64 & 0xFF
        fd = _nonblocking(msg.take_fd(), f"ring {i} error")
        ring = self._rings[i]
        self._retire(ring.err)
        ring.err = fd if fd is not None else -1

    def _set_vring_enable(self, msg: Message) -> None:
        state = msg.body_as(VhostVringState)
        if state.num and self._rings[state.index].queue is not None:
            self._process(state.index)

    def _ring_addresses(self, i: int) -> tuple[QueueAddresses, bool]:
        state = self._tracker[i]
        addr = state.addr
        if addr is None or state.num is None:
            raise ProtocolError(f"ring {i} has no size or addresses", _C_RING_STATES)
        mem = self._memory()
        try:
            addrs = QueueAddresses(
                desc=mem.gpa_of_userspace(addr.desc_user_addr),
                driver=mem.gpa_of_userspace(addr.avail_user_addr),
                device=mem.gpa_of_userspace(addr.used_user_addr),
            )
        except GuestMemoryError as e:
            raise DriverError(f"ring {i}: {e.message}", _C_MEMORY) from None
        return addrs, has(self.device_features, Feature.RING_PACKED)

    def _start_ring(self, i: int) -> None:
        """The ring just started: build its queue at its base, recover, serve it."""
        ring = self._rings[i]
        if ring.queue is not None:
            return
        state = self._tracker[i]
        try:
            addrs, packed = self._ring_addresses(i)
            mem = self._memory()
            num = state.num
            if num is None:  # pragma: no cover - _ring_addresses checked it
                raise ProtocolError(f"ring {i} has no size", _C_RING_STATES)
            features = self.device_features
            base = state.base
            split_t: SplitInflight | None = None
            packed_t: PackedInflight | None = None
            resubmit: list[DescriptorChain] = []
            split_heads: list[int] = []
            if packed:
                qstate = decode_packed_base(
                    base if base is not None else encode_packed_base(QueueState())
                )
                packed_t = self._packed_tracker(i, num)
                if packed_t is not None:
                    qstate, resubmit = self._recover_packed(packed_t, mem, addrs, num, qstate)
            else:
                used_idx = mem.read_le16(addrs.device + _USED_IDX_OFF)
                qstate = QueueState(avail_idx=(base or 0) & 0xFFFF, used_idx=used_idx)
                split_t = self._split_tracker(i, num)
                if split_t is not None:
                    try:
                        heads = split_t.recover(used_idx) if split_t.initialized else None
                    except InflightError as e:
                        _log.warning("queue %d: inflight region unusable, reset: %s", i, e)
                        heads = None
                    if heads is None:
                        split_t.reset(used_idx)
                    else:
                        qstate = QueueState(
                            avail_idx=(used_idx + len(heads)) & 0xFFFF, used_idx=used_idx
                        )
                        split_heads = heads
            inner = make_device_queue(mem, num, addrs, features, index=i, state=qstate)
            if split_heads and isinstance(inner, SplitDeviceQueue):
                # validated as the ring validates the chains it pops
                resubmit = [inner.read_chain(h) for h in split_heads]
            sq = ServedQueue(
                inner,
                packed=packed,
                budget=self.batch,
                split_inflight=split_t,
                packed_inflight=packed_t,
                resubmit=resubmit,
            )
        except (VirtioError, ValueError) as e:
            self._ring_failed(i, e)
            return
        if resubmit:
            _log.info("queue %d: resubmitting %d request(s) in flight", i, len(resubmit))
        ring.queue = sq
        ring.failed = False
        self._queues[i] = sq
        self.metrics.rings_started += 1
        self._current = i
        try:
            device = self.device
            if not device.active or self._active_features != features:
                # a new life of the device: the first ring of this feature set
                # (vhost-user has no DRIVER_OK without VHOST_USER_PROTOCOL_F_STATUS)
                if device.active:
                    self._reset_device_model()
                self._active_features = features
                device.guarded("activate", device.activate, features, self._queues)
            else:
                device.guarded("queue start", device.attach_queue, i, sq)
        finally:
            self._current = None
        self._apply_logging()
        if self._config_pending:
            self._send_config_change()
        if ring.call >= 0:
            # After a reconnect the previous back-end may have published used buffers
            # and died before notifying: notify once (harmless if nothing is new).
            self._out.append(Signal(ring.call))
        self._process(i)

    def _inflight_for(self, i: int, num: int) -> InflightArea | None:
        """The inflight area if it can track ring ``i`` of ``num`` entries."""
        area = self._inflight
        if area is None:
            return None
        if num > area.queue_size:
            _log.warning(
                "queue %d: ring of %d exceeds the inflight region's %d entries",
                i,
                num,
                area.queue_size,
            )
            return None
        return area

    def _split_tracker(self, i: int, num: int) -> SplitInflight | None:
        area = self._inflight_for(i, num)
        return None if area is None else area.split_queue(i)

    def _packed_tracker(self, i: int, num: int) -> PackedInflight | None:
        area = self._inflight_for(i, num)
        return None if area is None else area.packed_queue(i)

    def _recover_packed(
        self,
        tracker: PackedInflight,
        mem: GuestMemory,
        addrs: QueueAddresses,
        num: int,
        qstate: QueueState,
    ) -> tuple[QueueState, list[DescriptorChain]]:
        if tracker.initialized:
            try:
                ring_view = mem.view(addrs.desc, packed_desc_ring_size(num))
                chains = tracker.recover(ring_view, num)
            except (InflightError, GuestMemoryError) as e:
                _log.warning("inflight region unusable, reset: %s", e)
            else:
                used_idx, used_wrap = tracker.used
                lap = used_idx if used_wrap else used_idx + num
                lap = (lap + sum(len(d) for _, d in chains)) % (2 * num)
                avail_idx, avail_wrap = (lap, True) if lap < num else (lap - num, False)
                indirect = has(self.device_features, Feature.INDIRECT_DESC)
                resubmit = [packed_chain(mem, d, indirect=indirect) for _, d in chains]
                return (
                    QueueState(avail_idx, used_idx, avail_wrap, used_wrap),
                    resubmit,
                )
        tracker.reset(qstate.used_idx, qstate.used_wrap)
        return qstate, []

    def _ring_failed(self, i: int, err: Exception) -> None:
        _log.warning("queue %d failed: %s", i, err)
        self.metrics.errors["ring_failed"] += 1
        ring = self._rings[i]
        ring.failed = True
        self._drop_ring(i)
        reason = err if isinstance(err, VirtioError) else DriverError(str(err))
        self._needs_reset = strip_traceback(reason)  # type: ignore[assignment]
        self._signal_err(i)
        self.notify_config()

    def _process(self, i: int) -> None:
        """One round of ring ``i`` (if started, enabled and healthy)."""
        ring = self._rings[i]
        sq = ring.queue
        if sq is None or not self._tracker.is_enabled(i) or not self._tracker.is_started(i):
            ring.pending = False
            return
        if sq.broken:
            ring.pending = False
            return
        sq.begin_round()
        self._current = i
        try:
            # a device model bug must not take the connection down: the device's
            # failure path turns it into DEVICE_NEEDS_RESET (see needs_reset)
            self.device.queue_notified(i)
        finally:
            self._current = None
            sq.end_round()
        ring.pending = sq.exhausted and not sq.broken

    # -- back-end channel, config, inflight ---------------------------------------------------

    def _set_backend_req_fd(self, msg: Message) -> None:
        self._need(_PF.BACKEND_REQ, R.SET_BACKEND_REQ_FD)
        fd = _nonblocking(msg.take_fd(), "back-end channel")
        self._retire(self._backend_fd)
        self._backend_fd = fd if fd is not None else -1

    def drop_backend_channel(self) -> None:
        """Stop using the back-end channel (the I/O layer could not deliver a whole
        message on it); configuration change notifications are no longer sent."""
        self._retire(self._backend_fd)
        self._backend_fd = -1

    def _get_config(self, msg: Message) -> None:
        self._need(_PF.CONFIG, R.GET_CONFIG)
        body = msg.body_as(VhostUserConfig)
        space = self.device.config_bytes()
        data = space[body.offset : body.offset + body.size].ljust(body.size, b"\0")
        self._reply(R.GET_CONFIG, VhostUserConfig(body.offset, body.size, body.flags, data))

    def _set_config(self, msg: Message) -> None:
        self._need(_PF.CONFIG, R.SET_CONFIG)
        body = msg.body_as(VhostUserConfig)
        if body.flags not in (ConfigFlags.WRITABLE, ConfigFlags.MIGRATION):
            raise _Refused(f"SET_CONFIG flags {body.flags}")
        # read-only fields are ignored by the device model ("MUST NOT accept SET_CONFIG
        # for read-only configuration space fields unless the live migration bit is set")
        self.device.guarded(
            "configuration write", self.device.write_config, body.offset, body.payload
        )

    def _get_inflight_fd(self, msg: Message) -> None:
        self._need(_PF.INFLIGHT_SHMFD, R.GET_INFLIGHT_FD)
        req = msg.body_as(VhostUserInflight)
        area = InflightArea.create(req.num_queues, req.queue_size)
        if self._offered_inflight is not None:
            self._offered_inflight.close()
        self._offered_inflight = area
        body = VhostUserInflight(area.mmap_size, 0, req.num_queues, req.queue_size)
        self._reply(R.GET_INFLIGHT_FD, body, (area.fd,))

    def _set_inflight_fd(self, msg: Message) -> None:
        self._need(_PF.INFLIGHT_SHMFD, R.SET_INFLIGHT_FD)
        body = msg.body_as(VhostUserInflight)
        fd = msg.take_fd()
        if fd is None:  # pragma: no cover - the codec requires one
            raise _Refused("SET_INFLIGHT_FD without a descriptor")
        area = InflightArea(
            fd,
            body.mmap_size,
            body.mmap_offset,
            body.num_queues,
            body.queue_size,
            trusted=self.trust_frontend,
        )
        if self._inflight is not None:
            self._inflight.close()
        self._inflight = area
        if self._offered_inflight is not None:
            # the front-end sent back (a copy of) the area we offered: keep one mapping
            self._offered_inflight.close()
            self._offered_inflight = None

    # -- network device messages (VHOST_USER_PROTOCOL_F_MTU, _RARP) -------------------------

    def _net_set_mtu(self, msg: Message) -> None:
        self._need(_PF.MTU, R.NET_SET_MTU)
        mtu = msg.body_as(VhostUserU64).u64
        device = self.device
        assert isinstance(device, VhostUserNetExtras)  # only offered then
        if not device.guarded("NET_SET_MTU", device.vhost_user_set_mtu, mtu):
            # "the back-end must ... return an error if the MTU is not supported"
            raise _Refused(f"MTU {mtu} is outside 68..65535")

    def _send_rarp(self, msg: Message) -> None:
        self._need(_PF.RARP, R.SEND_RARP)
        # "the first 6 bytes of the payload contain the mac address of the guest"
        mac = msg.body_as(VhostUserU64).u64.to_bytes(8, "little")[:6]
        device = self.device
        assert isinstance(device, VhostUserNetExtras)
        device.guarded("SEND_RARP", device.vhost_user_send_rarp, mac)

    # -- helpers ----------------------------------------------------------------------------

    def _sync_enabled(self) -> None:
        """Tell the device which rings are disabled (vhost-user.rst "Ring states": a
        network back-end "must not supply any new RX packets" to a disabled ring)."""
        tracker = self._tracker
        self.device.disabled_queues = {
            i for i in range(tracker.num_queues) if not tracker.is_enabled(i)
        }

    def _retire(self, fd: int) -> None:
        if fd >= 0:
            self._retired.append(fd)

    _HANDLERS: ClassVar[dict[FrontendRequest, Callable[[VhostUserBackend, Message], None]]] = {
        R.GET_FEATURES: _get_features,
        R.SET_FEATURES: _set_features,
        R.GET_PROTOCOL_FEATURES: _get_protocol_features,
        R.SET_PROTOCOL_FEATURES: _set_protocol_features,
        R.GET_QUEUE_NUM: _get_queue_num,
        R.SET_OWNER: _set_owner,
        R.RESET_OWNER: _reset_owner,
        R.RESET_DEVICE: _reset_device,
        R.SET_STATUS: _set_status,
        R.GET_STATUS: _get_status,
        R.SET_MEM_TABLE: _set_mem_table,
        R.GET_MAX_MEM_SLOTS: _get_max_mem_slots,
        R.ADD_MEM_REG: _add_mem_reg,
        R.REM_MEM_REG: _rem_mem_reg,
        R.SET_LOG_BASE: _set_log_base,
        R.SET_LOG_FD: _set_log_fd,
        R.SET_VRING_NUM: _vring_simple,
        R.SET_VRING_BASE: _vring_simple,
        R.SET_VRING_ADDR: _set_vring_addr,
        R.GET_VRING_BASE: _get_vring_base,
        R.SET_VRING_KICK: _set_vring_kick,
        R.SET_VRING_CALL: _set_vring_call,
        R.SET_VRING_ERR: _set_vring_err,
        R.SET_VRING_ENABLE: _set_vring_enable,
        R.SET_BACKEND_REQ_FD: _set_backend_req_fd,
        R.GET_CONFIG: _get_config,
        R.SET_CONFIG: _set_config,
        R.GET_INFLIGHT_FD: _get_inflight_fd,
        R.SET_INFLIGHT_FD: _set_inflight_fd,
        R.NET_SET_MTU: _net_set_mtu,
        R.SEND_RARP: _send_rarp,
    }


def _nonblocking(fd: int | None, what: str) -> int | None:
    """Make a descriptor the front-end passed non-blocking (its file description is
    shared with the front-end, which uses it non-blocking too). A hostile front-end
    may pass a blocking eventfd whose counter is at its maximum, or a full pipe: a
    blocking write would then hang the back-end for good. A descriptor that cannot be
    made non-blocking is refused (closed)."""
    if fd is None:
        return None
    try:
        os.set_blocking(fd, False)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise _Refused(f"the {what} descriptor cannot be made non-blocking: {e}") from None
    return fd


def _describe(msg: Message) -> str:
    body = msg.body
    if body is None:
        text = ""
    elif isinstance(body, VhostUserU64):
        text = f"u64={body.u64:#x}"
    elif isinstance(body, VhostUserConfig):
        text = f"offset={body.offset} size={body.size} flags={body.flags}"
    elif isinstance(body, bytes):
        text = f"{len(body)} bytes"
    else:
        text = repr(body)
    return f"{text} fds={len(msg.fds)}" if msg.fds else text
