"""Device-side rings against a hostile driver that writes anything into a live queue.

Property (the quality bar's device clause): whatever bytes the driver puts in the
Descriptor Table / Available Ring / packed Descriptor Ring / event structures and
indirect tables, ``pop``/``push``/``flush`` only ever raise ``DriverError`` or
``QueueBrokenError``; a returned chain has every segment inside guest RAM, at most
2^32 bytes in total, its readable segments before its writable ones (checked against
an independent walk of the descriptors), and an id not already in flight; draining
without driver activity ends within a bounded number of pops; and queue operations
write only the device's own ring area, while a device model writing through
``DescriptorChain.write_all`` touches only the chain's writable segments.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from pyvirtio.errors import DriverError, QueueBrokenError
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.ring import (
    packed_desc_ring_size,
    split_avail_size,
    split_desc_table_size,
    split_used_size,
)
from pyvirtio.virtqueue.common import (
    DescriptorChain,
    DeviceVirtqueue,
    QueueAddresses,
    QueueState,
    RingFeatures,
)
from pyvirtio.virtqueue.packed.device import PackedDeviceQueue
from pyvirtio.virtqueue.split.device import SplitDeviceQueue
from tests.fuzz._support import (
    RAM_END,
    addresses,
    assert_changes_within,
    in_ram,
    lengths,
    new_memory,
    snapshot,
    time_limit,
)

DESC = 0x1000
DRIVER = 0x2000
DEVICE = 0x3000
#: indirect tables live here (64 entries), but a descriptor may point anywhere
TABLES = 0x4000
TABLE_SLOTS = 64

_SPLIT_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_PACKED_DESC = struct.Struct("<QIHH")  # addr, len, id, flags
_U16 = struct.Struct("<H")

F_NEXT, F_WRITE, F_INDIRECT, F_AVAIL, F_USED = 1, 2, 4, 1 << 7, 1 << 15

flags16 = st.one_of(
    st.integers(0, 0xFFFF),
    st.sets(st.sampled_from([F_NEXT, F_WRITE, F_INDIRECT, F_AVAIL, F_USED])).map(sum),
)
u16 = st.one_of(st.integers(0, 20), st.integers(0, 0xFFFF))

# A driver write is one of: a structured descriptor (ring or indirect area), an
# available ring entry / idx / flags / used_event, or raw bytes anywhere in an area.
good_segments = st.lists(
    st.tuples(
        st.one_of(*[st.integers(0x5000, 0x17000)] * 4, addresses()),
        st.one_of(*[st.integers(0, 0x1000)] * 4, lengths()),
        st.booleans(),
    ).map(lambda t: (t[0], t[1], t[2]) if t[1] < 0x1001 or t[0] < 0x18000 else t),
    min_size=1,
    max_size=6,
).map(lambda segs: sorted(segs, key=lambda t: t[2]))
# a plausible chain published the way a driver does, possibly with one field mutated
chain_ops = st.tuples(
    st.just("chain"),
    u16,  # first descriptor index (split) / nothing (packed)
    good_segments,
    st.booleans(),  # through an indirect table
    u16,  # Buffer ID (packed)
    st.one_of(
        st.none(), st.tuples(st.integers(0, 6), st.sampled_from(["flags", "next", "len", "addr"]))
    ),
    st.integers(0, 0xFFFF_FFFF),  # mutated value
)
driver_ops = st.one_of(
    chain_ops,
    chain_ops,
    chain_ops,
    st.tuples(st.just("desc"), u16, addresses(), lengths(), flags16, u16),
    st.tuples(
        st.just("table"), st.integers(0, TABLE_SLOTS - 1), addresses(), lengths(), flags16, u16
    ),
    st.tuples(st.just("avail"), u16, u16),
    st.tuples(st.just("idx"), st.one_of(st.integers(0, 4), st.integers(0, 0xFFFF))),
    st.tuples(st.just("flags"), u16),
    st.tuples(st.just("event"), u16, u16),
    st.tuples(
        st.just("raw"),
        st.sampled_from([DESC, DRIVER, DEVICE, TABLES]),
        st.integers(0, 300),
        st.binary(min_size=1, max_size=48),
    ),
)
device_ops = st.one_of(
    st.tuples(st.just("pop")),
    st.tuples(st.just("drain")),
    st.tuples(st.just("push"), st.integers(0, 1 << 16), st.floats(0, 1)),
    st.tuples(st.just("flush")),
    st.tuples(st.just("notify"), st.booleans()),
    st.tuples(st.just("has")),
)
ops = st.lists(st.one_of(driver_ops, device_ops, device_ops), min_size=1, max_size=60)
features = st.builds(RingFeatures, st.booleans(), st.booleans(), st.booleans())


# -- independent reference walks (only for chains the queue accepted) ------------------


def _split_reference(
    mem: GuestMemory, q: SplitDeviceQueue, head: int
) -> list[tuple[int, int, bool]]:
    """Descriptors of the chain at ``head`` in walk order: (addr, len, writable)."""
    out: list[tuple[int, int, bool]] = []
    i = head
    for _ in range(q.size):
        addr, ln, flags, nxt = _SPLIT_DESC.unpack(mem.read(DESC + 16 * i, 16))
        if flags & F_INDIRECT:
            n = ln // 16
            j = 0
            for _ in range(n):
                a, l2, f2, n2 = _SPLIT_DESC.unpack(mem.read(addr + 16 * j, 16))
                out.append((a, l2, bool(f2 & F_WRITE)))
                if not f2 & F_NEXT:
                    break
                j = n2
            return out
        out.append((addr, ln, bool(flags & F_WRITE)))
        if not flags & F_NEXT:
            return out
        i = nxt
    raise AssertionError(f"accepted chain at {head} is longer than the queue")


def _packed_reference(
    mem: GuestMemory, q: PackedDeviceQueue, pos: int
) -> list[tuple[int, int, bool]]:
    out: list[tuple[int, int, bool]] = []
    for _ in range(q.size):
        addr, ln, _id, flags = _PACKED_DESC.unpack(mem.read(DESC + 16 * pos, 16))
        if flags & F_INDIRECT:
            for j in range(ln // 16):
                a, l2, _i2, f2 = _PACKED_DESC.unpack(mem.read(addr + 16 * j, 16))
                out.append((a, l2, bool(f2 & F_WRITE)))
            return out
        out.append((addr, ln, bool(flags & F_WRITE)))
        if not flags & F_NEXT:
            return out
        pos = (pos + 1) % q.size
    raise AssertionError(f"accepted list at {pos} is longer than the queue")


# -- the harness ---------------------------------------------------------------------------


class Harness:
    def __init__(self, packed: bool, size: int, feats: RingFeatures, state: QueueState) -> None:
        self.mem = new_memory()
        self.packed = packed
        addrs = QueueAddresses(DESC, DRIVER, DEVICE)
        self.q: DeviceVirtqueue
        if packed:
            self.q = PackedDeviceQueue(self.mem, size, addrs, feats, state=state)
            self.own = [(DESC, packed_desc_ring_size(size)), (DEVICE, 4)]
            self.areas = {DESC: packed_desc_ring_size(size), DRIVER: 4, DEVICE: 4}
        else:
            self.q = SplitDeviceQueue(self.mem, size, addrs, feats, state=state)
            self.own = [(DEVICE, split_used_size(size))]
            self.areas = {
                DESC: split_desc_table_size(size),
                DRIVER: split_avail_size(size),
                DEVICE: split_used_size(size),
            }
        self.areas[TABLES] = TABLE_SLOTS * 16
        self.size = size
        self.drv_pos, self.drv_wrap = state.avail_idx, state.avail_wrap
        if not packed:
            self.mem.write(DRIVER + 2, _U16.pack(state.avail_idx & 0xFFFF))
        self.inflight: dict[int, DescriptorChain] = {}
        self.rng = random.Random(size)

    def close(self) -> None:
        self.mem.close()

    # driver side: plain writes into guest RAM
    def driver(self, op: tuple[Any, ...]) -> None:
        mem, size = self.mem, self.size
        kind = op[0]
        if kind == "desc":
            _, i, addr, ln, flags, nxt = op
            if self.packed:
                mem.write(DESC + 16 * (i % size), _PACKED_DESC.pack(addr, ln, nxt, flags))
            else:
                mem.write(DESC + 16 * (i % size), _SPLIT_DESC.pack(addr, ln, flags, nxt))
        elif kind == "table":
            _, i, addr, ln, flags, nxt = op
            fmt = _PACKED_DESC if self.packed else _SPLIT_DESC
            fields = (addr, ln, nxt, flags) if self.packed else (addr, ln, flags, nxt)
            mem.write(TABLES + 16 * i, fmt.pack(*fields))
        elif kind == "avail":
            if not self.packed:
                mem.write(DRIVER + 4 + 2 * (op[1] % size), _U16.pack(op[2]))
        elif kind == "idx":
            if not self.packed:
                old = _U16.unpack(mem.read(DRIVER + 2, 2))[0]
                mem.write(DRIVER + 2, _U16.pack((old + op[1]) & 0xFFFF))
        elif kind == "flags":
            if self.packed:
                mem.write(DRIVER + 2, _U16.pack(op[1]))
            else:
                mem.write(DRIVER, _U16.pack(op[1]))
        elif kind == "event":
            if self.packed:
                mem.write(DRIVER, _U16.pack(op[1]))
            else:
                mem.write(DRIVER + 4 + 2 * size, _U16.pack(op[1]))
        elif kind == "chain":
            self.publish(*op[1:])
        elif kind == "raw":
            _, area, off, data = op
            n = self.areas[area]
            off %= n
            mem.write(area + off, data[: n - off])

    def publish(
        self,
        first: int,
        segs: list[tuple[int, int, bool]],
        indirect: bool,
        bid: int,
        mutate: tuple[int, str] | None,
        value: int,
    ) -> None:
        size = self.size
        if indirect:
            segs = segs[:TABLE_SLOTS]
        elif len(segs) > size:
            segs = segs[:size]
        n = len(segs)
        rows: list[list[int]] = []  # addr, len, flags, next/id
        for k, (addr, ln, w) in enumerate(segs):
            fl = (F_WRITE if w else 0) | (
                F_NEXT if k + 1 < n and not (self.packed and indirect) else 0
            )
            rows.append([addr, ln, fl, k + 1 if indirect else 0])
        if mutate is not None:
            k, field = mutate
            row = rows[k % n]
            if field == "flags":
                row[2] = value & 0xFFFF
            elif field == "next":
                row[3] = value & 0xFFFF
            elif field == "len":
                row[1] = value
            else:
                row[0] = value
        if self.packed:
            self._publish_packed(rows, indirect, bid)
        else:
            self._publish_split(first, rows, indirect)

    def _publish_split(self, first: int, rows: list[list[int]], indirect: bool) -> None:
        mem, size = self.mem, self.size
        head = first % size
        if indirect:
            for k, (a, ln, fl, nx) in enumerate(rows):
                mem.write(TABLES + 16 * k, _SPLIT_DESC.pack(a, ln, fl, nx))
            mem.write(DESC + 16 * head, _SPLIT_DESC.pack(TABLES, 16 * len(rows), F_INDIRECT, 0))
        else:
            for k, (a, ln, fl, _nx) in enumerate(rows):
                i = (head + k) % size
                mem.write(DESC + 16 * i, _SPLIT_DESC.pack(a, ln, fl, (i + 1) % size))
        idx = _U16.unpack(mem.read(DRIVER + 2, 2))[0]
        mem.write(DRIVER + 4 + 2 * (idx % size), _U16.pack(head))
        mem.write(DRIVER + 2, _U16.pack((idx + 1) & 0xFFFF))

    def _publish_packed(self, rows: list[list[int]], indirect: bool, bid: int) -> None:
        mem, size = self.mem, self.size
        bid %= size
        if indirect:
            for k, (a, ln, fl, _nx) in enumerate(rows):
                mem.write(TABLES + 16 * k, _PACKED_DESC.pack(a, ln, 0, fl))
            rows = [[TABLES, 16 * len(rows), F_INDIRECT, 0]]
        pos, wrap = self.drv_pos, self.drv_wrap
        writes = []
        for a, ln, fl, _nx in rows:
            avail = (F_AVAIL if wrap else F_USED) if not fl & (F_AVAIL | F_USED) else 0
            writes.append((pos, _PACKED_DESC.pack(a, ln, bid, fl | avail)))
            pos += 1
            if pos == size:
                pos, wrap = 0, not wrap
        # the head is made available last
        for p, data in writes[1:]:
            mem.write(DESC + 16 * p, data)
        mem.write(DESC + 16 * writes[0][0], writes[0][1])
        self.drv_pos, self.drv_wrap = pos, wrap

    # device side: every call may only raise DriverError / QueueBrokenError
    def device(self, op: tuple[Any, ...]) -> None:
        q = self.q
        kind = op[0]
        before = snapshot(self.mem)
        was_broken = q.broken
        try:
            if kind == "pop":
                self.pop()
            elif kind == "drain":
                self.drain()
            elif kind == "push":
                if self.inflight:
                    keys = sorted(self.inflight)
                    chain = self.inflight.pop(keys[op[1] % len(keys)])
                    written = int(chain.writable_len * op[2])
                    data = bytes([0xA5]) * min(written, 0x20000)
                    wrote = chain.write_all(self.mem, data)
                    assert wrote == min(len(data), chain.writable_len)
                    assert_changes_within(self.mem, before, chain.writable, "write_all")
                    before = snapshot(self.mem)
                    q.push(chain, written)
            elif kind == "flush":
                q.flush()
            elif kind == "notify":
                q.set_notification(op[1])
            elif kind == "has":
                q.has_available()
        except QueueBrokenError:
            assert was_broken
        except DriverError as e:
            event(f"driver error: {e.message[:50]}")
            assert q.broken, "a DriverError must leave the queue marked broken"
        assert_changes_within(self.mem, before, self.own, f"{kind} of the device queue")

    def pop(self) -> DescriptorChain | None:
        q = self.q
        st_before = q.get_state()
        if self.packed:
            pos = st_before.avail_idx
        else:
            pos = _U16.unpack(self.mem.read(DRIVER + 4 + 2 * (st_before.avail_idx % self.size), 2))[
                0
            ]
        chain = q.pop()
        if chain is None:
            return None
        event(f"chain: {len(chain.readable)}r {len(chain.writable)}w nd={chain.ndescs}")
        self.check_chain(chain, pos)
        return chain

    def drain(self) -> None:
        # without driver activity the queue runs dry within a bounded number of pops
        # (in-flight ids block a replay; each pop consumes at least one slot)
        for _ in range(self.size + 1):
            if self.pop() is None:
                return
        raise AssertionError(f"{self.size + 1} pops without driver activity did not run dry")

    def check_chain(self, chain: DescriptorChain, pos: int) -> None:
        assert 0 <= chain.id < self.size
        assert chain.id not in self.inflight, f"id {chain.id} handed out twice"
        assert 1 <= chain.ndescs <= self.size
        total = 0
        for addr, n in [*chain.readable, *chain.writable]:
            assert n > 0
            assert in_ram(self.mem, addr, n), f"segment {addr:#x}+{n:#x} outside guest RAM"
            total += n
        assert total <= 1 << 32
        if self.packed:
            walk = _packed_reference(self.mem, self.q, pos)  # type: ignore[arg-type]
        else:
            walk = _split_reference(self.mem, self.q, pos)  # type: ignore[arg-type]
        nonzero = [(a, n, w) for a, n, w in walk if n]
        assert chain.readable == [(a, n) for a, n, w in nonzero if not w]
        assert chain.writable == [(a, n) for a, n, w in nonzero if w]
        flags = [w for _, _, w in nonzero]
        assert flags == sorted(flags), "a readable segment follows a writable one"
        self.inflight[chain.id] = chain


@pytest.mark.timeout(120)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size_exp=st.integers(0, 4),
    feats=features,
    start=st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.booleans(), st.booleans()),
    script=ops,
)
def test_device_ring_survives_any_driver_bytes(
    packed: bool,
    size_exp: int,
    feats: RingFeatures,
    start: tuple[int, int, bool, bool],
    script: list[tuple[Any, ...]],
) -> None:
    size = 1 << size_exp
    if packed:
        size = max(1, size - (start[0] & 1))  # packed sizes need not be powers of 2
        state = QueueState(start[0] % size, start[1] % size, start[2], start[3])
    else:
        state = QueueState(start[0], start[1])
    h = Harness(packed, size, feats, state)
    try:
        with time_limit(20):
            for op in script:
                if op[0] in ("pop", "drain", "push", "flush", "notify", "has"):
                    h.device(op)
                else:
                    h.driver(op)
            h.device(("drain",))
            while h.inflight:
                h.device(("push", 0, 1.0))
            h.device(("flush",))
    finally:
        h.close()


# biased so that a fair share of queues is constructed (sizes: any, or a power of 2;
# addresses: any, or 16-aligned in and around guest RAM; saved indexes: any, or small
# enough for a packed ring, or just below the 16-bit wrap)
placement_sizes = st.one_of(st.integers(0, 0x10000), st.integers(0, 16).map(lambda k: 1 << k))
placement_addrs = st.one_of(addresses(), st.integers(0, RAM_END >> 4).map(lambda a: a << 4))
placement_indexes = st.one_of(
    st.integers(0, 0x10000), st.integers(0, 3), st.integers(0xFFF0, 0x10000)
)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@settings(max_examples=150, deadline=None)
# found by hypothesis: a split queue resumed at avail_idx 1 over an Available Ring
# whose idx is still 0 (behind the device: a jump of 65535 in 16-bit arithmetic)
@example(size=1, desc=0, driver=0, device=0, state=(1, 0))
# the same queue resumed where the ring's idx is exactly Queue Size ahead: no error
@example(size=1, desc=0, driver=0, device=0, state=(0xFFFF, 0))
@given(
    size=placement_sizes,
    desc=placement_addrs,
    driver=placement_addrs,
    device=placement_addrs,
    state=st.tuples(placement_indexes, placement_indexes),
)
def test_ring_placement_is_validated_at_construction(
    packed: bool, size: int, desc: int, driver: int, device: int, state: tuple[int, int]
) -> None:
    """A queue either refuses its addresses with DriverError or has every area in RAM.

    A constructed queue then answers ``has_available`` from what guest RAM holds. A
    split queue resumed at a ``QueueState`` (vhost-user SET_VRING_BASE: ``avail_idx``
    is the next Available Ring index to read) compares it with the driver's avail
    ``idx`` in guest RAM, which may be anything: more than Queue Size ahead in 16-bit
    arithmetic (which includes any value behind the saved index, since ``idx`` only
    increments) is a DriverError citing virtio-v1.2 §2.7.13 that marks the queue broken;
    otherwise the answer is whether ``idx`` differs from the saved index. A packed queue
    checked its saved positions at construction and only reads a descriptor's flags.
    """
    mem = new_memory()
    try:
        cls = PackedDeviceQueue if packed else SplitDeviceQueue
        try:
            q = cls(mem, size, QueueAddresses(desc, driver, device), state=QueueState(*state))
        except DriverError:
            event("refused at construction")
            return
        if packed:
            areas = [(desc, 16 * size), (driver, 4), (device, 4)]
        else:
            areas = [
                (desc, split_desc_table_size(size)),
                (driver, split_avail_size(size)),
                (device, split_used_size(size)),
            ]
        for addr, n in areas:
            assert in_ram(mem, addr, n)
        if packed:
            event("packed: constructed")
            assert isinstance(q.has_available(), bool)
            assert not q.broken
            return
        ring_idx = _U16.unpack(mem.read(driver + 2, 2))[0]
        saved = state[0] & 0xFFFF
        if (ring_idx - saved) & 0xFFFF > size:
            event("split: ring idx more than Queue Size ahead of the saved index")
            with pytest.raises(DriverError, match="ahead") as ei:
                q.has_available()
            assert ei.value.clause is not None and "§2.7.13" in ei.value.clause
            assert q.broken, "a DriverError must leave the queue marked broken"
            with pytest.raises(QueueBrokenError):
                q.pop()
        else:
            event("split: ring idx within Queue Size of the saved index")
            assert q.has_available() == (ring_idx != saved)
            assert not q.broken
    finally:
        mem.close()
