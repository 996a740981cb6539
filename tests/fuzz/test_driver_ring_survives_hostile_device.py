"""Driver-side rings against a hostile device that writes anything into the rings.

Property (the quality bar's driver clause): whatever the device writes into the used
ring / used descriptors / event structures, the driver queue only raises
``DeviceError`` (marking itself broken) or ``QueueBrokenError``; no token is ever
handed back twice (by ``get_used`` or ``detach_unused``); a returned length never
exceeds the buffer's device-writable part; draining ``get_used`` ends after at most
one call per buffer in flight; and ``get_used`` writes nothing but the driver's own
ring areas.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyvirtio.errors import DeviceError, DriverError, QueueBrokenError, QueueFullError
from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.spec.ring import split_avail_size, split_desc_table_size, split_used_size
from pyvirtio.virtqueue.common import (
    DescriptorChain,
    DeviceVirtqueue,
    DriverVirtqueue,
    RingFeatures,
)
from pyvirtio.virtqueue.packed.device import PackedDeviceQueue
from pyvirtio.virtqueue.packed.driver import PackedDriverQueue
from pyvirtio.virtqueue.split.device import SplitDeviceQueue
from pyvirtio.virtqueue.split.driver import SplitDriverQueue
from tests.fuzz._support import (
    assert_changes_within,
    new_memory,
    snapshot,
    time_limit,
    weighted,
)

_ELEM = struct.Struct("<II")
_PDESC = struct.Struct("<QIHH")  # addr, len, id, flags
_U16 = struct.Struct("<H")
F_WRITE, F_AVAIL, F_USED = 2, 1 << 7, 1 << 15
#: data buffers the driver hands out live here; rings and tables come from the allocator
DATA = 0x10000

u16 = st.one_of(st.integers(0, 20), st.integers(0, 0xFFFF))
u32 = st.one_of(st.integers(0, 0x2000), st.integers(0, 0xFFFF_FFFF))
segments = st.lists(st.integers(0, 0x800), min_size=0, max_size=4)
driver_ops = weighted(
    (6, st.tuples(st.just("add"), segments, segments)),
    (1, st.tuples(st.just("kick"))),
    (2, st.tuples(st.just("drain"))),
    (2, st.tuples(st.just("get"))),
    (1, st.tuples(st.just("irq"), st.booleans())),
)
# a plausible device (pyvirtio's own device queue) pops and completes some buffers
serve_op = st.tuples(
    st.just("serve"),
    st.integers(0, 4),
    st.integers(0, 4),
    st.integers(0, 1 << 16),
    st.floats(0, 1),
)
device_ops = weighted(
    (20, serve_op),
    # arbitrary values anywhere the device may write
    (1, st.tuples(st.just("elem"), u16, u32, u32, u16)),
    (1, st.tuples(st.just("idx"), st.one_of(st.integers(0, 3), st.integers(0, 0xFFFF)))),
    (1, st.tuples(st.just("event"), u16, u16)),
    (1, st.tuples(st.just("raw"), st.integers(0, 600), st.binary(min_size=1, max_size=32))),
)
script = st.lists(weighted((1, driver_ops), (1, device_ops)), min_size=1, max_size=80)


class Harness:
    def __init__(self, packed: bool, size: int, feats: RingFeatures) -> None:
        self.mem = new_memory()
        self.alloc = GuestAllocator(0x1000, DATA - 0x1000)
        self.packed = packed
        self.size = size
        self.q: DriverVirtqueue[int]
        if packed:
            self.q = PackedDriverQueue(self.mem, self.alloc, size, feats)
            a = self.q.addrs
            self.areas = [(a.desc, 16 * size), (a.driver, 4), (a.device, 4)]
        else:
            self.q = SplitDriverQueue(self.mem, self.alloc, size, feats)
            a = self.q.addrs
            self.areas = [
                (a.desc, split_desc_table_size(size)),
                (a.driver, split_avail_size(size)),
                (a.device, split_used_size(size)),
            ]
        self.dq: DeviceVirtqueue | None = (PackedDeviceQueue if packed else SplitDeviceQueue)(
            self.mem, size, self.q.addrs, feats
        )
        self.held: list[DescriptorChain] = []
        self.next_token = 0
        self.wlen: dict[int, int] = {}  # token -> device-writable bytes
        self.returned: set[int] = set()

    def close(self) -> None:
        self.q.close()
        self.mem.close()

    def driver(self, op: tuple[Any, ...]) -> None:
        q = self.q
        kind = op[0]
        was_broken = q.broken
        try:
            if kind == "add":
                out = [(DATA + 0x800 * i, n) for i, n in enumerate(op[1])]
                in_ = [(DATA + 0x4000 + 0x800 * i, n) for i, n in enumerate(op[2])]
                if not out and not in_:
                    return
                token = self.next_token
                try:
                    q.add(out, in_, token)
                except (QueueFullError, ValueError):
                    return  # no room, or more segments than the queue takes (our misuse)
                self.next_token += 1
                self.wlen[token] = sum(n for _, n in in_)
            elif kind == "kick":
                q.kick_prepare()
            elif kind == "get":
                self.get()
            elif kind == "drain":
                # at most one answer per buffer in flight, then None (or an error)
                for _ in range(len(self.wlen) + 1):
                    if self.get() is None:
                        return
                raise AssertionError("get_used returned more buffers than were in flight")
            elif kind == "irq":
                if op[1]:
                    q.enable_interrupts()
                else:
                    q.disable_interrupts()
        except QueueBrokenError:
            assert was_broken
        except DeviceError as e:
            event(f"device error: {e.message[:40]}")
            assert q.broken, "a DeviceError must leave the queue marked broken"

    def get(self) -> tuple[int, int] | None:
        before = snapshot(self.mem)
        got = self.q.get_used()
        assert_changes_within(self.mem, before, self.areas, "get_used")
        if got is None:
            return None
        token, ln = got
        event("used buffer returned")
        assert token in self.wlen, f"token {token} returned twice (or never added)"
        assert 0 <= ln <= self.wlen.pop(token)
        self.returned.add(token)
        return got

    def serve(self, n_pop: int, n_push: int, pick: int, frac: float) -> None:
        dq = self.dq
        if dq is None:
            return
        try:
            for _ in range(n_pop):
                chain = dq.pop()
                if chain is None:
                    break
                self.held.append(chain)
            for _ in range(min(n_push, len(self.held))):
                chain = self.held.pop(pick % len(self.held))
                dq.push(chain, int(chain.writable_len * frac))
            dq.flush()
        except (DriverError, QueueBrokenError, ValueError):
            # the chaos ops below confused our device: from now on only chaos
            self.dq = None

    def device(self, op: tuple[Any, ...]) -> None:
        mem, size, a = self.mem, self.size, self.q.addrs
        kind = op[0]
        if kind == "serve":
            self.serve(*op[1:])
        elif kind == "elem":
            _, i, head, ln, flags = op
            if self.packed:
                mem.write(a.desc + 16 * (i % size), _PDESC.pack(0, ln, head & 0xFFFF, flags))
            else:
                mem.write(a.device + 4 + 8 * (i % size), _ELEM.pack(head, ln))
        elif kind == "idx":
            if not self.packed:
                used_idx = _U16.unpack(mem.read(a.device + 2, 2))[0]
                mem.write(a.device + 2, _U16.pack((used_idx + op[1]) & 0xFFFF))
        elif kind == "event":
            mem.write(a.device, _U16.pack(op[1]) + _U16.pack(op[2]))
        elif kind == "raw":
            # the device may write its own areas: used ring / descriptor ring / device event
            writable = [self.areas[0], self.areas[2]] if self.packed else [self.areas[2]]
            addr, n = writable[op[1] % len(writable)]
            off = op[1] % n
            mem.write(addr + off, op[2][: n - off])

    def finish(self) -> None:
        q = self.q
        self.driver(("drain",))
        tokens = q.detach_unused()
        for t in tokens:
            assert t in self.wlen, f"detach_unused handed back token {t} twice"
            del self.wlen[t]
        assert not self.wlen, f"tokens lost: {sorted(self.wlen)}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size_exp=st.integers(0, 4),
    feats=st.builds(RingFeatures, st.booleans(), st.booleans(), st.booleans()),
    ops=script,
)
def test_driver_ring_survives_any_device_writes(
    packed: bool, size_exp: int, feats: RingFeatures, ops: list[tuple[Any, ...]]
) -> None:
    h = Harness(packed, 1 << size_exp, feats)
    try:
        with time_limit(20):
            for op in ops:
                if op[0] in ("use", "elem", "idx", "event", "raw"):
                    h.device(op)
                else:
                    h.driver(op)
            h.finish()
    finally:
        h.close()
