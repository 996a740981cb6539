"""Power-cut durability of the block device (virtio-v1.2 §5.2.6.2), dm-log-writes style.

A test store records every write and every flush its backend receives, in order. A
power cut after record k keeps, of what was written, exactly the writes before the
last flush at or before k (any later one may or may not have reached the medium; the
replay keeps none of them, the worst case). The driver side records, for each FLUSH
it saw complete, which writes had completed before it submitted that FLUSH; in
writethrough mode, every write it saw complete.

The rule checked at every cut point: "A write is considered stable once a FLUSH that
was submitted after it completed" - nothing the driver was told is stable is lost.
Requests run on the device's I/O threads with random delays, so they complete out of
order and the flushes race with writes still in flight.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from pyvirtio.core.driver import RingOptions
from pyvirtio.devices.blk import BlkDevice, MemoryBackend
from pyvirtio.drivers.blk import BlkDriver, BlkRequest
from pyvirtio.spec.blk import SECTOR_SIZE
from pyvirtio.transport.loopback import connect

SECTORS = 256
CUTS = 10_000


class LogWritesBackend(MemoryBackend):
    """A memory image that logs writes and flushes in the order they reach it."""

    may_block = True

    def __init__(self, size: int, seed: int) -> None:
        super().__init__(size)
        #: ("w", offset, data), ("f", 0, b""), and the driver's markers
        self.log: list[tuple[str, int, bytes]] = []
        self._lock = threading.Lock()
        self._rnd = random.Random(seed)

    def _delay(self) -> None:
        with self._lock:
            d = self._rnd.random() * 0.002
        time.sleep(d)

    def writev(self, offset: int, bufs: list[memoryview]) -> int:
        self._delay()
        data = b"".join(bytes(b) for b in bufs)
        with self._lock:
            n = super().writev(offset, bufs)
            self.log.append(("w", offset, data))
        return n

    def flush(self) -> None:
        self._delay()
        with self._lock:
            self.log.append(("f", 0, b""))

    def mark(self, what: str, ident: int) -> None:
        """A marker from the driver side (not I/O): what it has seen complete so far."""
        with self._lock:
            self.log.append((what, ident, b""))


@pytest.mark.parametrize("writeback", [True, False], ids=["writeback", "writethrough"])
def test_no_write_the_driver_saw_stable_is_lost_at_any_power_cut(writeback: bool) -> None:
    rnd = random.Random(11 if writeback else 12)
    backend = LogWritesBackend(SECTORS * SECTOR_SIZE, seed=rnd.randrange(1 << 30))
    dev = BlkDevice(backend, io_threads=4, writeback=writeback)
    drv = connect(BlkDriver, dev, ring=RingOptions(in_order=False), timeout=30.0)
    writes: dict[int, tuple[int, bytes]] = {}
    covers: dict[int, set[int]] = {}  # flush id -> writes completed before it was submitted
    completed: set[int] = set()
    pending: dict[BlkRequest, tuple[str, int]] = {}

    def observe() -> None:
        """Reap; put a marker in the store's log for each completion seen (it happened
        no later than that: a cut after the marker is after the completion)."""
        drv.poll()
        for r in [r for r in pending if r.done]:
            kind, ident = pending.pop(r)
            assert r.result() is None  # no I/O error
            if kind == "w":
                completed.add(ident)
            backend.mark(kind + "done", ident)

    try:
        assert drv.writeback == writeback
        wid = fid = 0
        for _round in range(80):
            for _ in range(rnd.randrange(1, 8)):
                sector = rnd.randrange(SECTORS)
                data = rnd.randbytes(SECTOR_SIZE)
                pending[drv.submit_write(sector, data, kick=False)] = ("w", wid)
                writes[wid] = (sector, data)
                wid += 1
            drv.kick_pending()
            observe()
            if rnd.random() < 0.5:
                covers[fid] = set(completed)
                pending[drv.submit_flush(kick=False)] = ("f", fid)
                fid += 1
                drv.kick_pending()
        while pending:
            drv.wait_all()
            observe()
    finally:
        drv.close()
        drv.transport.close()
        dev.close()

    log = backend.log
    position = {
        (off // SECTOR_SIZE, data): i for i, (kind, off, data) in enumerate(log) if kind == "w"
    }
    flushes = [i for i, (kind, _, _) in enumerate(log) if kind == "f"]
    assert flushes and covers
    # what the driver was told is stable, from which log index on
    promises: list[tuple[int, set[int]]] = []
    for i, (kind, ident, _) in enumerate(log):
        if kind == "fdone":
            promises.append((i, covers[ident]))
        elif kind == "wdone" and not writeback:
            promises.append((i, {ident}))  # writethrough: stable once completed
    assert promises
    checked = 0
    for k in sorted(rnd.randrange(len(log) + 1) for _ in range(CUTS)):
        last_flush = max((i for i in flushes if i < k), default=-1)
        for promised_at, ids in promises:
            if promised_at >= k:
                continue
            for w in ids:
                assert position[writes[w]] < last_flush, (
                    f"write {w} was stable when the driver saw record {promised_at}, but a "
                    f"power cut at record {k} loses it"
                )
                checked += 1
    assert checked > 1000
