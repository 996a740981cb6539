"""The block driver. virtio-v1.2 §5.2 "Block Device", the driver's side.

:class:`BlkDriver` negotiates the block features, reads ``struct virtio_blk_config``
and issues ``struct virtio_blk_req`` requests. It offers a blocking API
(:meth:`BlkDriver.read`, :meth:`~BlkDriver.write`, :meth:`~BlkDriver.flush` ...) and
a submission API with many requests in flight (``submit_*`` returning a
:class:`BlkRequest` handle, then :meth:`~BlkDriver.complete` /
:meth:`~BlkDriver.wait_all`). Requests are spread over the request queues
(VIRTIO_BLK_F_MQ) round-robin.

Each request's header, data and status byte live in one allocation of guest memory
from ``transport.allocator``: ``[header 16][status 1][pad][data]``, described as the
segments header / data / status (data split at ``size_max``). The allocation is freed
when the request completes. A device that breaks a rule (bad used element, unknown
status, status never written, DEVICE_NEEDS_RESET) fails the requests concerned with a
:class:`~pyvirtio.errors.VirtioError`; waiting always has a deadline and re-checks
the device status, so a broken device never hangs the caller.

The driver is not thread-safe: use it from one thread (or through
:class:`~pyvirtio.drivers.blk.aio.AsyncBlkDriver` from one event loop).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pyvirtio.core.driver import DriverTransport, RingOptions, VirtioDriver
from pyvirtio.errors import (
    DeviceError,
    GuestMemoryError,
    QueueBrokenError,
    QueueFullError,
    VirtioError,
)
from pyvirtio.spec.blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_CONFIG,
    VIRTIO_BLK_DISCARD_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_OUTHDR,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    BlkFeature,
    BlkReqType,
    BlkStatus,
    VirtioBlkConfig,
)
from pyvirtio.spec.features import bit
from pyvirtio.spec.ids import DeviceId
from pyvirtio.virtqueue.common import Segment

CLAUSE_DRIVER_OPERATION = 'virtio-v1.2 §5.2.6.1 "Driver Requirements: Device Operation"'
CLAUSE_OPERATION = 'virtio-v1.2 §5.2.6 "Device Operation"'

#: Default cap on the data of one request (larger blocking reads/writes are split).
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
#: Default deadline for a blocking wait, in seconds.
DEFAULT_TIMEOUT = 30.0
#: While waiting, the device status is re-checked at least this often (seconds).
POLL_SLICE = 0.25
#: Never put more discard / write zeroes segments than this in one request.
MAX_SEGMENTS_PER_REQUEST = 256

_HDR = VIRTIO_BLK_OUTHDR.struct
_SEG = VIRTIO_BLK_DISCARD_WRITE_ZEROES.struct
_U32 = 0xFFFFFFFF
#: Status byte offset inside a request allocation, and where data begins.
_STATUS_OFF = 16
_DATA_OFF = 64
#: The status byte is pre-set to this value; still there at completion means the
#: device never wrote it.
_STATUS_UNWRITTEN = 0xFF
_UNWRITTEN = bytes([_STATUS_UNWRITTEN])

#: The block feature bits this driver implements.
DRIVER_FEATURES = (
    bit(BlkFeature.SIZE_MAX)
    | bit(BlkFeature.SEG_MAX)
    | bit(BlkFeature.GEOMETRY)
    | bit(BlkFeature.RO)
    | bit(BlkFeature.BLK_SIZE)
    | bit(BlkFeature.FLUSH)
    | bit(BlkFeature.TOPOLOGY)
    | bit(BlkFeature.CONFIG_WCE)
    | bit(BlkFeature.MQ)
    | bit(BlkFeature.DISCARD)
    | bit(BlkFeature.WRITE_ZEROES)
)


def pack_segments(segs: Iterable[tuple[int, int, int]]) -> bytes:
    """Encode ``(sector, num_sectors, flags)`` triples as the ``data`` of a
    discard / write zeroes request (``struct virtio_blk_discard_write_zeroes``)."""
    return b"".join(_SEG.pack(s, n, f) for s, n, f in segs)


class BlkError(VirtioError):
    """A block request completed with a status other than VIRTIO_BLK_S_OK."""

    def __init__(self, message: str, status: int, clause: str | None = None) -> None:
        super().__init__(message, clause)
        #: the ``status`` byte the device returned
        self.status = status


class BlkIOError(BlkError):
    """The device answered VIRTIO_BLK_S_IOERR ("device or driver error")."""


class BlkUnsupportedError(BlkError):
    """The device answered VIRTIO_BLK_S_UNSUPP, or the feature was not negotiated."""


class BlkTimeoutError(VirtioError, TimeoutError):
    """Requests did not complete before the deadline (they stay in flight)."""


class BlkRequest:
    """A handle on one request: its type, and once :attr:`done`, its outcome."""

    __slots__ = (
        "addr",
        "data",
        "data_len",
        "done",
        "error",
        "on_done",
        "out_len",
        "queue",
        "sector",
        "status",
        "type",
    )

    def __init__(self, req_type: int, sector: int, out_len: int, in_len: int) -> None:
        #: ``virtio_blk_req.type``
        self.type = req_type
        #: ``virtio_blk_req.sector``
        self.sector = sector
        self.out_len = out_len
        #: device-writable data bytes (IN, GET_ID)
        self.data_len = in_len
        #: guest address of the request's allocation (0: none)
        self.addr = 0
        #: the queue it was placed on (-1 before)
        self.queue = -1
        #: True once the request completed or failed
        self.done = False
        #: the status byte (None until completion)
        self.status: int | None = None
        #: the error the request failed with
        self.error: VirtioError | None = None
        #: the data read (IN, GET_ID) once completed
        self.data: bytes | None = None
        #: called once with the request when it is done
        self.on_done: Callable[[BlkRequest], None] | None = None

    def result(self) -> bytes | None:
        """The data read (IN, GET_ID) or None; raises the request's error.

        Raises :class:`RuntimeError` if the request has not completed yet.
        """
        if not self.done:
            raise RuntimeError("request still in flight")
        if self.error is not None:
            raise self.error
        return self.data

    def __repr__(self) -> str:
        state = "done" if self.done else "in flight"
        return f"<BlkRequest type={self.type} sector={self.sector} q={self.queue} {state}>"


def _status_error(req: BlkRequest, status: int) -> VirtioError:
    if status == BlkStatus.IOERR:
        return BlkIOError(f"request type {req.type} sector {req.sector}: I/O error", status)
    if status == BlkStatus.UNSUPP:
        return BlkUnsupportedError(f"request type {req.type} unsupported by the device", status)
    if status == _STATUS_UNWRITTEN:
        return DeviceError(
            f"device completed request type {req.type} without writing its status",
            CLAUSE_OPERATION,
        )
    return DeviceError(f"device returned unknown block status {status}", CLAUSE_OPERATION)


class BlkDriver(VirtioDriver):
    """A virtio block driver (virtio-v1.2 §5.2) over any :class:`DriverTransport`.

    Call :meth:`initialize` first. ``max_queues`` caps how many request queues are
    used (VIRTIO_BLK_F_MQ); ``max_request_bytes`` caps one request's data (blocking
    reads and writes larger than that are split); ``timeout`` is the deadline of
    every blocking wait (``None``: none, though the device status is still checked).
    ``ring`` (:class:`~pyvirtio.core.driver.RingOptions`) picks the ring features
    asked for and the queue size.
    """

    device_id = DeviceId.BLOCK

    def __init__(
        self,
        transport: DriverTransport,
        *,
        max_queues: int | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        timeout: float | None = DEFAULT_TIMEOUT,
        ring: RingOptions = RingOptions(),
    ) -> None:
        super().__init__(transport, ring=ring)
        if max_request_bytes < SECTOR_SIZE:
            raise ValueError("max_request_bytes must be at least 512")
        if max_queues is not None and max_queues < 1:
            raise ValueError("max_queues must be at least 1")
        self.max_queues = max_queues
        self.timeout = timeout
        self._max_request_cap = max_request_bytes - max_request_bytes % SECTOR_SIZE
        #: the configuration space as last read
        self.config = VirtioBlkConfig(*([0] * len(VirtioBlkConfig._fields)))
        self._seg_limit = _U32
        self._max_data_segs = 1
        self._max_request_bytes = self._max_request_cap
        self._inflight: list[set[BlkRequest]] = []
        self._dirty: set[int] = set()
        self._next_queue = 0
        #: requests whose buffers the device may still own (queue broke): freed on close
        self._orphans: list[BlkRequest] = []

    # -- negotiation and configuration (virtio-v1.2 §5.2.3 - §5.2.5) --------------

    def specific_features(self, offered: int) -> int:
        """Accept every block feature this driver implements.

        virtio-v1.2 §5.2.6.1: "A driver SHOULD accept the VIRTIO_BLK_F_RO feature if
        offered." FLUSH is accepted: this driver sends VIRTIO_BLK_T_FLUSH.
        """
        return offered & DRIVER_FEATURES

    def _read_blk_config(self) -> VirtioBlkConfig:
        return VIRTIO_BLK_CONFIG.unpack(self.read_config(0, VIRTIO_BLK_CONFIG.size))

    def setup(self) -> None:
        """Read ``struct virtio_blk_config`` (after FEATURES_OK, as §5.2.5.1 requires
        for ``writeback``) and derive the request limits."""
        cfg = self._read_blk_config()
        if self.has_feature(BlkFeature.MQ) and cfg.num_queues == 0:
            raise DeviceError("device offers VIRTIO_BLK_F_MQ with num_queues 0")
        self.config = cfg
        seg_limit = _U32
        if self.has_feature(BlkFeature.SIZE_MAX) and cfg.size_max:
            if cfg.size_max < SECTOR_SIZE:
                raise DeviceError(f"size_max {cfg.size_max} is too small to carry a sector")
            seg_limit = cfg.size_max
        self._seg_limit = seg_limit

    def queue_count(self) -> int:
        """One request queue, or ``num_queues`` with VIRTIO_BLK_F_MQ (virtio-v1.2 §5.2.2)."""
        n = 1
        if self.has_feature(BlkFeature.MQ):
            n = min(self.config.num_queues, self.transport.num_queues())
        if self.max_queues is not None:
            n = min(n, self.max_queues)
        return max(1, n)

    def initialize(self) -> None:
        """Bring the device up (virtio-v1.2 §3.1.1) and size the request limits."""
        super().initialize()
        self._inflight = [set() for _ in self.queues]
        self._dirty = set()
        qsize = min(q.size for q in self.queues)
        segs = max(1, qsize - 2)
        if self.has_feature(BlkFeature.SEG_MAX) and self.config.seg_max:
            segs = min(segs, self.config.seg_max)
        self._max_data_segs = segs
        limit = min(self._max_request_cap, segs * self._seg_limit)
        self._max_request_bytes = max(SECTOR_SIZE, limit - limit % SECTOR_SIZE)

    def on_config_change(self) -> None:
        """Re-read the configuration (virtio-v1.2 §5.2.6.1: "The driver SHOULD check
        if the content of the capacity field has changed")."""
        self.config = self._read_blk_config()

    # -- properties ---------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Device size in 512-byte sectors."""
        return int(self.config.capacity)

    @property
    def size(self) -> int:
        """Device size in bytes."""
        return self.capacity * SECTOR_SIZE

    @property
    def blk_size(self) -> int:
        """The device's optimal block size (512 without VIRTIO_BLK_F_BLK_SIZE)."""
        v = int(self.config.blk_size)
        if self.has_feature(BlkFeature.BLK_SIZE) and v >= SECTOR_SIZE and not v & (v - 1):
            return v
        return SECTOR_SIZE

    @property
    def read_only(self) -> bool:
        """True if the device is read-only (VIRTIO_BLK_F_RO)."""
        return self.has_feature(BlkFeature.RO)

    @property
    def num_request_queues(self) -> int:
        """How many request queues are in use."""
        return len(self.queues)

    @property
    def max_request_bytes(self) -> int:
        """Largest data length of one read or write request."""
        return self._max_request_bytes

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet completed."""
        return sum(len(s) for s in self._inflight)

    @property
    def writeback(self) -> bool:
        """The cache mode: True for writeback (virtio-v1.2 §5.2.5).

        With VIRTIO_BLK_F_CONFIG_WCE it is read from ``writeback``; otherwise
        (§5.2.5.1) FLUSH alone means a writeback cache and neither means writethrough.
        """
        if self.has_feature(BlkFeature.CONFIG_WCE):
            off = VIRTIO_BLK_CONFIG.offset_of("writeback")
            return self.read_config(off, 1)[0] != 0
        return self.has_feature(BlkFeature.FLUSH)

    @writeback.setter
    def writeback(self, value: bool) -> None:
        if not self.has_feature(BlkFeature.CONFIG_WCE):
            raise BlkUnsupportedError(
                "VIRTIO_BLK_F_CONFIG_WCE was not negotiated", BlkStatus.UNSUPP
            )
        off = VIRTIO_BLK_CONFIG.offset_of("writeback")
        self.transport.write_config(off, bytes([1 if value else 0]))
        self.config = self._read_blk_config()

    # -- request construction ------------------------------------------------------

    def _check_rw(self, sector: int, nbytes: int) -> None:
        if nbytes % SECTOR_SIZE:
            # §5.2.6.1: "The length of data MUST be a multiple of 512 bytes"
            raise ValueError("length must be a multiple of 512 bytes")
        if sector < 0 or sector * SECTOR_SIZE + nbytes > self.size:
            # §5.2.6.1: "A driver MUST NOT submit a request which would cause a read
            # or write beyond capacity."
            raise ValueError(
                f"sectors {sector}+{nbytes // SECTOR_SIZE} are beyond capacity {self.capacity}"
            )

    def _chunks(self, addr: int, length: int) -> list[Segment]:
        step = self._seg_limit
        return [(addr + i, min(step, length - i)) for i in range(0, length, step)]

    def _place(self, req: BlkRequest, out_data: bytes | bytearray | memoryview) -> None:
        """Allocate the request's guest memory and write header, status and data."""
        mem = self.transport.mem
        size = _DATA_OFF + max(req.out_len, req.data_len)
        addr = self.transport.allocator.alloc(size, 64)
        try:
            # header, then the status byte pre-set to "unwritten" right behind it
            mem.write(addr, _HDR.pack(req.type, 0, req.sector) + _UNWRITTEN)
            if req.out_len:
                mem.write(addr + _DATA_OFF, out_data)
        except BaseException:
            self.transport.allocator.free(addr)
            raise
        req.addr = addr

    def _segments(self, req: BlkRequest) -> tuple[list[Segment], list[Segment]]:
        addr = req.addr
        out: list[Segment] = [(addr, _HDR.size)]
        in_: list[Segment] = []
        if req.out_len:
            out += self._chunks(addr + _DATA_OFF, req.out_len)
        if req.data_len:
            in_ += self._chunks(addr + _DATA_OFF, req.data_len)
        in_.append((addr + _STATUS_OFF, 1))
        return out, in_

    def _try_enqueue(self, req: BlkRequest) -> bool:
        """Place ``req`` on a request queue (round-robin); False if all are full."""
        out, in_ = self._segments(req)
        n = len(self.queues)
        for k in range(n):
            qi = (self._next_queue + k) % n
            q = self.queues[qi]
            if q.broken:
                continue
            try:
                q.add(out, in_, req)
            except (QueueFullError, GuestMemoryError):
                # no free descriptors, or no memory for an indirect table right now
                continue
            req.queue = qi
            self._inflight[qi].add(req)
            self._dirty.add(qi)
            self._next_queue = (qi + 1) % n
            return True
        if all(q.broken for q in self.queues):
            raise QueueBrokenError("every request queue is broken")
        return False

    def _release(self, req: BlkRequest) -> None:
        if req.addr:
            self.transport.allocator.free(req.addr)
            req.addr = 0

    def _finish(self, req: BlkRequest, error: VirtioError | None = None) -> None:
        """Mark ``req`` done: read its status and data, free its memory."""
        if req.queue >= 0:
            self._inflight[req.queue].discard(req)
        if error is None and req.addr:
            mem = self.transport.mem
            status = mem.read(req.addr + _STATUS_OFF, 1)[0]
            req.status = status
            if status == BlkStatus.OK:
                if req.data_len:
                    req.data = mem.read(req.addr + _DATA_OFF, req.data_len)
            else:
                error = _status_error(req, status)
            self._release(req)
        req.error = error
        req.done = True
        cb = req.on_done
        if cb is not None:
            req.on_done = None
            cb(req)

    def _fail_queue(self, qi: int, err: VirtioError) -> None:
        """Queue ``qi`` broke: its requests fail; their buffers stay (orphans)."""
        for req in list(self._inflight[qi]):
            self._orphans.append(req)
            self._finish(req, err)

    def fail_in_flight(self, err: VirtioError) -> None:
        """Fail every request in flight with ``err`` (the device broke); their
        buffers are kept until :meth:`close`, as the device may still write them."""
        for qi in range(len(self._inflight)):
            self._fail_queue(qi, err)

    def prepare(
        self,
        req_type: int,
        sector: int = 0,
        out: bytes | bytearray | memoryview = b"",
        in_len: int = 0,
    ) -> BlkRequest:
        """Build a request (no checks beyond sizes): data ``out`` for the device,
        ``in_len`` device-writable data bytes. Low level; see :meth:`submit_request`."""
        out_len = memoryview(out).nbytes
        if in_len < 0 or max(out_len, in_len) > max(self._max_request_bytes, 1 << 16):
            raise ValueError("request data too large (see max_request_bytes)")
        return BlkRequest(req_type, sector, out_len, in_len)

    # -- submission API ----------------------------------------------------------------

    def submit_request(
        self,
        req_type: int,
        sector: int = 0,
        out: bytes | bytearray | memoryview = b"",
        in_len: int = 0,
        *,
        kick: bool = True,
    ) -> BlkRequest:
        """Submit any request (no argument checks): the low-level entry point."""
        req = self.prepare(req_type, sector, out, in_len)
        return self._submit(req, out, kick)

    def _start(self, req: BlkRequest, out: bytes | bytearray | memoryview) -> bool:
        """Place and enqueue ``req`` without waiting; False if there is no room now
        (guest memory or ring slots held by requests in flight). Raises if there
        will never be room."""
        self._check_usable()
        if not req.addr:
            try:
                self._place(req, out)
            except GuestMemoryError:
                if not self.in_flight:
                    raise
                return False
        try:
            if self._try_enqueue(req):
                return True
            if not self.in_flight:
                raise QueueFullError("request does not fit in an empty request queue")
        except BaseException:
            self._release(req)
            raise
        return False

    def _submit(
        self, req: BlkRequest, out: bytes | bytearray | memoryview, kick: bool
    ) -> BlkRequest:
        deadline = self._deadline(None)
        try:
            while not self._start(req, out):
                self._wait_progress(deadline)
        except BaseException:
            if req.queue < 0:
                self._release(req)
            raise
        if kick:
            self.kick_pending()
        return req

    def submit_read(self, sector: int, length: int, *, kick: bool = True) -> BlkRequest:
        """Submit a VIRTIO_BLK_T_IN of ``length`` bytes (<= :attr:`max_request_bytes`)."""
        self._check_rw(sector, length)
        if length > self._max_request_bytes:
            raise ValueError(f"one request carries at most {self._max_request_bytes} bytes")
        return self._submit(BlkRequest(BlkReqType.IN, sector, 0, length), b"", kick)

    def submit_write(
        self, sector: int, data: bytes | bytearray | memoryview, *, kick: bool = True
    ) -> BlkRequest:
        """Submit a VIRTIO_BLK_T_OUT of ``data`` (<= :attr:`max_request_bytes`)."""
        n = memoryview(data).nbytes
        self._check_rw(sector, n)
        if n > self._max_request_bytes:
            raise ValueError(f"one request carries at most {self._max_request_bytes} bytes")
        self._check_writable()
        return self._submit(BlkRequest(BlkReqType.OUT, sector, n, 0), data, kick)

    def submit_flush(self, *, kick: bool = True) -> BlkRequest:
        """Submit a VIRTIO_BLK_T_FLUSH ("A driver MUST set sector to 0", §5.2.6.1)."""
        return self._submit(BlkRequest(BlkReqType.FLUSH, 0, 0, 0), b"", kick)

    def submit_get_id(self, *, kick: bool = True) -> BlkRequest:
        """Submit a VIRTIO_BLK_T_GET_ID ("The length of data MUST be 20 bytes")."""
        return self._submit(BlkRequest(BlkReqType.GET_ID, 0, 0, VIRTIO_BLK_ID_BYTES), b"", kick)

    def _range_segments(
        self, sector: int, nsectors: int, max_sectors: int, max_seg: int, flags: int
    ) -> list[list[tuple[int, int, int]]]:
        """Split a range into requests of at most ``max_seg`` segments."""
        if nsectors < 0 or sector < 0 or sector + nsectors > self.capacity:
            raise ValueError(f"sectors {sector}+{nsectors} are beyond capacity {self.capacity}")
        segs = [
            (s, min(max_sectors, sector + nsectors - s), flags)
            for s in range(sector, sector + nsectors, max_sectors)
        ]
        return [segs[i : i + max_seg] for i in range(0, len(segs), max_seg)] or [
            [(sector, 0, flags)]
        ]

    def _discard_limits(self, discard: bool) -> tuple[int, int]:
        c = self.config
        sectors = c.max_discard_sectors if discard else c.max_write_zeroes_sectors
        segs = c.max_discard_seg if discard else c.max_write_zeroes_seg
        return (sectors or _U32), max(1, min(segs, MAX_SEGMENTS_PER_REQUEST))

    def _submit_segments(
        self, req_type: int, segs: Sequence[tuple[int, int, int]], kick: bool
    ) -> BlkRequest:
        table = pack_segments(segs)
        req = BlkRequest(req_type, 0, len(table), 0)
        return self._submit(req, table, kick)

    def submit_discard(self, sector: int, nsectors: int, *, kick: bool = True) -> BlkRequest:
        """Submit one VIRTIO_BLK_T_DISCARD (its range split into segments of at
        most ``max_discard_sectors``; at most ``max_discard_seg`` segments)."""
        self._need(BlkFeature.DISCARD, "VIRTIO_BLK_F_DISCARD")
        max_sectors, max_seg = self._discard_limits(True)
        # §5.2.6.1: "The unmap bit MUST be zero for discard commands."
        groups = self._range_segments(sector, nsectors, max_sectors, max_seg, 0)
        if len(groups) > 1:
            raise ValueError("range needs more than one discard request; use discard()")
        return self._submit_segments(BlkReqType.DISCARD, groups[0], kick)

    def submit_write_zeroes(
        self, sector: int, nsectors: int, unmap: bool = False, *, kick: bool = True
    ) -> BlkRequest:
        """Submit one VIRTIO_BLK_T_WRITE_ZEROES (``unmap`` lets the device deallocate)."""
        self._need(BlkFeature.WRITE_ZEROES, "VIRTIO_BLK_F_WRITE_ZEROES")
        max_sectors, max_seg = self._discard_limits(False)
        flags = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if unmap else 0
        groups = self._range_segments(sector, nsectors, max_sectors, max_seg, flags)
        if len(groups) > 1:
            raise ValueError("range needs more than one write zeroes request; use write_zeroes()")
        return self._submit_segments(BlkReqType.WRITE_ZEROES, groups[0], kick)

    def _need(self, feature: int, name: str) -> None:
        if not self.has_feature(feature):
            raise BlkUnsupportedError(f"{name} was not negotiated", BlkStatus.UNSUPP)

    def _check_writable(self) -> None:
        if self.read_only:
            # §5.2.5: "If the VIRTIO_BLK_F_RO feature is set by the device, any write
            # requests will fail." - fail them here without a round trip.
            raise BlkIOError("device is read-only (VIRTIO_BLK_F_RO)", BlkStatus.IOERR)

    def kick_pending(self) -> None:
        """Notify the device of every queue with requests added since the last kick."""
        dirty, self._dirty = self._dirty, set()
        for qi in sorted(dirty):
            if not self.queues[qi].broken:
                self.kick(qi)

    # -- completion -----------------------------------------------------------------

    def reap(self) -> int:
        """Collect completed requests from every queue without waiting; returns how
        many completed. A device violation fails that queue's requests."""
        done = 0
        for qi, q in enumerate(self.queues):
            if not self._inflight[qi]:
                continue
            while True:
                try:
                    item = q.get_used()
                except VirtioError as e:
                    self._fail_queue(qi, e)
                    break
                if item is None:
                    break
                req = item[0]
                if not isinstance(req, BlkRequest) or req not in self._inflight[qi]:
                    err = DeviceError("used element names a request not in flight")
                    q.broken_reason = q.broken_reason or err
                    self._fail_queue(qi, err)
                    break
                self._finish(req)
                done += 1
        return done

    def poll(self) -> int:
        """Kick pending queues and reap completions without waiting."""
        self.kick_pending()
        return self.reap()

    def _deadline(self, timeout: float | None) -> float | None:
        t = self.timeout if timeout is None else timeout
        return None if t is None else time.monotonic() + t

    def _check_usable(self) -> None:
        if not self.queues:
            raise QueueBrokenError("driver is not initialized (or was closed)")

    def check_device(self) -> None:
        """Raise (failing every request in flight) if the device needs a reset or
        the transport to it is gone."""
        try:
            self.check_status()
        except VirtioError as e:
            self.fail_in_flight(e)
            raise

    def _wait_progress(self, deadline: float | None) -> int:
        """Wait until at least one request completes; returns how many did."""
        self.kick_pending()
        while True:
            n = self.reap()
            if n:
                return n
            if not self.in_flight:
                return 0
            pending = False
            for q in self.queues:
                if not q.broken and q.enable_interrupts():
                    pending = True
            if not pending:
                wait = POLL_SLICE
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        self.check_device()
                        raise BlkTimeoutError(f"{self.in_flight} requests did not complete")
                try:
                    self.wait(wait)
                except VirtioError as e:  # DEVICE_NEEDS_RESET, or the device went away
                    self.fail_in_flight(e)
                    raise
                n = self.reap()
                if n:
                    return n
                self.check_device()

    def complete(
        self, handles: Iterable[BlkRequest], timeout: float | None = None
    ) -> list[bytes | None]:
        """Wait until every request in ``handles`` is done; return their results in
        order, raising the first failed request's error (after all are done)."""
        reqs = list(handles)
        deadline = self._deadline(timeout)
        self.kick_pending()
        self.reap()
        while not all(r.done for r in reqs):
            if not self.in_flight:
                raise RuntimeError("a request was never submitted")
            self._wait_progress(deadline)
        return [r.result() for r in reqs]

    def wait_all(self, timeout: float | None = None) -> None:
        """Wait until no request is in flight (errors stay in the handles)."""
        deadline = self._deadline(timeout)
        self.kick_pending()
        self.reap()
        while self.in_flight:
            self._wait_progress(deadline)

    # -- blocking API --------------------------------------------------------------------

    def read(self, sector: int, length: int) -> bytes:
        """Read ``length`` bytes (a multiple of 512) from ``sector``."""
        self._check_rw(sector, length)
        step = self._max_request_bytes
        reqs = [
            self.submit_read(sector + off // SECTOR_SIZE, min(step, length - off), kick=False)
            for off in range(0, length, step)
        ]
        return b"".join(d or b"" for d in self.complete(reqs))

    def write(self, sector: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` (a multiple of 512 bytes) at ``sector``."""
        src = memoryview(data).cast("B")
        self._check_rw(sector, src.nbytes)
        self._check_writable()
        step = self._max_request_bytes
        reqs = [
            self.submit_write(sector + off // SECTOR_SIZE, src[off : off + step], kick=False)
            for off in range(0, src.nbytes, step)
        ]
        self.complete(reqs)

    def flush(self) -> None:
        """Make completed writes stable. Without VIRTIO_BLK_F_FLUSH there is nothing
        to send: the device then commits writes before completing them (§5.2.6.2)."""
        if not self.has_feature(BlkFeature.FLUSH):
            return
        self.complete([self.submit_flush()])

    def get_id(self) -> bytes:
        """The device ID string (up to 20 bytes, NUL padding removed)."""
        data = self.complete([self.submit_get_id()])[0] or b""
        return data.split(b"\0", 1)[0]

    def _ranges(self, req_type: int, sector: int, nsectors: int, flags: int) -> None:
        discard = req_type == BlkReqType.DISCARD
        max_sectors, max_seg = self._discard_limits(discard)
        groups = self._range_segments(sector, nsectors, max_sectors, max_seg, flags)
        reqs = [self._submit_segments(req_type, g, False) for g in groups]
        self.complete(reqs)

    def discard(self, sector: int, nsectors: int) -> None:
        """Discard ``nsectors`` sectors at ``sector`` (contents undefined afterwards)."""
        self._need(BlkFeature.DISCARD, "VIRTIO_BLK_F_DISCARD")
        self._ranges(BlkReqType.DISCARD, sector, nsectors, 0)

    def write_zeroes(self, sector: int, nsectors: int, unmap: bool = False) -> None:
        """Zero ``nsectors`` sectors at ``sector``; ``unmap`` allows deallocation."""
        self._need(BlkFeature.WRITE_ZEROES, "VIRTIO_BLK_F_WRITE_ZEROES")
        flags = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if unmap else 0
        self._ranges(BlkReqType.WRITE_ZEROES, sector, nsectors, flags)

    # -- teardown --------------------------------------------------------------------

    def close(self) -> list[Any]:
        """Reset the device, fail every request still in flight, free its memory.

        A device that is already gone (its transport fails the reset) is not an
        error here: the rings and buffers are released all the same.
        """
        reqs = [r for s in self._inflight for r in s]
        tokens: list[Any] = []
        try:
            tokens = super().close()
        except VirtioError:
            pass
        finally:
            err = QueueBrokenError("device was reset")
            for r in reqs:
                if not r.done:
                    self._finish(r, err)
            for r in reqs + self._orphans:
                self._release(r)
            self._orphans = []
            self._inflight = []
            self._dirty = set()
        return tokens

    def __enter__(self) -> BlkDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
