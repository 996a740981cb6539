"""Device side of the split virtqueue (virtio-v1.2 §2.7), driven by raw ring writes
(for malformed drivers) and by :class:`SplitDriverQueue` (for well-formed ones)."""

from __future__ import annotations

import pytest

from pyvirtio.errors import DriverError, QueueBrokenError
from pyvirtio.memory import GuestAllocator, GuestMemory
from pyvirtio.spec.ring import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_USED_F_NO_NOTIFY,
)
from pyvirtio.testing import RawSplitRing
from pyvirtio.virtqueue.common import (
    MAX_INDIRECT_ENTRIES,
    QueueAddresses,
    QueueState,
    RingFeatures,
)
from pyvirtio.virtqueue.split import SplitDeviceQueue, SplitDriverQueue
from tests.virtqueue.helpers import INDIRECT, MEM_SIZE, NEXT, WRITE

DATA = 0x10000  # data buffers live from here on
TABLE = 0x8000  # indirect tables


class RawDriver(RawSplitRing):
    """The kit's hand-driven split ring, at fixed addresses (0x1000, 0x2000, 0x3000)."""

    def __init__(self, mem: GuestMemory, size: int = 8) -> None:
        super().__init__(mem, None, size, addrs=QueueAddresses(0x1000, 0x2000, 0x3000))


@pytest.fixture
def raw(mem: GuestMemory) -> RawDriver:
    return RawDriver(mem)


def device(raw: RawDriver, **kw: bool) -> SplitDeviceQueue:
    return SplitDeviceQueue(raw.mem, raw.size, raw.addrs, RingFeatures(**kw))


def expect_broken(q: SplitDeviceQueue, clause_part: str) -> DriverError:
    with pytest.raises(DriverError) as ei:
        q.pop()
    assert ei.value.clause is not None and clause_part in ei.value.clause
    assert q.broken and q.broken_reason is ei.value
    with pytest.raises(QueueBrokenError):
        q.pop()
    with pytest.raises(QueueBrokenError):
        q.flush()
    with pytest.raises(QueueBrokenError):
        q.has_available()
    with pytest.raises(QueueBrokenError):
        q.set_notification(True)
    return ei.value


# -- construction ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 3, 6, 65536, 32769])
def test_device_rejects_queue_size_not_power_of_2(raw: RawDriver, size: int) -> None:
    with pytest.raises(DriverError, match="power of 2"):
        SplitDeviceQueue(raw.mem, size, raw.addrs)


@pytest.mark.parametrize(
    "addrs",
    [
        QueueAddresses(0x1008, 0x2000, 0x3000),  # desc needs 16
        QueueAddresses(0x1000, 0x2001, 0x3000),  # avail needs 2
        QueueAddresses(0x1000, 0x2000, 0x3002),  # used needs 4
    ],
)
def test_device_rejects_misaligned_ring_part(mem: GuestMemory, addrs: QueueAddresses) -> None:
    """Driver MUST: "the physical address of the first byte of each virtqueue part is a
    multiple of the specified alignment value"."""
    with pytest.raises(DriverError, match="aligned") as ei:
        SplitDeviceQueue(mem, 8, addrs)
    assert ei.value.clause is not None and "§2.7.1" in ei.value.clause


@pytest.mark.parametrize(
    "addrs",
    [
        QueueAddresses(MEM_SIZE - 64, 0x2000, 0x3000),
        QueueAddresses(0x1000, MEM_SIZE - 10, 0x3000),
        QueueAddresses(0x1000, 0x2000, MEM_SIZE),
        QueueAddresses(0x1000, 0x2000, (1 << 64) - 16),
    ],
)
def test_device_rejects_ring_outside_guest_ram(mem: GuestMemory, addrs: QueueAddresses) -> None:
    with pytest.raises(DriverError, match="guest RAM"):
        SplitDeviceQueue(mem, 8, addrs)


def test_device_rejects_ring_straddling_regions() -> None:
    with (
        GuestMemory.create_layout([(0, 0x2000), (0x2000, 0x2000)]) as m,
        pytest.raises(DriverError, match="straddles"),
    ):
        SplitDeviceQueue(m, 8, QueueAddresses(0x1FC0, 0x3000, 0x3100))


# -- chain walking: well-formed ----------------------------------------------------------


def test_pop_empty_returns_none(raw: RawDriver) -> None:
    q = device(raw)
    assert q.pop() is None
    assert not q.has_available()
    assert q.in_flight == 0


def test_pop_direct_chain(raw: RawDriver) -> None:
    raw.desc(3, DATA, 10, NEXT, 5)
    raw.desc(5, DATA + 100, 20, NEXT, 0)
    raw.desc(0, DATA + 200, 30, WRITE | NEXT, 7)
    raw.desc(7, DATA + 300, 40, WRITE)
    raw.offer(3)
    q = device(raw)
    assert q.has_available()
    c = q.pop()
    assert c is not None
    assert c.id == 3
    assert c.readable == [(DATA, 10), (DATA + 100, 20)]
    assert c.writable == [(DATA + 200, 30), (DATA + 300, 40)]
    assert c.ndescs == 4
    assert q.in_flight == 1
    assert q.pop() is None


def test_zero_length_descriptors_are_accepted_and_skipped(raw: RawDriver) -> None:
    """The spec does not forbid zero-length descriptors; they produce no segment."""
    raw.desc(0, DATA, 0, NEXT, 1)
    raw.desc(1, DATA, 8, NEXT, 2)
    raw.desc(2, 0xFFFF_FFFF_FFFF_0000, 0, WRITE | NEXT, 3)  # nowhere, but empty
    raw.desc(3, DATA + 64, 8, WRITE)
    raw.offer(0)
    c = device(raw).pop()
    assert c is not None
    assert c.readable == [(DATA, 8)] and c.writable == [(DATA + 64, 8)]
    assert c.ndescs == 4


def test_indirect_chain(raw: RawDriver) -> None:
    n = raw.table(
        TABLE,
        [(DATA, 16, NEXT, 1), (DATA + 16, 16, NEXT | WRITE, 2), (DATA + 32, 16, WRITE, 0)],
    )
    raw.desc(2, TABLE, n, INDIRECT)
    raw.offer(2)
    c = device(raw, indirect=True).pop()
    assert c is not None
    assert c.id == 2 and c.ndescs == 1
    assert c.readable == [(DATA, 16)]
    assert c.writable == [(DATA + 16, 16), (DATA + 32, 16)]


def test_indirect_table_next_order_is_followed(raw: RawDriver) -> None:
    n = raw.table(TABLE, [(DATA, 1, NEXT, 2), (DATA + 1, 2, 0, 0), (DATA + 2, 3, NEXT, 1)])
    raw.desc(0, TABLE, n, INDIRECT)
    raw.offer(0)
    c = device(raw, indirect=True).pop()
    assert c is not None and c.readable == [(DATA, 1), (DATA + 2, 3), (DATA + 1, 2)]


def test_device_handles_chained_descriptors_followed_by_indirect(raw: RawDriver) -> None:
    """Device MUST: "handle the case of zero or more normal chained descriptors followed
    by a single descriptor with flags&VIRTQ_DESC_F_INDIRECT"."""
    n = raw.table(TABLE, [(DATA + 100, 4, NEXT, 1), (DATA + 200, 8, WRITE, 0)])
    raw.desc(4, DATA, 12, NEXT, 6)
    raw.desc(6, TABLE, n, INDIRECT)
    raw.offer(4)
    c = device(raw, indirect=True).pop()
    assert c is not None
    assert c.readable == [(DATA, 12), (DATA + 100, 4)]
    assert c.writable == [(DATA + 200, 8)]
    assert c.ndescs == 2


def test_device_ignores_write_flag_on_indirect_table_descriptor(raw: RawDriver) -> None:
    """Device MUST: "ignore the write-only flag ... in the descriptor that refers to an
    indirect table"."""
    n = raw.table(TABLE, [(DATA, 4, NEXT, 1), (DATA + 16, 4, WRITE, 0)])
    raw.desc(1, DATA + 64, 4, NEXT, 0)  # readable before the table
    raw.desc(0, TABLE, n, INDIRECT | WRITE)
    raw.offer(1)
    c = device(raw, indirect=True).pop()
    assert c is not None
    assert c.readable == [(DATA + 64, 4), (DATA, 4)]


def test_indirect_table_spanning_two_regions() -> None:
    with GuestMemory.create_layout([(0, 0x10000), (0x10000, 0x10000)]) as m:
        raw = RawDriver(m)
        at = 0x10000 - 16
        n = raw.table(at, [(0x100, 4, NEXT, 1), (0x200, 4, WRITE, 0)])
        raw.desc(0, at, n, INDIRECT)
        raw.offer(0)
        c = device(raw, indirect=True).pop()
        assert c is not None and c.readable == [(0x100, 4)] and c.writable == [(0x200, 4)]


def test_buffer_spanning_two_regions_is_accepted() -> None:
    with GuestMemory.create_layout([(0, 0x10000), (0x10000, 0x10000)]) as m:
        raw = RawDriver(m)
        raw.desc(0, 0xFFF0, 0x20)
        raw.offer(0)
        c = device(raw).pop()
        assert c is not None and c.readable == [(0xFFF0, 0x20)]


# -- chain walking: malformed drivers -----------------------------------------------------


def test_device_rejects_descriptor_loop(raw: RawDriver) -> None:
    """Driver MUST NOT add a chain longer than 2^32 bytes: "loops ... are forbidden"."""
    raw.desc(0, DATA, 8, NEXT, 1)
    raw.desc(1, DATA, 8, NEXT, 0)
    raw.offer(0)
    expect_broken(device(raw), "§2.7.5.2")


def test_device_rejects_self_loop(raw: RawDriver) -> None:
    raw.desc(5, DATA, 0, NEXT, 5)
    raw.offer(5)
    expect_broken(device(raw), "§2.7.5.2")


def test_device_rejects_next_out_of_range(raw: RawDriver) -> None:
    raw.desc(0, DATA, 8, NEXT, 8)
    raw.offer(0)
    err = expect_broken(device(raw), "§2.7.5.2")
    assert "next 8" in err.message


def test_device_rejects_head_out_of_range(raw: RawDriver) -> None:
    raw.offer(8)
    err = expect_broken(device(raw), "§2.7.13")
    assert "head 8" in err.message


def test_device_rejects_indirect_without_feature(raw: RawDriver) -> None:
    """Driver MUST NOT set VIRTQ_DESC_F_INDIRECT unless VIRTIO_F_INDIRECT_DESC was
    negotiated."""
    n = raw.table(TABLE, [(DATA, 4, 0, 0)])
    raw.desc(0, TABLE, n, INDIRECT)
    raw.offer(0)
    expect_broken(device(raw, indirect=False), "Indirect Descriptors")


def test_device_rejects_indirect_inside_indirect(raw: RawDriver) -> None:
    """Driver MUST NOT set VIRTQ_DESC_F_INDIRECT within an indirect descriptor."""
    raw.table(TABLE + 0x100, [(DATA, 4, 0, 0)])
    n = raw.table(TABLE, [(DATA, 4, NEXT, 1), (TABLE + 0x100, 16, INDIRECT, 0)])
    raw.desc(0, TABLE, n, INDIRECT)
    raw.offer(0)
    err = expect_broken(device(raw, indirect=True), "§2.7.5.3.1")
    assert "within an indirect" in err.message


def test_device_rejects_indirect_with_next(raw: RawDriver) -> None:
    """Driver MUST NOT set both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT."""
    n = raw.table(TABLE, [(DATA, 4, 0, 0)])
    raw.desc(0, TABLE, n, INDIRECT | NEXT, 1)
    raw.desc(1, DATA, 4)
    raw.offer(0)
    err = expect_broken(device(raw, indirect=True), "§2.7.5.3.1")
    assert "both" in err.message


def test_device_rejects_indirect_table_of_zero_length(raw: RawDriver) -> None:
    raw.desc(0, TABLE, 0, INDIRECT)
    raw.offer(0)
    expect_broken(device(raw, indirect=True), "§2.7.5.3")


def test_device_rejects_indirect_table_length_not_multiple_of_16(raw: RawDriver) -> None:
    raw.table(TABLE, [(DATA, 4, 0, 0), (DATA, 4, 0, 0)])
    raw.desc(0, TABLE, 24, INDIRECT)
    raw.offer(0)
    expect_broken(device(raw, indirect=True), "§2.7.5.3")


def test_device_rejects_indirect_table_larger_than_cap(raw: RawDriver) -> None:
    raw.desc(0, DATA, 16 * (MAX_INDIRECT_ENTRIES + 1), INDIRECT)
    raw.offer(0)
    err = expect_broken(device(raw, indirect=True), "§2.7.5.3")
    assert "entries" in err.message


def test_device_rejects_indirect_table_outside_guest_ram(raw: RawDriver) -> None:
    raw.desc(0, MEM_SIZE - 16, 32, INDIRECT)
    raw.offer(0)
    expect_broken(device(raw, indirect=True), "§2.7.5")


def test_device_rejects_indirect_table_loop(raw: RawDriver) -> None:
    n = raw.table(TABLE, [(DATA, 4, NEXT, 1), (DATA, 4, NEXT, 0)])
    raw.desc(0, TABLE, n, INDIRECT)
    raw.offer(0)
    err = expect_broken(device(raw, indirect=True), "§2.7.5.2")
    assert "loops" in err.message


def test_device_rejects_indirect_next_outside_table(raw: RawDriver) -> None:
    n = raw.table(TABLE, [(DATA, 4, NEXT, 2), (DATA, 4, 0, 0)])
    raw.desc(0, TABLE, n, INDIRECT)
    raw.offer(0)
    expect_broken(device(raw, indirect=True), "§2.7.5.3")


@pytest.mark.parametrize(
    ("addr", "ln"),
    [(MEM_SIZE - 4, 8), (MEM_SIZE, 1), ((1 << 64) - 4, 8), ((1 << 64) - 1, 0xFFFF_FFFF)],
)
def test_device_rejects_buffer_outside_guest_ram(raw: RawDriver, addr: int, ln: int) -> None:
    raw.desc(0, DATA, 4, NEXT, 1)
    raw.desc(1, addr, ln, WRITE)
    raw.offer(0)
    err = expect_broken(device(raw), "§2.7.5")
    assert "not in guest RAM" in err.message


def test_device_rejects_indirect_entry_outside_guest_ram(raw: RawDriver) -> None:
    n = raw.table(TABLE, [(DATA, 4, NEXT, 1), ((1 << 64) - 2, 4, WRITE, 0)])
    raw.desc(0, TABLE, n, INDIRECT)
    raw.offer(0)
    expect_broken(device(raw, indirect=True), "§2.7.5")


def test_device_rejects_chain_longer_than_2_32_bytes() -> None:
    """Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total."""
    big = 0xFFFF_F000
    with GuestMemory.create_layout([(0, 0x10000), (1 << 33, big)]) as m:
        raw = RawDriver(m)
        raw.desc(0, 1 << 33, big, NEXT, 1)
        raw.desc(1, 1 << 33, 0x2000, WRITE)  # total 2^32 + 0x1000
        raw.offer(0)
        err = expect_broken(device(raw), "§2.7.5.2")
        assert "2^32" in err.message


def test_chain_of_exactly_2_32_bytes_passes() -> None:
    big = 0xFFFF_F000
    with GuestMemory.create_layout([(0, 0x10000), (1 << 33, big)]) as m:
        raw = RawDriver(m)
        raw.desc(0, 1 << 33, big, NEXT, 1)
        raw.desc(1, 1 << 33, 0x1000, WRITE)  # total exactly 2^32
        raw.offer(0)
        c = device(raw).pop()
        assert c is not None and c.readable_len + c.writable_len == 1 << 32


def test_device_rejects_readable_after_writable(raw: RawDriver) -> None:
    """Driver MUST place any device-writable descriptor elements after any
    device-readable descriptor elements."""
    raw.desc(0, DATA, 4, WRITE | NEXT, 1)
    raw.desc(1, DATA + 8, 4)
    raw.offer(0)
    expect_broken(device(raw), "§2.7.4.2")


def test_device_rejects_readable_after_writable_zero_length(raw: RawDriver) -> None:
    raw.desc(0, DATA, 4, WRITE | NEXT, 1)
    raw.desc(1, DATA + 8, 0)
    raw.offer(0)
    expect_broken(device(raw), "§2.7.4.2")


def test_device_rejects_readable_after_writable_inside_indirect(raw: RawDriver) -> None:
    n = raw.table(TABLE, [(DATA, 4, WRITE | NEXT, 1), (DATA + 8, 4, 0, 0)])
    raw.desc(0, TABLE, n, INDIRECT)
    raw.offer(0)
    expect_broken(device(raw, indirect=True), "§2.7.4.2")


def test_device_rejects_readable_in_indirect_after_writable_direct(raw: RawDriver) -> None:
    n = raw.table(TABLE, [(DATA + 8, 4, 0, 0)])
    raw.desc(0, DATA, 4, WRITE | NEXT, 1)
    raw.desc(1, TABLE, n, INDIRECT)
    raw.offer(0)
    expect_broken(device(raw, indirect=True), "§2.7.4.2")


def test_device_rejects_avail_idx_jump_beyond_queue_size(raw: RawDriver) -> None:
    raw.desc(0, DATA, 4)
    raw.set_avail_idx(raw.size + 1)
    q = device(raw)
    with pytest.raises(DriverError, match="ahead") as ei:
        q.has_available()
    assert q.broken and ei.value.clause is not None and "§2.7.13" in ei.value.clause
    with pytest.raises(QueueBrokenError):
        q.pop()


def test_device_rejects_avail_idx_decrement(raw: RawDriver) -> None:
    """Driver MUST NOT decrement the available idx (seen as a jump of ~65535)."""
    raw.desc(0, DATA, 4)
    raw.offer(0)
    q = device(raw)
    assert q.pop() is not None
    raw.set_avail_idx(0)
    expect_broken(q, "§2.7.13")


def test_avail_idx_exactly_queue_size_ahead_is_fine(raw: RawDriver) -> None:
    for i in range(raw.size):
        raw.desc(i, DATA + 16 * i, 4)
    raw.offer(*range(raw.size))
    q = device(raw)
    heads = []
    while (c := q.pop()) is not None:
        heads.append(c.id)
    assert heads == list(range(raw.size))


def test_device_rejects_head_offered_again_while_in_flight(raw: RawDriver) -> None:
    raw.desc(1, DATA, 4)
    raw.offer(1, 1)
    q = device(raw)
    assert q.pop() is not None
    err = expect_broken(q, "§2.7.13.1")
    assert "again" in err.message


def test_head_may_be_offered_again_after_use(raw: RawDriver) -> None:
    raw.desc(1, DATA, 4)
    raw.offer(1, 1)
    q = device(raw)
    c = q.pop()
    assert c is not None
    q.push(c, 0)
    q.flush()
    c2 = q.pop()
    assert c2 is not None and c2.id == 1


def test_in_order_device_rejects_non_sequential_next(raw: RawDriver) -> None:
    """With VIRTIO_F_IN_ORDER the driver MUST set next to x + 1 (0 at the table end)."""
    raw.desc(0, DATA, 4, NEXT, 2)
    raw.desc(2, DATA, 4)
    raw.offer(0)
    expect_broken(device(raw, in_order=True), "§2.7.5.2")


def test_in_order_wraps_next_at_table_end(raw: RawDriver) -> None:
    raw.desc(7, DATA, 4, NEXT, 0)
    raw.desc(0, DATA, 4, WRITE)
    raw.offer(7)
    c = device(raw, in_order=True).pop()
    assert c is not None and c.ndescs == 2


def test_in_order_device_rejects_non_sequential_indirect(raw: RawDriver) -> None:
    """With VIRTIO_F_IN_ORDER indirect descriptors MUST appear sequentially."""
    n = raw.table(TABLE, [(DATA, 4, NEXT, 2), (DATA, 4, 0, 0), (DATA, 4, NEXT, 1)])
    raw.desc(0, TABLE, n, INDIRECT)
    raw.offer(0)
    expect_broken(device(raw, in_order=True, indirect=True), "§2.7.5.3.1")


# -- used ring -------------------------------------------------------------------------


def offer_simple(raw: RawDriver, heads: list[int], wlen: int = 16) -> None:
    for h in heads:
        raw.desc(h, DATA + 0x100 * h, wlen, WRITE)
    raw.offer(*heads)


def test_push_flush_writes_used_ring(raw: RawDriver) -> None:
    offer_simple(raw, [2, 5])
    q = device(raw)
    a, b = q.pop(), q.pop()
    assert a is not None and b is not None
    q.push(b, 7)
    q.push(a, 16)
    assert q.in_flight == 0
    assert raw.used_idx == 0  # not published before flush
    assert q.flush() is True
    assert raw.used_idx == 2
    assert raw.used_elem(0) == (5, 7)
    assert raw.used_elem(1) == (2, 16)
    assert q.flush() is False  # nothing new
    assert q.get_state() == QueueState(avail_idx=2, used_idx=2)


def test_push_more_than_writable_is_value_error(raw: RawDriver) -> None:
    offer_simple(raw, [0], wlen=4)
    q = device(raw)
    c = q.pop()
    assert c is not None
    with pytest.raises(ValueError):
        q.push(c, 5)
    with pytest.raises(ValueError):
        q.push(c, -1)
    q.push(c, 4)
    with pytest.raises(ValueError, match="not in flight"):
        q.push(c, 4)  # twice
    assert not q.broken


def test_flush_honours_no_interrupt_flag(raw: RawDriver) -> None:
    offer_simple(raw, [0, 1])
    q = device(raw)
    a, b = q.pop(), q.pop()
    assert a is not None and b is not None
    raw.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    q.push(a, 0)
    assert q.flush() is False
    raw.set_avail_flags(0)
    q.push(b, 0)
    assert q.flush() is True


def test_flush_with_event_idx_uses_used_event(raw: RawDriver) -> None:
    offer_simple(raw, [0, 1, 2, 3])
    q = device(raw, event_idx=True)
    chains = [q.pop() for _ in range(4)]
    raw.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)  # MUST be ignored with event idx
    raw.set_used_event(5)
    q.push(chains[0], 0)  # type: ignore[arg-type]
    assert q.flush() is True  # first flush: no previous value known
    q.push(chains[1], 0)  # type: ignore[arg-type]
    assert q.flush() is False  # used idx 1 -> 2, event 5 not crossed
    raw.set_used_event(2)
    q.push(chains[2], 0)  # type: ignore[arg-type]
    assert q.flush() is True  # wrote entry 2 == used_event
    q.push(chains[3], 0)  # type: ignore[arg-type]
    assert q.flush() is False


def test_set_notification_without_event_idx(raw: RawDriver) -> None:
    q = device(raw)
    q.set_notification(False)
    assert raw.used_flags == VIRTQ_USED_F_NO_NOTIFY
    assert q.enable_notification() is False
    assert raw.used_flags == 0
    offer_simple(raw, [0])
    q.set_notification(False)
    assert q.enable_notification() is True


def test_set_notification_with_event_idx(raw: RawDriver) -> None:
    offer_simple(raw, [0, 1])
    q = device(raw, event_idx=True)
    q.set_notification(True)
    assert raw.used_flags == 0
    assert raw.avail_event == 0
    q.pop()
    assert raw.avail_event == 1  # follows the next index to pop while enabled
    q.set_notification(False)
    assert raw.used_flags == 0  # device MUST set flags to 0 with event idx
    assert raw.avail_event == 0  # behind: the driver never writes that entry again
    q.pop()
    assert raw.avail_event == 0


def test_resume_from_state(raw: RawDriver) -> None:
    raw.idx = 0xFFFE
    raw.desc(0, DATA, 4, WRITE)
    raw.desc(1, DATA, 4, WRITE)
    raw.offer(0, 1)
    raw.mem.write_le16(raw.addrs.device + 2, 0xFFFE)
    q = SplitDeviceQueue(
        raw.mem, raw.size, raw.addrs, state=QueueState(avail_idx=0xFFFE, used_idx=0xFFFE)
    )
    a, b = q.pop(), q.pop()
    assert a is not None and b is not None and (a.id, b.id) == (0, 1)
    q.push(a, 1)
    q.push(b, 2)
    q.flush()
    assert raw.used_idx == 0
    assert raw.used_elem(0xFFFE) == (0, 1) and raw.used_elem(0xFFFF) == (1, 2)
    assert q.get_state() == QueueState(avail_idx=0, used_idx=0)


# -- in-order ----------------------------------------------------------------------------


def test_in_order_batches_full_buffers(raw: RawDriver) -> None:
    offer_simple(raw, [0, 1, 2, 3])
    q = device(raw, in_order=True)
    cs = [q.pop() for _ in range(4)]
    for c in cs:
        assert c is not None
        q.push(c, 16 if c.id < 3 else 5)
    assert q.flush() is True
    assert raw.used_idx == 4
    assert raw.used_elem(0) == (3, 5)  # one element for the batch, at its first slot


def test_in_order_partial_buffers_get_their_own_element(raw: RawDriver) -> None:
    offer_simple(raw, [0, 1, 2, 3])
    q = device(raw, in_order=True)
    cs = [q.pop() for _ in range(4)]
    lens = [16, 3, 16, 16]
    for c, w in zip(cs, lens, strict=True):
        assert c is not None
        q.push(c, w)
    q.flush()
    assert raw.used_idx == 4
    # 0 and 1 each alone (1 is partial and not last); 2..3 batched, closed by 3
    assert raw.used_elem(0) == (0, 16)
    assert raw.used_elem(1) == (1, 3)
    assert raw.used_elem(2) == (3, 16)


def test_in_order_publishes_out_of_order_pushes_in_order(raw: RawDriver) -> None:
    offer_simple(raw, [0, 1, 2])
    q = device(raw, in_order=True)
    a, b, c = q.pop(), q.pop(), q.pop()
    assert a is not None and b is not None and c is not None
    q.push(b, 16)
    assert q.flush() is False  # 0 still in use: nothing can be published
    assert raw.used_idx == 0
    q.push(a, 2)
    assert q.flush() is True
    assert raw.used_idx == 2
    assert raw.used_elem(0) == (0, 2) and raw.used_elem(1) == (1, 16)
    q.push(c, 1)
    q.flush()
    assert raw.used_idx == 3 and raw.used_elem(2) == (2, 1)


# -- with our own driver ---------------------------------------------------------------


@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("in_order", [False, True])
def test_round_trip_with_split_driver(mem: GuestMemory, indirect: bool, in_order: bool) -> None:
    alloc = GuestAllocator(0x1000, MEM_SIZE - 0x1000)
    f = RingFeatures(indirect=indirect, in_order=in_order, event_idx=True)
    drv: SplitDriverQueue[int] = SplitDriverQueue(mem, alloc, 16, f)
    dev = SplitDeviceQueue(mem, 16, drv.addrs, f)
    for rnd in range(5):
        bufs = []
        for t in range(5):
            src = alloc.alloc(32)
            dst = alloc.alloc(32)
            mem.write(src, bytes([rnd * 16 + t]) * 32)
            drv.add([(src, 16), (src + 16, 16)], [(dst, 32)], t)
            bufs.append((src, dst))
        assert drv.kick_prepare() is True or rnd > 0
        while (c := dev.pop()) is not None:
            data = c.read_all(mem)
            dev.push(c, c.write_all(mem, data))
        dev.flush()
        got = []
        while (u := drv.get_used()) is not None:
            got.append(u)
        assert sorted(got) == [(t, 32) for t in range(5)]
        for t, (src, dst) in enumerate(bufs):
            assert mem.read(dst, 32) == bytes([rnd * 16 + t]) * 32
            alloc.free(src)
            alloc.free(dst)
        assert drv.num_free == 16


def test_in_order_head_offered_again_before_publication_is_rejected(raw: RawDriver) -> None:
    """In-order: a pushed but unpublished buffer is still the device's."""
    offer_simple(raw, [0, 1])
    raw.offer(1)
    q = device(raw, in_order=True)
    a, b = q.pop(), q.pop()
    assert a is not None and b is not None
    q.push(b, 0)  # waits for a: not published
    assert q.in_flight == 1
    err = expect_broken(q, "§2.7.13.1")
    assert "head 1" in err.message


def test_read_chain_and_adopt_resubmit_a_chain(raw: RawDriver) -> None:
    offer_simple(raw, [0, 3])
    q = device(raw, in_order=True)
    c = q.read_chain(3)  # recovered from elsewhere: the avail ring is not consumed
    assert c.id == 3 and c.writable == [(DATA + 0x300, 16)]
    q.adopt(c)
    assert q.in_flight == 1
    with pytest.raises(DriverError, match="adopted"):
        q.adopt(c)
    assert not q.broken
    first = q.pop()
    assert first is not None and first.id == 0
    q.push(first, 1)
    q.push(c, 2)
    q.flush()
    assert raw.used_elem(0) == (3, 2)  # in order: adopted chain first
    assert raw.used_elem(1) == (0, 1)


def test_read_chain_rejects_head_out_of_range(raw: RawDriver) -> None:
    q = device(raw)
    with pytest.raises(DriverError):
        q.read_chain(8)
    assert q.broken


@pytest.mark.parametrize("in_order", [False, True], ids=["any-order", "in-order"])
def test_device_rejects_head_offered_twice_before_its_use_is_published(
    raw: RawDriver, in_order: bool
) -> None:
    """A head pushed but not yet published is still the device's: the driver cannot
    have seen it used, so offering it again in the same batch breaks §2.7.13.1 ("the
    driver places a buffer into free descriptors only") - it must not be served twice."""
    raw.desc(0, DATA, 16, WRITE)
    raw.offer(0, 0)
    q = device(raw, in_order=in_order)
    chain = q.pop()
    assert chain is not None and chain.id == 0
    q.push(chain, 16)  # staged, not published: no flush yet
    expect_broken(q, "§2.7.13.1")
    assert raw.used_idx == 0  # nothing served twice


def test_a_head_published_used_may_be_offered_again(raw: RawDriver) -> None:
    raw.desc(0, DATA, 16, WRITE)
    raw.offer(0)
    q = device(raw)
    chain = q.pop()
    assert chain is not None
    q.push(chain, 16)
    q.flush()
    raw.offer(0)
    again = q.pop()
    assert again is not None and again.id == 0
