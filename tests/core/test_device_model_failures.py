"""A device model that breaks its own contract is stopped, not allowed to crash."""

from __future__ import annotations

import pytest

from pyvirtio.core.device import VirtioDevice
from pyvirtio.memory import GuestAllocator, GuestMemory
from pyvirtio.spec.ids import DeviceId
from pyvirtio.testing import FakeHost
from pyvirtio.virtqueue import RingFeatures
from pyvirtio.virtqueue.common import USED_LEN_MAX, DeviceVirtqueue
from pyvirtio.virtqueue.packed import PackedDeviceQueue, PackedDriverQueue
from pyvirtio.virtqueue.split import SplitDeviceQueue, SplitDriverQueue


class Greedy(VirtioDevice):
    """Claims to have written more than every chain holds."""

    device_id = DeviceId.ENTROPY

    def specific_features(self) -> int:
        return 0

    def config_bytes(self) -> bytes:
        return b""

    def handle_queue(self, index: int) -> None:
        self.run_queue(index, lambda chain: chain.writable_len + 1)


@pytest.fixture(params=["split", "packed"])
def pair(request: pytest.FixtureRequest) -> tuple[object, DeviceVirtqueue, GuestMemory]:
    mem = GuestMemory.create(1 << 20)
    alloc = GuestAllocator(0x1000, (1 << 20) - 0x1000)
    if request.param == "split":
        drv: object = SplitDriverQueue(mem, alloc, 8, RingFeatures())
        dev: DeviceVirtqueue = SplitDeviceQueue(mem, 8, drv.addrs, RingFeatures())  # type: ignore[attr-defined]
    else:
        drv = PackedDriverQueue(mem, alloc, 8, RingFeatures())
        dev = PackedDeviceQueue(mem, 8, drv.addrs, RingFeatures())  # type: ignore[attr-defined]
    return drv, dev, mem


def test_device_model_bug_sets_needs_reset_instead_of_raising(pair: tuple) -> None:  # type: ignore[type-arg]
    drv, dev, _mem = pair
    drv.add([], [(0x8000, 64)], "t")
    drv.kick_prepare()
    host = FakeHost()
    model = Greedy(num_queues=1)
    model.host = host
    model.activate(0, [dev])
    model.handle_queue(0)  # must not raise
    assert len(host.resets) == 1 and dev.broken
    assert model.metrics.errors["device_error"] == 1


@pytest.mark.parametrize("fmt", ["split", "packed"])
def test_push_refuses_a_used_length_le32_cannot_hold(fmt: str) -> None:
    # a chain of exactly 2^32 bytes is legal ("MUST NOT add a descriptor chain longer
    # than 2^32 bytes"); a used length (le32) can say at most 2^32-1 of it
    mem = GuestMemory.create(1 << 31)  # sparse memfd
    alloc = GuestAllocator(0x1000, 0x10_0000)
    half = 1 << 30
    if fmt == "split":
        drv: object = SplitDriverQueue(mem, alloc, 8, RingFeatures())
        dev: DeviceVirtqueue = SplitDeviceQueue(mem, 8, drv.addrs, RingFeatures())  # type: ignore[attr-defined]
    else:
        drv = PackedDriverQueue(mem, alloc, 8, RingFeatures())
        dev = PackedDeviceQueue(mem, 8, drv.addrs, RingFeatures())  # type: ignore[attr-defined]
    drv.add([], [(half, half)] * 4, "big")  # type: ignore[attr-defined]
    drv.kick_prepare()  # type: ignore[attr-defined]
    chain = dev.pop()
    assert chain is not None and chain.writable_len == USED_LEN_MAX + 1
    with pytest.raises(ValueError):
        dev.push(chain, USED_LEN_MAX + 1)
    dev.push(chain, USED_LEN_MAX)
    dev.flush()
    assert drv.get_used() == ("big", USED_LEN_MAX)  # type: ignore[attr-defined]
    mem.close()
