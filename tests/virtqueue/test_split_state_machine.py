"""Hypothesis state machine: SplitDriverQueue and SplitDeviceQueue over one guest memory.

Random interleavings of add / kick / pop / push / flush / reap / notification toggles /
reset, with random ring features (indirect, event_idx, in_order), queue sizes and
segment layouts. Checked: every buffer comes back exactly once, with the length the
device reported and the data the device wrote (never past that length); the device
sees each chain exactly as added, in order; notification decisions never lose a
wake-up (a device or driver that re-enabled notifications and found nothing pending
is always notified of new work), and without VIRTIO_F_EVENT_IDX follow the flags
exactly; with VIRTIO_F_IN_ORDER buffers come back in the order they were added.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from pyvirtio.errors import QueueFullError
from pyvirtio.memory import GuestAllocator, GuestMemory
from pyvirtio.virtqueue.common import DescriptorChain, RingFeatures, Segment
from pyvirtio.virtqueue.split import SplitDeviceQueue, SplitDriverQueue

MEM_SIZE = 1 << 20
UNWRITTEN = 0xEE
#: a buffer's segment lengths (zero-length ones included) and how many are device-readable
segments = st.tuples(
    st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=4),
    st.integers(min_value=0, max_value=4),
)


@dataclass
class Buf:
    token: int
    out: list[Segment]
    in_: list[Segment]
    out_data: bytes
    need: int
    allocs: list[int] = field(default_factory=list)
    expected: bytes | None = None  # what the device wrote, once pushed


class SplitRingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mem = GuestMemory.create(MEM_SIZE)
        self.alloc = GuestAllocator(0x1000, MEM_SIZE - 0x1000)

    @initialize(
        size=st.sampled_from([2, 4, 8, 1]),
        indirect=st.booleans(),
        event_idx=st.booleans(),
        in_order=st.booleans(),
    )
    def setup(self, size: int, indirect: bool, event_idx: bool, in_order: bool) -> None:
        self.size = size
        self.f = RingFeatures(indirect=indirect, event_idx=event_idx, in_order=in_order)
        self.drv: SplitDriverQueue[int] = SplitDriverQueue(self.mem, self.alloc, size, self.f)
        self.next_token = 0
        self.interrupts = True
        self._fresh_device()

    def _fresh_device(self) -> None:
        self.dev = SplitDeviceQueue(self.mem, self.size, self.drv.addrs, self.f)
        self.bufs: dict[int, Buf] = {}  # added, not yet reaped
        self.unpopped: deque[int] = deque()
        self.popped: dict[int, DescriptorChain] = {}  # token -> chain, not pushed
        self.pushed: set[int] = set()
        self.added_since_kick = 0
        self.dev_notify = True
        self.device_waiting = False
        self.added_while_waiting = False
        self.driver_waiting = False
        self.published = 0
        self.reaped = 0
        self.last_reaped = -1

    def teardown(self) -> None:
        if hasattr(self, "drv"):
            for buf in self.bufs.values():
                self._free(buf)
            self.drv.close()
            # no leak: rings, indirect tables and buffers all went back
            assert self.alloc.free_bytes == MEM_SIZE - 0x1000
        self.mem.close()

    # -- driver ------------------------------------------------------------------------

    @rule(seg=segments)
    def add(self, seg: tuple[list[int], int]) -> None:
        lens, n_out = seg
        outs, ins = lens[:n_out], lens[n_out:]
        total = len(outs) + len(ins)
        need = 1 if self.f.indirect and total > 1 else total
        tok = self.next_token
        self.next_token += 1
        buf = Buf(tok, [], [], b"", need)
        data = bytearray()
        for n in outs:
            if n:
                a = self.alloc.alloc(n)
                buf.allocs.append(a)
                chunk = bytes((tok * 31 + a + i) & 0xFF for i in range(n))
                self.mem.write(a, chunk)
                data += chunk
                buf.out.append((a, n))
            else:
                buf.out.append((0x10, 0))
        for n in ins:
            if n:
                a = self.alloc.alloc(n)
                buf.allocs.append(a)
                self.mem.fill(a, n, UNWRITTEN)
                buf.in_.append((a, n))
            else:
                buf.in_.append((0x20, 0))
        buf.out_data = bytes(data)
        free_before = self.drv.num_free
        try:
            self.drv.add(buf.out, buf.in_, tok)
        except ValueError:
            assert total > self.size
            self._free(buf)
            return
        except QueueFullError:
            assert need > free_before
            self._free(buf)
            return
        assert 0 < total <= self.size and need <= free_before
        assert self.drv.num_free == free_before - need
        self.bufs[tok] = buf
        self.unpopped.append(tok)
        self.added_since_kick += 1
        if self.device_waiting:
            self.added_while_waiting = True

    def _free(self, buf: Buf) -> None:
        for a in buf.allocs:
            self.alloc.free(a)

    @rule(segs=st.lists(segments, min_size=1, max_size=4))
    def driver_round(self, segs: list[tuple[list[int], int]]) -> None:
        """Add a few buffers, then kick."""
        for seg in segs:
            self.add(seg)
        self.kick()

    @rule()
    def kick(self) -> None:
        kick = self.drv.kick_prepare()
        if not self.added_since_kick:
            assert not kick
        if self.device_waiting and self.added_while_waiting:
            assert kick, "lost available buffer notification"
        if not self.f.event_idx:
            assert kick == (self.dev_notify and self.added_since_kick > 0)
        if kick:
            self.device_waiting = False
            self.added_while_waiting = False
        self.added_since_kick = 0

    @rule()
    def reap(self) -> None:
        while (u := self.drv.get_used()) is not None:
            tok, ln = u
            assert tok in self.pushed, f"token {tok} returned but not used by the device"
            if self.f.in_order:
                assert tok > self.last_reaped
            self.last_reaped = tok
            buf = self.bufs.pop(tok)
            self.pushed.discard(tok)
            assert buf.expected is not None
            assert ln == len(buf.expected)
            got = b"".join(self.mem.read(a, n) for a, n in buf.in_)
            assert got[:ln] == buf.expected
            assert got[ln:] == bytes([UNWRITTEN]) * (len(got) - ln)
            self._free(buf)
            self.reaped += 1
        # nothing left to reap: with interrupts enabled the driver now waits for one
        self.driver_waiting = self.interrupts

    @rule(enable=st.booleans())
    def interrupts_toggle(self, enable: bool) -> None:
        if enable:
            self.enable_interrupts()
        else:
            self.disable_interrupts()

    def disable_interrupts(self) -> None:
        self.drv.disable_interrupts()
        self.interrupts = False
        self.driver_waiting = False

    def enable_interrupts(self) -> None:
        pending = self.drv.enable_interrupts()
        self.interrupts = True
        assert pending == (self.published > self.reaped)
        if not pending:
            self.driver_waiting = True

    # -- device ------------------------------------------------------------------------

    @rule()
    def pop(self) -> None:
        c = self.dev.pop()
        if not self.unpopped:
            assert c is None
            if self.dev_notify:
                self.device_waiting = True
                self.added_while_waiting = False
            return
        assert c is not None
        tok = self.unpopped.popleft()
        buf = self.bufs[tok]
        assert c.readable == [s for s in buf.out if s[1]]
        assert c.writable == [s for s in buf.in_ if s[1]]
        assert c.ndescs == buf.need
        self.popped[tok] = c
        self.device_waiting = False

    @rule(pick=st.integers(min_value=0), full=st.booleans(), frac=st.floats(0, 1))
    def push(self, pick: int, full: bool, frac: float) -> None:
        if not self.popped:
            return
        toks = sorted(self.popped)
        self._push(toks[pick % len(toks)], full, frac)

    def _push(self, tok: int, full: bool, frac: float) -> None:
        c = self.popped.pop(tok)
        wlen = c.writable_len
        n = wlen if full else int(wlen * frac)
        pattern = self.bufs[tok].out_data + bytes([tok & 0xFF]) * wlen
        payload = pattern[:n]
        assert c.read_all(self.mem) == self.bufs[tok].out_data
        assert c.write_all(self.mem, payload) == n
        self.dev.push(c, n)
        self.bufs[tok].expected = payload
        self.pushed.add(tok)

    @rule()
    def flush(self) -> None:
        before = self.dev.get_state().used_idx
        notify = self.dev.flush()
        moved = (self.dev.get_state().used_idx - before) & 0xFFFF
        self.published += moved
        if not moved:
            assert not notify
        if self.driver_waiting and moved:
            assert notify, "lost used buffer notification"
        if not self.f.event_idx and moved:
            assert notify == self.interrupts
        if notify:
            self.driver_waiting = False

    @rule(data=st.data())
    def device_round(self, data: st.DataObject) -> None:
        """Pop everything, use it in a random order (some in full), flush."""
        while self.unpopped:
            self.pop()
        if self.dev_notify:
            assert self.dev.pop() is None
            self.device_waiting = True
            self.added_while_waiting = False
        toks = data.draw(st.permutations(sorted(self.popped)))
        for tok in toks:
            self._push(tok, data.draw(st.booleans()), data.draw(st.floats(0, 1)))
        self.flush()

    @rule(mode=st.sampled_from(["off", "on", "enable"]))
    def notification(self, mode: str) -> None:
        if mode == "enable":
            self.enable_notification()
        else:
            self.set_notification(mode == "on")

    def set_notification(self, enable: bool) -> None:
        self.dev.set_notification(enable)
        self.dev_notify = enable
        self.device_waiting = False

    def enable_notification(self) -> None:
        more = self.dev.enable_notification()
        self.dev_notify = True
        assert more == bool(self.unpopped)
        self.device_waiting = not more
        self.added_while_waiting = False

    @rule(dice=st.integers(min_value=0, max_value=7))
    def reset(self, dice: int) -> None:
        """Now and then (one roll in eight): device reset, take back what is in flight."""
        if dice:
            return
        tokens = self.drv.detach_unused()
        assert sorted(tokens) == sorted(self.bufs)
        if self.f.in_order:
            assert tokens == sorted(tokens)
        for buf in self.bufs.values():
            self._free(buf)
        self._fresh_device()
        assert self.drv.num_free == self.size

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def counts(self) -> None:
        if not hasattr(self, "drv"):
            return
        assert self.dev.in_flight == len(self.popped)
        assert self.drv.num_free == self.size - sum(b.need for b in self.bufs.values())
        assert not self.dev.broken and not self.drv.broken


SplitRingMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSplitRing = SplitRingMachine.TestCase
