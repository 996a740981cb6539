"""Shared helpers of the fuzz tests: hostile values, memory snapshots and diffs."""

from __future__ import annotations

import signal
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from hypothesis import strategies as st

from pyvirtio.memory.guest_memory import GuestMemory

#: Guest RAM of the ring fuzzers: two adjacent regions (a buffer may straddle them)
#: and a lone page further up, so "just outside" exists on every side.
LAYOUT = ((0x0, 0x10000), (0x10000, 0x8000), (0x100000, 0x1000))
RAM_END = 0x101000

#: Addresses at and around every edge of :data:`LAYOUT`, and absurd ones.
EDGE_ADDRS = (
    0x0,
    0x8,
    0xFFF0,
    0xFFF8,
    0x10000,
    0x17FF0,
    0x17FFF,
    0x18000,
    0x18008,
    0xFFFF8,
    0x100000,
    0x100FF0,
    0x100FFF,
    0x101000,
    0x7FFF_FFFF_FFFF_FFF0,
    0xFFFF_FFFF_FFFF_FFF0,
    0xFFFF_FFFF_FFFF_FFFF,
)
EDGE_LENS = (0, 1, 2, 8, 16, 17, 0x100, 0x1000, 0x8000, 0x10000, 0x18000, 0x8000_0000, 0xFFFF_FFFF)


def addresses() -> st.SearchStrategy[int]:
    """Guest-physical addresses biased towards the edges of guest RAM."""
    return st.one_of(
        st.sampled_from(EDGE_ADDRS),
        st.integers(0, RAM_END + 0x100),
        st.integers(0, (1 << 64) - 1),
    )


def lengths() -> st.SearchStrategy[int]:
    """Descriptor lengths (le32) biased towards small and huge values."""
    return st.one_of(st.sampled_from(EDGE_LENS), st.integers(0, 0x200), st.integers(0, 0xFFFF_FFFF))


def new_memory() -> GuestMemory:
    """Guest RAM laid out as :data:`LAYOUT`."""
    return GuestMemory.create_layout(list(LAYOUT))


def snapshot(mem: GuestMemory) -> list[bytes]:
    """A copy of every region's bytes."""
    return [bytes(r.view) for r in mem.regions]


def changed_ranges(mem: GuestMemory, before: Sequence[bytes]) -> list[tuple[int, int]]:
    """Guest-physical ``(start, end)`` ranges of bytes that differ from ``before``."""
    out: list[tuple[int, int]] = []
    chunk = 256
    for r, old in zip(mem.regions, before, strict=True):
        new = bytes(r.view)
        if new == old:
            continue
        for c in range(0, len(new), chunk):
            if new[c : c + chunk] == old[c : c + chunk]:
                continue
            for i in range(c, min(c + chunk, len(new))):
                if new[i] != old[i]:
                    a = r.guest_phys_addr + i
                    if out and out[-1][1] == a:
                        out[-1] = (out[-1][0], a + 1)
                    else:
                        out.append((a, a + 1))
    return out


def assert_changes_within(
    mem: GuestMemory, before: Sequence[bytes], allowed: Iterable[tuple[int, int]], what: str
) -> None:
    """Every byte that changed since ``before`` lies in one of the ``(addr, len)`` ranges."""
    spans = sorted((a, a + n) for a, n in allowed if n > 0)
    for lo, hi in changed_ranges(mem, before):
        pos = lo
        while pos < hi:
            end = max((b for a, b in spans if a <= pos < b), default=None)
            if end is None:
                raise AssertionError(f"{what} wrote guest byte {pos:#x}, outside {spans}")
            pos = end


def in_ram(mem: GuestMemory, addr: int, n: int) -> bool:
    """True if ``[addr, addr+n)`` lies in guest RAM (an independent check of the layout)."""
    return any(base <= addr and addr + n <= base + size for base, size in _merged(mem))


def _merged(mem: GuestMemory) -> Iterator[tuple[int, int]]:
    cur: list[int] | None = None
    for r in mem.regions:
        if cur is not None and cur[0] + cur[1] == r.guest_phys_addr:
            cur[1] += r.size
            continue
        if cur is not None:
            yield cur[0], cur[1]
        cur = [r.guest_phys_addr, r.size]
    if cur is not None:
        yield cur[0], cur[1]


class Hang(Exception):
    """A bounded operation did not finish in time."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread if the block runs longer than ``seconds``."""

    def fire(signum: int, frame: object) -> None:
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Like ``st.one_of`` with relative weights (``one_of`` folds repeated branches)."""
    total = sum(w for w, _ in choices)

    def pick(r: int) -> st.SearchStrategy[Any]:
        for w, s in choices:
            if r < w:
                return s
            r -= w
        raise AssertionError("unreachable")

    return st.integers(0, total - 1).flatmap(pick)
