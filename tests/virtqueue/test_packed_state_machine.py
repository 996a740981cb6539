"""Hypothesis state machine over a packed virtqueue: our driver queue and our device
queue share one GuestMemory, with random feature combinations (indirect, event idx,
in-order), random segment counts and sizes, and random interleavings of add / kick /
pop / push / flush / reap / reset / resume.

Checked: every buffer comes back exactly once with the device's answer intact; ring
accounting stays consistent; and notification decisions never lose a wakeup (when
the driver is told not to kick a sleeping device, the device has nothing to pop; when
the device is told not to interrupt a sleeping driver, the driver has nothing to reap).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from pyvirtio.errors import QueueFullError
from pyvirtio.memory import GuestAllocator, GuestMemory
from pyvirtio.virtqueue.common import DescriptorChain, RingFeatures, Segment
from pyvirtio.virtqueue.packed import PackedDeviceQueue, PackedDriverQueue

MEM_SIZE = 1 << 20
MODES = st.sampled_from(["full", "zero", "half"])
SIZES = st.lists(st.integers(1, 48), max_size=2)
#: what a device_work step does besides pop/push/flush: mostly nothing
EXTRA = st.sampled_from(["none"] * 10 + ["resume"] * 2 + ["reset"])


def pattern(token: int, index: int, n: int) -> bytes:
    """Deterministic readable contents of segment ``index`` of request ``token``."""
    return bytes((token * 31 + index * 7 + j) & 0xFF for j in range(n))


def answer(data: bytes, n: int) -> bytes:
    """What the model device writes back: the request reversed, padded with 0xA5."""
    return (data[::-1] + b"\xa5" * n)[:n]


@dataclass
class Request:
    token: int
    out: list[Segment]
    in_: list[Segment]
    data: bytes

    @property
    def key(self) -> int:
        return (self.out or self.in_)[0][0]

    @property
    def wlen(self) -> int:
        return sum(n for _, n in self.in_)


class PackedRingMachine(RuleBasedStateMachine):
    """Driver and device of one packed ring, each either awake or waiting for an event.

    Few, coarse rules (Hypothesis swarm testing disables random subsets of rules per
    example; with one rule per side both sides stay alive in most examples).
    """

    @initialize(
        size=st.integers(1, 9),
        indirect=st.booleans(),
        event_idx=st.booleans(),
        in_order=st.booleans(),
    )
    def setup(self, size: int, indirect: bool, event_idx: bool, in_order: bool) -> None:
        self.mem = GuestMemory.create(MEM_SIZE)
        self.alloc = GuestAllocator(0x1000, MEM_SIZE - 0x1000)
        self.size = size
        self.features = RingFeatures(indirect=indirect, event_idx=event_idx, in_order=in_order)
        self.drv: PackedDriverQueue[int] = PackedDriverQueue(
            self.mem, self.alloc, size, self.features
        )
        self.dev = PackedDeviceQueue(self.mem, size, self.drv.addrs, self.features)
        self.next_token = 0
        self.requests: dict[int, Request] = {}  # token -> request, until reaped
        self.by_key: dict[int, int] = {}  # first segment address -> token
        self.written: dict[int, int] = {}  # token -> bytes the device said it wrote
        self.popped: list[DescriptorChain] = []
        self.unflushed = 0
        self.reaped = 0
        # both sides start idle, waiting for the other
        assert self.dev.enable_notification() is False
        self.dev_asleep = True
        assert self.drv.enable_interrupts() is False
        self.drv_asleep = True

    # -- driver ------------------------------------------------------------------

    @rule(
        bufs=st.lists(st.tuples(SIZES, SIZES), max_size=3),
        kick=st.booleans(),
        reap=st.integers(0, 4),
    )
    def driver_work(self, bufs: list[tuple[list[int], list[int]]], kick: bool, reap: int) -> None:
        """Poll up to ``reap`` used buffers, add a few buffers, maybe kick."""
        for _ in range(reap):
            if not self.reap():
                break
        for out_sizes, in_sizes in bufs:
            self.add(out_sizes, in_sizes)
        if kick:
            self.kick()

    def add(self, out_sizes: list[int], in_sizes: list[int]) -> None:
        nseg = len(out_sizes) + len(in_sizes)
        if nseg == 0:
            with pytest.raises(ValueError):
                self.drv.add([], [], -1)
            return
        token = self.next_token
        self.next_token += 1
        out = [(self.alloc.alloc(n), n) for n in out_sizes]
        in_ = [(self.alloc.alloc(n), n) for n in in_sizes]
        data = b""
        for i, (addr, n) in enumerate(out):
            chunk = pattern(token, i, n)
            self.mem.write(addr, chunk)
            data += chunk
        for addr, n in in_:
            self.mem.fill(addr, n, 0xEE)
        need = 1 if self.features.indirect and nseg > 1 else nseg
        if need > self.size:
            with pytest.raises(ValueError):
                self.drv.add(out, in_, token)
        elif need > self.drv.num_free:
            with pytest.raises(QueueFullError):
                self.drv.add(out, in_, token)
        else:
            free_before = self.drv.num_free
            self.drv.add(out, in_, token)
            assert self.drv.num_free == free_before - need
            req = Request(token, out, in_, data)
            self.requests[token] = req
            self.by_key[req.key] = token
            return
        for addr, _ in out + in_:
            self.alloc.free(addr)

    def kick(self) -> None:
        kicked = self.drv.kick_prepare()
        if self.dev_asleep:
            if kicked:
                self.dev_asleep = False
                self.dev.set_notification(False)
            else:
                # no lost wakeup: the sleeping device has nothing to take
                assert not self.dev.has_available()

    def reap(self) -> bool:
        """Poll for a used buffer (a sleeping driver wakes up to poll)."""
        if self.drv_asleep:
            self.drv_asleep = False
            self.drv.disable_interrupts()
        used = self.drv.get_used()
        if used is None:
            if self.drv.enable_interrupts():
                self.drv.disable_interrupts()
            else:
                self.drv_asleep = True
            return False
        token, length = used
        assert token in self.requests, f"token {token} returned twice or never added"
        req = self.requests.pop(token)
        del self.by_key[req.key]
        assert length == self.written.pop(token)
        got = b"".join(self.mem.read(a, n) for a, n in req.in_)
        assert got[:length] == answer(req.data, length)
        assert got[length:] == b"\xee" * (req.wlen - length)
        for addr, _ in req.out + req.in_:
            self.alloc.free(addr)
        self.reaped += 1
        return True

    # -- device ------------------------------------------------------------------

    @rule(
        pop=st.integers(0, 4),
        picks=st.lists(st.tuples(st.integers(0, 1 << 16), MODES), max_size=4),
        flush=st.booleans(),
        extra=EXTRA,
    )
    def device_work(self, pop: int, picks: list[tuple[int, str]], flush: bool, extra: str) -> None:
        """Pop up to ``pop`` buffers, complete some popped ones in any order, maybe flush."""
        for _ in range(pop):
            if not self.pop():
                break
        for which, mode in picks:
            if self.popped:
                self.push(which, mode)
        if flush:
            self.flush()
        if extra == "resume" and self.dev.in_flight == 0 and self.unflushed == 0:
            self.resume()
        elif extra == "reset":
            self.reset()

    def pop(self) -> bool:
        """Take an available buffer (a sleeping device wakes up to poll)."""
        if self.dev_asleep:
            self.dev_asleep = False
            self.dev.set_notification(False)
        chain = self.dev.pop()
        if chain is None:
            if self.dev.enable_notification():
                self.dev.set_notification(False)
            else:
                self.dev_asleep = True
            return False
        token = self.by_key[(chain.readable or chain.writable)[0][0]]
        req = self.requests[token]
        assert chain.readable == req.out and chain.writable == req.in_
        nseg = len(req.out) + len(req.in_)
        assert chain.ndescs == (1 if self.features.indirect and nseg > 1 else nseg)
        self.popped.append(chain)
        return True

    def push(self, which: int, mode: str) -> None:
        chain = self.popped.pop(which % len(self.popped))
        wlen = chain.writable_len
        written = {"full": wlen, "zero": 0, "half": wlen // 2}[mode]
        data = chain.read_all(self.mem)
        assert chain.write_all(self.mem, answer(data, written)) == written
        self.dev.push(chain, written)
        token = self.by_key[(chain.readable or chain.writable)[0][0]]
        self.written[token] = written
        self.unflushed += 1

    def flush(self) -> None:
        notify = self.dev.flush()
        self.unflushed = 0
        if self.drv_asleep:
            if notify:
                self.drv_asleep = False
                self.drv.disable_interrupts()
            else:
                # no lost interrupt: the sleeping driver has nothing to reap
                assert not self.drv.enable_interrupts()

    def resume(self) -> None:
        """Stop the device and start a new one at the saved ring position."""
        state = self.dev.get_state()
        self.dev = PackedDeviceQueue(
            self.mem, self.size, self.drv.addrs, self.features, state=state
        )
        self.dev.set_notification(self.dev_asleep)

    def reset(self) -> None:
        """Device reset: the driver takes every buffer back and starts over."""
        tokens = self.drv.detach_unused()
        assert sorted(tokens) == sorted(self.requests)
        for req in self.requests.values():
            for addr, _ in req.out + req.in_:
                self.alloc.free(addr)
        self.requests.clear()
        self.by_key.clear()
        self.written.clear()
        self.popped.clear()
        self.unflushed = 0
        self.dev = PackedDeviceQueue(self.mem, self.size, self.drv.addrs, self.features)
        assert self.dev.enable_notification() is False
        self.dev_asleep = True
        assert self.drv.enable_interrupts() is False
        self.drv_asleep = True

    # -- invariants --------------------------------------------------------------

    @invariant()
    def accounting(self) -> None:
        assert self.dev.in_flight == len(self.popped)
        assert 0 <= self.drv.num_free <= self.size
        assert not self.drv.broken and not self.dev.broken

    def teardown(self) -> None:
        if not hasattr(self, "mem"):
            return
        try:
            # drain through the checked helpers: every outstanding buffer comes back once
            for _ in range(2 * self.size + 4):
                if not self.requests:
                    break
                self.kick()
                while self.pop():
                    pass
                while self.popped:
                    self.push(0, "full")
                self.flush()
                while self.reap():
                    pass
            assert not self.requests, f"buffers never came back: {sorted(self.requests)}"
            assert self.drv.num_free == self.size
        finally:
            self.drv.close()
            self.mem.close()


TestPackedRing = PackedRingMachine.TestCase
TestPackedRing.settings = settings(max_examples=60, stateful_step_count=80, deadline=None)
