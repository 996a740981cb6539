"""The traditional memory balloon, driver side. virtio-v1.2 §5.5 "Traditional Memory
Balloon Device".

:class:`BalloonDriver` reads ``num_pages``, inflates the balloon to it with pages it
allocates from the transport's guest allocator (their PFNs, 4096-byte pages, on
inflateq), deflates (PFNs on deflateq, pages freed once the device acknowledged) and
writes ``actual``; it answers statistics requests on statsq, reports free ranges on
reporting_vq and hints free pages on free_page_vq.

Rules followed (virtio-v1.2 §5.5.6.1 "Driver Requirements: Device Operation" and the
sections of each queue):

- "The driver MUST NOT use pages from the balloon after adding the pages to the
  balloon, but before the device has acknowledged the inflate request" and "MUST NOT
  request deflation of pages in the balloon before the device has acknowledged the
  inflate request": a page joins :attr:`BalloonDriver.pages` only once its inflate
  request is used, and only those are deflated.
- With MUST_TELL_HOST "the driver MUST NOT use pages from the balloon until the device
  has acknowledged the deflate request": pages go back to the allocator after the
  acknowledgement (always: that is also correct without the feature).
- "The driver MUST update actual after changing the number of pages in the balloon":
  after each :meth:`~BalloonDriver.inflate` / :meth:`~BalloonDriver.deflate`.
- Statistics (§5.5.6.3.1): one output buffer at most, the same subset of tags in every
  buffer, a size that is a multiple of the 10-byte entry.
- PAGE_POISON (§5.5.6.5.1): ``poison_val`` is written before DRIVER_OK and deflated
  pages are filled with it before they are reused.
- Free page hinting (§5.5.6.4.1): a 4-byte output buffer with the current command id,
  the hinted pages as input buffers, then CMD_ID_STOP.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterable, Mapping

from pyvirtio.core.driver import DriverTransport, RingOptions, VirtioDriver
from pyvirtio.errors import ConfigurationError, DeviceError, QueueBrokenError
from pyvirtio.spec.balloon import (
    BALLOON_CONFIG,
    BALLOON_STAT,
    PFN_SHIFT,
    PFN_SIZE,
    BalloonFeature,
    BalloonQueue,
    CmdId,
    StatTag,
    queue_indexes,
    virtqueue_count,
)
from pyvirtio.spec.ids import DeviceId
from pyvirtio.virtqueue.common import DriverVirtqueue

__all__ = ["PFNS_PER_REQUEST", "BalloonDriver"]

#: PFNs per inflate/deflate request (Linux: VIRTIO_BALLOON_ARRAY_PFNS_MAX = 256)
PFNS_PER_REQUEST = 256

_LE32 = struct.Struct("<I")

#: the features the driver accepts by default
_DEFAULT = (
    BalloonFeature.MUST_TELL_HOST.mask
    | BalloonFeature.STATS_VQ.mask
    | BalloonFeature.DEFLATE_ON_OOM.mask
    | BalloonFeature.FREE_PAGE_HINT.mask
    | BalloonFeature.PAGE_REPORTING.mask
)


class BalloonDriver(VirtioDriver):
    """A virtio balloon driver over any :class:`~pyvirtio.core.driver.DriverTransport`.

    ``features``: balloon features to accept if offered (default: all but
    PAGE_POISON). ``poison_val``: accept PAGE_POISON and write this value to
    ``poison_val`` (the driver then fills deflated pages with it). ``stats``: a
    callable returning the statistics to report (tag -> value); the tags of its first
    answer are the subset reported from then on. ``timeout``: seconds any wait may
    take.
    """

    device_id = DeviceId.BALLOON_TRADITIONAL

    def __init__(
        self,
        transport: DriverTransport,
        *,
        features: int = _DEFAULT,
        poison_val: int | None = None,
        stats: Callable[[], Mapping[StatTag, int]] | None = None,
        timeout: float = 10.0,
        ring: RingOptions = RingOptions(),
    ) -> None:
        super().__init__(transport, ring=ring)
        self.want = features | (BalloonFeature.PAGE_POISON.mask if poison_val is not None else 0)
        self.poison_val = poison_val
        self.stats_source = stats if stats is not None else self.allocator_stats
        self.timeout = timeout
        #: guest addresses of the pages in the balloon (acknowledged inflations)
        self.pages: list[int] = []
        #: the number of statistics reports sent
        self.stats_sent = 0
        self._stats_tags: list[StatTag] | None = None
        self._stats_buf: int | None = None
        self._q: dict[BalloonQueue, int] = {}
        self._config_dirty = False
        # used tokens collected out of order while waiting for another (hint rounds)
        self._seen: dict[BalloonQueue, set[object]] = {}

    # -- VirtioDriver hooks -------------------------------------------------------------

    def specific_features(self, offered: int) -> int:
        """The balloon features asked for (MUST_TELL_HOST always: "The driver SHOULD
        accept the VIRTIO_BALLOON_F_MUST_TELL_HOST feature if offered")."""
        return offered & (self.want | BalloonFeature.MUST_TELL_HOST.mask)

    def queue_count(self) -> int:
        """inflateq, deflateq and the optional queues negotiated (§5.5.2)."""
        return virtqueue_count(self.features)

    def setup(self) -> None:
        """Number the queues; with PAGE_POISON write ``poison_val`` ("The driver MUST
        populate the poison_val configuration data before setting the DRIVER_OK
        bit")."""
        self._q = queue_indexes(self.features)
        if self.has_feature(BalloonFeature.PAGE_POISON) and self.poison_val is not None:
            self.transport.write_config(
                BALLOON_CONFIG.offset_of("poison_val"), _LE32.pack(self.poison_val & 0xFFFF_FFFF)
            )

    def on_config_change(self) -> None:
        """``num_pages`` or ``free_page_hint_cmd_id`` changed: :meth:`adjust` acts."""
        self._config_dirty = True

    def initialize(self) -> None:
        """Initialize (virtio-v1.2 §3.1.1, §5.5.5 "Device Initialization"); with
        STATS_VQ the first statistics buffer goes out after DRIVER_OK."""
        super().initialize()
        if self.has_feature(BalloonFeature.STATS_VQ):
            self._stats_buf = self.transport.allocator.alloc(BALLOON_STAT.size * 16, 16)
            # "After initializing the device, the driver MUST make an output buffer
            # available in the statsq."
            self._post_stats()

    def allocator_stats(self) -> dict[StatTag, int]:
        """The default statistics: the transport allocator's window as MEMTOT and its
        free bytes as MEMFREE."""
        alloc = self.transport.allocator
        return {StatTag.MEMTOT: alloc.size, StatTag.MEMFREE: alloc.free_bytes}

    # -- configuration --------------------------------------------------------------------

    def _config_u32(self, name: str) -> int:
        data = self.read_config(BALLOON_CONFIG.offset_of(name), 4)
        return int(_LE32.unpack(data)[0])

    @property
    def num_pages(self) -> int:
        """The device's target (``num_pages``)."""
        return self._config_u32("num_pages")

    @property
    def actual(self) -> int:
        """``actual`` as the configuration space reads it."""
        return self._config_u32("actual")

    @property
    def free_page_hint_cmd_id(self) -> int:
        """The device's current hinting command id."""
        return self._config_u32("free_page_hint_cmd_id")

    def _write_actual(self) -> None:
        # "The driver MUST update actual after changing the number of pages"
        self.transport.write_config(BALLOON_CONFIG.offset_of("actual"), _LE32.pack(len(self.pages)))

    # -- inflate / deflate ----------------------------------------------------------------

    def adjust(self) -> int:
        """Bring the balloon to ``num_pages`` (inflate or deflate); answer a pending
        statistics request first. Returns the change in pages (negative: deflated)."""
        self.service()
        self._config_dirty = False
        target = self.num_pages
        have = len(self.pages)
        if target > have:
            return self.inflate(target - have)
        if target < have:
            return -self.deflate(have - target)
        return 0

    def inflate(self, n: int) -> int:
        """Give ``n`` more pages to the balloon (fewer if guest memory runs out);
        returns how many were given."""
        alloc = self.transport.allocator
        given = 0
        while given < n:
            batch: list[int] = []
            for _ in range(min(PFNS_PER_REQUEST, n - given)):
                try:
                    batch.append(alloc.alloc(PFN_SIZE, PFN_SIZE))
                except Exception:
                    break
            if not batch:
                break
            self._send_pfns(BalloonQueue.INFLATEQ, batch)
            # only now are they the balloon's (acknowledged)
            self.pages.extend(batch)
            given += len(batch)
            if len(batch) < PFNS_PER_REQUEST and given < n:
                break
        self._write_actual()
        return given

    def deflate(self, n: int) -> int:
        """Take ``n`` pages back from the balloon; returns how many."""
        taken = 0
        alloc = self.transport.allocator
        while taken < n and self.pages:
            k = min(PFNS_PER_REQUEST, n - taken, len(self.pages))
            batch = self.pages[-k:]
            self._send_pfns(BalloonQueue.DEFLATEQ, batch)
            del self.pages[-k:]
            for addr in batch:
                if self.has_feature(BalloonFeature.PAGE_POISON) and self.poison_val is not None:
                    # "The driver MUST initialize the deflated pages with poison_val
                    # when they are reused by the driver."
                    self.transport.mem.write(addr, _LE32.pack(self.poison_val) * (PFN_SIZE // 4))
                alloc.free(addr)
            taken += k
        self._write_actual()
        return taken

    def deflate_on_oom(self, n: int) -> int:
        """Take ``n`` pages back although ``num_pages`` still wants them (the guest
        needs memory); returns how many. Only with VIRTIO_BALLOON_F_DEFLATE_ON_OOM:
        "If VIRTIO_BALLOON_F_DEFLATE_ON_OOM has not been negotiated, the driver MUST
        NOT use pages from the balloon when num_pages is less than or equal to the
        actual number of pages in the balloon" (raises
        :class:`~pyvirtio.errors.ConfigurationError` then)."""
        if not self.has_feature(BalloonFeature.DEFLATE_ON_OOM):
            raise ConfigurationError(
                "VIRTIO_BALLOON_F_DEFLATE_ON_OOM was not negotiated: the driver MUST NOT "
                'use pages from the balloon (virtio-v1.2 §5.5.6.1 "Driver Requirements: '
                'Device Operation")'
            )
        return self.deflate(n)

    def _send_pfns(self, role: BalloonQueue, addrs: list[int]) -> None:
        data = struct.pack(f"<{len(addrs)}I", *(a >> PFN_SHIFT for a in addrs))
        buf = self.transport.allocator.alloc(len(data), 16)
        try:
            self.transport.mem.write(buf, data)
            q = self.queues[self._q[role]]
            q.add([(buf, len(data))], [], buf)
            self.kick(self._q[role])
            self._wait_used(role, buf)
        finally:
            self.transport.allocator.free(buf)

    # -- statistics ------------------------------------------------------------------------

    def _post_stats(self) -> None:
        assert self._stats_buf is not None
        values = dict(self.stats_source())
        if self._stats_tags is None:
            # "Driver MUST supply the same subset of statistics in all buffers"
            self._stats_tags = sorted(values)[:16]
        data = b"".join(
            BALLOON_STAT.pack_values(int(t), int(values.get(t, 0)) & (1 << 64) - 1)
            for t in self._stats_tags
        )
        if not data:
            raise ConfigurationError("a statistics buffer needs at least one statistic")
        self.transport.mem.write(self._stats_buf, data)
        i = self._q[BalloonQueue.STATSQ]
        self.queues[i].add([(self._stats_buf, len(data))], [], self._stats_buf)
        self.kick(i)
        self.stats_sent += 1

    def service(self) -> bool:
        """Answer a statistics request if the device made one (it used our buffer):
        "Upon detecting that device has used a buffer in the statsq, the driver MUST
        make an output buffer available in the statsq". Returns True if it did."""
        i = self._q.get(BalloonQueue.STATSQ)
        if i is None or self._stats_buf is None:
            return False
        used = self.queues[i].get_used()
        if used is None:
            return False
        self._post_stats()
        return True

    def serve(self, duration: float) -> int:
        """Answer statistics requests (and follow ``num_pages``) for ``duration``
        seconds; returns how many statistics reports were sent meanwhile."""
        before = self.stats_sent
        deadline = time.monotonic() + duration
        while (left := deadline - time.monotonic()) > 0:
            self.service()
            if self._config_dirty:
                self.adjust()
            for q in self.queues:
                q.enable_interrupts()
            self.wait(min(left, 0.2))
        return self.stats_sent - before

    # -- free page reporting and hinting --------------------------------------------------

    def report_free(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Report free ranges ``(address, length)`` on reporting_vq and wait for the
        acknowledgement (§5.5.6.6: "Once the device has acknowledged the report, the
        driver can reuse the reported free pages")."""
        role = BalloonQueue.REPORTING_VQ
        if role not in self._q:
            raise ConfigurationError("VIRTIO_BALLOON_F_PAGE_REPORTING was not negotiated")
        segs = list(ranges)
        token = object()
        self.queues[self._q[role]].add([], segs, token)
        self.kick(self._q[role])
        self._wait_used(role, token)

    def hint_free(self, ranges: Iterable[tuple[int, int]]) -> bool:
        """One free page hinting round over ``ranges`` if the device asked for one
        (``free_page_hint_cmd_id`` >= 2): the command id, each range, CMD_ID_STOP.
        Returns False if no round is open."""
        role = BalloonQueue.FREE_PAGE_VQ
        if role not in self._q:
            raise ConfigurationError("VIRTIO_BALLOON_F_FREE_PAGE_HINT was not negotiated")
        cmd = self.free_page_hint_cmd_id
        if cmd < 2:
            return False
        i = self._q[role]
        q = self.queues[i]
        alloc = self.transport.allocator
        bufs = [alloc.alloc(4, 4), alloc.alloc(4, 4)]
        try:
            # "MUST start hinting by providing an output buffer containing the current
            # command ID" (4 bytes, once)
            self.transport.mem.write(bufs[0], _LE32.pack(cmd))
            self.transport.mem.write(bufs[1], _LE32.pack(CmdId.STOP))
            tokens: list[object] = [bufs[0]]
            q.add([(bufs[0], 4)], [], bufs[0])
            for seg in ranges:
                token = object()
                q.add([], [seg], token)
                tokens.append(token)
            # "If the driver is unable to supply pages, it MUST complete hinting by
            # adding an output buffer containing the command ID VIRTIO_BALLOON_CMD_ID_STOP"
            q.add([(bufs[1], 4)], [], bufs[1])
            tokens.append(bufs[1])
            self.kick(i)
            for token in tokens:
                self._wait_used(role, token, any_order=set(tokens))
        finally:
            for b in bufs:
                alloc.free(b)
        return True

    # -- waiting ---------------------------------------------------------------------------

    def _wait_used(
        self, role: BalloonQueue, token: object, any_order: set[object] | None = None
    ) -> None:
        q: DriverVirtqueue[object] = self.queues[self._q[role]]
        seen = self._seen.setdefault(role, set())
        if token in seen:
            seen.discard(token)
            return
        deadline = time.monotonic() + self.timeout
        while True:
            used = q.get_used()
            if used is not None:
                got, _ = used
                if got is token:
                    return
                if any_order is not None and got in any_order:
                    seen.add(got)
                    continue
                err = DeviceError(f"{role.name.lower()}: used buffer {got!r} was not asked for")
                q.broken_reason = q.broken_reason or err
                raise err
            self.service()
            if q.broken:
                raise QueueBrokenError(f"{role.name.lower()} is broken: {q.broken_reason}")
            if q.enable_interrupts():
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                self.check_status()
                raise DeviceError(f"{role.name.lower()}: no acknowledgement in {self.timeout} s")
            self.wait(min(left, 0.2))

    def close(self) -> list[object]:
        """Reset the device and free the rings, the stats buffer and the pages (after a
        reset the balloon is empty)."""
        try:
            tokens: list[object] = super().close()
        finally:
            alloc = self.transport.allocator
            if self._stats_buf is not None:
                alloc.free(self._stats_buf)
                self._stats_buf = None
            for addr in self.pages:
                alloc.free(addr)
            self.pages = []
        return tokens
