"""BlkDriver and AsyncBlkDriver against a BlkDevice in another process (two-process
loopback): the device process opens the image file itself; data integrity against a
shadow copy, the asyncio driver on real interrupt eventfds, and a device that fails."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirtio.core.driver import RingOptions
from pyvirtio.devices.blk import BlkDevice, MemoryBackend
from pyvirtio.drivers.blk import AsyncBlkDriver, BlkDriver, BlkIOError
from pyvirtio.errors import DriverError, QueueBrokenError, VirtioError
from pyvirtio.spec.blk import SECTOR_SIZE, BlkReqType
from pyvirtio.transport.loopback_mp.driver_side import connect
from pyvirtio.virtqueue.common import DescriptorChain, DeviceVirtqueue
from tests.drivers.test_blk_driver import random_io

RING = [pytest.param(False, id="split"), pytest.param(True, id="packed")]
DISK = 512 * SECTOR_SIZE


class ResettingDevice(BlkDevice):
    """Signals DEVICE_NEEDS_RESET on the first request (built in the device process)."""

    def __init__(self) -> None:
        super().__init__(MemoryBackend(DISK))

    def _serve(self, vq: DeviceVirtqueue, chain: DescriptorChain) -> int:
        raise DriverError("simulated device failure")


class SilentDevice(BlkDevice):
    """Takes requests and never completes them (built in the device process)."""

    def __init__(self) -> None:
        super().__init__(MemoryBackend(DISK))

    def handle_queue(self, index: int) -> None:
        pass


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(random.Random(9).randbytes(DISK))
    return p


@pytest.fixture
def mp() -> Iterator[Any]:
    made: list[BlkDriver] = []

    def make(factory: Any, factory_kwargs: dict[str, Any] | None = None, **kw: Any) -> BlkDriver:
        drv = connect(BlkDriver, factory, factory_kwargs=factory_kwargs, **kw)
        made.append(drv)
        return drv

    yield make
    for d in made:
        d.close()
        d.transport.close()


@pytest.mark.parametrize("packed", RING)
def test_data_integrity_two_processes(mp: Any, image: Path, packed: bool) -> None:
    shadow = bytearray(image.read_bytes())
    drv = mp(
        BlkDevice.from_file,
        {"path": str(image), "num_queues": 2, "size_max": 4096, "seg_max": 6},
        ring=RingOptions(packed=packed),
        max_request_bytes=16384,
    )
    assert drv.transport.interrupt_fds()
    assert drv.num_request_queues == 2
    assert drv.capacity == DISK // SECTOR_SIZE
    random_io(drv, shadow, seed=11, ops=120)
    drv.flush()
    assert drv.read(0, DISK) == bytes(shadow)
    assert image.read_bytes() == bytes(shadow)
    assert drv.get_id() == b"pyvirtio"


def test_read_only_image_two_processes(mp: Any, image: Path) -> None:
    before = image.read_bytes()
    drv = mp(BlkDevice.from_file, {"path": str(image), "readonly": True})
    assert drv.read_only
    with pytest.raises(BlkIOError):
        drv.complete([drv.submit_request(BlkReqType.OUT, 0, out=bytes(512))])
    assert drv.read(0, 1024) == before[:1024]
    assert image.read_bytes() == before


@pytest.mark.parametrize("packed", RING)
def test_async_driver_two_processes(mp: Any, image: Path, packed: bool) -> None:
    drv = mp(
        BlkDevice.from_file, {"path": str(image), "num_queues": 3}, ring=RingOptions(packed=packed)
    )
    a = AsyncBlkDriver(drv)

    async def main() -> None:
        rnd = random.Random(4)
        blocks = {s: rnd.randbytes(SECTOR_SIZE * rnd.randint(1, 3)) for s in range(0, 480, 4)}
        await asyncio.gather(*(a.write(s, b) for s, b in blocks.items()))
        await a.flush()
        got = await asyncio.gather(*(a.read(s, len(b)) for s, b in blocks.items()))
        assert got == list(blocks.values())

    asyncio.run(main())
    assert a.in_flight == 0


def test_device_failure_two_processes_is_an_error_not_a_hang(mp: Any) -> None:
    drv = mp(ResettingDevice, timeout=10)
    reqs = [drv.submit_read(i, SECTOR_SIZE, kick=False) for i in range(4)]
    with pytest.raises(QueueBrokenError):
        drv.complete(reqs)
    assert all(isinstance(r.error, QueueBrokenError) for r in reqs)


def test_device_process_opens_the_image_itself(mp: Any, image: Path) -> None:
    drv = mp(BlkDevice.from_file, {"path": str(image)})
    data = os.urandom(2048)
    drv.write(3, data)
    drv.flush()
    with image.open("rb") as f:
        f.seek(3 * SECTOR_SIZE)
        assert f.read(2048) == data


def test_device_process_death_fails_requests(mp: Any) -> None:
    drv = mp(SilentDevice, timeout=10)
    reqs = [drv.submit_read(i, SECTOR_SIZE) for i in range(3)]
    proc = drv.transport.process
    assert proc is not None
    proc.popen.kill()
    proc.popen.wait()
    with pytest.raises(VirtioError):
        drv.complete(reqs)
    assert all(r.done and r.error is not None for r in reqs)
