"""AsyncBlkDriver: many concurrent requests (asyncio.gather) over the synchronous
in-process loopback (no interrupt fds: reaped right after the kick) and over a
threaded transport whose interrupts arrive through an eventfd (loop.add_reader)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import random
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from pyvirtio.core.driver import RingOptions
from pyvirtio.devices.blk import BlkDevice, MemoryBackend
from pyvirtio.drivers.blk import (
    AsyncBlkDriver,
    BlkDriver,
    BlkIOError,
    BlkTimeoutError,
    BlkUnsupportedError,
)
from pyvirtio.errors import DriverError, QueueBrokenError
from pyvirtio.spec.blk import SECTOR_SIZE, BlkReqType
from pyvirtio.transport.loopback import LoopbackTransport
from pyvirtio.virtqueue.common import DescriptorChain, DeviceVirtqueue

RING = [pytest.param(False, id="split"), pytest.param(True, id="packed")]
DISK = 512 * SECTOR_SIZE


class ThreadedTransport:
    """A loopback transport whose device runs in a worker thread; used buffer
    notifications are signalled through an eventfd, as a real transport does."""

    def __init__(self, device: BlkDevice, mem_size: int = 16 << 20) -> None:
        self.inner = LoopbackTransport(device, mem_size)
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._work: queue.Queue[int | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _run(self) -> None:
        while True:
            index = self._work.get()
            if index is None:
                return
            before = sum(self.inner.interrupt_counts.values())
            self.inner.notify(index)
            if sum(self.inner.interrupt_counts.values()) != before:
                os.eventfd_write(self.efd, 1)

    def notify(self, index: int) -> None:
        self._work.put(index)

    def poll_interrupts(self, timeout: float | None) -> set[int]:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.efd)
        return self.inner.poll_interrupts(timeout)  # type: ignore[no-any-return]

    def interrupt_fds(self) -> list[int]:
        return [self.efd]

    def close(self) -> None:
        self._work.put(None)
        self._thread.join(5)
        os.close(self.efd)
        self.inner.close()


@pytest.fixture
def make() -> Iterator[Any]:
    made: list[tuple[AsyncBlkDriver, Any]] = []

    def build(
        device: BlkDevice | None = None, threaded: bool = False, mem_size: int = 16 << 20, **kw: Any
    ) -> AsyncBlkDriver:
        dev = device or BlkDevice(MemoryBackend(DISK))
        t: Any = ThreadedTransport(dev, mem_size) if threaded else LoopbackTransport(dev, mem_size)
        drv = BlkDriver(t, **kw)
        drv.initialize()
        a = AsyncBlkDriver(drv)
        made.append((a, t))
        return a

    yield build
    for a, t in made:
        a.close()
        t.close()


async def concurrent_integrity(a: AsyncBlkDriver, seed: int, n: int = 300) -> None:
    rnd = random.Random(seed)
    blocks = {s: rnd.randbytes(SECTOR_SIZE * rnd.randint(1, 4)) for s in range(0, 4 * n, 4)}
    await asyncio.gather(*(a.write(s, b) for s, b in blocks.items()))
    got = await asyncio.gather(*(a.read(s, len(b)) for s, b in blocks.items()))
    assert got == list(blocks.values())


@pytest.mark.parametrize("packed", RING)
@pytest.mark.parametrize("threaded", [False, True], ids=["sync-kick", "eventfd"])
def test_many_concurrent_requests(make: Any, packed: bool, threaded: bool) -> None:
    dev = BlkDevice(MemoryBackend(DISK * 4), num_queues=2, queue_max_size=32)
    a = make(dev, threaded=threaded, ring=RingOptions(packed=packed))
    if threaded:
        assert a.driver.transport.interrupt_fds()
    asyncio.run(concurrent_integrity(a, 5))
    assert a.in_flight == 0
    assert dev.metrics.writes == 300 and dev.metrics.reads == 300


@pytest.mark.parametrize("threaded", [False, True], ids=["sync-kick", "eventfd"])
def test_every_request_type(make: Any, threaded: bool) -> None:
    dev = BlkDevice(MemoryBackend(DISK))
    a = make(dev, threaded=threaded)

    async def main() -> None:
        data = os.urandom(4 * SECTOR_SIZE)
        await a.write(8, data)
        assert await a.read(8, len(data)) == data
        await a.flush()
        assert await a.get_id() == b"pyvirtio"
        await a.discard(8, 1)
        await a.write_zeroes(9, 1, unmap=True)
        await a.write_zeroes(10, 1)
        assert await a.read(8, len(data)) == bytes(3 * SECTOR_SIZE) + data[3 * SECTOR_SIZE :]
        assert a.capacity == DISK // SECTOR_SIZE and not a.read_only and a.blk_size == 512

    asyncio.run(main())
    m = dev.metrics
    assert (m.flushes, m.get_ids, m.discards, m.write_zeroes) == (1, 1, 1, 2)


def test_kicks_are_batched(make: Any) -> None:
    """Requests submitted in one loop iteration share one notification."""
    dev = BlkDevice(MemoryBackend(DISK))
    a = make(dev)

    async def main() -> None:
        await asyncio.gather(*(a.read(i, SECTOR_SIZE) for i in range(20)))

    asyncio.run(main())
    assert dev.metrics.reads == 20
    assert dev.metrics.notifications < 20


def test_errors_propagate(make: Any) -> None:
    a = make()

    async def main() -> None:
        with pytest.raises(BlkIOError):
            await a.request(BlkReqType.IN, 10**9, in_len=512)
        with pytest.raises(BlkUnsupportedError):
            await a.request(77)
        with pytest.raises(ValueError):
            await a.read(0, 100)
        results = await asyncio.gather(
            a.read(0, 512), a.request(BlkReqType.OUT, 10**9, out=bytes(512)), return_exceptions=True
        )
        assert results[0] == bytes(512) and isinstance(results[1], BlkIOError)

    asyncio.run(main())


@pytest.mark.parametrize("threaded", [False, True], ids=["sync-kick", "eventfd"])
def test_waits_for_room_in_queue_and_memory(make: Any, threaded: bool) -> None:
    dev = BlkDevice(MemoryBackend(8 << 20), queue_max_size=4)
    a = make(dev, threaded=threaded, mem_size=1 << 20, max_request_bytes=64 << 10)
    free0 = a.driver.transport.allocator.free_bytes

    async def main() -> None:
        data = [os.urandom(64 << 10) for _ in range(40)]
        await asyncio.gather(*(a.write(i * 128, d) for i, d in enumerate(data)))
        got = await asyncio.gather(*(a.read(i * 128, 64 << 10) for i in range(40)))
        assert got == data

    asyncio.run(main())
    assert a.driver.transport.allocator.free_bytes == free0


class ResettingDevice(BlkDevice):
    def _serve(self, vq: DeviceVirtqueue, chain: DescriptorChain) -> int:
        raise DriverError("simulated device failure")


class SilentDevice(BlkDevice):
    def handle_queue(self, index: int) -> None:
        pass


@pytest.mark.parametrize("threaded", [False, True], ids=["sync-kick", "eventfd"])
def test_device_needs_reset_fails_all_requests(make: Any, threaded: bool) -> None:
    a = make(ResettingDevice(MemoryBackend(DISK)), threaded=threaded)

    async def main() -> None:
        results = await asyncio.gather(
            *(a.read(i, SECTOR_SIZE) for i in range(10)), return_exceptions=True
        )
        assert all(isinstance(r, QueueBrokenError) for r in results), results

    asyncio.run(main())
    assert a.in_flight == 0


def test_silent_device_times_out(make: Any) -> None:
    a = make(SilentDevice(MemoryBackend(DISK)), timeout=0.3)

    async def main() -> None:
        with pytest.raises(BlkTimeoutError):
            await a.read(0, SECTOR_SIZE)

    asyncio.run(main())


def test_create_and_close(make: Any) -> None:
    t = LoopbackTransport(BlkDevice(MemoryBackend(DISK)))
    try:
        a = AsyncBlkDriver.create(t, ring=RingOptions(packed=True))

        async def main() -> None:
            async with a:
                await a.write(0, bytes(512))

        asyncio.run(main())
        assert not a.driver.queues
    finally:
        t.close()
