"""The block device model. virtio-v1.2 §5.2 "Block Device".

:class:`BlkDevice` serves ``struct virtio_blk_req`` requests from its request queues
against a :class:`~pyvirtio.devices.blk.backend.BlkBackend`. Request framing follows
virtio-v1.2 §2.7.4 "Message Framing" ("The device MUST NOT make assumptions about the
particular arrangement of descriptors"): the 16-byte header is the first 16 bytes of
the device-readable part wherever the descriptors split it, ``data`` is the rest of
the readable part (OUT, DISCARD, WRITE_ZEROES) or the writable part up to its last
byte (IN, GET_ID), and ``status`` is the last byte of the device-writable part.

Malformed requests get a defined answer:

- no device-writable byte at all: nothing can be answered, so this is a framing
  violation: :class:`~pyvirtio.errors.DriverError`, the queue stops and the device
  sets DEVICE_NEEDS_RESET;
- a request that breaks one of the driver's MUSTs of virtio-v1.2 §5.2.6.1 "Driver
  Requirements: Device Operation" (data length not a multiple of 512, GET_ID data not
  20 bytes, discard/write-zeroes data not whole segments or more segments than
  offered, a read or write beyond ``capacity``, a FLUSH with a non-zero sector), a
  header shorter than 16 bytes, or data in the wrong direction: VIRTIO_BLK_S_IOERR,
  which the spec defines "for device or driver error";
- a type the device does not implement, unknown discard/write-zeroes flags, or
  ``unmap`` on a discard: VIRTIO_BLK_S_UNSUPP (virtio-v1.2 §5.2.6.2 "Device
  Requirements: Device Operation").

The used length is the number of bytes the device wrote into the device-writable
part: the data it read plus the status byte (IN, GET_ID) or the status byte alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from pyvirtio.core.device import HOLD, DeviceMetrics, VirtioDevice
from pyvirtio.core.workers import DEFAULT_THREADS, WorkerPool
from pyvirtio.devices.blk.backend import BlkBackend, FileBackend, NullBackend
from pyvirtio.errors import ConfigurationError, DriverError, GuestMemoryError
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_CONFIG,
    VIRTIO_BLK_DISCARD_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_OUTHDR,
    VIRTIO_BLK_T_FLUSH_OUT,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    BlkFeature,
    BlkReqType,
    BlkStatus,
    VirtioBlkConfig,
)
from pyvirtio.spec.features import Feature, bit, has
from pyvirtio.spec.ids import DeviceId
from pyvirtio.virtqueue.common import USED_LEN_MAX, DescriptorChain, DeviceVirtqueue, Segment

CLAUSE_OPERATION = 'virtio-v1.2 §5.2.6 "Device Operation"'
CLAUSE_DRIVER_OPERATION = 'virtio-v1.2 §5.2.6.1 "Driver Requirements: Device Operation"'
CLAUSE_DEVICE_OPERATION = 'virtio-v1.2 §5.2.6.2 "Device Requirements: Device Operation"'
CLAUSE_DEVICE_INIT = 'virtio-v1.2 §5.2.5.2 "Device Requirements: Device Initialization"'

#: Size of the device-readable request header (type, reserved, sector).
HEADER_SIZE = VIRTIO_BLK_OUTHDR.size
#: Largest sector count a discard / write zeroes segment may carry by default
#: (the config fields are le32; 0x3FFFFF sectors is 2 GiB - 512).
DEFAULT_MAX_DISCARD_SECTORS = 0x3FFFFF
#: Largest number of discard / write zeroes segments per request by default.
DEFAULT_MAX_DISCARD_SEG = 16
#: ``seg_max`` unless told otherwise (capped at ``queue_max_size - 2``): what fits a
#: 128-entry ring (QEMU's default queue size) with the header and status descriptors.
DEFAULT_SEG_MAX = 126
#: Upper bound on the segment limits a user may configure: a request's segment
#: table is read into host memory, so its size is capped (16 bytes per segment).
MAX_DISCARD_SEG_LIMIT = 4096

_HDR = VIRTIO_BLK_OUTHDR.struct
_SEG = VIRTIO_BLK_DISCARD_WRITE_ZEROES.struct
_STATUS = {s: bytes([s]) for s in BlkStatus}
_WRITEBACK_OFFSET = VIRTIO_BLK_CONFIG.offset_of("writeback")
_U32 = 0xFFFFFFFF


@dataclass
class BlkMetrics(DeviceMetrics):
    """Block device counters: requests by type, bytes, statuses and backend flushes.

    ``bytes_read`` counts bytes read from the backend for IN requests and
    ``bytes_written`` bytes written to it by OUT requests. ``errors`` (inherited)
    counts ``"ioerr"``, ``"unsupp"``, ``"backend"`` (an OSError from the backend) and
    ``"driver_error"`` (a framing violation that stopped a queue).
    """

    reads: int = 0
    writes: int = 0
    flushes: int = 0
    get_ids: int = 0
    discards: int = 0
    write_zeroes: int = 0
    unsupported: int = 0
    io_errors: int = 0
    backend_flushes: int = 0


class _Fail(Exception):
    """Internal: finish the request now with ``status``."""

    def __init__(self, status: BlkStatus) -> None:
        super().__init__(status.name)
        self.status = status


def _views(mem: GuestMemory, segs: list[Segment], skip: int, length: int) -> list[memoryview]:
    """Zero-copy views of ``length`` bytes of ``segs`` starting ``skip`` bytes in."""
    out: list[memoryview] = []
    for addr, n in segs:
        if length <= 0:
            break
        if skip >= n:
            skip -= n
            continue
        take = min(n - skip, length)
        out.extend(mem.views(addr + skip, take))
        length -= take
        skip = 0
    return out


def _not_in_ram(e: GuestMemoryError) -> DriverError:
    return DriverError(f"block request buffer not in guest RAM: {e}", CLAUSE_OPERATION)


def _last_byte(segs: list[Segment]) -> int:
    """Guest address of the last byte of ``segs`` (which hold at least one byte)."""
    for addr, n in reversed(segs):
        if n > 0:
            return addr + n - 1
    raise ValueError("no bytes")  # pragma: no cover - caller checked the length


class BlkDevice(VirtioDevice):
    """A virtio block device (virtio-v1.2 §5.2) over a :class:`BlkBackend`.

    Offers VIRTIO_BLK_F_SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, TOPOLOGY, CONFIG_WCE,
    MQ (``num_queues > 1``), DISCARD and WRITE_ZEROES (unless disabled), RO (a
    read-only backend) and GEOMETRY (when ``geometry`` is given).

    ``writeback`` is the cache mode after reset ("The cache mode after reset can be
    either writeback or writethrough", virtio-v1.2 §5.2.5). In writethrough mode
    every write is made stable (``backend.flush()``) before it completes.

    ``io_threads`` worker threads run the backend's reads, writes, flushes and
    discards (:class:`~pyvirtio.core.workers.WorkerPool`), so a slow ``fdatasync``
    stalls neither the other queues nor the transport's control channel; requests
    then complete in any order (in order when VIRTIO_F_IN_ORDER was negotiated: the
    ring publishes them so). The default is :data:`~pyvirtio.core.workers.
    DEFAULT_THREADS` for a backend that may block and 0 (inline: each request
    completes before the next is read) for one that says ``may_block = False``
    (memory and null backends, where a thread hand-off costs more than the I/O).
    """

    device_id = DeviceId.BLOCK

    def __init__(
        self,
        backend: BlkBackend,
        *,
        num_queues: int = 1,
        queue_max_size: int = 256,
        serial: bytes = b"pyvirtio",
        writeback: bool = True,
        blk_size: int = SECTOR_SIZE,
        size_max: int = 1 << 20,
        seg_max: int | None = None,
        geometry: Sequence[int] | None = None,
        physical_block_exp: int = 0,
        alignment_offset: int = 0,
        min_io_size: int = 1,
        opt_io_size: int = 0,
        discard: bool = True,
        write_zeroes: bool = True,
        max_discard_sectors: int = DEFAULT_MAX_DISCARD_SECTORS,
        max_discard_seg: int = DEFAULT_MAX_DISCARD_SEG,
        max_write_zeroes_sectors: int = DEFAULT_MAX_DISCARD_SECTORS,
        max_write_zeroes_seg: int = DEFAULT_MAX_DISCARD_SEG,
        io_threads: int | None = None,
    ) -> None:
        if not 1 <= num_queues <= 0xFFFF:
            raise ConfigurationError("num_queues must be between 1 and 65535")
        if len(serial) > VIRTIO_BLK_ID_BYTES:
            raise ConfigurationError(f"serial is at most {VIRTIO_BLK_ID_BYTES} bytes")
        if blk_size < SECTOR_SIZE or blk_size & (blk_size - 1) or blk_size > _U32:
            raise ConfigurationError("blk_size must be a power of two >= 512")
        if seg_max is None:
            # Not the largest ring accepted: the driver uses seg_max to size requests,
            # and without indirect descriptors a request longer than the ring the
            # front-end actually set up can never be placed (Linux then hangs). The
            # front-end's ring size is unknown when the configuration is first read
            # (vhost-user GET_CONFIG comes before the rings), so the default is what
            # fits QEMU's default 128-entry ring, as qemu-storage-daemon offers.
            seg_max = min(DEFAULT_SEG_MAX, max(1, queue_max_size - 2))
        if not 1 <= seg_max <= _U32 or not SECTOR_SIZE <= size_max <= _U32:
            raise ConfigurationError("seg_max must be >= 1 and size_max >= 512 (le32)")
        for name, v in (
            ("max_discard_seg", max_discard_seg),
            ("max_write_zeroes_seg", max_write_zeroes_seg),
        ):
            if not 1 <= v <= MAX_DISCARD_SEG_LIMIT:
                raise ConfigurationError(f"{name} must be between 1 and {MAX_DISCARD_SEG_LIMIT}")
        for name, v in (
            ("max_discard_sectors", max_discard_sectors),
            ("max_write_zeroes_sectors", max_write_zeroes_sectors),
        ):
            if not 1 <= v <= _U32:
                raise ConfigurationError(f"{name} must be between 1 and 2^32-1")
        if io_threads is not None and not 0 <= io_threads <= 256:
            raise ConfigurationError("io_threads must be between 0 and 256")
        super().__init__(num_queues, queue_max_size)
        self.backend = backend
        if io_threads is None:
            io_threads = DEFAULT_THREADS if getattr(backend, "may_block", True) else 0
        #: worker threads running backend I/O (0: inline, on the device's thread)
        self.io_threads = io_threads
        self._pool: WorkerPool | None = None
        #: called as ``tracer(mem, chain, status, used_len)`` when a request completes
        #: (before the driver can see it), e.g. to log requests; None: nothing
        self.tracer: Callable[[GuestMemory, DescriptorChain, BlkStatus, int], None] | None = None
        self.metrics: BlkMetrics = BlkMetrics()
        self.serial = bytes(serial)
        self.blk_size = blk_size
        self.size_max = size_max
        self.seg_max = seg_max
        if geometry is not None and len(geometry) != 3:
            raise ConfigurationError("geometry is (cylinders, heads, sectors)")
        self.geometry = None if geometry is None else (geometry[0], geometry[1], geometry[2])
        self.topology = (physical_block_exp, alignment_offset, min_io_size, opt_io_size)
        self.discard_enabled = discard
        self.write_zeroes_enabled = write_zeroes
        self.max_discard_sectors = max_discard_sectors
        self.max_discard_seg = max_discard_seg
        self.max_write_zeroes_sectors = max_write_zeroes_sectors
        self.max_write_zeroes_seg = max_write_zeroes_seg
        self.readonly = bool(backend.readonly)
        self.writeback_default = writeback
        #: the ``writeback`` field as the driver sees it
        self._wce = writeback
        #: features accepted at FEATURES_OK (None before negotiation)
        self._accepted: int | None = None
        self.capacity = backend.size // SECTOR_SIZE
        self._config: bytes | None = None
        self._id = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        self._can_unmap = bool(getattr(backend, "can_unmap", False))

    @classmethod
    def from_file(cls, path: str, *, readonly: bool = False, **kwargs: Any) -> BlkDevice:
        """A device over the raw image at ``path`` (a :class:`FileBackend`); the other
        keyword arguments are the constructor's. Usable as a device-process factory
        (``"pyvirtio.devices.blk.device:BlkDevice.from_file"``)."""
        return cls(FileBackend(path, readonly=readonly), **kwargs)

    @classmethod
    def null(cls, size: int, **kwargs: Any) -> BlkDevice:
        """A device over a :class:`NullBackend` of ``size`` bytes (benchmarks)."""
        return cls(NullBackend(size), **kwargs)

    # -- features and configuration (virtio-v1.2 §5.2.3, §5.2.4) ---------------

    def specific_features(self) -> int:
        """Block feature bits offered (each implemented end to end)."""
        f = (
            bit(BlkFeature.SIZE_MAX)
            | bit(BlkFeature.SEG_MAX)
            | bit(BlkFeature.BLK_SIZE)
            | bit(BlkFeature.FLUSH)
            | bit(BlkFeature.TOPOLOGY)
            # §5.2.5.2: "Devices ... MUST offer [VIRTIO_BLK_F_FLUSH] if they offer
            # VIRTIO_BLK_F_CONFIG_WCE" - FLUSH is always offered above.
            | bit(BlkFeature.CONFIG_WCE)
        )
        if self.num_queues > 1:
            f |= bit(BlkFeature.MQ)
        if self.discard_enabled:
            f |= bit(BlkFeature.DISCARD)
        if self.write_zeroes_enabled:
            f |= bit(BlkFeature.WRITE_ZEROES)
        if self.readonly:
            f |= bit(BlkFeature.RO)
        if self.geometry is not None:
            f |= bit(BlkFeature.GEOMETRY)
        return f

    def _init_cache_mode(self, features: int) -> None:
        self._accepted = features
        self._config = None
        if not has(features, Feature.VERSION_1):
            # §5.2.5.3 "Legacy Interface: Device Initialization": "the device MUST NOT
            # modify the cache mode (and writeback) as a result of a driver modifying
            # the driver feature bits" - a legacy driver may have written writeback
            # already. (Without CONFIG_WCE the mode follows FLUSH: see writeback.)
            return
        if has(features, BlkFeature.CONFIG_WCE) and not has(features, BlkFeature.FLUSH):
            # §5.2.5.2: "If VIRTIO_BLK_F_CONFIG_WCE is negotiated but
            # VIRTIO_BLK_F_FLUSH is not, the device MUST initialize writeback to 0."
            self._wce = False

    def validate_features(self, features: int) -> bool:
        """FEATURES_OK: remember the features so ``writeback`` reads right at once."""
        self._init_cache_mode(features)
        return True

    def reset(self) -> None:
        """Device reset: host I/O in flight finishes first (nothing touches guest
        memory afterwards), then the cache mode returns to its initial value."""
        self._stop_pool()
        super().reset()
        self._wce = self.writeback_default
        self._accepted = None
        self._config = None

    @property
    def writeback(self) -> bool:
        """True if completed writes may be volatile (writeback cache) right now.

        virtio-v1.2 §5.2.6.2: a write is stable at completion when "neither
        VIRTIO_BLK_F_CONFIG_WCE nor VIRTIO_BLK_F_FLUSH feature were negotiated, but
        VIRTIO_BLK_F_FLUSH was offered" or when CONFIG_WCE was negotiated and
        ``writeback`` is 0; otherwise a FLUSH request makes it stable.
        """
        f = self._accepted
        if f is None:
            return self._wce
        if has(f, BlkFeature.CONFIG_WCE):
            return self._wce
        if has(f, BlkFeature.FLUSH):
            return self.writeback_default
        return False

    def config_bytes(self) -> bytes:
        """``struct virtio_blk_config`` as it reads now (padding zeroed, §5.2.5.2)."""
        if self._config is None:
            cyl, heads, sectors = self.geometry or (0, 0, 0)
            pbe, align, min_io, opt_io = self.topology
            discard = self.discard_enabled
            wz = self.write_zeroes_enabled
            self._config = VIRTIO_BLK_CONFIG.pack(
                VirtioBlkConfig(
                    capacity=self.capacity,
                    size_max=self.size_max,
                    seg_max=self.seg_max,
                    cylinders=cyl,
                    heads=heads,
                    sectors=sectors,
                    blk_size=self.blk_size,
                    physical_block_exp=pbe,
                    alignment_offset=align,
                    min_io_size=min_io,
                    opt_io_size=opt_io,
                    writeback=int(self.writeback),
                    num_queues=self.num_queues,
                    max_discard_sectors=self.max_discard_sectors if discard else 0,
                    max_discard_seg=self.max_discard_seg if discard else 0,
                    discard_sector_alignment=(self.blk_size // SECTOR_SIZE) if discard else 0,
                    max_write_zeroes_sectors=self.max_write_zeroes_sectors if wz else 0,
                    max_write_zeroes_seg=self.max_write_zeroes_seg if wz else 0,
                    write_zeroes_may_unmap=int(wz and self._can_unmap),
                )
            )
        return self._config

    def write_config(self, offset: int, data: bytes) -> None:
        """Only ``writeback`` is writable, and only with VIRTIO_BLK_F_CONFIG_WCE
        (or, through the legacy interface, before the features are known)."""
        if not offset <= _WRITEBACK_OFFSET < offset + len(data):
            return
        f = self._accepted
        # Before negotiation only a legacy driver can write here (a modern driver's
        # early write is refused by the transport, §3.1.1); §5.2.5.3: "the driver MAY
        # read or write writeback before setting the DRIVER or DRIVER_OK" bit.
        if f is not None and not has(f, BlkFeature.CONFIG_WCE):
            return
        # §5.2.6.1: "the driver MAY switch to writethrough or writeback mode by
        # writing respectively 0 and 1 to the writeback field"
        self._wce = data[_WRITEBACK_OFFSET - offset] != 0
        self._config = None

    def refresh_capacity(self) -> bool:
        """Re-read the backend size; on a change, update ``capacity`` and send a
        configuration change notification (virtio-v1.2 §5.2.6.2: "When this happens,
        the device SHOULD trigger a configuration change notification"). Returns
        whether the capacity changed."""
        cap = self.backend.size // SECTOR_SIZE
        if cap == self.capacity:
            return False
        self.capacity = cap
        self._config = None
        self.config_changed()
        return True

    def close(self) -> None:
        """Stop the I/O threads and close the backend."""
        self._stop_pool()
        self.backend.close()

    # -- request processing (virtio-v1.2 §5.2.6) ----------------------------------

    def handle_queue(self, index: int) -> None:
        """Serve every available request on request queue ``index``."""
        vq = self.queues[index] if 0 <= index < len(self.queues) else None
        if vq is None:
            return
        self.run_queue(index, partial(self._serve, vq))

    # -- host I/O off the event loop -------------------------------------------

    def activate(self, features: int, queues: Sequence[DeviceVirtqueue | None]) -> None:
        """DRIVER_OK. (A legacy driver has no FEATURES_OK: the cache mode is set here.)

        With I/O threads, the worker pool starts here and its completion eventfd is
        declared to the transport (:attr:`events`)."""
        if self._accepted != features:
            self._init_cache_mode(features)
        super().activate(features, queues)
        if self.io_threads and self._pool is None:
            self._pool = WorkerPool(self.io_threads, name="pyvirtio-blk")
            self.events.add_reader(self._pool.fd, self._collect)

    def _collect(self) -> None:
        if self._pool is not None:
            self._pool.collect()

    def quiesce(self) -> None:
        """Wait for every request's host I/O in flight and complete it."""
        if self._pool is not None:
            self._pool.drain()

    def _stop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            self.events.remove_reader(pool.fd)
            pool.close()

    @property
    def in_flight(self) -> int:
        """Requests whose host I/O is running on a worker thread."""
        return 0 if self._pool is None else self._pool.in_flight

    def _serve(self, vq: DeviceVirtqueue, chain: DescriptorChain) -> int:
        """Serve one request chain: the used length, or HOLD while its I/O runs."""
        mem = vq.mem
        wlen = chain.writable_len
        if wlen == 0:
            raise DriverError("block request has no device-writable status byte", CLAUSE_OPERATION)
        try:
            job, written = self._dispatch(mem, chain, wlen)
            status = BlkStatus.OK
            if job is not None:
                if self._pool is not None:
                    self._pool.submit(job, partial(self._finish, vq, chain, written))
                    return HOLD
                job()
        except (_Fail, OSError) as e:
            status, written = self._failed(e), 1
        except GuestMemoryError as e:
            raise _not_in_ram(e) from None
        return self._answer(mem, chain, status, written)

    def _finish(
        self,
        vq: DeviceVirtqueue,
        chain: DescriptorChain,
        written: int,
        _result: object,
        error: BaseException | None,
    ) -> None:
        """A worker finished the request's host I/O: write its status, complete it."""
        if vq.broken or self.queues[vq.index] is not vq:
            # the queue was reset or stopped meanwhile: not a byte more for it
            self.metrics.error("stale_completion")
            return
        if isinstance(error, GuestMemoryError):
            raise _not_in_ram(error)
        status = BlkStatus.OK
        if isinstance(error, (_Fail, OSError)):
            status, written = self._failed(error), 1
        elif error is not None:
            raise error  # a bug of the backend: the failure path takes it
        self.complete(vq, chain, self._answer(vq.mem, chain, status, written))

    def _answer(
        self, mem: GuestMemory, chain: DescriptorChain, status: BlkStatus, written: int
    ) -> int:
        """Write the status byte (the last device-writable byte); the used length."""
        try:
            mem.write(_last_byte(chain.writable), _STATUS[status])
        except GuestMemoryError as e:
            raise _not_in_ram(e) from None
        if self.tracer is not None:
            self.tracer(mem, chain, status, written)
        return written

    def _failed(self, e: BaseException) -> BlkStatus:
        """Count a failed request; its status byte."""
        m = self.metrics
        if isinstance(e, _Fail):
            if e.status == BlkStatus.UNSUPP:
                m.unsupported += 1
                m.error("unsupp")
            else:
                m.io_errors += 1
                m.error("ioerr")
            return e.status
        m.io_errors += 1
        m.error("backend")
        m.error("ioerr")
        return BlkStatus.IOERR

    @staticmethod
    def header(mem: GuestMemory, chain: DescriptorChain) -> tuple[int, int]:
        """``(type, sector)`` of the request in ``chain`` (a header shorter than 16
        bytes is answered VIRTIO_BLK_S_IOERR: raises the internal ``_Fail``)."""
        readable = chain.readable
        if readable and readable[0][1] >= HEADER_SIZE:
            raw = mem.read(readable[0][0], HEADER_SIZE)
        else:
            raw = chain.read_all(mem, HEADER_SIZE)
            if len(raw) < HEADER_SIZE:
                # the request header is device-readable and 16 bytes long (§5.2.6)
                raise _Fail(BlkStatus.IOERR)
        rtype, _reserved, sector = _HDR.unpack(raw)
        return rtype, sector

    def _check_range(self, sector: int, nbytes: int) -> int:
        """Byte offset of ``sector`` if ``nbytes`` from there fit in ``capacity``.

        §5.2.6.1: "A driver MUST NOT submit a request which would cause a read or
        write beyond capacity" - such a request gets VIRTIO_BLK_S_IOERR.
        """
        if sector > self.capacity or nbytes > (self.capacity - sector) * SECTOR_SIZE:
            raise _Fail(BlkStatus.IOERR)
        return sector * SECTOR_SIZE

    def _check_data_len(self, nbytes: int) -> None:
        """Refuse data longer than the device advertises it handles.

        virtio-v1.2 §5.2.3: "Maximum number of segments in a request is in seg_max",
        "Maximum size of any single segment is in size_max"; a request carrying more
        than ``seg_max * size_max`` bytes gets VIRTIO_BLK_S_IOERR. The cap also keeps
        the used length (data plus status byte) within le32.
        """
        if nbytes > min(self.seg_max * self.size_max, USED_LEN_MAX - 1):
            raise _Fail(BlkStatus.IOERR)

    def _stable(self) -> bool:
        """Writethrough: the write must be made stable before it completes."""
        if self.writeback:
            return False
        self.metrics.backend_flushes += 1
        return True

    def _dispatch(
        self, mem: GuestMemory, chain: DescriptorChain, wlen: int
    ) -> tuple[Callable[[], None] | None, int]:
        """Check the request and plan its host I/O.

        Returns the job (None: nothing to do on the backend) and the used length if
        it succeeds. The job runs on a worker thread (or inline) and raises
        :class:`_Fail` or :class:`OSError` for VIRTIO_BLK_S_IOERR. Everything that
        reads the request or the device's state happens here, on the device's thread.
        """
        m = self.metrics
        rlen = chain.readable_len
        rtype, sector = self.header(mem, chain)
        backend = self.backend

        if rtype == BlkReqType.IN:
            m.reads += 1
            dlen = wlen - 1
            # data of a read is device-writable only; §5.2.6.1: "The length of data
            # MUST be a multiple of 512 bytes for VIRTIO_BLK_T_IN and VIRTIO_BLK_T_OUT"
            if rlen != HEADER_SIZE or dlen % SECTOR_SIZE:
                raise _Fail(BlkStatus.IOERR)
            self._check_data_len(dlen)
            off = self._check_range(sector, dlen)
            if not dlen:
                return None, 1
            m.bytes_read += dlen
            return partial(
                _read, backend, off, _views(mem, chain.writable, 0, dlen), dlen
            ), dlen + 1

        if rtype == BlkReqType.OUT:
            m.writes += 1
            # §5.2.6.2: "A device MUST set the status byte to VIRTIO_BLK_S_IOERR for
            # a write request if the VIRTIO_BLK_F_RO feature if offered, and MUST NOT
            # write any data."
            if self.readonly:
                raise _Fail(BlkStatus.IOERR)
            dlen = rlen - HEADER_SIZE
            if wlen != 1 or dlen % SECTOR_SIZE:
                raise _Fail(BlkStatus.IOERR)
            self._check_data_len(dlen)
            off = self._check_range(sector, dlen)
            if not dlen:
                return None, 1
            m.bytes_written += dlen
            views = _views(mem, chain.readable, HEADER_SIZE, dlen)
            return partial(_write, backend, off, views, dlen, self._stable()), 1

        if rtype == BlkReqType.FLUSH or (
            rtype == VIRTIO_BLK_T_FLUSH_OUT and not has(self.features, Feature.VERSION_1)
        ):
            m.flushes += 1
            # §5.2.6.1: "A driver MUST set sector to 0 for a VIRTIO_BLK_T_FLUSH
            # request." (Data in a flush is only a SHOULD NOT: it is ignored.)
            if sector != 0:
                raise _Fail(BlkStatus.IOERR)
            m.backend_flushes += 1
            # Submitted now, it covers every write completed before: those finished
            # their backend write before their used element was published.
            return backend.flush, 1

        if rtype == BlkReqType.GET_ID:
            m.get_ids += 1
            # §5.2.6.1: "The length of data MUST be 20 bytes for VIRTIO_BLK_T_GET_ID"
            if rlen != HEADER_SIZE or wlen - 1 != VIRTIO_BLK_ID_BYTES:
                raise _Fail(BlkStatus.IOERR)
            chain.write_all(mem, self._id)
            return None, VIRTIO_BLK_ID_BYTES + 1

        if rtype == BlkReqType.DISCARD or rtype == BlkReqType.WRITE_ZEROES:
            is_discard = rtype == BlkReqType.DISCARD
            if is_discard:
                m.discards += 1
            else:
                m.write_zeroes += 1
            if self.readonly:
                raise _Fail(BlkStatus.IOERR)
            feature = BlkFeature.DISCARD if is_discard else BlkFeature.WRITE_ZEROES
            if not has(self.features, feature):
                raise _Fail(BlkStatus.UNSUPP)
            ranges = self._discard_write_zeroes(mem, chain, rlen, wlen, is_discard)
            return partial(_discard, backend, ranges, is_discard, self._stable()), 1

        # GET_LIFETIME, SECURE_ERASE, zoned and legacy SCSI requests, and every
        # unknown type: §5.2.6 "VIRTIO_BLK_S_UNSUPP for a request unsupported by device"
        raise _Fail(BlkStatus.UNSUPP)

    def _discard_write_zeroes(
        self, mem: GuestMemory, chain: DescriptorChain, rlen: int, wlen: int, is_discard: bool
    ) -> list[tuple[int, int, bool]]:
        """Read and check the segments of a discard / write zeroes request; returns
        the byte ranges ``(offset, length, unmap)`` to apply."""
        if is_discard:
            max_seg, max_sectors = self.max_discard_seg, self.max_discard_sectors
        else:
            max_seg, max_sectors = self.max_write_zeroes_seg, self.max_write_zeroes_sectors
        dlen = rlen - HEADER_SIZE
        # §5.2.6.1: "The length of data MUST be a multiple of the size of struct
        # virtio_blk_discard_write_zeroes" and "MUST NOT contain more than
        # max_discard_seg [max_write_zeroes_seg] ... segments"; the length is
        # checked before anything is read, so the host copy is bounded.
        seg_size = _SEG.size
        if wlen != 1 or dlen <= 0 or dlen % seg_size or dlen // seg_size > max_seg:
            raise _Fail(BlkStatus.IOERR)
        raw = memoryview(b"".join(bytes(v) for v in _views(mem, chain.readable, HEADER_SIZE, dlen)))
        segs = [_SEG.unpack_from(raw, i) for i in range(0, dlen, seg_size)]
        for _sector, _num, flags in segs:
            # §5.2.6.2: "The device MUST set the status byte to VIRTIO_BLK_S_UNSUPP
            # for discard, secure erase and write zeroes commands if any unknown flag
            # is set. Furthermore, ... for discard commands if the unmap flag is set."
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (
                is_discard and flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            ):
                raise _Fail(BlkStatus.UNSUPP)
        ranges: list[tuple[int, int, bool]] = []
        for sector, num, flags in segs:
            if num > max_sectors:
                raise _Fail(BlkStatus.IOERR)
            off = self._check_range(sector, num * SECTOR_SIZE)
            unmap = bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
            if num:
                ranges.append((off, num * SECTOR_SIZE, unmap))
        return ranges


# -- the jobs (run on a worker thread, or inline): backend I/O only ----------------


def _read(backend: BlkBackend, off: int, views: list[memoryview], dlen: int) -> None:
    if backend.readv(off, views) != dlen:
        raise _Fail(BlkStatus.IOERR)


def _write(backend: BlkBackend, off: int, views: list[memoryview], dlen: int, stable: bool) -> None:
    if backend.writev(off, views) != dlen:
        raise _Fail(BlkStatus.IOERR)
    if stable:
        backend.flush()


def _discard(
    backend: BlkBackend, ranges: list[tuple[int, int, bool]], is_discard: bool, stable: bool
) -> None:
    for off, length, unmap in ranges:
        if is_discard:
            backend.discard(off, length)
        else:
            # §5.2.6.2: "After a write zeroes command is completed, reads of the
            # specified ranges of sectors MUST return zeroes."
            backend.write_zeroes(off, length, unmap)
    if stable:
        backend.flush()


__all__ = ["BlkDevice", "BlkMetrics"]
