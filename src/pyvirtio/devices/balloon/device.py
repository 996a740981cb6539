"""The traditional memory balloon (virtio-balloon), device side. virtio-v1.2 §5.5
"Traditional Memory Balloon Device".

The host asks for memory with :meth:`BalloonDevice.set_target` (``num_pages``, a
configuration change); the driver inflates (page frame numbers on inflateq), deflates
(deflateq) and writes how many pages the balloon holds to ``actual``.

What the device does with each queue:

- **inflateq / deflateq** (virtio-v1.2 §5.5.6 "Device Operation"): each buffer is an
  array of le32 PFNs of 4096-byte pages. A PFN outside guest RAM is skipped and
  counted (``pfn_outside_ram``), never fatal. Inflated pages are given back to the
  host (:meth:`~pyvirtio.memory.guest_memory.GuestMemory.discard`: a hole punched in
  the memfd) *before* the inflate request is acknowledged: "The device MAY modify the
  contents of a page in the balloon after detecting its physical number in an inflate
  request and before acknowledging the inflate request" - the one window the spec
  gives whether or not VIRTIO_BALLOON_F_MUST_TELL_HOST is negotiated (without it the
  driver may reuse a page before its deflate is acknowledged). A deflated page needs
  nothing: it is faulted back in, zero-filled, when the guest touches it.
- **statsq** (§5.5.6.3 "Memory Statistics"): the driver's buffer is read (unknown
  tags ignored: "the device MUST ignore entries with tag values that it does not
  recognize") and *held*; using it is the device's request for the next report,
  made by :meth:`BalloonDevice.request_stats` or every ``stats_interval`` seconds.
- **free_page_vq** (§5.5.6.4 "Free Page Hinting"): :meth:`BalloonDevice.start_hinting`
  publishes a new command id; the driver answers with a 4-byte buffer holding it and
  then hints pages (device-writable buffers), ending with CMD_ID_STOP. Hints given
  under an id that is not the current one are ignored ("The device MUST ignore pages
  that are provided with a command ID that does not match the current value").
  Hinted pages are recorded (a migration would skip them), never modified.
- **reporting_vq** (§5.5.6.6 "Free Page Reporting"): every reported range (the
  device-writable parts of a buffer; a readable part is left alone) is given back
  like an inflated page, except when VIRTIO_BALLOON_F_PAGE_POISON is negotiated
  with a non-zero ``poison_val`` (reported pages "will retain the value indicated by
  poison_val", and a hole reads back zeros).

Queues are numbered by role from the negotiated features (§5.5.2:
:func:`pyvirtio.spec.balloon.queue_indexes`); the device has room for all five.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pyvirtio.core.device import HOLD, VirtioDevice
from pyvirtio.core.events import Timer
from pyvirtio.errors import ConfigurationError, DriverError, GuestMemoryError
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.balloon import (
    BALLOON_CONFIG,
    BALLOON_STAT,
    MAX_QUEUES,
    PFN_SHIFT,
    PFN_SIZE,
    BalloonFeature,
    BalloonQueue,
    CmdId,
    StatTag,
    VirtioBalloonConfig,
    queue_indexes,
)
from pyvirtio.spec.ids import DeviceId
from pyvirtio.virtqueue.common import DescriptorChain, DeviceVirtqueue

__all__ = ["ALL_FEATURES", "BalloonCounters", "BalloonDevice", "MAX_PFNS_PER_REQUEST"]

_log = logging.getLogger(__name__)

#: Every balloon feature this device implements end to end.
ALL_FEATURES = (
    BalloonFeature.MUST_TELL_HOST.mask
    | BalloonFeature.STATS_VQ.mask
    | BalloonFeature.DEFLATE_ON_OOM.mask
    | BalloonFeature.FREE_PAGE_HINT.mask
    | BalloonFeature.PAGE_POISON.mask
    | BalloonFeature.PAGE_REPORTING.mask
)

#: Most PFNs read from one inflate/deflate buffer (a 1 MiB array; Linux sends 256):
#: the cap on host memory a request costs. Bytes beyond it are ignored and counted.
MAX_PFNS_PER_REQUEST = 1 << 18
#: Most stats entries read from one statsq buffer (the spec defines 10 tags).
MAX_STATS = 256
#: Hint ranges remembered per round (the count of hinted bytes is always kept).
MAX_HINT_RANGES = 1 << 16

_OP = 'virtio-v1.2 §5.5.6 "Device Operation"'
_STATS = 'virtio-v1.2 §5.5.6.3.1 "Driver Requirements: Memory Statistics"'
_HINT = 'virtio-v1.2 §5.5.6.4.1 "Driver Requirements: Free Page Hinting"'
_CFG = BALLOON_CONFIG
_OFF_ACTUAL = _CFG.offset_of("actual")
_OFF_POISON = _CFG.offset_of("poison_val")
_LE32 = struct.Struct("<I")


@dataclass
class BalloonCounters:
    """What the balloon did, for a user to read (beside :attr:`VirtioDevice.metrics`)."""

    inflate_requests: int = 0
    deflate_requests: int = 0
    #: PFNs inflated / deflated (each page counted once per request)
    inflated_pfns: int = 0
    deflated_pfns: int = 0
    #: PFNs naming no guest RAM (skipped)
    pfn_outside_ram: int = 0
    #: deflated PFNs that were not in the balloon
    deflate_not_inflated: int = 0
    #: bytes of host memory given back (holes punched) for inflated / reported pages
    discarded_bytes: int = 0
    #: discards the memory could not do (e.g. not memfd-backed)
    discard_failed: int = 0
    stats_reports: int = 0
    unknown_stat_tags: int = 0
    hint_rounds: int = 0
    hinted_bytes: int = 0
    #: hint buffers under an id that is not the current one (ignored)
    stale_hints: int = 0
    reports: int = 0
    reported_bytes: int = 0
    #: report ranges outside guest RAM (skipped)
    report_outside_ram: int = 0
    #: reported ranges kept (not discarded) because poison_val is non-zero
    reports_kept_for_poison: int = 0
    #: trailing bytes of a PFN / stats array that are not a whole entry
    ragged_bytes: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class BalloonDevice(VirtioDevice):
    """A virtio memory balloon (see the module docs).

    ``num_pages``: the initial target (4 KiB pages the host wants the guest to give
    up). ``features``: which balloon features to offer (default: all of them).
    ``stats_interval``: seconds between stats requests once the driver posted its
    stats buffer (None: only on :meth:`request_stats`). ``discard``: give inflated and
    reported pages back to the host (a hole punched in guest RAM's memfd); off, pages
    are only counted.

    Host API: :meth:`set_target`, :attr:`num_pages`, :attr:`actual` (what the driver
    wrote), :attr:`inflated` (PFNs in the balloon as the queues say),
    :attr:`stats` (the last report, by :class:`~pyvirtio.spec.balloon.StatTag`),
    :meth:`request_stats`, :meth:`start_hinting` / :meth:`stop_hinting` /
    :meth:`done_hinting`, :attr:`hinted`, :attr:`reported`, :attr:`poison_val`,
    :attr:`counters`.
    """

    device_id = DeviceId.BALLOON_TRADITIONAL

    def __init__(
        self,
        num_pages: int = 0,
        *,
        features: int = ALL_FEATURES,
        stats_interval: float | None = None,
        discard: bool = True,
        queue_max_size: int = 256,
        on_change: Callable[[BalloonDevice, str], None] | None = None,
    ) -> None:
        super().__init__(num_queues=MAX_QUEUES, queue_max_size=queue_max_size)
        if features & ~ALL_FEATURES:
            raise ConfigurationError(f"unknown balloon feature bits {features & ~ALL_FEATURES:#x}")
        if stats_interval is not None and stats_interval <= 0:
            raise ConfigurationError("stats_interval must be positive (or None)")
        self._check_pages(num_pages)
        self.offered = features
        self.stats_interval = stats_interval
        self.discard = discard
        #: called with (device, what) after ``actual``, ``stats``, ``inflate``,
        #: ``deflate``, ``hint`` or ``report`` changed something (e.g. to log it)
        self.on_change = on_change
        #: the host's target: pages it wants the guest to give up
        self.num_pages = num_pages
        #: ``actual`` as the driver last wrote it
        self.actual = 0
        self.poison_val = 0
        self.free_page_hint_cmd_id: int = int(CmdId.STOP)
        #: PFNs in the balloon (inflated and not deflated since)
        self.inflated: set[int] = set()
        #: the last statistics report: tag -> value (unknown tags left out)
        self.stats: dict[StatTag, int] = {}
        #: ``(address, length)`` hinted in the current round (capped)
        self.hinted: list[tuple[int, int]] = []
        #: ``(address, length)`` ranges reported (the last :data:`MAX_HINT_RANGES`)
        self.reported: list[tuple[int, int]] = []
        self.counters = BalloonCounters()
        self._roles: dict[int, BalloonQueue] = {}
        self._stats_held: tuple[DeviceVirtqueue, DescriptorChain] | None = None
        self._stats_timer: Timer | None = None
        self._next_cmd_id = 2
        #: the command id the driver's last 4-byte free_page_vq buffer carried
        self._driver_cmd_id: int | None = None
        #: the driver sent CMD_ID_STOP since the current id was issued
        self._stop_received = True
        self._used_cmd_ids: set[int] = set()
        #: called (last added first) by :meth:`close`
        self.close_hooks: list[Callable[[], None]] = []

    @staticmethod
    def _check_pages(n: int) -> None:
        if not 0 <= n <= 0xFFFF_FFFF:
            raise ConfigurationError(f"num_pages {n} is not a le32")

    # -- VirtioDevice hooks -------------------------------------------------------

    def specific_features(self) -> int:
        """The balloon features offered (virtio-v1.2 §5.5.3 "Feature bits")."""
        return self.offered

    def config_bytes(self) -> bytes:
        """``struct virtio_balloon_config`` (virtio-v1.2 §5.5.4)."""
        return _CFG.pack(
            VirtioBalloonConfig(
                self.num_pages, self.actual, self.free_page_hint_cmd_id, self.poison_val
            )
        )

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver writes ``actual`` and (with PAGE_POISON) ``poison_val``;
        ``num_pages`` and ``free_page_hint_cmd_id`` are the device's ("read-only by
        the driver") and writes to them are ignored."""
        cfg = bytearray(self.config_bytes())
        end = min(len(cfg), offset + len(data))
        if offset < 0 or offset >= end:
            return
        cfg[offset:end] = data[: end - offset]
        new = _CFG.unpack(bytes(cfg))
        if offset < _OFF_ACTUAL + 4 and end > _OFF_ACTUAL and new.actual != self.actual:
            self.actual = new.actual
            self._changed("actual")
        # "poison_val is available if VIRTIO_BALLOON_F_PAGE_POISON has been negotiated"
        # (written before DRIVER_OK, when the device is not live yet: accepted then)
        poison = self.negotiated(BalloonFeature.PAGE_POISON) or not self.active
        if poison and offset < _OFF_POISON + 4 and end > _OFF_POISON:
            self.poison_val = new.poison_val

    def activate(self, features: int, queues: Sequence[DeviceVirtqueue | None]) -> None:
        """Go live: number the queues from the negotiated features (§5.5.2)."""
        super().activate(features, queues)
        self._roles = {index: role for role, index in queue_indexes(features).items()}

    def reset(self) -> None:
        """Device reset: forget the held stats buffer and the hinting round (the
        target stays: it is the host's)."""
        self._cancel_stats_timer()
        self._stats_held = None
        self._roles = {}
        self.actual = 0
        self.poison_val = 0
        self.inflated.clear()
        self._driver_cmd_id = None
        super().reset()

    def queue_stopped(self, index: int) -> None:
        """A stopped statsq takes the held buffer with it."""
        if self._stats_held is not None and self._stats_held[0].index == index:
            self._stats_held = None
            self._cancel_stats_timer()

    def close(self) -> None:
        """Cancel the stats timer; run the close hooks (e.g. a control socket's)."""
        self._cancel_stats_timer()
        while self.close_hooks:
            self.close_hooks.pop()()

    def role(self, index: int) -> BalloonQueue | None:
        """The role of queue ``index`` with the negotiated features (None: no queue)."""
        return self._roles.get(index)

    def handle_queue(self, index: int) -> None:
        """An available buffer notification: serve the queue by its role."""
        role = self._roles.get(index)
        if role is None:
            self.metrics.error("bad_queue")
            return
        handler = {
            BalloonQueue.INFLATEQ: self._inflate,
            BalloonQueue.DEFLATEQ: self._deflate,
            BalloonQueue.STATSQ: self._stats_buffer,
            BalloonQueue.FREE_PAGE_VQ: self._free_page,
            BalloonQueue.REPORTING_VQ: self._report,
        }[role]
        self.run_queue(index, handler)

    # -- host API -------------------------------------------------------------------

    def set_target(self, num_pages: int) -> None:
        """Ask the guest to hold ``num_pages`` 4 KiB pages in the balloon (inflate if
        more than :attr:`actual`, deflate if fewer): ``num_pages`` changes and the
        driver gets a configuration change notification (§5.5.6: "The device is driven
        either by the receipt of a configuration change notification...")."""
        self._check_pages(num_pages)
        with self.lock:
            self.num_pages = num_pages
            self.config_changed()

    @property
    def inflated_pages(self) -> int:
        """How many distinct pages the inflate/deflate queues put in the balloon."""
        return len(self.inflated)

    def ram_allocated(self) -> int | None:
        """Bytes of guest RAM the host holds now (the memfds' allocated blocks; over
        vhost-user the front-end's guest RAM), or None before the device is live."""
        vq = next((q for q in self.queues if q is not None), None)
        return None if vq is None else vq.mem.allocated_bytes()

    def request_stats(self) -> bool:
        """Ask the driver for a new statistics report now: the held statsq buffer is
        used (§5.5.6.3: "The device uses the buffer and sends a used buffer
        notification"). False if no buffer is held (none posted yet, or a request is
        already out)."""
        return bool(self.guarded("request stats", self._request_stats))

    def start_hinting(self) -> int:
        """Begin a free page hinting round: publish a new command id (>= 2) in
        ``free_page_hint_cmd_id`` and notify; returns it. "The device MUST NOT reuse a
        command ID until it has received an output buffer containing
        VIRTIO_BALLOON_CMD_ID_STOP from the driver": a fresh id is taken unless the
        driver stopped the last round."""
        with self.lock:
            if not self._stop_received and self.free_page_hint_cmd_id >= 2:
                self._used_cmd_ids.add(self.free_page_hint_cmd_id)
            cmd = self._next_cmd_id
            while cmd in self._used_cmd_ids:
                cmd = cmd + 1 if cmd < 0xFFFF_FFFF else 2
            self._next_cmd_id = cmd + 1 if cmd < 0xFFFF_FFFF else 2
            self._used_cmd_ids.add(cmd)
            self.free_page_hint_cmd_id = cmd
            self._stop_received = False
            self.hinted = []
            self.counters.hint_rounds += 1
            self.config_changed()
            return cmd

    def stop_hinting(self) -> None:
        """End the round, hints kept (``free_page_hint_cmd_id`` = CMD_ID_STOP)."""
        with self.lock:
            self.free_page_hint_cmd_id = int(CmdId.STOP)
            self.config_changed()

    def done_hinting(self) -> None:
        """Hinting complete: the driver may reuse every hinted page (CMD_ID_DONE).
        "The device MUST NOT modify the content of a previously hinted page after
        free_page_hint_cmd_id is set to VIRTIO_BALLOON_CMD_ID_DONE" (it never does)."""
        with self.lock:
            self.free_page_hint_cmd_id = int(CmdId.DONE)
            self.config_changed()

    # -- inflate / deflate --------------------------------------------------------------

    def _mem(self, index: BalloonQueue) -> GuestMemory:
        for i, role in self._roles.items():
            if role is index:
                vq = self.queues[i]
                assert vq is not None
                return vq.mem
        raise AssertionError(index)  # pragma: no cover - run_queue serves live queues

    def _pfns(self, chain: DescriptorChain, mem: GuestMemory, what: str) -> list[int]:
        if chain.writable:
            # the PFN array is device-readable (§5.5.6); a writable part is ignored
            self.counters.extra["writable_part"] = self.counters.extra.get("writable_part", 0) + 1
        total = chain.readable_len
        take = min(total // 4, MAX_PFNS_PER_REQUEST)
        self.counters.ragged_bytes += total - take * 4
        try:
            data = chain.read_all(mem, take * 4)
        except GuestMemoryError as e:
            raise DriverError(f"{what} buffer {chain.id} lies outside guest RAM: {e}", _OP) from e
        return list(struct.unpack(f"<{take}I", data))

    def _inflate(self, chain: DescriptorChain) -> int:
        mem = self._mem(BalloonQueue.INFLATEQ)
        c = self.counters
        c.inflate_requests += 1
        for pfn in self._pfns(chain, mem, "inflateq"):
            addr = pfn << PFN_SHIFT
            if not mem.contains(addr, PFN_SIZE):
                c.pfn_outside_ram += 1
                continue
            c.inflated_pfns += 1
            self.inflated.add(pfn)
            # before the inflate request is acknowledged: the window §5.5.6.2 gives
            self._discard(mem, addr, PFN_SIZE)
        self._changed("inflate")
        return 0

    def _deflate(self, chain: DescriptorChain) -> int:
        mem = self._mem(BalloonQueue.DEFLATEQ)
        c = self.counters
        c.deflate_requests += 1
        for pfn in self._pfns(chain, mem, "deflateq"):
            if not mem.contains(pfn << PFN_SHIFT, PFN_SIZE):
                c.pfn_outside_ram += 1
                continue
            c.deflated_pfns += 1
            if pfn in self.inflated:
                self.inflated.discard(pfn)
            else:
                c.deflate_not_inflated += 1
        # With MUST_TELL_HOST "the driver MUST NOT use pages from the balloon until
        # the device has acknowledged the deflate request": the page is the guest's
        # again from this acknowledgement on (nothing to undo: a punched page is
        # faulted back in on the guest's first touch).
        self._changed("deflate")
        return 0

    def _discard(self, mem: GuestMemory, addr: int, n: int) -> None:
        if not self.discard:
            return
        try:
            self.counters.discarded_bytes += mem.discard(addr, n)
        except GuestMemoryError:
            self.counters.discard_failed += 1

    # -- statistics ------------------------------------------------------------------------

    def _stats_buffer(self, chain: DescriptorChain) -> int:
        vq = self._live_role(BalloonQueue.STATSQ)
        if self._stats_held is not None:
            raise DriverError(
                f"statsq buffer {chain.id} while the device holds buffer "
                f"{self._stats_held[1].id}: the driver MUST make at most one buffer "
                "available to the device in the statsq, at all times",
                _STATS,
            )
        if chain.writable:
            raise DriverError(
                f"statsq buffer {chain.id} has a device-writable part: the driver MUST "
                "make an output buffer available in the statsq",
                _STATS,
            )
        total = chain.readable_len
        n = min(total // BALLOON_STAT.size, MAX_STATS)
        self.counters.ragged_bytes += total - n * BALLOON_STAT.size
        try:
            data = chain.read_all(vq.mem, n * BALLOON_STAT.size)
        except GuestMemoryError as e:
            raise DriverError(f"statsq buffer {chain.id} lies outside guest RAM: {e}", _OP) from e
        stats: dict[StatTag, int] = {}
        known = {int(t) for t in StatTag}
        for i in range(n):
            entry = BALLOON_STAT.unpack_from(data, i * BALLOON_STAT.size)
            # "the device MUST ignore entries with tag values that it does not
            # recognize" and "MUST accept ... entries in any order"
            if entry.tag in known:
                stats[StatTag(entry.tag)] = entry.val
            else:
                self.counters.unknown_stat_tags += 1
        self.stats = stats
        self.counters.stats_reports += 1
        # "The device pops the buffer (retaining it to initiate a subsequent request)"
        self._stats_held = (vq, chain)
        if self.stats_interval is not None:
            self._cancel_stats_timer()
            self._stats_timer = self.events.call_later(self.stats_interval, self._on_stats_timer)
        self._changed("stats")
        return HOLD

    def _live_role(self, role: BalloonQueue) -> DeviceVirtqueue:
        for i, r in self._roles.items():
            if r is role and self.queues[i] is not None:
                vq = self.queues[i]
                assert vq is not None
                return vq
        raise AssertionError(role)  # pragma: no cover

    def _on_stats_timer(self) -> None:
        self._stats_timer = None
        self._request_stats()

    def _request_stats(self) -> bool:
        held = self._stats_held
        if held is None:
            return False
        self._stats_held = None
        self._cancel_stats_timer()
        return self.complete(held[0], held[1], 0)

    def _cancel_stats_timer(self) -> None:
        if self._stats_timer is not None:
            self._stats_timer.cancel()
            self._stats_timer = None

    # -- free page hinting -----------------------------------------------------------------

    def _free_page(self, chain: DescriptorChain) -> int:
        vq = self._live_role(BalloonQueue.FREE_PAGE_VQ)
        c = self.counters
        if chain.readable:
            if chain.readable_len != 4:
                raise DriverError(
                    f"free_page_vq buffer {chain.id} has {chain.readable_len} readable "
                    "bytes: the driver MUST use an output buffer size of 4 bytes for all "
                    "output buffers submitted to the free_page_vq",
                    _HINT,
                )
            try:
                cmd = _LE32.unpack(chain.read_all(vq.mem, 4))[0]
            except GuestMemoryError as e:
                raise DriverError(f"free_page_vq buffer {chain.id}: {e}", _HINT) from e
            if cmd == CmdId.STOP:
                # every id issued so far may be reused from now on
                self._stop_received = True
                self._used_cmd_ids.clear()
                self._driver_cmd_id = None
            else:
                self._driver_cmd_id = cmd
        if chain.writable:
            current = self.free_page_hint_cmd_id
            if self._driver_cmd_id is None or self._driver_cmd_id != current or current < 2:
                # "The device MUST ignore pages that are provided with a command ID
                # that does not match the current value in free_page_hint_cmd_id."
                c.stale_hints += 1
            else:
                for addr, n in chain.writable:
                    c.hinted_bytes += n
                    if len(self.hinted) < MAX_HINT_RANGES:
                        self.hinted.append((addr, n))
                self._changed("hint")
        return 0

    # -- free page reporting -----------------------------------------------------------------

    def _report(self, chain: DescriptorChain) -> int:
        mem = self._live_role(BalloonQueue.REPORTING_VQ).mem
        c = self.counters
        c.reports += 1
        # pages reported with PAGE_POISON "will retain the value indicated by
        # poison_val": a punched hole reads zeros, so only a zero poison allows it
        keep = self.negotiated(BalloonFeature.PAGE_POISON) and self.poison_val != 0
        if chain.readable:
            # reported pages come as device-writable buffers (Linux adds them with
            # virtqueue_add_inbuf, QEMU reads only the in_sg): a readable part is
            # the driver's and is left alone, only counted
            c.extra["report_readable"] = c.extra.get("report_readable", 0) + 1
        for addr, n in chain.writable:
            if not mem.contains(addr, n):
                c.report_outside_ram += 1
                continue
            c.reported_bytes += n
            self.reported.append((addr, n))
            if keep:
                c.reports_kept_for_poison += 1
            else:
                self._discard(mem, addr, n)
        if len(self.reported) > MAX_HINT_RANGES:
            del self.reported[: len(self.reported) - MAX_HINT_RANGES]
        self._changed("report")
        return 0

    def _changed(self, what: str) -> None:
        if self.on_change is not None:
            self.on_change(self, what)
