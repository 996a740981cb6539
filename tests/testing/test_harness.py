"""pyvirtio.testing: the harness, raw rings and the framework's held-chain rules."""

from __future__ import annotations

import pytest

from pyvirtio.core.device import UNPOP, VirtioDevice
from pyvirtio.spec.ring import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from pyvirtio.testing import DeviceHarness, EchoDevice, HeldEchoDevice, RawPackedRing, RawSplitRing
from pyvirtio.virtqueue.common import DescriptorChain

NEXT = int(VIRTQ_DESC_F_NEXT)
WRITE = int(VIRTQ_DESC_F_WRITE)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_well_formed_requests_through_driver_queues(packed: bool) -> None:
    with DeviceHarness(EchoDevice(), packed=packed) as h:
        segs = h.add(0, [b"hel", b"lo"], [2, 3], token="t")
        h.kick(0)
        assert h.used(0) == [("t", 5)]
        assert b"".join(h.read(s) for s in segs) == b"hello"
        assert h.host.used == [0] and not h.needs_reset


def test_raw_split_ring_well_formed_and_looping_chain() -> None:
    with DeviceHarness(EchoDevice(), raw=True) as h:
        ring = h.raw[0]
        assert isinstance(ring, RawSplitRing)
        src, dst = h.put(b"abc"), h.buf(3)
        ring.desc(0, src, 3, NEXT, 1)
        ring.desc(1, dst, 3, WRITE)
        ring.offer(0)
        h.kick(0)
        assert ring.used() == [(0, 3)]
        assert h.mem.read(dst, 3) == b"abc"
        # a chain that loops back on itself: the device stops the queue and asks for
        # a reset instead of walking forever (virtio-v1.2 §2.7.5.2)
        ring.desc(2, src, 3, NEXT, 2)
        ring.offer(2)
        h.kick(0)
        assert ring.used() == []
        assert h.needs_reset and "§2.7.5.2" in str(h.host.resets[0])
        assert h.host.config == 1


def test_raw_packed_ring_bad_buffer_id() -> None:
    with DeviceHarness(EchoDevice(), packed=True, raw=True, queue_size=8) as h:
        ring = h.raw[0]
        assert isinstance(ring, RawPackedRing)
        src, dst = h.put(b"xy"), h.buf(2)
        ring.put(src, 2, 5, NEXT)
        ring.put(dst, 2, 5, WRITE)
        h.kick(0)
        assert ring.used([2]) == [(5, 2)]
        ring.put(dst, 2, 99, WRITE)  # Buffer ID beyond the queue size
        h.kick(0)
        assert h.needs_reset and "§2.8" in str(h.host.resets[0])


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_held_chains_are_answered_from_host_events_via_poll(packed: bool) -> None:
    dev = HeldEchoDevice()
    with DeviceHarness(dev, packed=packed) as h:
        h.add(0, [b"one"], [3], token=1)
        h.add(0, [b"two"], [3], token=2)
        h.kick(0)
        assert h.used(0) == [] and len(dev.held) == 2
        dev.command(b"n")
        assert h.poll(1.0) == 1
        assert h.used(0) == [(2, 3)]
        dev.command(b"o")
        h.poll(1.0)
        assert h.used(0) == [(1, 3)]
    dev.close()


def test_a_completion_after_reset_is_dropped_and_counted() -> None:
    dev = HeldEchoDevice()
    h = DeviceHarness(dev)
    h.add(0, [b"late"], [4], token=1)
    h.kick(0)
    item = dev.held[0]
    vq, chain = item
    h.close()  # resets the device: its queues are gone
    assert dev.complete(vq, chain, 4) is False
    assert dev.metrics.errors["stale_completion"] == 1
    dev.close()


class Picky(VirtioDevice):
    """Takes a request only once ``ready`` is set; until then it gives it back."""

    device_id = 63

    def __init__(self) -> None:
        super().__init__(1)
        self.ready = False
        self.seen: list[int] = []

    def specific_features(self) -> int:
        return 0

    def config_bytes(self) -> bytes:
        return b""

    def handle_queue(self, index: int) -> None:
        vq = self.queues[index]
        assert vq is not None

        def take(chain: DescriptorChain) -> int:
            self.seen.append(chain.id)
            if not self.ready:
                return UNPOP
            return chain.write_all(vq.mem, b"ok")

        self.run_queue(index, take)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("in_order", [False, True], ids=["any-order", "in-order"])
def test_unpop_gives_the_same_chain_back_first(packed: bool, in_order: bool) -> None:
    dev = Picky()
    with DeviceHarness(dev, packed=packed, in_order=in_order) as h:
        h.add(0, [], [2], token="a")
        h.add(0, [], [2], token="b")
        h.kick(0)
        h.kick(0)  # a second notification: the same chain is offered again, not "b"
        assert h.used(0) == [] and dev.seen[0] == dev.seen[1] and len(dev.seen) == 2
        dev.ready = True
        h.kick(0)
        assert h.used(0) == [("a", 2), ("b", 2)]
        assert not h.needs_reset
