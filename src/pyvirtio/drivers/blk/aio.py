"""An asyncio interface to the block driver: many concurrent requests in flight.

:class:`AsyncBlkDriver` wraps an initialized :class:`~pyvirtio.drivers.blk.driver.BlkDriver`
and shares its request machinery (guest-memory buffers, queue selection, status
handling). Completions arrive through ``loop.add_reader`` on the transport's
``interrupt_fds()``; a transport that delivers interrupts synchronously inside the
kick (no fds) is reaped right after kicking. Kicks are batched: every request
submitted in one event-loop iteration (``asyncio.gather``) shares one notification.

A watchdog timer runs while requests are in flight: it reaps (a missed interrupt
never hangs a request), re-checks the device status (DEVICE_NEEDS_RESET fails every
request) and fails requests past their deadline with
:class:`~pyvirtio.drivers.blk.driver.BlkTimeoutError`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pyvirtio.core.driver import DriverTransport
from pyvirtio.drivers.blk.driver import (
    POLL_SLICE,
    BlkDriver,
    BlkRequest,
    BlkTimeoutError,
    pack_segments,
)
from pyvirtio.errors import VirtioError
from pyvirtio.spec.blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    BlkFeature,
    BlkReqType,
)


class AsyncBlkDriver:
    """Awaitable block I/O over a :class:`BlkDriver` (bound to one event loop).

    ``timeout`` is each request's deadline in seconds (``None``: the driver's).
    Do not use the wrapped driver's blocking API at the same time.
    """

    def __init__(self, driver: BlkDriver, *, timeout: float | None = None) -> None:
        if not driver.queues:
            raise ValueError("initialize() the BlkDriver first")
        self.driver = driver
        self.timeout = driver.timeout if timeout is None else timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fds: list[int] = []
        self._kick_scheduled = False
        self._room: list[asyncio.Future[None]] = []
        self._waiting: dict[BlkRequest, tuple[asyncio.Future[None], float | None]] = {}
        self._watchdog: asyncio.TimerHandle | None = None

    @classmethod
    def create(cls, transport: DriverTransport, **kwargs: Any) -> AsyncBlkDriver:
        """Make and initialize a :class:`BlkDriver` on ``transport`` and wrap it."""
        drv = BlkDriver(transport, **kwargs)
        drv.initialize()
        return cls(drv)

    # -- properties ----------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Device size in 512-byte sectors."""
        return self.driver.capacity

    @property
    def blk_size(self) -> int:
        """The device's optimal block size."""
        return self.driver.blk_size

    @property
    def read_only(self) -> bool:
        """True if the device is read-only."""
        return self.driver.read_only

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet completed."""
        return self.driver.in_flight

    # -- event loop plumbing -----------------------------------------------------------

    def _attach(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return loop
        if self._loop is not None and not self._loop.is_closed():
            raise RuntimeError("AsyncBlkDriver is bound to another event loop")
        # (re)bind: state tied to a previous, closed loop is dropped
        self._loop = loop
        self._watchdog = None
        self._kick_scheduled = False
        self._room = []
        self._fds = list(self.driver.transport.interrupt_fds())
        for fd in self._fds:
            loop.add_reader(fd, self._service, True)
        return loop

    def _wake_room(self) -> None:
        waiters, self._room = self._room, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    def _service(self, poll: bool) -> None:
        """Take interrupts, reap completions, wake coroutines waiting for room."""
        drv = self.driver
        done = 0
        try:
            if poll:
                drv.wait(0)
            while True:
                done += drv.reap()
                if not drv.in_flight:
                    break
                pending = False
                for q in drv.queues:
                    if not q.broken and q.enable_interrupts():
                        pending = True
                if not pending:
                    break
        except VirtioError as e:
            drv.fail_in_flight(e)
            done += 1
        if done:
            self._wake_room()
        self._arm_watchdog()

    def _kick(self) -> None:
        self._kick_scheduled = False
        try:
            self.driver.kick_pending()
        except VirtioError as e:
            self.driver.fail_in_flight(e)
        if not self._fds:
            # interrupts are delivered inside the kick: completions are ready now
            self._service(True)
        else:
            self._arm_watchdog()

    def _schedule_kick(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._kick_scheduled:
            self._kick_scheduled = True
            loop.call_soon(self._kick)

    def _arm_watchdog(self) -> None:
        if self._watchdog is None and self._loop is not None and self._waiting:
            self._watchdog = self._loop.call_later(POLL_SLICE, self._on_watchdog)

    def _on_watchdog(self) -> None:
        self._watchdog = None
        self._service(True)
        try:
            self.driver.check_device()
        except VirtioError:
            self._wake_room()
        now = time.monotonic()
        for req, (fut, deadline) in list(self._waiting.items()):
            if deadline is not None and now >= deadline and not fut.done():
                del self._waiting[req]
                fut.set_exception(BlkTimeoutError(f"{req!r} did not complete in time"))
        self._arm_watchdog()

    def _on_done(self, req: BlkRequest) -> None:
        entry = self._waiting.pop(req, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(None)

    async def _wait_room(self, loop: asyncio.AbstractEventLoop) -> None:
        fut: asyncio.Future[None] = loop.create_future()
        self._room.append(fut)
        self._kick()
        if fut.done():
            return
        try:
            await asyncio.wait_for(fut, POLL_SLICE)
        except asyncio.TimeoutError:
            self._service(True)
            self.driver.check_device()

    async def _run(self, req: BlkRequest, out: bytes | bytearray | memoryview = b"") -> BlkRequest:
        loop = self._attach()
        drv = self.driver
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        fut: asyncio.Future[None] = loop.create_future()
        try:
            while not drv._start(req, out):
                if deadline is not None and time.monotonic() >= deadline:
                    raise BlkTimeoutError("no room for the request before its deadline")
                await self._wait_room(loop)
        except BaseException:
            if req.queue < 0:
                drv._release(req)
            raise
        self._waiting[req] = (fut, deadline)
        req.on_done = self._on_done
        self._schedule_kick(loop)
        self._arm_watchdog()
        await fut
        return req

    # -- requests -------------------------------------------------------------------------

    async def request(
        self,
        req_type: int,
        sector: int = 0,
        out: bytes | bytearray | memoryview = b"",
        in_len: int = 0,
    ) -> bytes | None:
        """Any request, unchecked (low level): returns the data read, if any."""
        req = self.driver.prepare(req_type, sector, out, in_len)
        return (await self._run(req, out)).result()

    async def read(self, sector: int, length: int) -> bytes:
        """Read ``length`` bytes (a multiple of 512) from ``sector``."""
        drv = self.driver
        drv._check_rw(sector, length)
        step = drv.max_request_bytes
        jobs = [
            self._run(
                BlkRequest(BlkReqType.IN, sector + off // SECTOR_SIZE, 0, min(step, length - off))
            )
            for off in range(0, length, step)
        ]
        done = await asyncio.gather(*jobs)
        return b"".join(r.result() or b"" for r in done)

    async def write(self, sector: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` (a multiple of 512 bytes) at ``sector``."""
        drv = self.driver
        src = memoryview(data).cast("B")
        drv._check_rw(sector, src.nbytes)
        drv._check_writable()
        step = drv.max_request_bytes
        jobs = []
        for off in range(0, src.nbytes, step):
            chunk = src[off : off + step]
            req = BlkRequest(BlkReqType.OUT, sector + off // SECTOR_SIZE, chunk.nbytes, 0)
            jobs.append(self._run(req, chunk))
        for r in await asyncio.gather(*jobs):
            r.result()

    async def flush(self) -> None:
        """Make completed writes stable (nothing to send without VIRTIO_BLK_F_FLUSH)."""
        if not self.driver.has_feature(BlkFeature.FLUSH):
            return
        (await self._run(BlkRequest(BlkReqType.FLUSH, 0, 0, 0))).result()

    async def get_id(self) -> bytes:
        """The device ID string (NUL padding removed)."""
        req = await self._run(BlkRequest(BlkReqType.GET_ID, 0, 0, VIRTIO_BLK_ID_BYTES))
        return (req.result() or b"").split(b"\0", 1)[0]

    async def _ranges(self, req_type: int, sector: int, nsectors: int, flags: int) -> None:
        drv = self.driver
        discard = req_type == BlkReqType.DISCARD
        max_sectors, max_seg = drv._discard_limits(discard)
        groups = drv._range_segments(sector, nsectors, max_sectors, max_seg, flags)
        jobs = []
        for g in groups:
            table = pack_segments(g)
            jobs.append(self._run(BlkRequest(req_type, 0, len(table), 0), table))
        for r in await asyncio.gather(*jobs):
            r.result()

    async def discard(self, sector: int, nsectors: int) -> None:
        """Discard ``nsectors`` sectors at ``sector``."""
        self.driver._need(BlkFeature.DISCARD, "VIRTIO_BLK_F_DISCARD")
        await self._ranges(BlkReqType.DISCARD, sector, nsectors, 0)

    async def write_zeroes(self, sector: int, nsectors: int, unmap: bool = False) -> None:
        """Zero ``nsectors`` sectors at ``sector``; ``unmap`` allows deallocation."""
        self.driver._need(BlkFeature.WRITE_ZEROES, "VIRTIO_BLK_F_WRITE_ZEROES")
        flags = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if unmap else 0
        await self._ranges(BlkReqType.WRITE_ZEROES, sector, nsectors, flags)

    # -- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop watching interrupts and close the driver (resets the device)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            for fd in self._fds:
                loop.remove_reader(fd)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._fds = []
        self.driver.close()
        for fut, _ in self._waiting.values():
            if not fut.done():
                fut.set_result(None)
        self._waiting.clear()
        self._wake_room()

    async def __aenter__(self) -> AsyncBlkDriver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
