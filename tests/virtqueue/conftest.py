"""Fixtures the virtqueue tests share: memfd-backed guest RAM and an allocator in it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyvirtio.memory import GuestAllocator, GuestMemory
from tests.virtqueue.helpers import ALLOC_BASE, MEM_SIZE


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    """``MEM_SIZE`` bytes of guest RAM at guest-physical 0, closed after the test."""
    m = GuestMemory.create(MEM_SIZE)
    yield m
    m.close()


@pytest.fixture
def alloc() -> GuestAllocator:
    """An allocator over the guest RAM above ``ALLOC_BASE``."""
    return GuestAllocator(ALLOC_BASE, MEM_SIZE - ALLOC_BASE)
